"""Export: merge a run's adapter into its base model, write it out, and verify it.

A LoRA update B·A (times lora_alpha / r) added into W0 runs at no extra cost and leaves finlora:
  hf          a plain transformers checkpoint (safetensors, tokenizer, generation config, chat
              template, model card) that loads with neither finlora nor peft installed
  state_dict  the merged weights as one safetensors file
  gguf        one file for llama.cpp (Llama architecture), f16, q8_0, ..., with a README that
              gives the llama.cpp, llama-cpp-python and Ollama commands, and a Modelfile

Other tools' merges have been seen to export the base model unchanged, or a model whose outputs
differ from the adapter's. So every export is checked before it is moved into place: the adapter
must hold a non-zero update, the merge must change the weights, and the written model's logits
must match the adapter model's on sample prompts (and, for GGUF where llama-cpp-python is
installed, llama.cpp's predictions must agree with the Hugging Face model's). A failed check
leaves nothing at --out.

  recipe.py       export_run: the steps in order
  options.py      ExportOptions, Verification, ExportResult
  checks.py       checks before any work (a mergeable, non-empty adapter; a writable --out)
  load.py         the run's adapter model, loaded for export
  merge.py        the merge and its proof that weights changed
  writers.py      hf, state_dict and gguf writers, and the reloads the verification scores
  gguf_writer.py  a Llama model and its tokenizer as one GGUF file
  verify.py       the written model against the adapter model, by task
  classify.py     the classification check: label scores
  instruct.py     the instruct check: answer-token logits
  llama_cpp.py    scoring in llama.cpp, to check a GGUF
  records.py      finlora_export.json
  card.py         README.md, the model card (templates/model_card.md), for hf and gguf exports
  usage.py        how to use an export: scoring snippets, llama.cpp and Ollama commands, and
                  the Ollama Modelfile beside a GGUF (templates/)
"""

from finlora.export.checks import check_adapter_not_empty, check_mergeable, check_out
from finlora.export.options import (
    DTYPES,
    FORMATS,
    TOLERANCES,
    ExportOptions,
    ExportResult,
    Verification,
)
from finlora.export.recipe import export_run
from finlora.export.records import EXPORT_RECORD

__all__ = [
    "DTYPES",
    "EXPORT_RECORD",
    "FORMATS",
    "TOLERANCES",
    "ExportOptions",
    "ExportResult",
    "Verification",
    "check_adapter_not_empty",
    "check_mergeable",
    "check_out",
    "export_run",
]
