"""The comparison recipe: one config, several tuning methods, side by side.

Every method gets the same data, split, seed and step budget (`--set train.max_steps=...`
applies to all); only `method.name` changes, with that method's own section of options. A
method named with options of its section, `lora[use_dora=true]`, is a row of its own; a row is
labelled by those options and by any variant switch its section sets (`LoraSection.VARIANTS`),
so `--set lora.use_dora=true` makes the lora row `lora[use_dora=true]`. A dotted key in the
brackets sets that key of the whole config for the row, so preference objectives rank side by
side: `lora[preference.objective=orpo,train.learning_rate=1e-4]`. Each
run is trained and then evaluated from disk, as `finlora eval` would, so the figures are those
of the saved adapter. The recipe writes `compare.md`, `compare.json` and `compare.png` beside
one run directory per method (and seed). A classification recipe is ranked by accuracy and
macro-F1, an instruct recipe by perplexity, BLEU and ROUGE on its held-out records.
"""

from __future__ import annotations

import copy
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import torch

from finlora import atomic
from finlora.config import (
    METHOD_SECTIONS,
    RunConfig,
    apply_overrides,
    config_from_dict,
    read_yaml,
    select_method,
)
from finlora.errors import FinloraError
from finlora.evaluate import evaluate_run
from finlora.memory import PeakMemory
from finlora.methods import METHODS, check_method, check_positions
from finlora.models.loading import config_kind, model_config
from finlora.plots import plot_method_comparison
from finlora.runs import Manifest, RunDir
from finlora.train import train

Log = Callable[[str], None]

# What a comparison reports per task: (key of `finlora eval`'s metrics, column name); the chart
# draws the scores that share a 0-1 scale.
SCORES = {
    "classify": (("accuracy", "accuracy"), ("macro_f1", "macro-F1")),
    "instruct": (("perplexity", "perplexity"), ("bleu", "BLEU"), ("rouge1", "ROUGE-1"),
                 ("rougeL", "ROUGE-L")),
    "preference": (("reward_accuracy", "reward accuracy"), ("logp_accuracy", "log-prob accuracy"),
                   ("chosen_perplexity", "chosen perplexity")),
}  # fmt: skip
CHART_SCORES = {"classify": SCORES["classify"], "instruct": SCORES["instruct"][2:],
                "preference": SCORES["preference"][:2]}  # fmt: skip

TABLE_MD = "compare.md"
TABLE_JSON = "compare.json"
CHART = "compare.png"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class RunResult:
    """One method trained and evaluated on one seed."""

    method: str
    label: str  # the row: the method and the options that make it a variant
    seed: int
    run_dir: str
    scores: dict[str, float]  # SCORES[task] keys
    trainable_params: int
    total_params: int
    adapter_bytes: int
    train_s: float
    peak_rss_mib: float
    peak_gpu_mib: float | None
    learning_rate: float
    steps: int


_SPEC = re.compile(r"\s*([^\[\],\s]+)\s*(?:\[([^\[\]]*)\])?\s*")


def _split_methods(text: str) -> list[str]:
    """Split at the commas outside brackets: `lora,lora[r=8,use_dora=true]` is two items."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [item.strip() for item in [*items, text[start:]] if item.strip()]


def method_spec(item: str) -> tuple[str, list[str]]:
    """`lora[r=8,use_dora=true]` -> ("lora", ["r=8", "use_dora=true"]); FinloraError for an
    unknown method or an option that is not key=value."""
    match = _SPEC.fullmatch(item)
    if match is None:
        raise FinloraError(f"--methods: cannot read {item!r} (e.g. lora or lora[use_dora=true])")
    name, inside = match.group(1), match.group(2)
    if name not in METHODS:
        raise FinloraError(f"--methods: unknown method {name!r} (known: {', '.join(METHODS)})")
    options = [o.strip() for o in (inside or "").split(",") if o.strip()]
    for option in options:
        if "=" not in option:
            raise FinloraError(f"--methods: {item}: expected key=value, not {option!r}")
    return name, options


def parse_methods(text: str) -> list[str]:
    """`lora,lora[use_dora=true],prefix` -> one item each; raises FinloraError for unknown
    methods, unreadable options, or an item named twice."""
    items = _split_methods(text)
    if not items:
        raise FinloraError("--methods: name at least one method")
    for item in items:
        method_spec(item)
    if len(set(items)) != len(items):
        raise FinloraError(f"--methods: a method is named twice ({text})")
    return items


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def _config_key(key: str, method: str) -> str:
    """The config key a bracketed option's key names: `r` -> `lora.r`, `train.epochs` as is."""
    key = key.strip()
    return key if "." in key else f"{method}.{key}"


def row_label(cfg: RunConfig, options: Sequence[str] = ()) -> str:
    """The method, with the options given to it in --methods and any variant switch its
    section sets away from the default: `lora`, `lora[use_dora=true]`,
    `lora[preference.objective=orpo]`. The values shown are the config's, as validated."""
    section = cfg.method_options
    keys = [o.split("=", 1)[0].strip() for o in options]
    defaults = type(section)()
    keys += [
        key
        for key in getattr(section, "VARIANTS", ())
        if key not in keys and getattr(section, key) != getattr(defaults, key)
    ]
    if not keys:
        return cfg.method.name
    shown = ",".join(
        f"{key}={_value_text(reduce(getattr, _config_key(key, cfg.method.name).split('.'), cfg))}"
        for key in keys
    )
    return f"{cfg.method.name}[{shown}]"


