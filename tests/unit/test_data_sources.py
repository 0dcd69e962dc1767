"""Several sources in one run (data.sources): the config, pooling, max_rows, weights, the
leakage report and data.dedup, and split.json's records of them (old files still loading)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from finlora.config import DataConfig, load_config
from finlora.data import Example, synthetic_sentiment
from finlora.data.leakage import find_leakage, normalise, without_leaks
from finlora.data.prepare import PreparedData, prepare_data
from finlora.data.sources import sample_rows, weighted_draws
from finlora.data.split import Split, stratified_split
from finlora.errors import FinloraError
from finlora.models import sha256_file
from finlora.runs import SplitRecord

TONES = {"negative": "bear", "positive": "bull", "neutral": "flat"}
CODES = {"negative": "0", "positive": "1", "neutral": "2"}  # Twitter Financial News' order


def per_label(k: int, seed: int) -> list[Example]:
    """`k` synthetic sentences of each label (seed 0 is the FPB fixture's; others differ)."""
    taken: Counter[str] = Counter()
    rows = []
    for e in synthetic_sentiment(400, seed=seed):
        if taken[e.label] < k:
            taken[e.label] += 1
            rows.append(e)
    return rows


def write_news(path: Path, rows: list[Example]) -> Path:
    """A CSV with columns id, headline, tone (bear / bull / flat)."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "headline", "tone"])
        for i, e in enumerate(rows):
            writer.writerow([i, e.text, TONES[e.label]])
    return path


def write_tweets(path: Path, rows: list[Example]) -> Path:
    """A CSV as Twitter Financial News Sentiment has it: text, label (0 / 1 / 2)."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for e in rows:
            writer.writerow([e.text, CODES[e.label]])
    return path


def tweet(text: str, i: int) -> str:
    """`text` as a tweet: a cashtag before, a link after, other case and punctuation."""
    return f"$TK{i} - {text.upper().replace(' .', '!!')} https://t.co/x{i}Yz"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, fpb_file: Path) -> dict[str, Path]:
    """The FPB fixture, a news CSV (30 rows) and a tweets CSV (60 rows, 6 of them near copies
    of FPB sentences)."""
    folder = tmp_path_factory.mktemp("sources")
    fpb = [Example(*line.rsplit("@", 1)) for line in fpb_file.read_text().splitlines()]
    planted = [Example(tweet(e.text, i), e.label) for i, e in enumerate(fpb[:6])]
    tweets = [Example(tweet(e.text, 100 + i), e.label) for i, e in enumerate(per_label(18, 2))]
    return {
        "fpb": fpb_file,
        "news": write_news(folder / "news.csv", per_label(10, 1)),
        "tweets": write_tweets(folder / "tweets.csv", tweets + planted),
    }


def sources_yaml(files: dict[str, Path], **extra: str) -> str:
    """A data.sources list for --set, with `extra` keys per source name (`tweets="weight: 2"`)."""
    entries = {
        "fpb": f"{{path: {files['fpb']}, name: fpb, format: fpb",
        "news": (
            f"{{path: {files['news']}, text_column: headline, label_column: tone, "
            "label_map: {bear: negative, bull: positive, flat: neutral}"
        ),
        "tweets": f"{{path: {files['tweets']}, label_map: '0=negative,1=positive,2=neutral'",
    }
    items = [e + (f", {extra[n]}" if n in extra else "") + "}" for n, e in entries.items()]
    return "data.sources=[" + ", ".join(items) + "]"


def data_config(files: dict[str, Path], *overrides: str, **extra: str) -> DataConfig:
    fractions = ["data.test_fraction=0.2", "data.val_fraction=0.2"]
    return load_config(None, [*fractions, sources_yaml(files, **extra), *overrides]).data


# ---- the config ---------------------------------------------------------------------------------


def test_a_recipe_lists_sources(tmp_path: Path, files: dict[str, Path]) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""data:
  sources:
    - path: {files["fpb"]}
      agreement: 75
    - name: tweets
      path: {files["tweets"]}
      format: csv
      label_map: {{0: negative, 1: positive, 2: neutral}}
      max_rows: 40
      weight: 1.5
  labels: [negative, neutral, positive]
  dedup: true
