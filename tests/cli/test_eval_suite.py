"""`finlora eval RUN --suite SUITE.yaml` and `--few-shot K` on the tiny trained run: the suite's
figures are those of `finlora eval` on each set alone, baselines are rows of their own, and the
few-shot examples come from the run's training split."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, assert_user_error

from finlora.config import RunConfig
from finlora.data import FPB_LABELS
from finlora.data.loaders import load_fpb
from finlora.data.prepare import PreparedData
from finlora.errors import FinloraError
from finlora.evaluate.fewshot import check_few_shot, few_shot_examples
from finlora.evaluate.suite import TRAINING_MARK, evaluate_suite, load_suite
from finlora.runs import Run

LABEL_MAP = "0=negative,1=neutral,2=positive"
FIGURES = ("accuracy", "macro_f1", "weighted_f1", "ece", "n")
SCORES = {"negative": -0.5, "neutral": 0.0, "positive": 0.6}


@pytest.fixture(scope="module")
def scored_files(tmp_path_factory: pytest.TempPathFactory, fpb_file: Path) -> tuple[Path, Path]:
    """SemEval-style headlines with a score (JSON list: title, sentiment), and the same rows as
    a CSV labelled as the thresholds [-0.1, 0.1] read their scores."""
    fpb = load_fpb(fpb_file)
    rows = [e for label in FPB_LABELS for e in fpb if e.label == label][::5]
    folder = tmp_path_factory.mktemp("scored")
    headlines = folder / "headlines.json"
    records = [{"id": i, "title": e.text, "sentiment": SCORES[e.label]} for i, e in enumerate(rows)]
    headlines.write_text(json.dumps(records), encoding="utf-8")
    labelled = folder / "headlines.csv"
    lines = ["text,label", *(f'"{e.text}",{e.label}' for e in rows)]
    labelled.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return headlines, labelled


@pytest.fixture
def suite_file(
    tmp_path: Path, fpb_file: Path, csv_file: Path, scored_files: tuple[Path, Path]
) -> Path:
    """Three sets: the run's own training file, a CSV with a label map, scored headlines."""
    path = tmp_path / "tiny-suite.yaml"
    path.write_text(
        f"""name: tiny
sets:
  - name: own
    path: {fpb_file}
    format: fpb
  - name: news
    path: {csv_file}
    text_column: headline
    label_column: y
    label_map: {{0: negative, 1: neutral, 2: positive}}
  - name: headlines
    path: {scored_files[0]}
    format: jsonl
    text_column: title
    label_column: sentiment
    score_thresholds: [-0.1, 0.1]
""",
        encoding="utf-8",
    )
    return path


def _eval_json(cli: Callable[..., Result], *args: object) -> dict:
    result = cli("eval", *args, "--json", "--no-progress")
    assert result.code == 0, result.err
    return json.loads(result.out)


def files_of(report: dict) -> dict[str, Path]:
    return {kind: Path(path) for kind, path in report["report_files"].items()}


def _figures(metrics: dict) -> dict:
    return {k: metrics[k] for k in FIGURES}


def test_suite_figures_equal_eval_of_each_set(
    cli: Callable[..., Result],
    trained: Path,
    suite_file: Path,
    csv_file: Path,
    scored_files: tuple[Path, Path],
) -> None:
    report = _eval_json(cli, trained, "--suite", suite_file)
    assert report["models"] == ["tuned"]
    own, news, headlines = report["sets"]
    # The run's own data: its test split alone, as `finlora eval RUN` scores it.
    assert own["training_data"] is True and not news["training_data"]
    assert own["results"]["tuned"] == _figures(_eval_json(cli, trained))
    on_news = _eval_json(
        cli, trained, "--data", csv_file, "--text-column", "headline", "--label-column", "y",
        "--label-map", LABEL_MAP,
    )  # fmt: skip
    assert news["results"]["tuned"] == _figures(on_news)
    # Scores read with the thresholds give the labels the CSV twin holds.
    assert headlines["results"]["tuned"] == _figures(
        _eval_json(cli, trained, "--data", scored_files[1])
    )
    # The CSV's sentences come from the generator of the run's own data: the report counts the
    # rows that repeat a training or validation sentence, and says so under the table.
    run = Run.open(trained)
    data = run.prepared()
    assert isinstance(data, PreparedData)
    trained_on = {data.examples[i].text for i in (*run.split.train, *run.split.validation)}
    with csv_file.open(encoding="utf-8") as fh:
        news_texts = [row["headline"] for row in csv.DictReader(fh)]
    assert news["seen_in_training"] == sum(t in trained_on for t in news_texts) > 0
    markdown = files_of(report)["md"].read_text(encoding="utf-8")
    assert f"- news: {news['seen_in_training']} of its rows repeat sentences" in markdown
    mean = report["mean"]["tuned"]
    assert mean["n"] == 12 + 15 + 12
    assert mean["accuracy"] == pytest.approx(
        sum(s["results"]["tuned"]["accuracy"] for s in report["sets"]) / 3
    )
    files = files_of(report)
    assert files == {
        kind: trained / "eval" / f"suite-tiny.{kind}" for kind in ("md", "json", "png")
    }
    assert files["png"].stat().st_size > 0
    assert json.loads(files["json"].read_text())["sets"] == report["sets"]