@dataclass
class PlannedRun:
    """One run of the comparison: its config and the row it belongs to."""

    cfg: RunConfig
    label: str


def _variant_config(data: dict[str, Any], item: str) -> tuple[RunConfig, str]:
    method, options = method_spec(item)
    cfg = config_from_dict(
        apply_overrides(
            select_method(data, method),
            [
                f"{_config_key(key, method)}={value}"
                for key, value in (o.split("=", 1) for o in options)
            ],
        )
    )
    return cfg, row_label(cfg, options)


def plan(
    config: Path | None, overrides: Sequence[str], methods: Sequence[str], seeds: int
) -> list[PlannedRun]:
    """Every run, seed by seed, methods (`lora` or `lora[use_dora=true]`) in the order given;
    all validated first. The recipe's own method section (often `lora`) applies to that method
    only."""
    if seeds < 1:
        raise FinloraError(f"--seeds must be at least 1 (got {seeds})")
    names = [method_spec(item)[0] for item in methods]
    for item in overrides:
        section = item.split("=", 1)[0].split(".", 1)[0].strip()
        # A recipe's lora section is fine for a comparison without lora, but an option set on
        # the command line for a method that is not run is a mistake worth a line.
        if section in METHOD_SECTIONS and section not in names:
            raise FinloraError(
                f"--set {item}: method {section} is not among --methods ({','.join(methods)})"
            )
    data = apply_overrides(read_yaml(config) if config else {}, list(overrides))
    where = f"{config}: " if config else ""
    rows = []
    for item in methods:
        try:
            rows.append(_variant_config(data, item))
        except FinloraError as exc:
            raise FinloraError(f"{where}{exc}") from None
    labels = [label for _, label in rows]
    for label in labels:
        if labels.count(label) > 1:
            raise FinloraError(f"--methods: two of them are the same run, {label}")
    runs = []
    for offset in range(seeds):
        for cfg, label in rows:
            seeded = copy.deepcopy(cfg)
            seeded.seed += offset
            runs.append(PlannedRun(seeded, label))
    return runs


