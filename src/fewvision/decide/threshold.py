"""Decision thresholds for anomaly scores. An image is flagged anomalous when ``score > threshold``.

* :func:`conformal_threshold` - from good images alone (split conformal prediction; Vovk et al. 2005, Angelopoulos &
  Bates 2021): with ``n`` held-out good scores and a target false-reject rate ``alpha``, the threshold is the
  ``k = ceil((n + 1)(1 - alpha))``-th smallest score. For a new good image exchangeable with the held-out ones,
  ``P(score > threshold) <= 1 - k / (n + 1) <= alpha``. When ``k > n`` no held-out score gives the guarantee and
  the function refuses, naming the number of good images needed.
* :func:`f1_threshold` and :func:`recall_threshold` - when labelled defects exist: the F1-optimal threshold and the
  highest threshold that still catches a chosen fraction of the defects.

No function here returns a threshold that would flag every held-out good image (anomalib #2433): it raises
:class:`ThresholdError` instead.
"""

from __future__ import annotations

import math

import numpy as np


class ThresholdError(ValueError):
    """No usable threshold can be chosen; the message says why and what to supply."""


def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))`` computed so that float rounding cannot add one (e.g. 100 * 0.99)."""
    return math.ceil(round((n + 1) * (1.0 - alpha), 9))


def min_calibration_size(alpha: float) -> int:
    """The smallest number of held-out good images for which the conformal threshold exists at ``alpha``."""
    _check_alpha(alpha)
    n = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def tightest_target(n: int) -> float:
    """The smallest false-reject rate ``n`` calibration scores support: 1 / (n + 1) (the largest score)."""
    if n < 1:
        raise ThresholdError("no calibration scores: at least one good image must calibrate the threshold")
    return 1.0 / (n + 1)


def supported_target(alpha: float, n: int) -> tuple[float, str | None]:
    """(the target to use, None) when ``n`` scores support ``alpha``; else (the tightest they support, a sentence
    saying so)."""
    _check_alpha(alpha)
    if conformal_rank(n, alpha) <= n:
        return float(alpha), None
    tightest = tightest_target(n)
    return tightest, (f"a false-reject rate of {alpha:g} needs at least {min_calibration_size(alpha)} calibration "
                      f"images; {n} support at best {tightest:.3g}, so the threshold is set for that")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ThresholdError(f"the target false-reject rate must be in (0, 1), got {alpha}")


def _scores(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ThresholdError(f"{what} contain NaN or infinite values")
    return arr


def check_not_all_flagged(threshold: float, good_scores, what: str = "threshold") -> None:
    """Raise when ``threshold`` would flag every good image given."""
    good = _scores(good_scores, "good scores")
    if len(good) and bool(np.all(good > threshold)):
        raise ThresholdError(f"the {what} {threshold:.6g} would flag all {len(good)} good images as anomalous "
                             f"(lowest good score {good.min():.6g}); refusing it")


def conformal_threshold(good_scores, alpha: float) -> float:
    """The split-conformal threshold for false-reject rate ``alpha`` from held-out good scores."""
    _check_alpha(alpha)
    good = np.sort(_scores(good_scores, "held-out good scores"))
    n = len(good)
    k = conformal_rank(n, alpha)
    if n == 0 or k > n:
        need = min_calibration_size(alpha)
        raise ThresholdError(
            f"a false-reject rate of {alpha:g} needs at least {need} calibration images for the conformal "
            f"guarantee, got {n}: add good images or raise the target false-reject rate"
        )
    threshold = float(good[k - 1])
    check_not_all_flagged(threshold, good, "conformal threshold")
    return threshold


def _candidates(scores: np.ndarray) -> np.ndarray:
    """Thresholds between consecutive distinct scores, plus one below the lowest (all distinct decisions)."""
    u = np.unique(scores)
    mids = (u[:-1] + u[1:]) / 2.0
    below = u[0] - max(1.0, abs(u[0])) * 1e-6
    return np.concatenate([[below], mids, [u[-1]]])


def _confusion(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray):
    """tp, fp, fn for every threshold (flag = score > t), vectorised over sorted scores."""
    order = np.argsort(scores)
    s, y = scores[order], labels[order]
    # number of items with score <= t
    below = np.searchsorted(s, thresholds, side="right")
    pos_below = np.concatenate([[0], np.cumsum(y)])[below]
    neg_below = below - pos_below
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    return n_pos - pos_below, n_neg - neg_below, pos_below


def _labelled(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, "scores")
    y = np.asarray(labels).astype(bool).reshape(-1)
    if len(s) != len(y):
        raise ThresholdError(f"{len(s)} scores but {len(y)} labels")
    if y.all() or not y.any():
        raise ThresholdError("labelled thresholds need both good and defective images")
    return s, y.astype(np.int64)


def f1_threshold(scores, is_defect) -> float:
    """The threshold (flag = score > t) with the highest F1 for the defect class; ties: the highest threshold."""
    s, y = _labelled(scores, is_defect)
    t = _candidates(s)
    tp, fp, fn = _confusion(s, y, t)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(t)), where=(2 * tp + fp + fn) > 0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])
    threshold = float(t[best])
    check_not_all_flagged(threshold, s[y == 0], "F1-optimal threshold")
    return threshold


def recall_threshold(scores, is_defect, recall: float) -> float:
    """The highest threshold (flag = score > t) that flags at least ``recall`` of the defective images."""
    if not 0 < recall <= 1:
        raise ThresholdError(f"recall must be in (0, 1], got {recall}")
    s, y = _labelled(scores, is_defect)
    t = _candidates(s)
    tp, _, _ = _confusion(s, y, t)
    ok = np.flatnonzero(tp >= recall * y.sum() - 1e-9)
    threshold = float(t[ok[-1]])
    check_not_all_flagged(threshold, s[y == 0], f"threshold for recall {recall:g}")
    return threshold


__all__ = ["ThresholdError", "conformal_threshold", "min_calibration_size", "f1_threshold", "recall_threshold",
           "check_not_all_flagged", "conformal_rank", "supported_target", "tightest_target"]
