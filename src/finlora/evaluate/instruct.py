"""Evaluation of an instruct run: held-out perplexity, and generated answers against references.

- perplexity: exp of the mean cross-entropy over the reference answers' tokens (teacher-forced,
  the same target tokens training uses);
- BLEU and ROUGE-1/2/L of greedy answers against the reference answers;
- for records whose answer is a label: the share of answers naming exactly one valid label, and
  the share naming the right one.
Reports go to RUN_DIR/eval: the metrics (JSON, text), every answer beside its reference (JSONL),
and a histogram of per-answer ROUGE-L.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from finlora import atomic
from finlora.chat import prompt_budget
from finlora.data.instruct import InstructRecord, load_instruct
from finlora.evaluate.common import data_report_stem, report_title
from finlora.generate import GenerationOptions, generate_answers
from finlora.inference import LoadedRun
from finlora.plots import plot_score_histogram
from finlora.scoring import response_nll
from finlora.textmetrics import generation_metrics, label_answer_metrics, rouge_f1


def _test_records(loaded: LoadedRun, data_path: Path | None) -> tuple[str, str, list[Any]]:
    """(report stem, description, records): the run's test split, or every record of a file."""
    if data_path is not None:
        return data_report_stem(data_path), str(data_path), load_instruct(data_path)
    description, records = loaded.run.test_rows()
    return "test", description, records


def _perplexity(loaded: LoadedRun, records: list[InstructRecord]) -> tuple[float, int, int]:
    """Perplexity over the reference answers' tokens, how many tokens, and over how many
    records (one whose answer has no token within data.max_length has none to score)."""
    codec = loaded.instruct_codec
    features = [f for f in (codec.encode(r) for r in records) if f is not None]
    if not features:
        return math.nan, 0, 0
    nll, count = response_nll(
        loaded.model,
        codec,
        features,
        loaded.cfg.speed.eval_batch_size,
        loaded.device,
        loaded.dtype,
        loaded.cfg.speed.label_logits_only,
    )
    return math.exp(min(nll / count, 700.0)), count, len(features)


def evaluate_instruct(
    loaded: LoadedRun,
    data_path: Path | None = None,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure an instruct run (or its base model) and write its reports; returns the metrics."""
    stem, description, records = _test_records(loaded, data_path)
    perplexity, tokens, scored = _perplexity(loaded, records)
    budget = prompt_budget(loaded, max_new_tokens)
    codec = loaded.instruct_codec
    cut_before = len(codec.overflow.lengths)
    prompts = [codec.generation_prompt(r, budget) for r in records]
    prompts_cut = len(codec.overflow.lengths) - cut_before
    answers = generate_answers(
        loaded.model,
        codec.tokenizer,
        prompts,
        GenerationOptions(max_new_tokens=max_new_tokens),
        batch_size=loaded.cfg.speed.eval_batch_size,
        device=loaded.device,
        dtype=loaded.dtype,
        progress=progress,
    )
    references = [r.response for r in records]
    rouge = rouge_f1(answers, references)
    labelled = [i for i, r in enumerate(records) if r.label is not None]
    metrics: dict[str, Any] = {
        "task": "instruct",
        "n": len(records),
        "perplexity": perplexity,
        "answer_tokens": tokens,
        "perplexity_records": scored,
        "prompts_cut": prompts_cut,  # generation prompts cut to leave room for the answer
        **generation_metrics(answers, references, rouge),
        **label_answer_metrics(
            [answers[i] for i in labelled],
            [str(records[i].label) for i in labelled],
            [records[i].labels or loaded.labels for i in labelled],
        ),
        "max_new_tokens": max_new_tokens,
        "data": description,
        "zero_shot": loaded.zero_shot,
        "synthetic": loaded.run.split.synthetic and data_path is None,
    }
    stem = f"{'zero-shot-' if loaded.zero_shot else ''}{stem}"
    metrics["report_files"] = _write_reports(
        loaded, stem, metrics, records, answers, rouge["rougeL"]
    )
    return metrics


def _of_records(metrics: dict[str, Any]) -> str:
    scored = metrics.get("perplexity_records", metrics["n"])
    return "" if scored == metrics["n"] else f" of {scored} of the {metrics['n']} records"


def format_instruct_report(metrics: dict[str, Any], title: str) -> str:
    lines = [
        title,
        f"  answers           {metrics['n']}",
        f"  perplexity        {metrics['perplexity']:.3f}  (over {metrics['answer_tokens']} "
        f"reference answer tokens{_of_records(metrics)})",
        f"  BLEU              {metrics['bleu']:.2f}",
        f"  ROUGE-1 / 2 / L   {metrics['rouge1']:.4f} / {metrics['rouge2']:.4f} / "
        f"{metrics['rougeL']:.4f}",
    ]
    if metrics.get("label_n"):
        lines.append(
            f"  label answers     {metrics['label_n']}: one valid label in "
            f"{metrics['single_valid_label']:.1%}, the right one in {metrics['label_accuracy']:.1%}"
        )
    return "\n".join(lines)


def _write_reports(
    loaded: LoadedRun,
    stem: str,
    metrics: dict[str, Any],
    records: list[InstructRecord],
    answers: list[str],
    scores: list[float],
) -> dict[str, str]:
    out = loaded.run.dir.eval_dir
    title = report_title(loaded, stem)
    files = {
        "json": out / f"{stem}.json",
        "text": out / f"{stem}.txt",
        "answers": out / f"{stem}_answers.jsonl",
        "rouge_histogram": out / f"{stem}_rougeL.png",
    }
    rows = [
        {
            "source": r.source,
            "prompt": [{"role": m.role, "content": m.content} for m in r.prompt_messages],
            "reference": r.response,
            "answer": a,
            "rougeL": round(score, 4),
        }
        for r, a, score in zip(records, answers, scores, strict=True)
    ]
    atomic.write_json(files["json"], metrics)
    atomic.write_text(files["text"], format_instruct_report(metrics, title) + "\n")
    atomic.write_text(files["answers"], "".join(json.dumps(row) + "\n" for row in rows))
    plot_score_histogram(scores, files["rouge_histogram"], title=f"ROUGE-L per answer - {title}")
    return {k: str(v) for k, v in files.items()}