""",
        encoding="utf-8",
    )
    cfg = load_config(recipe)
    first, second = cfg.data.sources
    assert (first.path, first.agreement, first.resolved_name) == (
        str(files["fpb"]),
        "75",
        "Sentences_tiny",
    )
    assert second.label_map == "0=negative,1=positive,2=neutral"
    assert (second.max_rows, second.weight, cfg.data.dedup) == (40, 1.5, True)
    # A run's config.yaml reads back the same.
    assert load_config(None, []).data.sources == []
    from finlora.config import config_from_dict

    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.path=x.csv", "config: data.path and data.sources are both set"),
        ("data.text_column=headline", "config: data.text_column applies to data.path"),
        ("data.format=synthetic", "config: data.format applies to data.path"),
        ("task=instruct", "config: data.sources is for task classify"),
    ],
)
def test_sources_refuse_a_data_path_option(
    files: dict[str, Path], override: str, message: str
) -> None:
    with pytest.raises(FinloraError, match=message):
        data_config(files, override)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tweets": "weight: 0"}, r"config: data.sources\[2\].weight must be positive"),
        ({"tweets": "max_rows: 0"}, r"config: data.sources\[2\].max_rows must be a positive"),
        (
            {"tweets": "name: fpb"},
            r"config: data.sources\[2\].name 'fpb' is also data.sources\[0\]",
        ),
        ({"news": "name: 'a b'"}, r"config: data.sources\[1\].name must be letters"),
        ({"news": "format: synthetic"}, r"config: data.sources\[1\].format must be one of"),
        ({"news": "colour: red"}, r"config: unknown key 'data.sources\[1\].colour'"),
        ({"tweets": "label_column: text"}, r"data.sources\[2\].label_column must differ"),
    ],
)
def test_a_bad_source_is_one_line_naming_its_key(
    files: dict[str, Path], extra: dict[str, str], message: str
) -> None:
    with pytest.raises(FinloraError, match=message) as info:
        data_config(files, **extra)
    assert "\n" not in str(info.value)


def test_a_missing_source_file_names_its_key(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = data_config({**files, "tweets": tmp_path / "gone.csv"})
    with pytest.raises(FinloraError, match=r"^config: data.sources\[2\].path: .*gone.csv: no such"):
        prepare_data(cfg, seed=0)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nRevenue rose .,7\n", encoding="utf-8")
    with pytest.raises(FinloraError, match=r"bad.csv:2: unknown label '7'"):
        prepare_data(data_config({**files, "tweets": bad}), seed=0)


def test_fpb_dir_fallback_only_without_path_or_sources(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINLORA_FPB_DIR", str(files["fpb"]))
    assert DataConfig().resolved_path() == str(files["fpb"])
    cfg = data_config(files)
    assert cfg.resolved_path() is None
    assert [s.name for s in prepare_data(cfg, seed=0).sources] == ["fpb", "news", "tweets"]


# ---- pooling ------------------------------------------------------------------------------------


def test_sources_pool_one_split_per_source(files: dict[str, Path]) -> None:
    cfg = data_config(files)
    data = prepare_data(cfg, seed=42)
    assert data.labels == ["negative", "neutral", "positive"]
    assert [(s.name, s.start, s.stop, s.loaded) for s in data.sources] == [
        ("fpb", 0, 60, 60),
        ("news", 60, 90, 30),
        ("tweets", 90, 150, 60),
    ]
    assert data.description == "; ".join(f"{n}: {files[n]}" for n in ("fpb", "news", "tweets"))
    # The news file's own labels are mapped onto the run's.
    assert Counter(e.label for e in data.examples[60:90]) == dict.fromkeys(data.labels, 10)
    # Each source is split as it would be alone, by the run's seed; the pool is their union.
    for source in data.sources:
        alone = stratified_split(data.examples[source.start : source.stop], 0.2, 0.2, 42)
        for name in ("train", "validation", "test"):
            ours = [i - source.start for i in getattr(data.split, name) if i in source.rows]
            assert ours == list(getattr(alone, name)), (source.name, name)
    assert prepare_data(cfg, seed=42).split == data.split
    assert prepare_data(cfg, seed=7).split != data.split


def test_data_labels_give_the_order(files: dict[str, Path]) -> None:
    data = prepare_data(data_config(files, "data.labels=[positive, neutral, negative]"), 0)
    assert data.labels == ["positive", "neutral", "negative"]
    with pytest.raises(FinloraError, match="unknown label 'neutral'"):
        prepare_data(data_config(files, "data.labels=[positive, negative]"), 0)


def source_parts(data: PreparedData, index: int) -> dict[str, list[Example]]:
    """Source `index`'s examples in each split."""
    rows = data.sources[index].rows
    return {
        name: [data.examples[i] for i in getattr(data.split, name) if i in rows]
        for name in ("train", "validation", "test")
    }


