"""Export a trained FPB run three ways and check each on the run's whole test split.

.venv/bin/python benchmarks/export_check.py runs/fpb --out exports/fpb

hf (f32): its labels should equal the adapter model's on every test sentence; gguf f16 and q8_0:
llama.cpp's labels (llama-cpp-python, `pip install -e ".[llama]"`) should agree on >= 99% and
>= 97% of them. Prints one JSON object per export, as `finlora export --json` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finlora.errors import FinloraError
from finlora.export import ExportOptions, export_run

EXPORTS = [("hf", None, None), ("gguf", "f16", None), ("gguf", None, "q8_0")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("exports"))
    args = parser.parse_args()
    for fmt, dtype, quant in EXPORTS:
        out = args.out / f"{fmt}-{quant or dtype or 'f32'}"
        options = ExportOptions(fmt, out, dtype, quant, verify_n=None, overwrite=True)
        try:
            result = export_run(args.run, options, log=lambda m: print(m, file=sys.stderr))
        except FinloraError as exc:
            sys.exit(f"export_check: error: {exc}")
        print(json.dumps(result.to_dict()), flush=True)


if __name__ == "__main__":
    main()
