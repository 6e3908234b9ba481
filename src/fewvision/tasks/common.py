"""What the task modules share: result containers, backbone and feature helpers, classification metrics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..backbones import create_backbone
from ..backbones.base import Backbone
from ..decide.review import decide
from ..features.cache import open_cache
from ..features.encode import GLOBAL, Features, encode_files
from ..heads import ClassifierHead
from ..io.datasets import Dataset
from ..io.images import Skipped
from ..metrics.classification import classification_metrics, expected_calibration_error


@dataclass
class Predictions:
    """One row per readable image (path, label, probabilities) and the files that were skipped."""

    class_names: list[str]
    rows: list[dict]
    skipped: list[Skipped] = field(default_factory=list)
    encoded: int = 0

    @property
    def labels(self) -> list[str]:
        return [r["label"] for r in self.rows]


def as_backbone(backbone: str | Backbone, cache_dir: str | None = None, weights: str | None = None) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else create_backbone(backbone, cache_dir=cache_dir, weights=weights)


def encode(backbone: Backbone, paths: Sequence[str | os.PathLike], kind: str = GLOBAL, *,
           cache_dir: str | None = None, use_cache: bool = True, progress: bool = False, batch_size: int = 32,
           workers: int | None = None, description: str = "encoding") -> Features:
    """Features of ``kind`` for image files, through the backbone's feature cache."""
    cache = open_cache(backbone.id, cache_dir, enabled=use_cache)
    return encode_files(backbone, paths, cache, kind=kind, batch_size=batch_size, workers=workers,
                        progress=progress, description=description)



def classification_rows(paths: Sequence[str], proba: np.ndarray, class_names: Sequence[str], *,
                        unknown_threshold: float | None = None, sets: np.ndarray | None = None,
                        alpha: float | None = None, abstain: bool = False,
                        top: Sequence[int] | None = None) -> list[dict]:
    """One row per image: ``label`` (the decision: a class, or ``review``), ``top_label`` and ``top_probability``
    (kept on review rows too), ``probabilities``, and when they apply ``set`` (the conformal prediction set) and
    ``review_reason``."""
    names = list(class_names)
    decisions = decide(proba, names, unknown_threshold=unknown_threshold, sets=sets, alpha=alpha, abstain=abstain,
                       top=top)
    chosen = proba.argmax(axis=1) if top is None else np.asarray(top)
    rows = []
    for i, path in enumerate(paths):
        label, reason = decisions[i]
        row = {"path": path, "label": label, "top_label": names[int(chosen[i])],
               "top_probability": float(proba[i, int(chosen[i])]),
               "probabilities": {n: float(v) for n, v in zip(names, proba[i])}}
        if sets is not None:
            row["set"] = [names[j] for j in np.flatnonzero(sets[i])]
        if reason:
            row["review_reason"] = reason
        rows.append(row)
    return rows


def predictions_from(head: ClassifierHead, feats: Features, unknown_threshold: float | None = None) -> Predictions:
    names = list(head.class_names_)
    if len(feats.paths) == 0:
        return Predictions(names, [], feats.skipped, feats.encoded)
    rows = classification_rows(feats.paths, head.predict_proba(feats.tensor), names,
                               unknown_threshold=unknown_threshold)
    return Predictions(names, rows, feats.skipped, feats.encoded)


@dataclass
class Evaluation:
    metrics: dict
    predictions: Predictions
    truths: list[str]
    support_paths: list[str] = field(default_factory=list)


def evaluate_predictions(preds: Predictions, dataset: Dataset, n_bootstrap: int = 1000) -> Evaluation:
    truth_of = {it.path: it.label for it in dataset.items}
    names = preds.class_names
    index = {n: i for i, n in enumerate(names)}
    unknown_truths = sorted({truth_of[r["path"]] for r in preds.rows} - set(names))
    if unknown_truths:
        raise ValueError(f"dataset labels {unknown_truths} are not among the classes {names}")
    truths = [truth_of[r["path"]] for r in preds.rows]
    y_true = np.array([index[t] for t in truths], dtype=np.int64)
    y_pred = np.array([index.get(r["label"], -1) for r in preds.rows], dtype=np.int64)  # review: -1
    metrics = classification_metrics(y_true, y_pred, names, n_bootstrap=n_bootstrap)
    if preds.rows:
        proba = np.array([[r["probabilities"][n] for n in names] for r in preds.rows], dtype=np.float64)
        metrics["ece"] = expected_calibration_error(proba, y_true)
    metrics["n_skipped"] = len(preds.skipped)
    for row, t in zip(preds.rows, truths):
        row["true"] = t
    return Evaluation(metrics, preds, truths)
