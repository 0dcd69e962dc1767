"""The main job, end to end on the embedded default model: train, evaluate, predict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finlora.config import FPB_ENV, load_config
from finlora.data import SYNTHETIC_NOTE
from finlora.evaluate import evaluate_run
from finlora.inference import load_run
from finlora.metrics import format_classification_report
from finlora.train import train

EXAMPLES = (
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "The company reported a net loss of EUR 2.3 mn, compared with a profit a year earlier.",
    "The annual general meeting will be held in Helsinki on 15 March.",
    "Shares fell 9 % after the group cut its full-year sales guidance.",
)
FPB_DEMO_STEPS = 50


def run_demo(
    output: Path, max_steps: int | None, echo: Callable[[str], None], log: Callable[[str], None]
) -> dict[str, float]:
    """Short training run of the default recipe, its evaluation, and a few predictions."""
    import os

    on_fpb = bool(os.environ.get(FPB_ENV))
    overrides = []
    if on_fpb:
        overrides.append(f"train.max_steps={max_steps or FPB_DEMO_STEPS}")
        echo(
            f"demo: Financial PhraseBank from ${FPB_ENV}, a short run "
            f"({max_steps or FPB_DEMO_STEPS} steps; see README for the full recipe)"
        )
    else:
        overrides.append("data.format=synthetic")
        if max_steps:
            overrides.append(f"train.max_steps={max_steps}")
        echo(f"demo: ${FPB_ENV} is not set, so this trains on the {SYNTHETIC_NOTE}")
    cfg = load_config(None, overrides)
    result = train(cfg, output, overwrite=True, log=log)
    echo(
        f"trained {result.steps} steps in {result.train_seconds:.0f}s "
        f"({result.real_tokens_per_s:.0f} real tokens/s, "
        f"peak RSS {result.peak_rss_mib / 1024:.2f} GiB)"
    )
    metrics = evaluate_run(output)
    title = f"{output} on {metrics['data']}" + (" (SYNTHETIC)" if metrics["synthetic"] else "")
    echo(format_classification_report(metrics, title))
    echo("\npredictions:")
    for p in load_run(output).predict(list(EXAMPLES), progress=False):
        probs = "  ".join(f"{k} {v:.2f}" for k, v in p.probabilities.items())
        echo(f"  {p.label:<9} [{probs}]  {p.text}")
    echo(
        f"\nrun directory: {output} (loss curve: {output / 'loss_curve.png'}, "
        f"reports: {output / 'eval'})"
    )
    echo(
        f'next: finlora predict {output} "...", finlora analyze {output} REPORT.pdf '
        f"(a report, sentence by sentence), finlora serve {output} (HTTP API), "
        f"finlora export {output} --format gguf --out exports/demo (llama.cpp)"
    )
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}