def test_suite_markdown_with_baseline_rows(
    cli: Callable[..., Result], trained: Path, suite_file: Path
) -> None:
    result = cli("eval", trained, "--suite", suite_file, "--zero-shot", "--few-shot", "3",
                 "--no-progress")  # fmt: skip
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"## Suite tiny: {trained.name}"
    assert lines[2] == "| set | model | accuracy | macro-F1 | weighted-F1 | ECE | n |"
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    names = [(row.split(" | ")[0][2:], row.split(" | ")[1]) for row in rows]
    models = ["tuned", "zero-shot", "3-shot"]
    assert names == [
        *((f"own {TRAINING_MARK}", m) for m in models),
        *(("news", m) for m in models),
        *(("headlines", m) for m in models),
        *(("mean of 3 sets", m) for m in models),
    ]
    assert any(line.startswith("- Figures compare fairly only on sets held out") for line in lines)
    assert lines[-1] == f"reports: {trained / 'eval' / 'suite-tiny.md'} (and .json, .png)"
    report = json.loads((trained / "eval" / "suite-tiny.json").read_text())
    assert report["models"] == models
    assert report["few_shot"]["k"] == 3 and report["few_shot"]["seed"] == 42
    # The baselines' figures are those of the base model on each set alone.
    zero = _eval_json(cli, trained, "--zero-shot")
    assert report["sets"][0]["results"]["zero-shot"] == _figures(zero)
    few = _eval_json(cli, trained, "--few-shot", "3")
    assert report["sets"][0]["results"]["3-shot"] == _figures(few)


def test_few_shot_alone_scores_the_test_split(cli: Callable[..., Result], trained: Path) -> None:
    metrics = _eval_json(cli, trained, "--few-shot", "3")
    split = json.loads((trained / "split.json").read_text())
    assert metrics["n"] == len(split["test"]) == 12
    assert metrics["few_shot"]["k"] == 3
    assert Path(metrics["report_files"]["json"]) == trained / "eval" / "few-shot-3-test.json"
    text = cli("eval", trained, "--few-shot", "3", "--no-progress")
    assert text.out.splitlines()[0].startswith("3-shot base model on test split of ")


def test_few_shot_examples_come_from_the_training_split(trained: Path) -> None:
    run = Run.open(trained)
    data = run.prepared()
    train = {data.examples[i].source for i in run.split.train}
    picked = few_shot_examples(run, 5)
    assert {e.source for e in picked} <= train
    assert sorted(Counter(e.label for e in picked).values()) == [1, 2, 2]
    assert few_shot_examples(run, 5) == picked


def test_few_shot_refuses_an_encoder_run(
    trained: Path, tiny_cfg: Callable[..., RunConfig], tiny_encoder_dir: Path
) -> None:
    run = Run.open(trained)
    encoder = dataclasses.replace(run, config=tiny_cfg(model=tiny_encoder_dir))
    with pytest.raises(FinloraError, match="encoder run"):
        check_few_shot(encoder)


def test_suite_placeholder_path_is_refused_by_set(
    cli: Callable[..., Result], trained: Path, tmp_path: Path, csv_file: Path
) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text(
        f"sets:\n  - name: news\n    path: {csv_file}\n"
        "  - name: tfns\n    path: <sent_valid.csv>\n",
        encoding="utf-8",
    )
    assert_user_error(cli("eval", trained, "--suite", suite), "set 'tfns'", "placeholder")


def test_shipped_suite_template_names_its_first_placeholder(
    cli: Callable[..., Result], trained: Path
) -> None:
    template = Path(__file__).parents[2] / "configs" / "suites" / "fin-sentiment.yaml"
    assert_user_error(cli("eval", trained, "--suite", template), "set 'fpb'", "placeholder")


def test_suite_refuses_an_option_it_would_not_read(
    cli: Callable[..., Result], trained: Path, suite_file: Path, csv_file: Path
) -> None:
    result = cli("eval", trained, "--suite", suite_file, "--data", csv_file)
    assert_user_error(result, "--data: not read with --suite")
    result = cli("eval", trained, "--few-shot", "2", "--zero-shot")
    assert_user_error(result, "--zero-shot: not read with --few-shot alone")


def test_suite_names_the_set_of_an_unknown_label(
    cli: Callable[..., Result], trained: Path, tmp_path: Path
) -> None:
    data = tmp_path / "odd.csv"
    data.write_text("text,label\nShares rose.,bullish\n", encoding="utf-8")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"sets:\n  - name: odd\n    path: {data}\n", encoding="utf-8")
    assert_user_error(cli("eval", trained, "--suite", suite), "suite set 'odd'", "'bullish'")


def test_suite_and_few_shot_refuse_an_instruct_run(
    trained: Path, tiny_cfg: Callable[..., RunConfig], suite_file: Path
) -> None:
    run = Run.open(trained)
    instruct = dataclasses.replace(run, config=tiny_cfg("task=instruct"))
    with pytest.raises(FinloraError, match="--few-shot: .*'s task is instruct"):
        check_few_shot(instruct)
    with pytest.raises(FinloraError, match="--suite: .*'s task is instruct"):
        evaluate_suite(instruct, load_suite(suite_file))
