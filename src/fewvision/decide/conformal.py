"""Prediction sets a user can trust to say "I am not sure" (temperature scaling is in :mod:`.calibration`).

* Split-conformal prediction sets (Vovk et al. 2005; Angelopoulos & Bates 2021) at miscoverage ``alpha``:
  ``lac`` scores s(x, y) = 1 - p_y (Sadinle, Lei & Wasserman 2019, "least ambiguous set-valued classifiers");
  ``aps`` scores s(x, y) = total probability of the classes ranked at or above y (Romano, Sesia & Candes 2020,
  non-randomised). The threshold is the ceil((n+1)(1-alpha))/n empirical quantile of the n calibration scores, so
  P(y in set) >= 1 - alpha for exchangeable data. ``mondrian`` uses one threshold per true class (class-conditional
  coverage, Vovk 2012).
* Abstention: an image whose set is not exactly one class is routed to ``review`` (:mod:`.review`).

See docs/decisions.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SCORES = ("lac", "aps")


def nonconformity(proba: np.ndarray, score: str) -> np.ndarray:
    """Score of every (image, class) pair, [N, C]; a class enters the set when its score is <= the threshold."""
    proba = np.asarray(proba, dtype=np.float64)
    if score == "lac":
        return 1.0 - proba
    if score == "aps":
        order = np.argsort(-proba, axis=1, kind="stable")
        cumulative = np.cumsum(np.take_along_axis(proba, order, axis=1), axis=1)
        out = np.empty_like(proba)
        np.put_along_axis(out, order, cumulative, axis=1)
        return out
    raise ValueError(f"unknown conformal score '{score}': expected one of {', '.join(SCORES)}")


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The ceil((n+1)(1-alpha))/n empirical quantile; +inf when n is too small for that level (every class kept)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha))
    return float("inf") if n == 0 or rank > n else float(scores[rank - 1])


def calibrate_conformal(proba: np.ndarray, labels: np.ndarray, alpha: float, score: str = "lac",
                        mondrian: bool = False) -> dict[str, Any]:
    """Thresholds from calibration probabilities and true labels, as stored in a model's ``decision`` dict."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    true_scores = nonconformity(proba, score)[np.arange(len(labels)), labels]
    if mondrian:
        thresholds = [conformal_quantile(true_scores[labels == c], alpha) for c in range(proba.shape[1])]
    else:
        thresholds = [conformal_quantile(true_scores, alpha)] * proba.shape[1]
    counts = np.bincount(labels, minlength=proba.shape[1])
    return {"score": score, "alpha": float(alpha), "mondrian": bool(mondrian), "n_calibration": int(len(labels)),
            "n_calibration_per_class": counts.tolist(),
            # JSON has no infinity: a class whose threshold is unbounded is stored as null and always included.
            "thresholds": [None if math.isinf(t) else t for t in thresholds]}


def prediction_sets(proba: np.ndarray, conformal: dict[str, Any]) -> np.ndarray:
    """Boolean [N, C]: class c is in image i's set."""
    thresholds = np.array([np.inf if t is None else t for t in conformal["thresholds"]], dtype=np.float64)
    # A tiny slack so a calibration score equal to its threshold stays inside after float32 round trips.
    return nonconformity(proba, conformal["score"]) <= thresholds[None, :] + 1e-9


def set_metrics(sets: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Empirical coverage, mean set size and the share of singleton sets; per-class coverage when names are given."""
    labels = np.asarray(labels, dtype=np.int64)
    covered = sets[np.arange(len(labels)), labels]
    sizes = sets.sum(axis=1)
    out: dict[str, Any] = {"coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()),
                           "singleton_rate": float((sizes == 1).mean())}
    if class_names is not None:
        out["coverage_per_class"] = {n: float(covered[labels == c].mean()) for c, n in enumerate(class_names)
                                     if (labels == c).any()}
    return out
