"""Anomaly-detection metrics: image level (AUROC, AUPR, F1 / false-reject / miss rate at a threshold, bootstrap
intervals for AUROC) and pixel level (AUROC over all pixels, AUPRO up to FPR 0.3).

AUPRO follows the MVTec AD evaluation (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, Sec. 5.2
and its reference code ``pro_curve_util.compute_pro``): ground-truth defects are split into connected components
(8-connectivity); at every threshold the per-region overlap (PRO) is the mean over all regions of the fraction of
the region's pixels flagged, and the false-positive rate is the fraction of defect-free pixels flagged. The PRO
curve is integrated (trapezoids) over FPR from 0 to 0.3 and divided by 0.3, so 1.0 is perfect.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .ranking import average_precision, roc_auc

DEFAULT_FPR_LIMIT = 0.3
# The bilinear-form bootstrap builds an n_defect x n_good matrix; above this size it loops instead.
_BOOT_MATRIX_LIMIT = 4_000_000


def _binary(labels) -> np.ndarray:
    y = np.asarray(labels).astype(bool).reshape(-1)
    return y


def image_metrics(scores, is_defect, threshold: float | None) -> dict[str, Any]:
    """AUROC, AUPR (average precision) and, given a threshold (flag = score > t), F1 and the error rates."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _binary(is_defect)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    n_defect, n_good = int(y.sum()), int((~y).sum())
    out: dict[str, Any] = {"n_good": n_good, "n_defect": n_defect}
    if n_defect and n_good:
        out["image_auroc"] = roc_auc(y, s)
        out["image_aupr"] = average_precision(y, s)
    if threshold is not None:
        flagged = s > threshold
        tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
        fn = n_defect - tp
        out["threshold"] = float(threshold)
        out["image_f1"] = float(2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) else 0.0
        out["false_reject_rate"] = float(fp / n_good) if n_good else None
        out["miss_rate"] = float(fn / n_defect) if n_defect else None
        out["precision"] = float(tp / (tp + fp)) if (tp + fp) else None
        out["recall"] = float(tp / n_defect) if n_defect else None
    return out


def auroc_bootstrap_ci(scores, is_defect, *, n_bootstrap: int = 1000, seed: int = 0,
                       confidence: float = 0.95) -> list[float]:
    """Percentile-bootstrap interval for image AUROC, resampling good and defective images separately.

    AUROC is the Mann-Whitney statistic ``P(s_defect > s_good) + 0.5 P(=)``; for a resample with multiplicities
    ``a`` (defects) and ``b`` (goods) it is ``a^T M b / (n_d n_g)``, evaluated for all resamples at once.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _binary(is_defect)
    d, g = s[y], s[~y]
    if not len(d) or not len(g):
        raise ValueError("AUROC needs both good and defective images")
    rng = np.random.default_rng(seed)
    values = []
    if len(d) * len(g) <= _BOOT_MATRIX_LIMIT:
        m = (d[:, None] > g[None, :]).astype(np.float64) + 0.5 * (d[:, None] == g[None, :])
        for start in range(0, n_bootstrap, 200):
            b = min(200, n_bootstrap - start)
            a = np.stack([np.bincount(rng.integers(0, len(d), len(d)), minlength=len(d)) for _ in range(b)])
            c = np.stack([np.bincount(rng.integers(0, len(g), len(g)), minlength=len(g)) for _ in range(b)])
            values.append(((a @ m) * c).sum(1) / (len(d) * len(g)))
        values = np.concatenate(values)
    else:
        ones = np.r_[np.ones(len(d)), np.zeros(len(g))]
        values = np.array([roc_auc(ones, np.r_[rng.choice(d, len(d)), rng.choice(g, len(g))])
                           for _ in range(n_bootstrap)])
    alpha = 1 - confidence
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return [float(lo), float(hi)]


def pixel_auroc(maps: Sequence[np.ndarray] | np.ndarray, masks: Sequence[np.ndarray] | np.ndarray) -> float:
    """AUROC over every pixel of every image (maps and boolean masks of the same shapes)."""
    s = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    y = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    if y.all() or not y.any():
        raise ValueError("pixel AUROC needs both defect and defect-free pixels")
    return roc_auc(y, s)


def pro_curve(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score threshold, from the highest threshold down (as compute_pro)."""
    try:
        from scipy import ndimage  # connected components; the light install has no scipy
    except ImportError:
        raise ValueError("AUPRO needs scipy for the defect regions (pip install scipy)") from None
    structure = np.ones((3, 3), dtype=int)
    scores, fpr_w, pro_w = [], [], []
    regions = []
    n_ok = 0
    for mp, mk in zip(maps, masks):
        mk = np.asarray(mk, dtype=bool)
        labeled, n = ndimage.label(mk, structure=structure)
        regions.append((labeled, n))
        n_ok += int((~mk).sum())
    n_regions = sum(n for _, n in regions)
    if n_regions == 0 or n_ok == 0:
        raise ValueError("AUPRO needs at least one defect region and some defect-free pixels")
    for mp, (labeled, n) in zip(maps, regions):
        mp = np.asarray(mp, dtype=np.float64).ravel()
        lab = labeled.ravel()
        sizes = np.bincount(lab, minlength=n + 1).astype(np.float64)
        ok = lab == 0
        scores.append(mp)
        fpr_w.append(np.where(ok, 1.0 / n_ok, 0.0))
        pro_w.append(np.where(ok, 0.0, 1.0 / (np.maximum(sizes[lab], 1.0) * n_regions)))
    scores = np.concatenate(scores)
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    fpr = np.cumsum(np.concatenate(fpr_w)[order])
    pro = np.cumsum(np.concatenate(pro_w)[order])
    # Keep the last entry of each run of equal scores: one point per distinct threshold.
    last = np.r_[scores[1:] != scores[:-1], True]
    fpr, pro = np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]
    return np.clip(fpr, 0, 1), np.clip(pro, 0, 1)


def aupro(maps, masks, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit``, normalised by ``fpr_limit`` (1.0 = perfect)."""
    fpr, pro = pro_curve(maps, masks)
    if fpr_limit <= 0 or fpr_limit > 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    # Interpolate the PRO value at exactly fpr_limit, then integrate up to it.
    keep = fpr <= fpr_limit
    x, yv = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        i = int(np.searchsorted(fpr, fpr_limit))
        if i < len(fpr):
            x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
            y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
            x, yv = np.r_[x, fpr_limit], np.r_[yv, y_at]
    return float(np.trapezoid(yv, x) / fpr_limit)


__all__ = ["image_metrics", "auroc_bootstrap_ci", "pixel_auroc", "pro_curve", "aupro"]
