"""Shared fixtures: a tiny tokenizer and tiny models built from a config (no download), small
data files, and a config builder pointing at them. Nothing here ships inside the package."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from finlora.config import RunConfig, load_config
from finlora.data import FPB_LABELS, Example, synthetic_sentiment

PER_CLASS = 20  # FPB-format fixture rows per label (60 in all)


def _tokenizer_corpus() -> list[str]:
    prompt = "Financial news: Sentiment (negative, neutral, positive): negative neutral positive"
    # Repeating the prompt words makes " negative" etc. merge into one token each.
    return [e.text for e in synthetic_sentiment(200)] + [prompt] * 30


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 500) trained in-process on the synthetic sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(directory)
    return directory


def _tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _save_tiny(
    factory: pytest.TempPathFactory, name: str, build: Callable[[], Any], tokenizer: Any
) -> Path:
    """Build a model (seed 0) and save it as safetensors with the tokenizer beside it."""
    torch.manual_seed(0)
    directory = factory.mktemp(name)
    build().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_causal_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer Llama (hidden 32) saved as safetensors with the tiny tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(tiny_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return _save_tiny(tmp_path_factory, "tiny-llama", lambda: LlamaForCausalLM(config), tokenizer)


def _t5_sizes(tokenizer: Any) -> dict[str, Any]:
    """A 2-layer T5-family encoder-decoder (d_model 32) for the tiny tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 8,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }


@pytest.fixture(scope="session")
def tiny_seq2seq_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer T5 (d_model 32) saved as safetensors with the tiny tokenizer beside it."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _tokenizer(tiny_tokenizer_dir)
    config = T5Config(**_t5_sizes(tokenizer))
    return _save_tiny(
        tmp_path_factory, "tiny-t5", lambda: T5ForConditionalGeneration(config), tokenizer
    )


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer BERT encoder without a head (as MiniLM ships), with the tiny tokenizer."""
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer(tiny_tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_tiny(tmp_path_factory, "tiny-bert", lambda: BertModel(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_mt5_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A 2-layer mT5 (the mT0 family's architecture: gated-GELU, untied output head), saved the
    way a real mt0 checkout is: config.json naming MT5ForConditionalGeneration, safetensors."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    tokenizer = _tokenizer(tiny_tokenizer_dir)
    config = MT5Config(
        **_t5_sizes(tokenizer), feed_forward_proj="gated-gelu", tie_word_embeddings=False
    )
    return _save_tiny(
        tmp_path_factory, "tiny-mt5", lambda: MT5ForConditionalGeneration(config), tokenizer
    )


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> None:
    """One intra-op thread: tiny models gain nothing from more, and on a busy machine two
    spinning threads make a step 100x slower."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def fin_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FINLORA_HOME in a temporary directory, so no test writes to the user's cache."""
    home = tmp_path_factory.mktemp("finlora-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINLORA_HOME", str(home))
        yield home


def balanced_examples(per_class: int = PER_CLASS) -> list[Example]:
    """`per_class` synthetic sentences of each FPB label, in the synthetic set's order."""
    taken: dict[str, int] = dict.fromkeys(FPB_LABELS, 0)
    rows = []
    for example in synthetic_sentiment(400):
        if taken[example.label] < per_class:
            taken[example.label] += 1
            rows.append(example)
    return rows


@pytest.fixture(scope="session")
def fpb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 `sentence@label` lines, 20 of each label, in Financial PhraseBank format."""
    path = tmp_path_factory.mktemp("data") / "Sentences_tiny.txt"
    path.write_text("".join(f"{e.text}@{e.label}\n" for e in balanced_examples()), "utf-8")
    return path


@pytest.fixture(scope="session")
def csv_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CSV with columns headline and y (0/1/2 = negative/neutral/positive), 15 rows."""
    path = tmp_path_factory.mktemp("data") / "news.csv"
    codes = {label: str(i) for i, label in enumerate(FPB_LABELS)}
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "headline", "y"])
        for i, e in enumerate(balanced_examples(5)):
            writer.writerow([i, e.text, codes[e.label]])
    return path


# Small and fast: fp32 on the CPU, rank-4 LoRA, a few steps.
TINY_OVERRIDES = [
    "speed.threads=1",
    "train.epochs=2",  # the tiny fixture's steps (max_steps) span two epochs of its data
    "train.max_steps=4",
    "train.precision=fp32",
    "train.device=cpu",
    "train.batch_size=8",
    "speed.eval_batch_size=16",
    "train.log_every=1",
    "lora.r=4",
    "lora.lora_alpha=8",
    "data.test_fraction=0.2",
    "data.val_fraction=0.2",
]


@pytest.fixture(scope="session")
def tiny_overrides(tiny_causal_dir: Path, fpb_file: Path) -> list[str]:
    """`--set` overrides for a small run of the tiny causal model on the FPB fixture."""
    return [f"model.name={tiny_causal_dir}", f"data.path={fpb_file}", *TINY_OVERRIDES]


@pytest.fixture
def tiny_cfg(tiny_overrides: list[str]) -> Callable[..., RunConfig]:
    """Build a RunConfig on the tiny causal model and the FPB fixture; extra overrides win."""

    def build(*overrides: str, model: Path | None = None) -> RunConfig:
        chosen = [f"model.name={model}"] if model else []
        return load_config(None, [*tiny_overrides, *chosen, *overrides])

    return build


class _StopAfterCheckpoint(Exception):
    """Where a kill (or Ctrl-C) stops a run, in `stop_after_checkpoint`."""


@pytest.fixture
def stop_after_checkpoint(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], type[Exception]]:
    """`stop_after_checkpoint(step)`: the next training run stops right after writing its
    checkpoint of `step`, raising the exception returned; `monkeypatch.undo()` ends it."""
    import finlora.train as train_module

    def arm(step: int) -> type[Exception]:
        original = train_module._checkpoint

        def checkpoint_then_stop(run_dir: Any, loop: Any) -> None:
            original(run_dir, loop)
            if loop.progress.step == step:
                raise _StopAfterCheckpoint

        monkeypatch.setattr(train_module, "_checkpoint", checkpoint_then_stop)
        return _StopAfterCheckpoint

    return arm
