"""A Hugging Face Llama model and its tokenizer written as one GGUF file for llama.cpp.

The facts come from llama.cpp's own converter (`convert_hf_to_gguf.py`, class LlamaModel) and
its loader (`src/llama-vocab.cpp`); the code is ours and covers what finlora exports: the
Llama architecture with a byte-level BPE tokenizer, in f32, f16, bf16 or a numpy-quantizable
type such as q8_0 (gguf.quants).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType

from finlora.errors import FinloraError

TENSOR_TYPES: dict[str, tuple[QType, LlamaFileType]] = {
    "f32": (QType.F32, LlamaFileType.ALL_F32),
    "f16": (QType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": (QType.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (QType.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (QType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (QType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}

# llama.cpp pre-tokenizer names for the pre-tokenizers finlora can recognise in a tokenizer.json.
# "gpt-2" is GPT-2's regex alone; "smollm" (and others) first split every digit apart.
GPT2_PRE = "gpt-2"
DIGITS_THEN_GPT2_PRE = "smollm"


def write_llama_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    tensor_type: str = "f16",
    name: str = "finlora export",
    pre: str | None = None,
    description: str = "",
) -> int:
    """Write `model` (a transformers LlamaForCausalLM) and `tokenizer` to `path`.

    `tensor_type` is a key of TENSOR_TYPES; `pre` overrides the llama.cpp pre-tokenizer name
    (by default it is read off the tokenizer's own pre-tokenizer). Returns the tensor count.
    Raises FinloraError for a model or tokenizer this writer does not cover.
    """
    config = model.config
    _check_supported(config)
    qtype, file_type = TENSOR_TYPES[tensor_type]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    if description:
        writer.add_description(description)
    _add_hparams(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, config.vocab_size, pre)
    count = 0
    for gguf_name, array in _llama_tensors(model):
        data, raw_dtype = _encode(array, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


# ---- architecture -------------------------------------------------------------------------------


def _rope(config: Any) -> dict[str, Any]:
    # transformers 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/scaling.
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params.setdefault("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    params.setdefault("factor", scaling.get("factor"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _check_supported(config: Any) -> None:
    if config.model_type != "llama":
        raise FinloraError(
            f"GGUF export covers the Llama architecture; this model is {config.model_type!r} "
            "(export it with --format hf and convert with llama.cpp's convert_hf_to_gguf.py)"
        )
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ("default", "linear"):
        raise FinloraError(
            f"GGUF export: rope type {rope_type!r} is not supported (default, linear)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FinloraError(
            "GGUF export: Llama models with attention or MLP biases are not supported"
        )


def _head_dim(config: Any) -> int:
    return int(
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )


def _add_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    n_head = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder Q or K rows from Hugging Face's rotate-half layout to llama.cpp's.

    Hugging Face rotates the two halves of each head's dimensions against each other; llama.cpp
    (like Meta's original checkpoints) rotates adjacent pairs. Same numbers, other row order.
    """
    head_dim = weight.shape[0] // n_head
    return (
        weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:])  # (H, 2, D/2, ...)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _llama_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, fp32 array) for every weight, Q and K permuted, a tied head left out."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise FinloraError(f"GGUF export: tensor {hf_name} has no llama.cpp name")
        data = tensor.detach().float().cpu()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, n_kv_head)
        yield gguf_name, data.numpy()


def _encode(array: np.ndarray, qtype: QType) -> tuple[np.ndarray, QType | None]:
    """The bytes (or array) to store and their GGML type.

    Norm vectors stay f32, as llama.cpp's converter keeps them; a matrix whose rows do not fill
    whole quantization blocks falls back to f16.
    """
    if array.ndim == 1 or qtype == QType.F32:
        return array.astype(np.float32), None
    if qtype == QType.F16:
        return array.astype(np.float16), None
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block_size:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


# ---- tokenizer ----------------------------------------------------------------------------------


def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise FinloraError("GGUF export needs a fast (tokenizer.json) tokenizer")
    return dict(json.loads(backend.to_str()))


def _is_gpt2_byte_level(step: dict[str, Any] | None) -> bool:
    return step is not None and step.get("type") == "ByteLevel" and step.get("use_regex", True)


def detect_pre(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` entry.

    Raises FinloraError for one that llama.cpp would split differently.
    """
    if pre_tokenizer and _is_gpt2_byte_level(pre_tokenizer):
        return GPT2_PRE
    steps = (pre_tokenizer or {}).get("pretokenizers") or []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits")
        and _is_gpt2_byte_level(steps[1])
    ):
        return DIGITS_THEN_GPT2_PRE
    raise FinloraError(
        "GGUF export: the tokenizer's pre-tokenizer is not GPT-2 byte-level BPE "
        f"({json.dumps(pre_tokenizer)[:120]}); export with --format hf instead"
    )


def _token_list(
    data: dict[str, Any], tokenizer: Any, vocab_size: int
) -> tuple[list[str], list[gguf.TokenType]]:
    vocab: dict[str, int] = data["model"]["vocab"]
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise FinloraError(f"GGUF export: tokenizer ids reach {max(by_id)}, vocab is {vocab_size}")
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for i in range(vocab_size):
        if i not in by_id:
            # Rows of a padded embedding matrix that no text maps to.
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            special = added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merges(data: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 stores merges as pairs, older files as "a b" strings; GGUF wants strings.
    merges = data["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _add_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int, pre: str | None
) -> None:
    data = _backend_json(tokenizer)
    if data["model"].get("type") != "BPE":
        raise FinloraError(
            f"GGUF export: tokenizer model {data['model'].get('type')} is not BPE; "
            "export with --format hf instead"
        )
    tokens, types = _token_list(data, tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or detect_pre(data.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(data))
    special = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    for kind, token_id in special.items():
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    # llama.cpp adds BOS/EOS only where the Hugging Face tokenizer would.
    probe = list(tokenizer("a")["input_ids"])
    writer.add_add_bos_token(bool(probe) and probe[0] == special["bos"])
    writer.add_add_eos_token(bool(probe) and probe[-1] == special["eos"] and len(probe) > 1)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
