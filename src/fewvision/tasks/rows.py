"""Rows from scores, without torch: what every path that scores images (torch, onnxruntime, OpenVINO; the CLI, the
service, the station) turns class probabilities and anomaly maps into, so the columns and decisions cannot drift
apart between them. ``model`` here is anything with ``class_names`` and ``decision`` (a fitted
:class:`fewvision.modelfile.FewVisionModel` or a :class:`fewvision.runtime.model.RuntimeModel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..decide.calibration import apply_temperature, log_probabilities
from ..decide.conformal import prediction_sets
from ..decide.review import decide
from ..io.datasets import Dataset
from ..io.geometry import image_coordinates, image_size
from ..io.regions import defect_regions
from ..io.images import BadImage, Skipped, load_image
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

@dataclass
class Scored:
    """Raw (uncalibrated) class probabilities of the readable files, in input order, and the skipped files.
    ``log_proba`` (float64 log-softmax of the head's logits) where the head has logits: temperature scaling works on
    it, since a float32 probability may have underflowed to 0."""

    paths: list[str]
    shas: list[str]
    proba: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)
    encoded: int = 0
    log_proba: np.ndarray | None = None

    def subset(self, keep: Sequence[int]) -> "Scored":
        keep = list(keep)
        return Scored([self.paths[i] for i in keep], [self.shas[i] for i in keep], self.proba[keep], self.skipped,
                      self.encoded, None if self.log_proba is None else self.log_proba[keep])

    def log_probabilities(self) -> np.ndarray:
        """float64 log-probabilities: the head's log-softmax where there is one, else the log of ``proba``."""
        return self.log_proba if self.log_proba is not None else log_probabilities(self.proba)

    def calibrated(self, temperature: float | None) -> np.ndarray:
        """softmax(log p / T) from the most exact log-probabilities there are."""
        return apply_temperature(self.proba, temperature, self.log_proba)


def predictions(model, scored: Scored, *, abstain: bool = False,
                unknown_threshold: float | None = None) -> Predictions:
    """Rows (see :func:`classification_rows`): calibrated probabilities, the prediction set
    when the model has conformal thresholds, ``review`` with a reason when abstaining or below the threshold."""
    names = model.class_names
    conformal = model.decision.get("conformal")
    if abstain and not conformal:
        raise ValueError("--abstain needs conformal thresholds in the model: fit it with --alpha and "
                         "--calibrate-fraction")
    proba = scored.calibrated(model.decision.get("temperature"))
    sets = None
    if conformal and len(proba):
        # Thresholds set on raw head probabilities (files before 0.2 set them on calibrated ones).
        sets = prediction_sets(scored.proba if conformal.get("probabilities") == "raw" else proba, conformal)
    rows = classification_rows(scored.paths, proba, names, unknown_threshold=unknown_threshold, sets=sets,
                               alpha=conformal["alpha"] if conformal else None, abstain=abstain)
    return Predictions(names, rows, scored.skipped, scored.encoded)


@dataclass
class AnomalyPredictions:
    """One row per readable image (path, score, verdict, ...), its map (in ``maps``, same order) and the skips."""

    rows: list[dict]
    maps: np.ndarray | None
    threshold: float | None
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def scores(self) -> np.ndarray:
        return np.array([r["score"] for r in self.rows], dtype=np.float64)


class Recorder:
    """Collects skipped files and the paths actually used while chunks are produced."""

    def __init__(self) -> None:
        self.skipped: list[Skipped] = []
        self.used: list[str] = []


def pixel_chunks(preprocess: Callable, paths: Sequence[str], chunk_images: int, rec: Recorder,
                 stack: Callable = np.stack) -> Iterator[tuple[list[str], Any]]:
    """(readable paths, their preprocessed pixels stacked) per chunk of ``chunk_images`` files; a file that cannot
    be read or preprocessed is recorded in ``rec`` with its reason and the chunk goes on without it."""
    for start in range(0, len(paths), chunk_images):
        ok, tensors = [], []
        for p in paths[start : start + chunk_images]:
            try:
                tensors.append(preprocess(load_image(p)))
                ok.append(p)
            except BadImage as err:
                rec.skipped.append(Skipped(p, err.reason))
            except Exception as err:  # noqa: BLE001 - one odd image must not stop the batch
                rec.skipped.append(Skipped(p, f"cannot preprocess ({type(err).__name__}: {err})"))
        if ok:
            rec.used += ok
            yield ok, stack(tensors)


OK, NG, REVIEW = "ok", "ng", "review"  # the verdicts; "review" only inside a review band around the threshold


def verdict(score: float, threshold: float | None, review_band: float = 0.0) -> str | None:
    """ok / ng (score > threshold) / review (within ``review_band`` of the threshold, relative to it)."""
    if threshold is None:
        return None
    if review_band > 0 and abs(score - threshold) <= review_band * abs(threshold):
        return REVIEW
    return NG if score > threshold else OK


def anomaly_rows(paths: Sequence[str], maps: np.ndarray, scores: np.ndarray, preprocess: Callable,
                 size: tuple[int, int], threshold: float | None, review_band: float,
                 regions: tuple[float | None, float] = (None, 0.0)) -> list[dict]:
    """The rows of one scored chunk (see :func:`fewvision.tasks.anomaly.score_files`); ``maps`` [N, H, W] and
    ``scores`` [N] as the model's post-processing finished them. With ``regions`` = (map threshold, minimum area;
    :func:`region_rule`), each row also has the defect regions (:func:`fewvision.io.regions.defect_regions`):
    ``n_regions``, ``largest_region_px``, ``largest_region_pct`` and ``regions`` (boxes, largest first)."""
    region_threshold, min_region_area = regions
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    maps = np.asarray(maps)
    peaks = maps.reshape(len(paths), -1).argmax(1).tolist()
    rows = []
    for i, (p, v, peak) in enumerate(zip(paths, np.asarray(scores).tolist(), peaks)):
        row = {"path": p, "score": float(v), "threshold": threshold,
               "normalized_score": float(v) / threshold if threshold else None,
               "verdict": verdict(float(v), threshold, review_band), "x": None, "y": None, "time": now}
        wh = image_size(p)
        if wh is not None:
            xs, ys = image_coordinates(preprocess, wh[0], wh[1], tuple(size))
            r, c = divmod(int(peak), size[1])
            row["x"], row["y"] = int(round(float(xs[r, c]))), int(round(float(ys[r, c])))
            if region_threshold is not None:
                row.update(region_columns(defect_regions(maps[i], region_threshold, xs, ys, wh[0], wh[1],
                                                         min_region_area)))
        rows.append(row)
    return rows


def region_rule(decision: dict) -> tuple[float | None, float]:
    """(the map threshold of defect regions, the smallest region reported in image pixels) of a model: the map
    threshold calibrated at fit on the good images' map maxima (``region_threshold``; a model fitted before it
    existed uses its image threshold), ``anomaly fit --min-region-area`` (0: all)."""
    return decision.get("region_threshold", decision.get("threshold")), float(decision.get("min_region_area") or 0.0)


def region_columns(regions: list[dict]) -> dict:
    """A row's region columns from its regions (largest first)."""
    largest = regions[0] if regions else None
    return {"n_regions": len(regions), "largest_region_px": largest["area_px"] if largest else 0,
            "largest_region_pct": largest["area_pct"] if largest else 0.0, "regions": regions}
