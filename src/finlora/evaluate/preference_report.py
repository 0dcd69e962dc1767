"""The reports of a preference run's eval: the figures (JSON, text), each record's log-probabilities
and rewards (JSONL), and the sample answers of both models beside the chosen and rejected ones."""

from __future__ import annotations

import json
import math
from typing import Any

from finlora import atomic
from finlora.data.preference import PreferenceRecord
from finlora.runs import Run


def _figure(value: Any, digits: int = 4) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def format_preference_report(metrics: dict[str, Any], title: str) -> str:
    """The figures for people; `docs/concepts.md` (Preference tuning) defines each."""
    m = metrics
    lines = [
        f"{title}  (objective {m['objective']}, beta {m['beta']:g})",
        f"  records             {m['n']} ({m['pairs']} pairs, {m['unpaired']} unpaired)",
    ]
    if m["pairs"]:
        lines += [
            f"  reward accuracy     {_figure(m['reward_accuracy'])}  (beta * log pi/pi0: chosen "
            "above rejected)",
            f"  reward margin       {_figure(m['reward_margin'])}  (chosen "
            f"{_figure(m['reward_chosen'])}, rejected {_figure(m['reward_rejected'])})",
            "                      run     starting model",
            f"  log-prob accuracy   {_figure(m['logp_accuracy'])}  "
            f"{_figure(m['start_logp_accuracy'])}   (log pi(chosen) > log pi(rejected))",
            f"    per token         {_figure(m['logp_accuracy_per_token'])}  "
            f"{_figure(m['start_logp_accuracy_per_token'])}",
        ]
    if m["unpaired"]:
        lines.append(
            f"  unpaired accuracy   {_figure(m.get('unpaired_reward_accuracy'))}  (reward sign "
            "= label)"
        )
    lines.append(
        f"  chosen perplexity   {_figure(m['chosen_perplexity'], 3)}  "
        f"{_figure(m['start_chosen_perplexity'], 3)}"
    )
    if m.get("skipped"):
        lines.append(f"  skipped             {m['skipped']} (no answer token within max_length)")
    return "\n".join(lines)


def _prompt(record: PreferenceRecord) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in record.prompt_messages]


def _record_rows(
    records: list[PreferenceRecord], logps: tuple[list[list[float]], list[list[float]]], beta: float
) -> list[dict[str, Any]]:
    rows = []
    for record, policy, start in zip(records, *logps, strict=True):
        rewards = [round(beta * (p - s), 6) for p, s in zip(policy, start, strict=True)]
        row: dict[str, Any] = {"source": record.source, "prompt": _prompt(record)}
        if record.paired:
            row |= {"chosen": record.response, "rejected": record.rejected}
        else:
            row |= {"completion": record.response, "label": record.desirable}
        logp = {"logp": [round(p, 6) for p in policy], "start_logp": [round(s, 6) for s in start]}
        rows.append(row | logp | {"reward": rewards})
    return rows


def write_reports(
    run: Run,
    stem: str,
    metrics: dict[str, Any],
    records: list[PreferenceRecord],
    logps: tuple[list[list[float]], list[list[float]]],
    answers: tuple[list[str], list[str]],
) -> dict[str, str]:
    """Write `stem`.json, .txt, _records.jsonl and _samples.jsonl under RUN_DIR/eval; returns
    the paths. `logps` and `answers`: the run's, then the starting model's."""
    out = run.dir.eval_dir
    files = {
        "json": out / f"{stem}.json",
        "text": out / f"{stem}.txt",
        "records": out / f"{stem}_records.jsonl",
        "samples": out / f"{stem}_samples.jsonl",
    }
    samples = [
        {
            "prompt": _prompt(r),
            "chosen" if r.paired else "completion": r.response,
            **({"rejected": r.rejected} if r.paired else {"label": r.desirable}),
            "answer": mine,
            "start_answer": theirs,
        }
        for r, mine, theirs in zip(records, *answers, strict=False)
    ]
    rows = _record_rows(records, logps, metrics["beta"])
    atomic.write_json(files["json"], metrics)
    title = f"{run.root.name}: {stem}"
    atomic.write_text(files["text"], format_preference_report(metrics, title) + "\n")
    atomic.write_text(files["records"], "".join(json.dumps(r) + "\n" for r in rows))
    atomic.write_text(files["samples"], "".join(json.dumps(s) + "\n" for s in samples))
    return {k: str(v) for k, v in files.items()}