def _run_dir(output: Path, run: PlannedRun, seeds: int) -> Path:
    # `lora[use_dora=true]` -> `lora-use_dora=true`: no brackets or commas in a directory name.
    name = re.sub(r"[\[\],\s/]+", "-", run.label).strip("-")
    return output / (name if seeds == 1 else f"{name}-seed{run.cfg.seed}")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _train_and_evaluate(
    planned: PlannedRun, run_dir: Path, progress_bar: bool, trust_remote_code: bool, log: Log
) -> RunResult:
    """Train one run, evaluate it from disk on its test split, and note what it cost."""
    cfg = planned.cfg
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory().measure() as peak:
        result = train(
            cfg, run_dir, progress_bar=progress_bar, log=log, trust_remote_code=trust_remote_code
        )
    metrics = evaluate_run(run_dir, progress=progress_bar, trust_remote_code=trust_remote_code)
    run = RunDir(run_dir)
    manifest = _manifest(run)
    # Checkpoints exist for --resume only, and a full fine-tune's hold three times the model.
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    return RunResult(
        method=cfg.method.name,
        label=planned.label,
        seed=cfg.seed,
        run_dir=str(run_dir),
        scores={key: float(metrics[key]) for key, _ in SCORES[cfg.task]},
        trainable_params=int(manifest.trainable_params or 0),
        total_params=int(manifest.total_params or 0),
        adapter_bytes=_dir_bytes(run.adapter),
        train_s=float(result.train_seconds),
        peak_rss_mib=round(peak.peak_mib, 1),
        peak_gpu_mib=round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None,
        learning_rate=cfg.learning_rate,
        steps=result.steps,
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def summarize(results: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per method or variant (`label`), in the order run: each score's mean over seeds
    (and its std, where there are several)."""
    rows = []
    for label in dict.fromkeys(r.label for r in results):
        runs = [r for r in results if r.label == label]
        first = runs[0]
        scores: dict[str, float | None] = {}
        for key in first.scores:
            scores[key], scores[f"{key}_std"] = _mean_std([r.scores[key] for r in runs])
        gpu = [r.peak_gpu_mib for r in runs if r.peak_gpu_mib is not None]
        rows.append(
            {
                "method": first.method,
                "label": label,
                **scores,
                "trainable_params": first.trainable_params,
                "total_params": first.total_params,
                "trainable_share": first.trainable_params / first.total_params,
                "adapter_bytes": first.adapter_bytes,
                "train_s": statistics.fmean(r.train_s for r in runs),
                "peak_rss_mib": max(r.peak_rss_mib for r in runs),
                "peak_gpu_mib": max(gpu) if gpu else None,
                "learning_rate": first.learning_rate,
                "steps": first.steps,
                "run_dir": first.run_dir,
                "runs": [asdict(r) for r in runs],
            }
        )
    return rows


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"  # a short run is not "0 s"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop returns


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def _score(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown_table(table: dict[str, Any]) -> str:
    """The comparison as Markdown: what was run, then one row per method."""
    seeds = table["seeds"]
    scores = SCORES[table.get("task", "classify")]
    memory = "peak GPU memory" if any(r["peak_gpu_mib"] for r in table["methods"]) else "peak RSS"
    lines = [
        f"Model `{table['model']}` ({table['kind']}), data: {table['data']}; "
        f"{table['steps']} steps each, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}; scores on the held-out test split"
        + (" (mean ± std over seeds)" if len(seeds) > 1 else "")
        + ".",
        "",
        f"| method | {' | '.join(name for _, name in scores)} | trainable params | share "
        f"| adapter size | train time | {memory} | learning rate |",
        "| --- |" + " ---: |" * (len(scores) + 6),
    ]
    for r in table["methods"]:
        peak = r["peak_gpu_mib"] if r["peak_gpu_mib"] else r["peak_rss_mib"]
        lines.append(
            f"| {r.get('label', r['method'])} "
            f"| {' | '.join(_score(r[k], r[f'{k}_std']) for k, _ in scores)} "
            f"| {_count(r['trainable_params'])} "
            f"| {100 * r['trainable_share']:.3f}% | {_size(r['adapter_bytes'])} "
            f"| {_seconds(r['train_s'])} | {peak:.0f} MiB | {r['learning_rate']:g} |"
        )
    if table.get("command"):
        lines += ["", "Produced by:", "", "```bash", table["command"], "```"]
    return "\n".join(lines) + "\n"


def _check_methods(configs: Sequence[RunConfig], trust: bool) -> None:
    """Every method against the model's kind, before anything trains: a method that cannot tune
    it would otherwise stop the comparison midway, its first runs written and no table. So are
    its virtual tokens and text against the model's positions."""
    model = configs[0].model
    config, where = model_config(model.name, trust)
    kind = model.kind if model.kind != "auto" else config_kind(config, where)
    for name in dict.fromkeys(cfg.method.name for cfg in configs):
        check_method(name, kind)
    for cfg in configs:
        check_positions(config, cfg)


def _new_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FinloraError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise FinloraError(
                f"{output}: output directory exists and is not empty (--overwrite replaces it)"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def _manifest(run: RunDir) -> Manifest:
    manifest = Manifest.read(run.manifest)
    if manifest is None:  # train() writes it before it returns
        raise FinloraError(f"{run.manifest}: missing after training")
    return manifest


def _table(
    configs: Sequence[RunConfig], results: Sequence[RunResult], command: str | None
) -> dict[str, Any]:
    manifest = _manifest(RunDir(Path(results[0].run_dir)))
    return {
        "task": configs[0].task,
        "model": configs[0].model.name,
        "kind": manifest.base_model["kind"],
        "data": manifest.data["description"],
        "synthetic": manifest.data["synthetic"],
        "seeds": sorted({cfg.seed for cfg in configs}),
        "steps": results[0].steps,
        "command": command,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "methods": summarize(results),
    }


def _write_table(table: dict[str, Any], output: Path) -> None:
    """compare.json, compare.md and compare.png into `output`; `table` gets their paths."""
    files = {"markdown": output / TABLE_MD, "json": output / TABLE_JSON, "chart": output / CHART}
    table["files"] = {k: str(v) for k, v in files.items()}
    atomic.write_json(files["json"], table)
    atomic.write_text(files["markdown"], markdown_table(table))
    bars = [{**row, "method": row["label"]} for row in table["methods"]]  # a bar per row
    plot_method_comparison(
        bars, files["chart"], CHART_SCORES[table["task"]], title=f"{table['model']}"
    )


def compare(
    config: Path | None,
    overrides: Sequence[str],
    methods: Sequence[str],
    output: Path,
    *,
    seeds: int = 1,
    overwrite: bool = False,
    command: str | None = None,
    progress_bar: bool = True,
    trust_remote_code: bool = False,
    log: Log = _stderr,
) -> dict[str, Any]:
    """Train and evaluate every method in `methods` as `config` says; returns the table.

    The table (`methods`: one row per method) is also written to OUTPUT/compare.{md,json},
    with a bar chart in OUTPUT/compare.png. `trust_remote_code` lets the model run its own code
    (never read from the config). Raises FinloraError before anything is written for a bad
    config, an unknown method or an existing non-empty `output`.
    """
    runs = plan(config, overrides, methods, seeds)
    configs = [run.cfg for run in runs]
    _check_methods(configs, trust_remote_code)
    _new_output(output, overwrite)
    results = []
    for i, run in enumerate(runs, 1):
        run_dir = _run_dir(output, run, seeds)
        log(f"compare: [{i}/{len(runs)}] {run.label}, seed {run.cfg.seed} -> {run_dir}")
        results.append(_train_and_evaluate(run, run_dir, progress_bar, trust_remote_code, log))
    table = _table(configs, results, command)
    _write_table(table, output)
    return table
