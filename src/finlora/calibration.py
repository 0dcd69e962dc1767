"""Temperature scaling (Guo et al., 2017): one number, fitted on the validation split after
training, that divides the label scores before their softmax.

Dividing by a positive temperature changes no row's argmax, so accuracy and F1 stay as they are;
only the confidence moves toward how often the model is right. A run stores its temperature in
RUN/calibration.json and every scoring of the tuned run (predict, eval, serve) applies it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from finlora.metrics import expected_calibration_error

# A temperature outside these bounds only sharpens or flattens a tiny validation split's last
# few rows; the bound keeps one unlucky split from turning probabilities into 0/1 or uniform.
LOW, HIGH = 0.05, 20.0


def fit_temperature(scores: np.ndarray, gold: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of `gold` (N,) under
    softmax(scores / T), `scores` being (N, K) label log-likelihoods (a per-row constant does
    not matter). 1.0 when there is nothing to fit on."""
    if len(gold) == 0:
        return 1.0
    rows = np.arange(len(gold))

    def nll(log_t: float) -> float:
        return float(-log_softmax(scores / math.exp(log_t), axis=1)[rows, gold].mean())

    found = minimize_scalar(nll, bounds=(math.log(LOW), math.log(HIGH)), method="bounded")
    return round(float(math.exp(found.x)), 6)


def calibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """`probs` (N, K), rows summing to 1, as softmax(log p / T): what softmax(scores / T) gives
    for the scores those probabilities came from."""
    if temperature == 1.0:
        return probs
    with np.errstate(divide="ignore"):
        logp = np.log(probs)
    return softmax(logp / temperature, axis=1)


def ece_of(scores: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Expected calibration error of softmax(scores / T) against `gold` (N,)."""
    probs = softmax(scores / temperature, axis=1)
    predicted = probs.argmax(1)
    return expected_calibration_error(probs.max(1), predicted == gold)
