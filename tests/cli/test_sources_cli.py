"""A run on several sources end to end on the tiny causal model: an FPB-format file and two CSV
files with their own columns and label maps; split.json's records, and `finlora eval` on every
source's test split and on the pool."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import Result, assert_user_error, set_args

from finlora.config import load_config
from finlora.data import Example, synthetic_sentiment
from finlora.inference import load_run
from finlora.metrics import classification_metrics
from finlora.models import sha256_file
from finlora.train import train

SOURCES = ("fpb", "news", "tweets")
SUMMARY = ("n", "accuracy", "macro_f1", "weighted_f1", "ece")
FPB_FIXTURE_SHA256 = "d5081554e04a7339eb33e25b2f5de6fe7e360404b658310055ac6e851840156d"


def per_label(k: int, seed: int) -> list[Example]:
    taken: Counter[str] = Counter()
    rows = []
    for e in synthetic_sentiment(400, seed=seed):
        if taken[e.label] < k:
            taken[e.label] += 1
            rows.append(e)
    return rows


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def sources_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str], fpb_file: Path
) -> Path:
    """Three sources (tweets: 24 of its 38 training rows, drawn twice, 6 of them near copies of
    FPB sentences), data.dedup on, trained for 4 steps."""
    folder = tmp_path_factory.mktemp("sources-run")
    tones = {"negative": "bear", "positive": "bull", "neutral": "flat"}
    codes = {"negative": "0", "positive": "1", "neutral": "2"}
    news = [[e.text, tones[e.label]] for e in per_label(10, 1)]
    fpb = [line.rsplit("@", 1) for line in fpb_file.read_text().splitlines()]
    tweets = [
        [f"$TK {e.text} https://t.co/{i}", codes[e.label]] for i, e in enumerate(per_label(18, 2))
    ]
    tweets += [
        [f"$TK {text.upper()} https://t.co/p{i}", codes[label]]
        for i, (text, label) in enumerate(fpb[:6])
    ]
    write_csv(folder / "news.csv", ["headline", "tone"], news)
    write_csv(folder / "tweets.csv", ["text", "label"], tweets)
    sources = (
        f"data.sources=[{{path: {fpb_file}, name: fpb}}, "
        f"{{path: {folder / 'news.csv'}, name: news, text_column: headline, label_column: tone, "
        "label_map: {bear: negative, bull: positive, flat: neutral}}, "
        f"{{path: {folder / 'tweets.csv'}, name: tweets, max_rows: 24, weight: 2, "
        "label_map: '0=negative,1=positive,2=neutral'}]"
    )
    without_path = [o for o in tiny_overrides if not o.startswith("data.path=")]
    cfg = load_config(None, [*without_path, sources, "data.dedup=true"])
    output = folder / "run"
    train(cfg, output, progress_bar=False, log=lambda message: None)
    return output


def test_split_json_records_every_source(sources_run: Path) -> None:
    split = json.loads((sources_run / "split.json").read_text())
    assert list(split) == [
        "task", "labels", "data", "synthetic", "files", "seed", "duplicates_across_splits",
        "leakage", "sources", "train", "validation", "test",
    ]  # fmt: skip
    assert split["labels"] == ["negative", "neutral", "positive"]
    records = split["sources"]
    assert [s["name"] for s in records] == list(SOURCES)
    assert [s["rows"] for s in records] == [[0, 60], [60, 90], [90, 136]]
    assert [(s["loaded"], s["max_rows"], s["weight"]) for s in records] == [
        (60, None, 1.0),
        (30, None, 1.0),
        (60, 24, 2.0),
    ]
    for s in records:
        assert Path(s["path"]).is_absolute() and s["sha256"] == sha256_file(Path(s["path"]))
        assert split["files"][s["path"]] == s["sha256"]
        start, stop = s["rows"]
        counts = {
            n: sum(1 for i in split[n] if start <= i < stop)
            for n in ("train", "validation", "test")
        }
        assert s["split"] == counts and all(counts.values())
        assert s["train_draws"] == s["weight"] * counts["train"]
        assert sum(counts.values()) + s["leakage"]["dropped_from_train"] == stop - start
    leakage = split["leakage"]
    assert leakage["dedup"] is True and leakage["dropped_from_train"] > 0
    assert leakage["dropped_from_train"] == sum(s["leakage"]["dropped_from_train"] for s in records)
    assert {tuple(g["sources"]) for g in leakage["groups"]} >= {("fpb", "tweets")}
    dropped = {i for g in leakage["groups"] for i in g["train"]}
    assert dropped and dropped.isdisjoint(split["train"])


def test_eval_reports_each_source_and_the_pool(
    cli: Callable[..., Result], sources_run: Path
) -> None:
    result = cli("eval", sources_run, "--json", "--no-progress")
    assert result.code == 0, result.err
    metrics = json.loads(result.out)
    assert list(metrics["sources"]) == list(SOURCES)

    loaded = load_run(sources_run)
    split = loaded.run.split
    rows = loaded.run.test_rows()[1]
    probs = loaded.proba([e.text for e in rows], progress=False)
    gold = [e.label for e in rows]
    predicted = [loaded.labels[i] for i in probs.argmax(1)]
    pooled = classification_metrics(gold, predicted, probs, loaded.labels)
    for key in SUMMARY:  # the pooled figure is computed on all test rows at once
        assert metrics[key] == pytest.approx(pooled[key], abs=1e-6), key
    names = split.source_names(split.test)
    for name in SOURCES:
        mine = [i for i, n in enumerate(names) if n == name]
        own = classification_metrics(
            [gold[i] for i in mine], [predicted[i] for i in mine], probs[mine], loaded.labels
        )
        reported = metrics["sources"][name]
        for key in SUMMARY:
            assert reported[key] == pytest.approx(own[key], abs=1e-6), (name, key)
        report = json.loads(Path(reported["report_files"]["json"]).read_text())
        assert Path(reported["report_files"]["json"]).name == f"test-{name}.json"
        assert report["confusion_matrix"] == own["confusion_matrix"]
    assert sum(s["n"] for s in metrics["sources"].values()) == metrics["n"]
    eval_dir = sources_run / "eval"
    assert json.loads((eval_dir / "test.json").read_text())["sources"] == metrics["sources"]

    text = cli("eval", sources_run, "--no-progress")
    assert text.code == 0, text.err
    rows = [line.split() for line in text.out.splitlines()]
    table = [row for row in rows if row and row[0] in (*SOURCES, "pooled")]
    assert [row[0] for row in table] == [*SOURCES, "pooled"]
    assert table[-1][1] == f"{metrics['accuracy']:.4f}" and table[-1][-1] == str(metrics["n"])
    assert "pooled" in (eval_dir / "test.txt").read_text()


def test_eval_refuses_a_changed_source(cli: Callable[..., Result], sources_run: Path) -> None:
    news = Path(json.loads((sources_run / "split.json").read_text())["sources"][1]["path"])
    before = news.read_bytes()
    try:
        news.write_bytes(before + b"Orders grew .,bull\n")
        assert_user_error(
            cli("eval", sources_run, "--no-progress"), "news.csv: changed since training"
        )
    finally:
        news.write_bytes(before)


def test_a_one_file_run_writes_split_json_as_before(
    cli: Callable[..., Result],
    config_file: Path,
    tiny_overrides: list[str],
    fpb_file: Path,
    tmp_path: Path,
) -> None:
    """The FPB fixture's split.json, byte for byte as finlora wrote it before data.sources."""
    output = tmp_path / "run"
    args = set_args([*tiny_overrides, "train.max_steps=1"])
    result = cli("train", config_file, "--output", output, "--no-progress", *args)
    assert result.code == 0, result.err
    expected = {
        "task": "classify",
        "labels": ["negative", "neutral", "positive"],
        "data": str(fpb_file),
        "synthetic": False,
        "files": {str(fpb_file): FPB_FIXTURE_SHA256},
        "seed": 42,
        "duplicates_across_splits": [],
        "train": [1, 2, 5, 6, 7, 8, 10, 11, 12, 13, 14, 17, 20, 21, 22, 23, 24, 25, 27, 28, 30,
                  31, 36, 37, 40, 43, 44, 45, 47, 48, 49, 51, 53, 55, 56, 57, 58, 59],
        "validation": [3, 9, 15, 16, 19, 34, 38, 41, 42, 52],
        "test": [0, 4, 18, 26, 29, 32, 33, 35, 39, 46, 50, 54],
    }  # fmt: skip
    assert (output / "split.json").read_text() == json.dumps(expected, indent=2) + "\n"
