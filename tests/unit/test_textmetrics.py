"""Generated-text metrics: BLEU and ROUGE at their extremes and on a hand-counted case, and the
label-answer check (whole words, any case, exactly one valid label)."""

from __future__ import annotations

import pytest

from finlora.data import FPB_LABELS
from finlora.textmetrics import generation_metrics, label_answer_metrics, labels_named, rouge_l

ANSWERS = [
    "EBITDA stands for earnings before interest, taxes, depreciation and amortisation.",
    "The sentiment is negative: this is bad news for the company's shareholders.",
    "Free cash flow is operating cash flow minus capital expenditure.",
]


def test_identical_answers_score_full_marks() -> None:
    metrics = generation_metrics(ANSWERS, ANSWERS)
    assert metrics["bleu"] == pytest.approx(100.0)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert metrics[key] == pytest.approx(1.0)
    assert rouge_l(ANSWERS[0], ANSWERS[0]) == pytest.approx(1.0)


def test_disjoint_answers_score_nothing() -> None:
    predictions = ["zebra quantum violin", "purple mountain lake sky", "orbit"]
    metrics = generation_metrics(predictions, ANSWERS)
    assert metrics["bleu"] == pytest.approx(0.0, abs=1e-6)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert metrics[key] == 0.0
    assert rouge_l("zebra quantum violin", ANSWERS[0]) == 0.0


def test_rouge_on_a_hand_counted_answer() -> None:
    # 3 predicted words, all in the 6-word reference: P 1, R 1/2; bigrams 2 of 5: P 1, R 2/5.
    metrics = generation_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert metrics["rouge1"] == pytest.approx(2 / 3)
    assert metrics["rouge2"] == pytest.approx(2 * 0.4 / 1.4)
    assert metrics["rougeL"] == pytest.approx(2 / 3)
    assert metrics["bleu"] == 0.0  # no 4-gram in three words: corpus BLEU is 0
    # ROUGE lower-cases and stems (sales/sale, rises/rise).
    assert rouge_l("Sales rises", "sale rise") == pytest.approx(1.0)


def test_bleu_of_a_partial_answer_lies_between() -> None:
    partial = ["EBITDA stands for earnings before interest, taxes and amortisation."]
    metrics = generation_metrics(partial, ANSWERS[:1])
    assert 20 < metrics["bleu"] < 100
    assert 0.5 < metrics["rouge2"] < metrics["rouge1"] < 1


def test_rouge_is_the_mean_over_answers() -> None:
    metrics = generation_metrics(
        ["the cat sat", ANSWERS[0]], ["the cat sat on the mat", ANSWERS[0]]
    )
    assert metrics["rouge1"] == pytest.approx((2 / 3 + 1) / 2)


def test_generation_metrics_need_one_reference_per_answer() -> None:
    with pytest.raises(ValueError, match="one reference per prediction"):
        generation_metrics(ANSWERS, ANSWERS[:2])
    with pytest.raises(ValueError, match="at least one"):
        generation_metrics([], [])


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("Positive.", ["positive"]),
        ("The sentiment is NEGATIVE for investors", ["negative"]),
        ("neutral, because it states a fact", ["neutral"]),
        ("Not positive, rather negative.", ["negative", "positive"]),  # in label order
        ("Negatively surprising results.", []),  # a longer word is not the label
        ("The outlook is positively bright.", []),
        ("Neutrality was kept.", []),
        ("No sentiment at all.", []),
        ("(positive)", ["positive"]),
    ],
)
def test_labels_named_whole_words_any_case(text: str, named: list[str]) -> None:
    assert labels_named(text, FPB_LABELS) == named


def test_label_answer_metrics_counts() -> None:
    predictions = [
        "Positive. Sales rose.",  # one label, right
        "The sentiment is negative.",  # one label, wrong (gold neutral)
        "Positive or negative, hard to say.",  # two labels: neither share
        "Sales rose 5 %.",  # no label
        "Negatively, I would say.",  # no whole-word label
        "NEUTRAL",  # one label, right, any case
    ]
    gold = ["positive", "neutral", "negative", "positive", "negative", "neutral"]
    metrics = label_answer_metrics(predictions, gold, [FPB_LABELS] * 6)
    assert metrics == {
        "label_n": 6,
        "single_valid_label": pytest.approx(3 / 6),
        "label_accuracy": pytest.approx(2 / 6),
    }


def test_label_answer_metrics_use_each_answers_own_labels() -> None:
    # "buy" is not a valid label of the first answer, so only "positive" is named there.
    valid = [("negative", "positive"), ("buy", "hold", "sell")]
    metrics = label_answer_metrics(["positive: buy", "Hold."], ["positive", "hold"], valid)
    assert metrics["single_valid_label"] == 1.0 and metrics["label_accuracy"] == 1.0
    # Gold labels compare without case.
    assert label_answer_metrics(["Buy"], ["BUY"], [("buy", "sell")])["label_accuracy"] == 1.0


def test_label_answer_metrics_without_answers() -> None:
    assert label_answer_metrics([], [], []) == {"label_n": 0}
