"""Evaluation of a preference run: how the tuned model ranks held-out answers, beside the model
it started from.

Log-probabilities are of the answer tokens only, summed over each answer, as training scores
them. pi is the run's model (the policy), pi0 its starting model: the base model, or the
adapter the run continued (`--from`), which is also its reference in training. Definitions:
- reward accuracy: the share of pairs whose implicit reward, beta * (log pi(y) - log pi0(y)),
  is higher for the chosen answer than for the rejected one (beta: preference.beta; for ORPO,
  which has no reference, the same yardstick against the starting model);
- reward margin: the mean of the chosen answer's reward minus the rejected one's;
- log-prob accuracy: the share of pairs with log pi(chosen) > log pi(rejected), for the run and
  for its starting model (whose reward against itself is zero: this is the figure to compare
  the two by), also per answer token (mean log-probability), which does not favour the shorter
  answer;
- chosen perplexity: exp of the mean cross-entropy of the chosen answers' tokens, both models;
- unpaired (KTO) records: the share whose reward has the sign of their label.
A few test prompts answered greedily by both models are written beside the figures.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora.chat import prompt_budget
from finlora.data.preference import PreferenceRecord, load_preference
from finlora.errors import FinloraError
from finlora.evaluate.common import data_report_stem
from finlora.evaluate.preference_report import write_reports
from finlora.generate import GenerationOptions, generate_answers
from finlora.inference import LoadedRun, load_base_of, load_run
from finlora.methods import load_adapter, merged_for_inference
from finlora.models import Placement
from finlora.runs import Run
from finlora.tasks.preference import PreferenceCodec, PreferenceFeature
from finlora.training.preference import score_rows
from finlora.training.preference_loss import pair_metrics, unpaired_metrics
from finlora.training.start import start_adapter

SAMPLES = 4  # test prompts answered by both models in the report


@dataclass
class Scored:
    """One model's figures on the evaluated records."""

    logps: list[list[float]]  # per record, per answer
    answers: list[str]  # greedy answers to the sample prompts


def _records(run: Run, data_path: Path | None) -> tuple[str, str, list[PreferenceRecord]]:
    """(report stem, description, records): the run's test split, or every record of a file."""
    if data_path is not None:
        return data_report_stem(data_path), str(data_path), load_preference(data_path)
    description, records = run.test_rows()
    return "test", description, records


def load_start_model(run: Run, trust_remote_code: bool = False) -> LoadedRun:
    """The run's starting model, placed for scoring: the base model, with the adapter the run
    started from (`start_adapter/`) where it started from one."""
    cfg = run.config
    placement = Placement.from_config(cfg.train, cfg.speed)
    base, codec = load_base_of(run, placement.attention, trust_remote_code)
    model, fresh = base.model, cfg.method.start_from is None
    if not fresh:
        model = load_adapter(model, cfg, base.kind, start_adapter(run))
        if cfg.speed.merge_for_inference:
            model = merged_for_inference(model)
    model = placement.place(model).eval()
    return LoadedRun(run, model, codec, placement.device, placement.dtype, zero_shot=fresh)


def _score(
    loaded: LoadedRun,
    codec: PreferenceCodec,
    features: list[PreferenceFeature],
    samples: list[PreferenceRecord],
    max_new_tokens: int,
    progress: bool,
) -> Scored:
    rows = [row for f in features for row in f.rows()]
    speed = loaded.cfg.speed
    flat = score_rows(loaded.model, codec, rows, speed, loaded.device, loaded.dtype)
    logps, at = [], 0
    for f in features:
        logps.append(flat[at : at + len(f.answers)])
        at += len(f.answers)
    budget = prompt_budget(loaded, max_new_tokens)
    prompts = [loaded.instruct_codec.generation_prompt(r, budget) for r in samples]
    answers = generate_answers(
        loaded.model, codec.tokenizer, prompts, GenerationOptions(max_new_tokens=max_new_tokens),
        batch_size=speed.eval_batch_size, device=loaded.device, dtype=loaded.dtype,
        progress=progress,
    )  # fmt: skip
    return Scored(logps, answers)


