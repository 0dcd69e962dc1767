"""Suites: one classification run measured on several labelled sets at once, beside its
baselines (the base model zero-shot and few-shot), as one table, one JSON and one chart.

A suite is a YAML file naming each set with the loader options `finlora eval --data` takes, and
for sets labelled with a continuous score (FiQA-SA, SemEval-2017 Task 5) a threshold rule that
reads the score as a label. configs/suites/fin-sentiment.yaml is the template for the standard
public sets."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finlora import atomic
from finlora.config import read_yaml
from finlora.data import Example
from finlora.data.prepare import PreparedData, load_labelled
from finlora.errors import FinloraError
from finlora.evaluate.fewshot import (
    check_few_shot,
    few_shot_examples,
    few_shot_record,
    few_shot_run,
)
from finlora.inference import LoadedRun, load_run
from finlora.metrics import classification_metrics
from finlora.plots import plot_suite
from finlora.runs import Run

TUNED, ZERO_SHOT = "tuned", "zero-shot"
FIGURES = ("accuracy", "macro_f1", "weighted_f1", "ece", "n")
_COLUMNS = ("accuracy", "macro-F1", "weighted-F1", "ECE", "n")
TRAINING_MARK = "(training data: only its test split is held out)"
_FORMATS = ("auto", "fpb", "csv", "tsv", "jsonl", "parquet", "xlsx", "hf")
_AGREEMENTS = ("all", "75", "66", "50")
_SET_KEYS = (
    "name", "path", "format", "agreement", "text_column", "label_column", "label_map",
    "score_thresholds", "score_labels",
)  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ScoreRule:
    """A continuous sentiment score read as a label: below `low` the first label, from `high`
    up the last, the middle label from `low` up to `high` (FiQA-SA and SemEval-2017 Task 5
    score sentiment from -1 to 1; FinGPT's benchmarks read FiQA-SA so with -0.1 and 0.1)."""

    low: float
    high: float
    labels: tuple[str, str, str] = ("negative", "neutral", "positive")

    def label(self, where: str, raw: str) -> str:
        try:
            score = float(raw)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise FinloraError(f"{where}: score {raw!r} is not a number (score_thresholds)")
        if score < self.low:
            return self.labels[0]
        return self.labels[2] if score >= self.high else self.labels[1]


@dataclass(frozen=True)
class SuiteSet:
    """One labelled set of a suite: where it is and how to read it, with the loader options
    as `finlora eval --data` and the config name them. A set leaves out what it does not need;
    its defaults are fixed (not the run's own), so a suite means the same for every run."""

    name: str
    path: Path
    format: str = "auto"
    agreement: str = "all"
    text_column: str = "text"
    label_column: str = "label"
    label_map: str | None = None
    score_rule: ScoreRule | None = None


@dataclass(frozen=True)
class Suite:
    name: str  # report file stem: RUN/eval/suite-<name>.md
    file: Path
    sets: list[SuiteSet]


def load_suite(path: Path) -> Suite:
    """Read and check a suite file. Raises FinloraError naming the file, the set and the field
    at fault; a path still the template's placeholder ("<...>") is refused by set name."""
    raw = read_yaml(path)
    unknown = sorted(set(raw) - {"name", "sets"})
    if unknown:
        raise FinloraError(f"{path}: unknown key {unknown[0]!r} (a suite has name and sets)")
    name = str(raw.get("name") or path.stem)
    if not _NAME.fullmatch(name):
        raise FinloraError(f"{path}: name {name!r}: letters, digits, '.', '_' and '-' only")
    sets = raw.get("sets")
    if not isinstance(sets, list) or not sets:
        raise FinloraError(f"{path}: sets: expected a list of labelled sets")
    parsed = [_parse_set(path, i, item) for i, item in enumerate(sets, start=1)]
    names = [s.name for s in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FinloraError(f"{path}: set name {repeated[0]!r} appears more than once")
    return Suite(name, path, parsed)


def _parse_set(path: Path, number: int, raw: Any) -> SuiteSet:
    if not isinstance(raw, dict):
        raise FinloraError(f"{path}: sets[{number}]: expected a mapping (name, path, ...)")
    name = str(raw.get("name") or f"set{number}")
    where = f"{path}: set {name!r}"
    unknown = sorted(set(raw) - set(_SET_KEYS))
    if unknown:
        raise FinloraError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_SET_KEYS)})")
    value = raw.get("path")
    text = "" if value is None else str(value).strip()
    if not text or (text.startswith("<") and text.endswith(">")):
        raise FinloraError(
            f"{where}: path is still the placeholder {text or 'null'!r}; write where its data is"
        )
    spec = SuiteSet(
        name,
        Path(text).expanduser(),
        format=_choice(where, "format", raw.get("format", "auto"), _FORMATS),
        agreement=_choice(where, "agreement", str(raw.get("agreement", "all")), _AGREEMENTS),
        text_column=str(raw.get("text_column", "text")),
        label_column=str(raw.get("label_column", "label")),
        label_map=_label_map(where, raw.get("label_map")),
        score_rule=_score_rule(where, raw.get("score_thresholds"), raw.get("score_labels")),
    )
    if spec.score_rule is not None and (spec.label_map or spec.format == "fpb"):
        raise FinloraError(
            f"{where}: score_thresholds read a table's numeric score; leave out label_map and "
            "format fpb"
        )
    return spec