def test_max_rows_samples_the_training_split_by_seed(files: dict[str, Path]) -> None:
    whole = source_parts(prepare_data(data_config(files), seed=42), 2)
    data = prepare_data(data_config(files, tweets="max_rows: 30"), seed=42)
    tweets = data.sources[2]
    parts = source_parts(data, 2)
    # 60 rows: 12 test, 10 validation, 38 training of which 30 are kept, 10 of each label.
    assert [len(whole[name]) for name in ("train", "validation", "test")] == [38, 10, 12]
    assert (len(tweets.rows), tweets.loaded, tweets.max_rows) == (52, 60, 30)
    assert Counter(e.label for e in parts["train"]) == dict.fromkeys(data.labels, 10)
    assert set(parts["train"]) < set(whole["train"])
    # Validation and test are the rows the whole file gives them: settings compare on them.
    assert (parts["validation"], parts["test"]) == (whole["validation"], whole["test"])
    again = prepare_data(data_config(files, tweets="max_rows: 30"), seed=42)
    other = prepare_data(data_config(files, tweets="max_rows: 30"), seed=43)
    assert again.examples == data.examples and other.examples[90:] != data.examples[90:]
    # More rows than the training split has: every row.
    assert prepare_data(data_config(files, tweets="max_rows: 38"), 42).examples == (
        prepare_data(data_config(files), 42).examples
    )
    rows = per_label(4, 3)
    assert sample_rows(rows, 99, 0) == list(range(12))
    with pytest.raises(FinloraError, match="cannot sample 2 rows stratified by label"):
        sample_rows(rows, 2, 0)


def test_weights_draw_training_rows_by_seed(files: dict[str, Path]) -> None:
    plain = prepare_data(data_config(files), seed=42)
    assert plain.train_draws is None and len(plain.rows("train")) == len(plain.split.train)
    data = prepare_data(data_config(files, news="weight: 2", tweets="weight: 0.5"), seed=42)
    assert data.split == plain.split  # weights change what an epoch draws, not the split
    draws = Counter(data.train_draws)
    fpb, news, tweets = ([i for i in data.split.train if i in s.rows] for s in data.sources)
    assert all(draws[i] == 1 for i in fpb) and all(draws[i] == 2 for i in news)
    drawn_tweets = [i for i in draws if i in data.sources[2].rows]
    assert len(drawn_tweets) == round(len(tweets) / 2) and set(drawn_tweets) <= set(tweets)
    assert [e.text for e in data.rows("train")] == [data.examples[i].text for i in data.train_draws]
    again = prepare_data(data_config(files, news="weight: 2", tweets="weight: 0.5"), seed=42)
    assert again.train_draws == data.train_draws
    # One source's weight leaves the other sources' draws as they were.
    other = prepare_data(data_config(files, news="weight: 3", tweets="weight: 0.5"), seed=42)
    assert [i for i in other.train_draws if i >= 90] == [i for i in data.train_draws if i >= 90]


def test_weighted_draws() -> None:
    assert weighted_draws([5, 6, 7, 8], 1.0, 0) == [5, 6, 7, 8]
    assert weighted_draws([5, 6, 7, 8], 2.0, 0) == [5, 5, 6, 6, 7, 7, 8, 8]
    half = weighted_draws([5, 6, 7, 8], 0.5, 0)
    assert len(half) == 2 and len(set(half)) == 2 and half == weighted_draws([5, 6, 7, 8], 0.5, 0)
    assert len(weighted_draws([5, 6, 7, 8], 1.5, (1, 2))) == 6
    assert weighted_draws([], 0.5, 0) == []


# ---- leakage ------------------------------------------------------------------------------------


