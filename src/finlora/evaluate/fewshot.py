"""Few-shot baselines: the base model (no adapter) reads K labelled examples from the run's
training split, each in the run's own template with its label verbalised, before the sentence it
labels. Scoring is the usual label scoring; only the prompt grows.

In-context learning is what a tuned adapter has to beat for it to be worth training: a row of
`finlora eval RUN --few-shot K` next to the run's own."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finlora.data import Example
from finlora.data.prepare import PreparedData
from finlora.errors import FinloraError
from finlora.evaluate.classify import write_reports
from finlora.inference import LoadedRun, load_run
from finlora.metrics import classification_metrics
from finlora.models.loading import model_kind
from finlora.prompts import PromptTemplate
from finlora.runs import Run
from finlora.scoring import unwrap
from finlora.tasks.classify import LabelCodec

EXAMPLE_SEPARATOR = "\n\n"


def pick_examples(
    rows: Sequence[Example], k: int, seed: int, labels: Sequence[str]
) -> list[Example]:
    """K of `rows` spread over `labels` as evenly as the rows allow, drawn with `seed`.

    Each label gets K // len(labels) examples and the labels with most rows one more each for the
    remainder, so a prompt shows every label it can (a prompt of mostly one label teaches the
    model to answer it). A label with too few rows leaves its share to the others. The examples
    come in a shuffled order: labels grouped together would put the last label's next to every
    sentence. Texts repeated within the rows are offered once. Raises FinloraError when the rows
    hold fewer than K distinct texts.
    """
    by_label: dict[str, list[Example]] = {label: [] for label in labels}
    seen: set[str] = set()
    for row in rows:
        if row.label in by_label and row.text not in seen:
            seen.add(row.text)
            by_label[row.label].append(row)
    available = sum(len(v) for v in by_label.values())
    if k > available:
        raise FinloraError(
            f"--few-shot {k}: the run's training split has only {available} distinct labelled "
            "sentences"
        )
    # Round robin over the labels, most rows first (ties in label order), until K are taken.
    order = sorted(labels, key=lambda label: (-len(by_label[label]), list(labels).index(label)))
    quota = dict.fromkeys(labels, 0)
    while sum(quota.values()) < k:
        for label in order:
            if quota[label] < len(by_label[label]) and sum(quota.values()) < k:
                quota[label] += 1
    rng = random.Random(seed)
    picked = [row for label in labels for row in rng.sample(by_label[label], quota[label])]
    rng.shuffle(picked)
    return picked


@dataclass(frozen=True)
class FewShotTemplate(PromptTemplate):
    """The run's template with the rendered examples put before its prompt.

    The prefix is added after `{labels}` is filled in, so an example's own braces stay as
    written."""

    prefix: str = ""

    def parts(self, labels: list[str]) -> tuple[str, str]:
        before, after = super().parts(labels)
        return self.prefix + before, after


def render_examples(
    template: PromptTemplate, examples: Sequence[Example], labels: list[str]
) -> str:
    """Each example as the run's template renders it, its label verbalised after the prompt."""
    before, after = template.parts(labels)
    return "".join(
        f"{before}{e.text}{after}{template.verbalize(e.label)}{EXAMPLE_SEPARATOR}" for e in examples
    )


def check_few_shot(run: Run, trust_remote_code: bool = False) -> None:
    """Refuse a run whose base model cannot read examples in a prompt, before any model loads."""
    cfg = run.config
    if run.task != "classify":
        raise FinloraError(
            f"--few-shot: scores labels of a classification run; {run.root}'s task is {run.task}"
        )
    if model_kind(cfg.model.name, cfg.model.kind, trust_remote_code) == "encoder":
        raise FinloraError(
            f"--few-shot: {run.root} is an encoder run: its base model reads no prompt to put "
            "examples in (its labels come from the head the run trained)"
        )


def few_shot_examples(run: Run, k: int) -> list[Example]:
    """The run's K few-shot examples: from its training split, fixed by its seed."""
    data = run.prepared()
    if not isinstance(data, PreparedData):
        raise FinloraError(f"--few-shot: {run.root}'s task is {run.task}, not classify")
    train = [data.examples[i] for i in run.split.train]
    return pick_examples(train, k, run.config.seed, run.labels)


def few_shot_run(base: LoadedRun, examples: Sequence[Example]) -> LoadedRun:
    """`base` (a zero-shot load) scoring with the examples before every prompt.

    Its max_length grows by the examples' tokens, so each sentence keeps the room the run's own
    prompts give it and is cut where the tuned model's is; up to the model's context at most,
    past which a long sentence is cut shorter. Raises FinloraError when the examples leave no
    room for the sentence in that context."""
    codec = base.label_codec
    labels = list(codec.labels)
    template = FewShotTemplate(
        **dataclasses.asdict(codec.template),
        prefix=render_examples(codec.template, examples, labels),
    )
    own_before, _ = codec.prompt_ids
    before, _ = template.parts(labels)
    extra = len(codec.tokenizer(before, add_special_tokens=False)["input_ids"]) - len(own_before)
    max_length = max(codec.max_length, codec.max_length + extra)
    context = getattr(unwrap(base.model).config, "max_position_embeddings", None)
    if context is not None:
        max_length = min(max_length, context)
    try:
        few = LabelCodec(codec.tokenizer, template, labels, codec.kind, max_length)
    except FinloraError:
        raise FinloraError(
            f"--few-shot {len(examples)}: the examples take {extra} more tokens, which leaves no "
            f"room for the sentence in the model's context of {context}; give fewer examples"
        ) from None
    return dataclasses.replace(base, codec=few)


def load_few_shot(
    run: Run, k: int, *, trust_remote_code: bool = False
) -> tuple[LoadedRun, list[Example]]:
    """The run's base model with its K examples in every prompt, and those examples."""
    check_few_shot(run, trust_remote_code)
    examples = few_shot_examples(run, k)
    base = load_run(run, zero_shot=True, trust_remote_code=trust_remote_code)
    return few_shot_run(base, examples), examples


def evaluate_few_shot(
    run: Run, k: int, progress: bool = True, *, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The few-shot baseline on the run's own test split; reports under RUN/eval as
    few-shot-K-test.{json,txt}, its confusion matrix and reliability diagram.

    Returns the metrics dict with `data`, `few_shot` (K, the seed and the examples' sources)
    and `report_files` added."""
    loaded, examples = load_few_shot(run, k, trust_remote_code=trust_remote_code)
    description, rows = run.test_rows()
    probs = loaded.proba([e.text for e in rows], progress)
    predicted = [loaded.labels[i] for i in probs.argmax(1)]
    gold = [e.label for e in rows]
    metrics = classification_metrics(gold, predicted, probs, loaded.labels)
    metrics.update(
        {
            "data": description,
            "zero_shot": False,
            "few_shot": few_shot_record(run, examples),
            "synthetic": run.split.synthetic,
        }
    )
    stem = f"few-shot-{k}-test"
    title = f"{k}-shot base model: {stem}"
    metrics["report_files"] = write_reports(loaded, stem, metrics, probs, gold, title)
    return metrics


def few_shot_record(run: Run, examples: Sequence[Example]) -> dict[str, Any]:
    """What a report says of its few-shot examples: how many, the seed, and where each is from."""
    return {"k": len(examples), "seed": run.config.seed, "examples": [e.source for e in examples]}