def _choice(where: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise FinloraError(f"{where}: {key} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _label_map(where: str, value: Any) -> str | None:
    """A label map as the CLI spells it ("0=negative,..."), from that string or a mapping."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ",".join(f"{raw}={label}" for raw, label in value.items())
    raise FinloraError(f"{where}: label_map: expected raw=label pairs or a mapping")


def _score_rule(where: str, thresholds: Any, labels: Any) -> ScoreRule | None:
    if thresholds is None:
        if labels is not None:
            raise FinloraError(f"{where}: score_labels needs score_thresholds")
        return None
    numbers = (int, float)
    if not (
        isinstance(thresholds, list)
        and len(thresholds) == 2
        and all(isinstance(t, numbers) and not isinstance(t, bool) for t in thresholds)
        and thresholds[0] < thresholds[1]
    ):
        raise FinloraError(f"{where}: score_thresholds: expected [low, high] with low < high")
    if labels is None:
        return ScoreRule(float(thresholds[0]), float(thresholds[1]))
    if not (isinstance(labels, list) and len(labels) == 3):
        raise FinloraError(f"{where}: score_labels: expected three labels (low, middle, high)")
    first, middle, last = (str(x) for x in labels)
    return ScoreRule(float(thresholds[0]), float(thresholds[1]), (first, middle, last))


# ---- reading the sets ----------------------------------------------------------------------


@dataclass
class SetRows:
    spec: SuiteSet
    examples: list[Example]
    training_data: bool  # the run's own data file: only its test-split rows are kept
    # Rows whose sentence the run trained or validated on (None: the run's data is not here).
    seen: int | None = None


def read_set(spec: SuiteSet, run: Run, trained_on: set[str] | None = None) -> SetRows:
    """A suite set's labelled rows, read as `finlora eval --data` reads the file; a set that is
    the run's own training data keeps only the rows of the run's test split. With `trained_on`
    (the texts of the run's training and validation rows), counts the rows it repeats."""
    try:
        examples = _load(spec, run.labels)
        training = _is_training_source(spec.path, run)
        if training:
            examples = _held_out(examples, run)
    except FinloraError as exc:
        raise FinloraError(f"suite set {spec.name!r}: {exc}") from None
    seen = None if trained_on is None else sum(e.text in trained_on for e in examples)
    return SetRows(spec, examples, training, seen)


def trained_texts(run: Run) -> set[str] | None:
    """The sentences of the run's training and validation rows; None when its data is not
    here unchanged (the suite is then scored without the check)."""
    try:
        data = run.prepared()
    except FinloraError:
        return None
    if not isinstance(data, PreparedData):
        return None
    return {data.examples[i].text for i in (*run.split.train, *run.split.validation)}


def _load(spec: SuiteSet, labels: list[str]) -> list[Example]:
    rule = spec.score_rule
    examples = load_labelled(
        spec.path,
        spec.format,
        agreement=spec.agreement,
        text_column=spec.text_column,
        label_column=spec.label_column,
        label_map=spec.label_map,
        labels=None if rule else labels,  # scores become labels below
    )
    if rule is not None:
        examples = [dataclasses.replace(e, label=rule.label(e.source, e.label)) for e in examples]
    unknown = sorted({e.label for e in examples} - set(labels))
    if unknown:
        where = next(e.source for e in examples if e.label in unknown)
        raise FinloraError(
            f"{where}: unknown label {unknown[0]!r} (the run knows {', '.join(labels)})"
        )
    return examples


def _run_files(run: Run) -> set[Path]:
    return {Path(name).expanduser().resolve() for name in run.split.fingerprint.files}


def _is_training_source(path: Path, run: Run) -> bool:
    """Whether `path` is a file the run trained on, or the FPB directory it read one from."""
    target = path.resolve()
    return any(f == target or (target.is_dir() and f.parent == target) for f in _run_files(run))


def _source_key(source: str) -> tuple[Path, str]:
    """("file", "line") of an example's "file:line" source, the file resolved."""
    name, _, line = source.rpartition(":")
    return Path(name).resolve(), line


def _held_out(examples: list[Example], run: Run) -> list[Example]:
    """The rows of `examples` in the run's test split: the same lines when the set reads the
    run's own file; the same sentences when it reads a sibling (another FPB agreement level,
    whose sentences overlap the run's on other lines)."""
    _, test = run.test_rows()
    run_files = _run_files(run)
    if any(_source_key(e.source)[0] in run_files for e in examples):
        lines = {_source_key(e.source) for e in test}
        kept = [e for e in examples if _source_key(e.source) in lines]
    else:
        texts = {e.text for e in test}
        kept = [e for e in examples if e.text in texts]
    if not kept:
        raise FinloraError("none of its rows is in the run's test split")
    return kept


# ---- scoring and the report ----------------------------------------------------------------


def _score(loaded: LoadedRun, sets: list[SetRows], progress: bool) -> dict[str, dict[str, Any]]:
    """Each set's figures for one model: accuracy, macro/weighted F1, ECE, n."""
    figures = {}
    for rows in sets:
        probs = loaded.proba([e.text for e in rows.examples], progress)
        predicted = [loaded.labels[i] for i in probs.argmax(1)]
        gold = [e.label for e in rows.examples]
        metrics = classification_metrics(gold, predicted, probs, loaded.labels)
        figures[rows.spec.name] = {k: metrics[k] for k in FIGURES}
    return figures


def evaluate_suite(
    run: Run,
    suite: Suite,
    *,
    zero_shot: bool = False,
    few_shot: int | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Score a classification run on every set of `suite`, and with `zero_shot` / `few_shot`
    (K examples) its base model too; write RUN/eval/suite-<name>.{md,json,png}.

    Returns the report: each set's figures per model, their mean, the few-shot examples and
    `report_files`. Raises FinloraError on a run of another task, an encoder run with a
    baseline, or a set that cannot be read (naming it)."""
    if run.task != "classify":
        raise FinloraError(f"--suite: scores classification sets; {run.root}'s task is {run.task}")
    examples = None
    if few_shot is not None:
        check_few_shot(run, trust_remote_code)
        examples = few_shot_examples(run, few_shot)
    trained_on = trained_texts(run)
    sets = [read_set(spec, run, trained_on) for spec in suite.sets]  # all read before any model
    results: dict[str, dict[str, dict[str, Any]]] = {}
    if zero_shot or examples is not None:  # first: an encoder's refusal comes before any work
        base = load_run(run, zero_shot=True, trust_remote_code=trust_remote_code)
        if zero_shot:
            results[ZERO_SHOT] = _score(base, sets, progress)
        if examples is not None:
            results[f"{few_shot}-shot"] = _score(few_shot_run(base, examples), sets, progress)
        del base
    tuned = load_run(run, trust_remote_code=trust_remote_code)
    models = [TUNED, *results]
    results[TUNED] = _score(tuned, sets, progress)
    report = _report(run, suite, sets, {m: results[m] for m in models})
    report["few_shot"] = few_shot_record(run, examples) if examples is not None else None
    report["report_files"] = _write(run, suite, report)
    return report


def _mean(figures: list[dict[str, Any]]) -> dict[str, Any]:
    mean = {k: sum(f[k] for f in figures) / len(figures) for k in FIGURES if k != "n"}
    return {**mean, "n": sum(f["n"] for f in figures)}


def _report(
    run: Run, suite: Suite, sets: list[SetRows], results: dict[str, dict[str, dict[str, Any]]]
) -> dict[str, Any]:
    return {
        "suite": suite.name,
        "suite_file": str(suite.file),
        "run": str(run.root),
        "models": list(results),
        "sets": [
            {
                "name": rows.spec.name,
                "data": str(rows.spec.path),
                "training_data": rows.training_data,
                "seen_in_training": rows.seen,
                "results": {model: results[model][rows.spec.name] for model in results},
            }
            for rows in sets
        ],
        "mean": {model: _mean(list(by_set.values())) for model, by_set in results.items()},
    }


def format_suite(report: dict[str, Any]) -> str:
    """The report as a Markdown table: a row per set and model, then the mean over sets."""
    lines = [
        f"## Suite {report['suite']}: {Path(report['run']).name}",
        "",
        "| set | model | " + " | ".join(_COLUMNS) + " |",
        "| --- | --- |" + " ---: |" * len(_COLUMNS),
    ]
    for entry in report["sets"]:
        name = entry["name"] + (f" {TRAINING_MARK}" if entry["training_data"] else "")
        lines += [_table_row(name, model, f) for model, f in entry["results"].items()]
    mean = f"mean of {len(report['sets'])} sets"
    lines += [_table_row(mean, model, f) for model, f in report["mean"].items()]
    lines += ["", *_footnotes(report)]
    return "\n".join(lines) + "\n"


def _table_row(name: str, model: str, f: dict[str, Any]) -> str:
    cells = [f"{f[k]:.4f}" for k in FIGURES if k != "n"] + [str(f["n"])]
    return f"| {name} | {model} | " + " | ".join(cells) + " |"


def _footnotes(report: dict[str, Any]) -> list[str]:
    """The notes under the table, a Markdown list item each."""
    notes = [
        "Figures compare fairly only on sets held out from the run: none of their sentences "
        f"trained it. A set marked {TRAINING_MARK} is the run's own data file, scored on the "
        "rows of the run's test split alone.",
        "The mean weighs every set alike; its n is their sum.",
    ]
    for entry in report["sets"]:
        if entry["seen_in_training"] and not entry["training_data"]:
            notes.append(
                f"{entry['name']}: {entry['seen_in_training']} of its rows repeat sentences the "
                "run trained or validated on, so it is not wholly held out."
            )
    if ZERO_SHOT in report["models"]:
        notes.append("zero-shot: the base model without the adapter.")
    shots = report.get("few_shot")
    if shots:
        notes.append(
            f"{shots['k']}-shot: the base model reading {shots['k']} examples from the run's "
            f"training split (spread over the labels, seed {shots['seed']}) before each sentence."
        )
    return [f"- {note}" for note in notes]


def _write(run: Run, suite: Suite, report: dict[str, Any]) -> dict[str, str]:
    out = run.dir.eval_dir
    stem = f"suite-{suite.name}"
    files = {kind: out / f"{stem}.{kind}" for kind in ("md", "json", "png")}
    report_files = {kind: str(path) for kind, path in files.items()}
    atomic.write_text(files["md"], format_suite(report))
    atomic.write_json(files["json"], {**report, "report_files": report_files})
    scores = {e["name"]: e["results"] for e in report["sets"]}
    scores["mean"] = report["mean"]
    plot_suite(scores, files["png"], title=f"Suite {suite.name}: {run.root.name}")
    return report_files
