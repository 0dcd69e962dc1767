"""The packaged financial preference set: SYNTHETIC pairs generated from templates, for demos and
tests of preference tuning (it is not real data, and reports name it as such).

Three kinds of pair, each a prompt with a better and a worse answer:
- hedged vs overconfident: an investment question about an invented company or asset; the
  chosen answer weighs the uncertainty and points to diversification and personal advice, the
  rejected one promises a rise;
- worked vs wrong: a ratio from given figures; the chosen answer shows the formula and the
  working, the rejected one gives a wrong figure (inverted, a slipped decimal, the wrong
  operation) with no working;
- grounded vs invented: a question about a figure in a short company text; where the text does
  not hold it, the chosen answer says so and refuses to guess while the rejected one makes a
  number up; where it does, the chosen answer quotes it and the rejected one alters it.
The set is deterministic: the same records in the same order in every finlora version that does
not change this file (its digest is recorded in each run's split.json).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from finlora.data.preference import PreferenceRecord, parse_preference, unpaired

FIN_PREFERENCE_NOTE = (
    "finlora packaged financial preference set (SYNTHETIC pairs from templates: hedged vs "
    "overconfident, worked vs wrong, grounded vs invented; not real data)"
)
PAIRS_PER_KIND = 110

_COMPANIES = (
    "Nordvik Industries", "Halden Paper", "Kestrel Robotics", "Aurel Foods", "Brightwater "
    "Energy", "Corvane Shipping", "Lumen Retail", "Ostara Pharma", "Tessel Software",
    "Vantor Steel", "Mirova Telecom", "Glenholm Bank", "Saxby Logistics", "Pellion Chemicals",
)  # fmt: skip
_ASSETS = (
    "a single technology stock",
    "gold",
    "a leveraged oil ETF",
    "a newly listed small-cap",
    "a high-yield bond fund",
    "Bitcoin",
    "an emerging-market equity fund",
)
_EVENTS = (
    "a 20 % jump in quarterly profit",
    "a new CEO appointment",
    "a large share buyback",
    "a profit warning",
    "a takeover rumour",
    "a dividend increase",
    "a record order intake",
)


_HORIZONS = ("next month", "this year", "after its next results", "by the end of the quarter")
_POTS = ("retirement savings", "house deposit", "children's education fund", "emergency fund")


def _possessive(name: str) -> str:
    return f"{name}'" if name.endswith("s") else f"{name}'s"


def _hedged(rng: random.Random) -> tuple[str, str, str]:
    """(question, hedged answer, overconfident answer) about an invented company or asset."""
    company, event, asset = rng.choice(_COMPANIES), rng.choice(_EVENTS), rng.choice(_ASSETS)
    amount, pct = rng.choice((5, 10, 20, 50)), rng.choice((15, 30, 50))
    horizon, pot = rng.choice(_HORIZONS), rng.choice(_POTS)
    owner = _possessive(company)
    cases = (
        (f"{company} just announced {event}. Should I buy its shares now?",
         f"I can't tell you whether {owner} shares will rise: {event} may already be in the "
         "price, and short-term moves are not predictable. Consider your time horizon, how much "
         "of your portfolio one stock should be, and your tolerance for losses; for a personal "
         "recommendation, speak to a licensed adviser.",
         f"Yes, buy now. After {event} {owner} shares will certainly rise at least {pct} % "
         "within weeks. This is a guaranteed win."),
        (f"I have EUR {amount},000 saved. Should I put all of it into {asset}?",
         f"Putting all of it into {asset} concentrates your risk: it could fall sharply and "
         "nothing guarantees a return. Many investors keep an emergency fund first and spread "
         "the rest across assets that suit their horizon and risk tolerance. A licensed "
         "adviser can look at your whole situation.",
         f"Absolutely. {asset[0].upper() + asset[1:]} is the best investment right now and will "
         f"return at least {pct} % this year. Put everything in before it is too late."),
        (f"Will {owner} stock go up {horizon}?",
         f"Nobody can reliably say where {owner} stock will be {horizon}. Results, interest "
         "rates and market sentiment all move prices, so any forecast is uncertain. If you are "
         "considering an investment, look at the company's fundamentals and at how it fits a "
         "diversified portfolio.",
         f"Yes. {owner} stock will go up {horizon}; the trend makes that certain."),
        (f"Is {asset} a safe place for my {pot}?",
         f"No investment is entirely safe, and {asset} can lose value, sometimes a lot. Money "
         f"for your {pot} is usually spread across several asset classes, with the mix depending "
         "on when you need it. A licensed adviser can help you choose.",
         f"Yes, {asset} is completely safe for your {pot} and cannot lose value over time."),
    )  # fmt: skip
    return rng.choice(cases)


def _money(rng: random.Random, low: float, high: float) -> float:
    return round(rng.uniform(low, high), 1)


def _ratio(rng: random.Random) -> tuple[str, str, str, float, Callable[[float], str]]:
    """(instruction, input, working, value, how the value is written) of one ratio."""
    a, b = _money(rng, 20, 90), _money(rng, 5, 60)
    cases = (
        ("Compute the current ratio.",
         f"Current assets: EUR {a} mn. Current liabilities: EUR {b} mn.",
         f"Current ratio = current assets / current liabilities = {a} / {b}", a / b, _x),
        ("Compute the P/E ratio.",
         f"Share price: EUR {a}. Earnings per share: EUR {round(b / 10, 2)}.",
         f"P/E = share price / earnings per share = {a} / {round(b / 10, 2)}",
         a / round(b / 10, 2), _x),
        ("Compute the gross margin.",
         f"Revenue: EUR {a + b:.1f} mn. Cost of goods sold: EUR {a} mn.",
         f"Gross margin = (revenue - cost of goods sold) / revenue = ({a + b:.1f} - {a}) / "
         f"{a + b:.1f}", b / (a + b), _pct),
        ("Compute the dividend yield.",
         f"Dividend per share: EUR {round(b / 20, 2)}. Share price: EUR {a}.",
         f"Dividend yield = dividend per share / share price = {round(b / 20, 2)} / {a}",
         round(b / 20, 2) / a, _pct),
        ("Compute the debt-to-equity ratio.",
         f"Total debt: EUR {b} mn. Shareholders' equity: EUR {a} mn.",
         f"Debt-to-equity = total debt / equity = {b} / {a}", b / a, _x),
        ("Compute the return on equity.",
         f"Net income: EUR {round(b / 5, 1)} mn. Shareholders' equity: EUR {a} mn.",
         f"ROE = net income / equity = {round(b / 5, 1)} / {a}", round(b / 5, 1) / a, _pct),
        ("Compute year-on-year revenue growth.",
         f"Revenue this year: EUR {a + b:.1f} mn. Revenue last year: EUR {a} mn.",
         f"Growth = (this year - last year) / last year = ({a + b:.1f} - {a}) / {a}", b / a, _pct),
    )  # fmt: skip
    return rng.choice(cases)


def _x(value: float) -> str:
    return f"{value:.2f}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def _wrong(rng: random.Random, value: float, write: Callable[[float], str]) -> str:
    """A figure a careless answer gives: inverted, a decimal slipped, or simply off."""
    slips = (1 / value if value else value + 1, value * 10, value / 10, value * 1.37 + 0.05)
    wrong = rng.choice(slips)
    if write(wrong) == write(value):
        wrong = value * 2 + 0.1
    return write(wrong)


def _worked(rng: random.Random) -> tuple[str, str, str, str]:
    """(instruction, figures, worked answer, wrong figure without working)."""
    instruction, given, working, value, write = _ratio(rng)
    wrong = rng.choice(("It is {}.", "The answer is {}.", "{}, clearly."))
    return (
        instruction,
        given,
        f"{working} = {write(value)}.",
        wrong.format(_wrong(rng, value, write)),
    )


_METRICS = ("operating profit", "net income", "EBITDA", "order intake", "free cash flow")


def _grounded(rng: random.Random) -> tuple[str, str, str, str]:
    """(question, company text, grounded answer, invented or altered figure)."""
    company, year = rng.choice(_COMPANIES), rng.choice((2021, 2022, 2023, 2024))
    owner = _possessive(company)
    sales, growth = _money(rng, 50, 900), rng.choice((3, 6, 9, 12, 15))
    given, asked = rng.sample(_METRICS, 2)
    figure = _money(rng, 5, 80)
    text = (
        f"{company} reported net sales of EUR {sales} mn for {year}, up {growth} % on the "
        f"previous year. Its {given} was EUR {figure} mn."
    )
    if rng.random() < 0.3:  # the figure is in the text: quote it, do not alter it
        instruction = f"What was {owner} {given} in {year}?"
        chosen = f"According to the text, {owner} {given} in {year} was EUR {figure} mn."
        rejected = f"{owner} {given} in {year} was EUR {round(figure * 1.3 + 2, 1)} mn."
    else:
        instruction = f"What was {owner} {asked} in {year}?"
        chosen = (
            f"The text does not give {owner} {asked} for {year}: it reports net sales of "
            f"EUR {sales} mn (up {growth} %) and {given} of EUR {figure} mn. I can't state "
            f"the {asked} without that figure, and I won't guess it."
        )
        rejected = f"{owner} {asked} in {year} was EUR {_money(rng, 5, 80)} mn."
    return instruction, text, chosen, rejected


def _kind(
    name: str, make: Callable[[random.Random], tuple[str, ...]], seed: int
) -> list[PreferenceRecord]:
    """PAIRS_PER_KIND records of one kind, no prompt twice (a repeated prompt could land in
    both the training and the test split)."""
    rng = random.Random(f"{name}:{seed}")
    records: list[PreferenceRecord] = []
    seen: set[tuple[str, ...]] = set()
    while len(records) < PAIRS_PER_KIND:
        made = make(rng)
        prompt, given, chosen, rejected = made if len(made) == 4 else (made[0], "", *made[1:])
        if (prompt, given) in seen:
            continue
        seen.add((prompt, given))
        row = {"prompt": prompt, "input": given, "chosen": chosen, "rejected": rejected}
        records.append(parse_preference(f"finlora:fin-preference:{name}:{len(records)}", row))
    return records


def fin_preference_set(seed: int = 0) -> list[PreferenceRecord]:
    """The packaged pairs: PAIRS_PER_KIND of each kind, interleaved; deterministic."""
    kinds = [
        _kind("hedged", _hedged, seed),
        _kind("worked", _worked, seed),
        _kind("grounded", _grounded, seed),
    ]
    return [records[i] for i in range(PAIRS_PER_KIND) for records in kinds]


def fin_preference_kto(seed: int = 0) -> list[PreferenceRecord]:
    """The same set unpaired for KTO: each chosen answer desirable, each rejected one not."""
    return unpaired(fin_preference_set(seed))