def test_normalise_sets_aside_case_space_links_tickers_and_punctuation() -> None:
    assert normalise("$AAPL - Profit ROSE to EUR 3.1 mn !! https://t.co/Ab1 www.x.com/y") == (
        "profitrosetoeur31mn"
    )
    assert normalise("Net profit rose .") == normalise("net profit rose")
    assert normalise("Sales were $3.1 bn") == "saleswere31bn"  # an amount is not a ticker
    assert normalise("$TSLA https://t.co/x") == ""


def test_find_leakage_counts_exact_and_near_rows() -> None:
    texts = [
        "Profit rose .",  # 0 train
        "Sales fell",  # 1 train
        "$X profit ROSE! https://t.co/a",  # 2 test: near copy of 0
        "Profit rose .",  # 3 test: exact copy of 0
        "Sales fell https://t.co/b",  # 4 test: near copy of 1
        "Orders grew",  # 5 test: no copy
        "$Y https://t.co/c",  # 6 train: nothing left once normalised
        "$Z https://t.co/d",  # 7 test: nothing left, never matched
        "Sales fell",  # 8 validation: not compared
    ]
    examples = [Example(t, "neutral") for t in texts]
    split = Split(train=(0, 1, 6), validation=(8,), test=(2, 3, 4, 5, 7))
    leakage = find_leakage(examples, split)
    assert [(g.kind, g.train, g.test, g.exact) for g in leakage.groups] == [
        ("exact", (0,), (2, 3), (3,)),
        ("near", (1,), (4,), ()),
    ]
    assert leakage.counts() == {"exact": 1, "near": 2, "dropped_from_train": 0}
    assert leakage.counts(range(0, 4)) == {"exact": 1, "near": 1, "dropped_from_train": 0}
    assert without_leaks(split, leakage) == split
    dedup = find_leakage(examples, split, dedup=True)
    assert dedup.counts()["dropped_from_train"] == 2
    assert without_leaks(split, dedup) == Split((6,), (8,), (2, 3, 4, 5, 7))
    record = dedup.to_dict(lambda i: "a" if i < 4 else "b")
    assert record["groups"][1] == {
        "kind": "near",
        "text": "Sales fell https://t.co/b",
        "sources": ["a", "b"],
        "train": [1],
        "test": [4],
    }
    assert (record["exact"], record["near"], record["dedup"]) == (1, 2, True)


def brute_force_leaks(data: PreparedData) -> tuple[set[int], set[int], set[int]]:
    """(test rows with an exact copy in train, test rows with only a near one, train rows
    copied), pair by pair."""
    exact, near, train = set(), set(), set()
    for t in data.split.test:
        for r in data.split.train:
            a, b = data.examples[t].text, data.examples[r].text
            if a.strip() == b.strip():
                exact.add(t)
            if normalise(a) and normalise(a) == normalise(b):
                train.add(r)
                near.add(t)
    return exact, near - exact, train


def test_leakage_across_sources_and_dedup(files: dict[str, Path]) -> None:
    data = prepare_data(data_config(files), seed=42)
    exact, near, copied = brute_force_leaks(data)
    assert near and copied  # the planted tweets: some land in test, their sentence in train
    assert data.leakage is not None and not data.leakage.dedup
    assert data.leakage.exact_test_rows == exact and data.leakage.near_test_rows == near
    assert {i for g in data.leakage.groups for i in g.train} == copied
    assert any(
        len({data.source_of(i) for i in (*g.train, *g.test)}) == 2 for g in data.leakage.groups
    )

    deduped = prepare_data(data_config(files, "data.dedup=true"), seed=42)
    assert set(deduped.split.train) == set(data.split.train) - copied
    assert (deduped.split.validation, deduped.split.test) == (
        data.split.validation,
        data.split.test,
    )
    assert not find_leakage(deduped.examples, deduped.split).groups
    record = SplitRecord.of("classify", 42, deduped).to_dict()
    assert record["leakage"]["dropped_from_train"] == len(copied)
    assert record["leakage"]["near"] == len(near)
    per_source = {s["name"]: s["leakage"] for s in record["sources"]}
    assert sum(s["dropped_from_train"] for s in per_source.values()) == len(copied)
    assert sum(s["near"] for s in per_source.values()) == len(near)


# ---- split.json ---------------------------------------------------------------------------------