def _chosen_perplexity(logps: list[list[float]], features: list[PreferenceFeature]) -> float:
    """Over the better answers (a pair's chosen one, a desirable completion)."""
    nll, tokens = 0.0, 0
    for values, f in zip(logps, features, strict=True):
        for value, answer, good in zip(values, f.answers, f.desirable, strict=True):
            if good:
                nll, tokens = nll - value, tokens + len(answer)
    return math.exp(min(nll / tokens, 700.0)) if tokens else math.nan


def _metrics(
    policy: Scored, start: Scored, features: list[PreferenceFeature], beta: float
) -> dict[str, Any]:
    pairs = [i for i, f in enumerate(features) if f.paired]
    single = [i for i, f in enumerate(features) if not f.paired]
    tokens = [[len(a) for a in features[i].answers] for i in pairs]
    mine = pair_metrics(
        [policy.logps[i] for i in pairs], [start.logps[i] for i in pairs], tokens, beta
    )
    theirs = pair_metrics(
        [start.logps[i] for i in pairs], [start.logps[i] for i in pairs], tokens, beta
    )
    return {
        "pairs": len(pairs),
        **mine,
        "start_logp_accuracy": theirs.get("logp_accuracy", math.nan),
        "start_logp_accuracy_per_token": theirs.get("logp_accuracy_per_token", math.nan),
        "unpaired": len(single),
        **unpaired_metrics(
            [policy.logps[i][0] for i in single],
            [start.logps[i][0] for i in single],
            [features[i].desirable[0] for i in single],
            beta,
        ),
        "chosen_perplexity": _chosen_perplexity(policy.logps, features),
        "start_chosen_perplexity": _chosen_perplexity(start.logps, features),
    }


def evaluate_preference(
    run: Run,
    data_path: Path | None = None,
    max_new_tokens: int = 128,
    progress: bool = True,
    *,
    zero_shot: bool = False,
    trust_remote_code: bool = False,
    samples: int = SAMPLES,
) -> dict[str, Any]:
    """Measure a preference run beside its starting model and write the reports under
    RUN_DIR/eval; returns the metrics. Raises FinloraError for --zero-shot (the starting model
    is always measured beside the run) or for records that leave no answer to score."""
    if zero_shot:
        raise FinloraError(
            f"{run.root}: a preference run's eval measures its starting model beside it; "
            "--zero-shot does not apply"
        )
    stem, description, records = _records(run, data_path)
    start_model = load_start_model(run, trust_remote_code)
    codec = PreferenceCodec(start_model.instruct_codec)
    encoded = [(r, codec.encode(r)) for r in records]
    kept = [(r, f) for r, f in encoded if f is not None]
    if not kept:
        raise FinloraError(f"{description}: no record leaves an answer token in data.max_length")
    features = [f for _, f in kept]
    sample = [r for r, _ in kept[:samples]]
    start = _score(start_model, codec, features, sample, max_new_tokens, progress)
    del start_model  # one model in memory at a time
    gc.collect()
    policy = _score(load_run(run, trust_remote_code=trust_remote_code), codec, features, sample,
                    max_new_tokens, progress)  # fmt: skip
    metrics: dict[str, Any] = {
        "task": "preference",
        "objective": run.config.preference.objective,
        "beta": run.config.preference.beta,
        "n": len(kept),
        "skipped": len(records) - len(kept),
        **_metrics(policy, start, features, run.config.preference.beta),
        "max_new_tokens": max_new_tokens,
        "data": description,
        "zero_shot": False,
        "synthetic": run.split.synthetic and data_path is None,
    }
    metrics["report_files"] = write_reports(
        run, stem, metrics, [r for r, _ in kept], (policy.logps, start.logps),
        (policy.answers, start.answers),
    )  # fmt: skip
    return metrics
