"""Temperature scaling (Guo et al. 2017): one scalar T > 0 dividing the log-probabilities, fitted on held-out
calibration images by minimising the negative log-likelihood (scipy, bounded search over log T)."""

from __future__ import annotations

import math

import numpy as np


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits, labels). Log-probabilities work as logits."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(logits) == 0:
        raise ValueError("temperature scaling needs at least one calibration image")

    def nll(log_t: float) -> float:
        return float(-_log_softmax(logits / math.exp(log_t))[np.arange(len(labels)), labels].mean())

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-6})
    return float(math.exp(res.x))


def apply_temperature(proba: np.ndarray, temperature: float | None) -> np.ndarray:
    """softmax(log p / T): temperature scaling of probabilities (as ``modelfile.probabilities`` applies it)."""
    if not temperature or temperature == 1.0:
        return proba
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), 1e-300, None)) / float(temperature)
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
