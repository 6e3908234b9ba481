"""Classification metrics for small factory test sets, with percentile-bootstrap confidence intervals.

Predictions may contain ``-1`` ("review": the model abstained). An abstention is wrong for accuracy, a missed
detection (false negative) for its true class, and gets its own ``review`` column in the confusion matrix.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

REVIEW_INDEX = -1
REVIEW_LABEL = "review"
CI_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")

# The bootstrap builds confusion matrices for this many (resample, item) pairs at a time, to bound memory.
_BOOT_CHUNK_ITEMS = 4_000_000


def _check_inputs(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1 or len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must be 1-D of the same length, got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("no test items: cannot compute metrics on an empty set")
    if n_classes < 1:
        raise ValueError("class_names is empty")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError(f"{name} must hold integer class indices")
    y_true = y_true.astype(np.int64)
    y_pred = y_pred.astype(np.int64)
    if y_true.min() < 0 or y_true.max() >= n_classes:
        raise ValueError(f"y_true holds indices outside 0..{n_classes - 1}")
    if y_pred.min() < REVIEW_INDEX or y_pred.max() >= n_classes:
        raise ValueError(f"y_pred holds indices outside -1..{n_classes - 1}")
    return y_true, y_pred


def _metrics_from_confusions(cm: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy and macro-F1 from a stack of confusion matrices ``(B, C, C+1)``.

    Column ``C`` counts abstentions. Matches scikit-learn: balanced accuracy averages recall over the classes present
    in y_true; macro-F1 averages over all C classes with 0 for a class that has no tp, fp or fn (zero_division=0).
    """
    c = cm.shape[1]
    tp = np.diagonal(cm[:, :, :c], axis1=1, axis2=2).astype(np.float64)
    support = cm.sum(axis=2).astype(np.float64)
    predicted = cm[:, :, :c].sum(axis=1).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    denom = support + predicted  # = 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        "accuracy": tp.sum(axis=1) / n,
        "balanced_accuracy": recall.sum(axis=1) / present.sum(axis=1),
        "macro_f1": f1.mean(axis=1),
    }


def bootstrap_ci(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    n_classes: int,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile-bootstrap intervals over test items for accuracy, balanced accuracy and macro-F1 (vectorised)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    n, c = len(y_true), n_classes
    # One code per item: cell index in a C x (C+1) matrix, abstentions (-1) mapped to the last column.
    codes = y_true * (c + 1) + np.where(y_pred == REVIEW_INDEX, c, y_pred)
    cells = c * (c + 1)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ITEMS // n)
    values: dict[str, list[np.ndarray]] = {k: [] for k in CI_METRICS}
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        idx = rng.integers(0, n, size=(b, n))
        flat = codes[idx] + (np.arange(b) * cells)[:, None]
        cm = np.bincount(flat.ravel(), minlength=b * cells).reshape(b, c, c + 1)
        for k, v in _metrics_from_confusions(cm, n).items():
            values[k].append(v)
    alpha = 1.0 - confidence
    out = {}
    for k in CI_METRICS:
        lo, hi = np.quantile(np.concatenate(values[k]), [alpha / 2, 1 - alpha / 2])
        out[k] = [float(lo), float(hi)]
    return out


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Point metrics, per-class table, confusion matrix and bootstrap CIs, as a JSON-ready dict. The point metrics
    are scikit-learn's definitions (the tests compare them with ``accuracy_score``, ``balanced_accuracy_score``,
    ``f1_score`` and ``precision_recall_fscore_support``), computed from the confusion matrix with numpy so the
    light install evaluates without scikit-learn."""
    class_names = [str(n) for n in class_names]
    c = len(class_names)
    y_true, y_pred = _check_inputs(y_true, y_pred, c)
    n = len(y_true)
    n_review = int((y_pred == REVIEW_INDEX).sum())

    cm = np.zeros((c, c + 1), dtype=np.int64)
    np.add.at(cm, (y_true, np.where(y_pred == REVIEW_INDEX, c, y_pred)), 1)
    tp = np.diagonal(cm[:, :c]).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm[:, :c].sum(axis=0)
    prec = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=support + predicted > 0)
    point = {k: float(v[0]) for k, v in _metrics_from_confusions(cm[None], n).items()}
    confusion_labels = list(class_names)
    if n_review:
        confusion_labels.append(REVIEW_LABEL)
    else:
        cm = cm[:, :c]

    metrics: dict[str, Any] = {
        "n": n,
        "accuracy": point["accuracy"],
        "balanced_accuracy": point["balanced_accuracy"],
        "macro_f1": point["macro_f1"],
        "per_class": {
            name: {
                "precision": float(prec[i]),
                "recall": float(rec[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "confusion_labels": confusion_labels,
        "class_names": class_names,
    }
    if n_review:
        metrics["n_review"] = n_review
    metrics["ci"] = bootstrap_ci(y_true, y_pred, c, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence)
    metrics["ci_method"] = {"method": "percentile bootstrap over test items", "n_bootstrap": int(n_bootstrap),
                            "seed": int(seed), "confidence": float(confidence)}
    return metrics


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017, eq. 3): the mean over equal-width confidence bins of |accuracy - mean confidence|,
    weighted by the share of images in each bin; confidence is the top class's probability."""
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no images: cannot compute the calibration error of an empty set")
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == labels
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # (lo, hi] bins
    ece = 0.0
    for b in np.unique(bins):
        members = bins == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)
