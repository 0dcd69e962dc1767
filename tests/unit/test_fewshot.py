"""Few-shot baselines: the example picker (stratified, from the rows given, fixed by the seed),
the prompt it builds with the run's template, and suite files read into sets."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from finlora.data import FPB_LABELS, Example
from finlora.errors import FinloraError
from finlora.evaluate.fewshot import (
    FewShotTemplate,
    few_shot_run,
    pick_examples,
    render_examples,
)
from finlora.evaluate.suite import ScoreRule, load_suite
from finlora.inference import LoadedRun
from finlora.prompts import PromptTemplate
from finlora.tasks.classify import LabelCodec

LABELS = list(FPB_LABELS)


def _rows(counts: dict[str, int]) -> list[Example]:
    return [
        Example(f"{label} sentence {i}", label, f"train.csv:{n}")
        for n, (label, i) in enumerate(
            (label, i) for label, count in counts.items() for i in range(count)
        )
    ]


def test_pick_examples_is_stratified_and_fixed_by_the_seed() -> None:
    rows = _rows({"negative": 10, "neutral": 60, "positive": 30})
    picked = pick_examples(rows, 5, seed=42, labels=LABELS)
    # K // 3 each; the remainder to the labels with most rows.
    assert Counter(e.label for e in picked) == {"neutral": 2, "positive": 2, "negative": 1}
    assert all(e in rows for e in picked)
    assert pick_examples(rows, 5, seed=42, labels=LABELS) == picked
    others = [pick_examples(rows, 5, seed=s, labels=LABELS) for s in range(1, 6)]
    assert any(o != picked for o in others)


def test_pick_examples_fills_from_other_labels_and_refuses_too_few() -> None:
    rows = _rows({"negative": 1, "neutral": 8, "positive": 3})
    picked = pick_examples(rows, 9, seed=0, labels=LABELS)
    assert Counter(e.label for e in picked) == {"negative": 1, "neutral": 5, "positive": 3}
    repeated = [*rows, Example(rows[0].text, rows[0].label, "train.csv:99")]
    with pytest.raises(FinloraError, match="only 12 distinct"):
        pick_examples(repeated, 13, seed=0, labels=LABELS)


def _codec(tokenizer_dir: Path, template: PromptTemplate, max_length: int = 64) -> LabelCodec:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return LabelCodec(tokenizer, template, LABELS, "causal", max_length)


def _loaded(codec: LabelCodec, context: int) -> LoadedRun:
    """A zero-shot load as few_shot_run reads it: a classification run, the model's context."""
    run: Any = SimpleNamespace(root=Path("tiny"), task="classify")
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
    return LoadedRun(run, model, codec, None, None, True)  # type: ignore[arg-type]


def test_few_shot_prompt_puts_the_examples_before_the_run_template(
    tiny_tokenizer_dir: Path,
) -> None:
    template = PromptTemplate.load("sentiment")
    examples = [Example("Sales rose {text}.", "positive"), Example("Costs fell.", "neutral")]
    base = _codec(tiny_tokenizer_dir, template)
    few = few_shot_run(_loaded(base, context=512), examples).label_codec
    decoded = base.tokenizer.decode(few.encode_text("Profit was flat."))
    prompt = "Financial news: {}\nSentiment (negative, neutral, positive):"
    assert decoded == (
        f"{prompt.format('Sales rose {text}.')} positive\n\n"
        f"{prompt.format('Costs fell.')} neutral\n\n"
        f"{prompt.format('Profit was flat.')}"
    )
    assert decoded.startswith(render_examples(template, examples, LABELS))
    assert isinstance(few.template, FewShotTemplate) and few.label_ids == base.label_ids
    # A long sentence keeps the room the run's own prompts give it.
    long = " ".join(["profit"] * 200)
    assert len(few.encode_text(long)) - len(base.encode_text(long)) == len(few.prompt_ids[0]) - len(
        base.prompt_ids[0]
    )


def test_few_shot_prompt_fits_the_model_context(tiny_tokenizer_dir: Path) -> None:
    base = _codec(tiny_tokenizer_dir, PromptTemplate.load("sentiment"))
    examples = [Example(f"Sales rose {i} percent in the quarter.", "positive") for i in range(2)]
    whole = few_shot_run(_loaded(base, context=512), examples).label_codec.max_length
    assert whole > base.max_length
    few = few_shot_run(_loaded(base, context=whole - 10), examples).label_codec
    assert few.max_length == whole - 10  # the sentence has 10 tokens less room
    with pytest.raises(FinloraError, match="--few-shot 2: .* give fewer examples"):
        few_shot_run(_loaded(base, context=whole - base.max_length), examples)


def test_score_rule_reads_scores_as_fingpt_does() -> None:
    rule = ScoreRule(-0.1, 0.1)
    labels = [rule.label("f:1", str(x)) for x in (-0.5, -0.1, 0.0, 0.0999, 0.1, 0.8)]
    assert labels == ["negative", "neutral", "neutral", "neutral", "positive", "positive"]
    with pytest.raises(FinloraError, match="f:2: score 'n/a' is not a number"):
        rule.label("f:2", "n/a")


def test_load_suite_reads_sets_and_names_the_field_at_fault(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        "sets:\n"
        "  - {name: tfns, path: a.csv, label_map: {0: negative, 1: positive, 2: neutral}}\n"
        "  - {name: fiqa, path: b.jsonl, label_column: score, score_thresholds: [-0.2, 0.3]}\n",
        encoding="utf-8",
    )
    suite = load_suite(path)
    assert suite.name == "s"
    tfns, fiqa = suite.sets
    assert tfns.label_map == "0=negative,1=positive,2=neutral"
    assert fiqa.score_rule == ScoreRule(-0.2, 0.3) and fiqa.label_column == "score"
    for body, message in [
        ("sets:\n  - {name: x, path: a.csv, colour: red}\n", "set 'x': unknown key 'colour'"),
        ("sets:\n  - {name: x, path: a.csv, format: xls}\n", "set 'x': format 'xls'"),
        ("sets:\n  - {name: x, path: a.csv, score_thresholds: [1, 0]}\n", "low < high"),
        ("sets:\n  - {name: x, path: a}\n  - {name: x, path: b}\n", "'x' appears more"),
        ("sets:\n  - {name: x}\n", "set 'x': path is still the placeholder 'null'"),
    ]:
        path.write_text(body, encoding="utf-8")
        with pytest.raises(FinloraError, match=message):
            load_suite(path)


def test_few_shot_template_is_the_run_template_with_a_prefix() -> None:
    template = PromptTemplate.load("sentiment")
    few = FewShotTemplate(**dataclasses.asdict(template), prefix="A {labels} B\n\n")
    before, after = few.parts(LABELS)
    # The examples' braces are left as written: {labels} is filled in the template alone.
    assert before.startswith("A {labels} B\n\nFinancial news: ")
    assert (before[len("A {labels} B\n\n") :], after) == template.parts(LABELS)