# split.json of the FPB fixture at seed 42 (test and validation 0.2) as finlora wrote it before
# data.sources: a one-file run's record must not change.
ONE_FILE_KEYS = ["task", "labels", "data", "synthetic", "files", "seed",
                 "duplicates_across_splits", "train", "validation", "test"]  # fmt: skip
ONE_FILE_SHA256 = "d5081554e04a7339eb33e25b2f5de6fe7e360404b658310055ac6e851840156d"
ONE_FILE_ROWS = {
    "train": [1, 2, 5, 6, 7, 8, 10, 11, 12, 13, 14, 17, 20, 21, 22, 23, 24, 25, 27, 28, 30, 31,
              36, 37, 40, 43, 44, 45, 47, 48, 49, 51, 53, 55, 56, 57, 58, 59],
    "validation": [3, 9, 15, 16, 19, 34, 38, 41, 42, 52],
    "test": [0, 4, 18, 26, 29, 32, 33, 35, 39, 46, 50, 54],
}  # fmt: skip


def one_file_split_json(fpb_file: Path) -> dict[str, object]:
    return {
        "task": "classify",
        "labels": ["negative", "neutral", "positive"],
        "data": str(fpb_file),
        "synthetic": False,
        "files": {str(fpb_file): ONE_FILE_SHA256},
        "seed": 42,
        "duplicates_across_splits": [],
        **ONE_FILE_ROWS,
    }


def test_a_one_file_record_keeps_its_layout(fpb_file: Path) -> None:
    cfg = load_config(
        None, [f"data.path={fpb_file}", "data.test_fraction=0.2", "data.val_fraction=0.2"]
    )
    record = SplitRecord.of("classify", 42, prepare_data(cfg.data, 42)).to_dict()
    assert list(record) == ONE_FILE_KEYS
    assert record == one_file_split_json(fpb_file)
    # data.dedup on one file adds its leakage report, and nothing else.
    deduped = load_config(None, [f"data.path={fpb_file}", "data.dedup=true"])
    keys = list(SplitRecord.of("classify", 42, prepare_data(deduped.data, 42)).to_dict())
    assert [k for k in keys if k not in ONE_FILE_KEYS] == ["leakage"]


def test_split_json_of_sources_round_trips(files: dict[str, Path], tmp_path: Path) -> None:
    data = prepare_data(data_config(files, tweets="max_rows: 24, weight: 2"), seed=42)
    record = SplitRecord.of("classify", 42, data)
    path = tmp_path / "split.json"
    record.write(path)
    raw = json.loads(path.read_text())
    assert list(raw)[-5:] == ["leakage", "sources", "train", "validation", "test"]
    tweets = raw["sources"][2]
    assert tweets == {
        "name": "tweets",
        "path": str(files["tweets"]),
        "sha256": sha256_file(files["tweets"]),
        "rows": [90, 136],
        "loaded": 60,
        "max_rows": 24,
        "weight": 2.0,
        "split": {
            name: sum(1 for i in raw[name] if 90 <= i < 136)
            for name in ("train", "validation", "test")
        },
        "train_draws": 2 * sum(1 for i in raw["train"] if 90 <= i < 136),
        "leakage": data.leakage.counts(range(90, 136)) if data.leakage else {},
    }
    assert sum(s["rows"][1] - s["rows"][0] for s in raw["sources"]) == len(data.examples)
    back = SplitRecord.read(path)
    assert back == record and back.source_names([0, 59, 60, 134]) == [
        "fpb",
        "fpb",
        "news",
        "tweets",
    ]
    raw["sources"][1]["rows"] = [5, 2]
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(FinloraError, match=r"split.json: malformed \('sources' entry"):
        SplitRecord.read(path)


def test_an_old_split_json_still_loads(tmp_path: Path, fpb_file: Path) -> None:
    path = tmp_path / "split.json"
    old = one_file_split_json(fpb_file)
    path.write_text(json.dumps(old, indent=2) + "\n", encoding="utf-8")
    record = SplitRecord.read(path)
    assert record.sources == [] and record.leakage is None
    assert record.source_names([0, 1]) == ["", ""]
    copy = tmp_path / "copy.json"
    record.write(copy)
    assert copy.read_bytes() == path.read_bytes()
