"""Evaluation from scores, without torch: the metrics of a classifier or an anomaly model on a labelled dataset,
whatever scored the images (the torch path in :mod:`fewvision.tasks.fewshot` / :mod:`fewvision.tasks.anomaly`, or
an exported graph in :mod:`fewvision.runtime`). ``model`` is anything with ``class_names``, ``decision``, ``info``,
``method``, ``backbone_spec`` and ``backbone_id``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..decide.review import REVIEW
from ..decide.conformal import set_metrics
from ..decide.threshold import ThresholdError, f1_threshold, recall_threshold
from ..io.datasets import GOOD, Dataset, DatasetError, load_dataset
from ..io.geometry import mask_view
from ..io.images import BadImage, hash_files, load_image
from ..progress import expect
from ..runtime.engines import installed
from .rows import AnomalyPredictions, Evaluation, Scored, evaluate_predictions, predictions


def evaluate_classes(model, data: Dataset, score: Callable[[list[str]], Scored], *, abstain: bool = False,
                     n_bootstrap: int = 1000) -> Evaluation:
    """The zero-shot evaluation's metrics for a fitted model, on the dataset's test images.

    Images of a 'train' split and images the model was fitted or calibrated on (matched by content hash) are left
    out, so the numbers are never measured on the support set. With conformal thresholds the metrics add empirical
    coverage, mean set size and per-class coverage.
    """
    missing = sorted(set(data.class_names) - set(model.class_names))
    if missing:
        raise ValueError(f"dataset '{data.name}' has classes {missing} that the model does not know "
                         f"(model classes: {model.class_names})")
    items = [it for it in data.items if it.split != "train"]
    expect(len(items))
    scored = score([it.path for it in items])
    fitted = set(model.info.get("fitted_on_sha256", []))
    keep = [i for i, s in enumerate(scored.shas) if s not in fitted]
    if not keep:
        raise ValueError(f"dataset '{data.name}': every image was used to fit or calibrate this model; "
                         "evaluate on other images")
    preds = predictions(model, scored.subset(keep), abstain=abstain)
    ev = evaluate_predictions(preds, data, n_bootstrap=n_bootstrap)
    ev.metrics["n_excluded_fit_images"] = len(scored.paths) - len(keep)
    conformal = model.decision.get("conformal")
    if conformal:
        index = {n: i for i, n in enumerate(model.class_names)}
        sets = np.array([[n in r["set"] for n in model.class_names] for r in preds.rows], dtype=bool)
        y = np.array([index[t] for t in ev.truths], dtype=np.int64)
        ev.metrics.update(set_metrics(sets, y, model.class_names))
        ev.metrics.update({"conformal_alpha": conformal["alpha"], "conformal_score": conformal["score"],
                           "mondrian": conformal["mondrian"]})
        if abstain:
            ev.metrics["review_rate"] = float(np.mean([r["label"] == REVIEW for r in preds.rows]))
    ev.metrics.update({"method": model.method, "backbone": model.backbone_spec, "backbone_id": model.backbone_id,
                       "dataset": data.name, "temperature": model.decision.get("temperature")})
    return ev


@dataclass
class AnomalyEvaluation:
    metrics: dict[str, Any]
    predictions: AnomalyPredictions
    is_defect: np.ndarray
    masks: list[np.ndarray | None] = field(default_factory=list)


def good_label_of(dataset: Dataset, good_label: str | None = None) -> str:
    """The label of good images: ``good_label``, else 'good', else 'nominal' (the textile set)."""
    names = set(dataset.class_names)
    if good_label is not None:
        if good_label not in names:
            raise DatasetError(f"{dataset.root or dataset.name}: no class '{good_label}' (classes: "
                               f"{', '.join(dataset.class_names)})")
        return good_label
    for cand in (GOOD, "nominal"):
        if cand in names:
            return cand
    raise DatasetError(f"{dataset.root or dataset.name}: no 'good' folder (classes: {', '.join(dataset.class_names)});"
                       " name the good class with --good-label")


def test_items(dataset: Dataset) -> Dataset:
    """The MVTec test split (the train split is good images for fitting); every item for other layouts."""
    if dataset.layout == "mvtec":
        return dataset.split("test")
    return dataset


def _load_mask(path: str, preprocess, size) -> np.ndarray:
    try:
        return mask_view(load_image(path), preprocess, size)
    except BadImage as err:
        raise DatasetError(f"{path}: cannot read the ground-truth mask ({err.reason})") from None


def evaluate_maps(model, dataset: Dataset | str | os.PathLike, score: Callable[[list[str]], AnomalyPredictions],
                  preprocess: Callable, *, good_label: str | None = None,
                  recall: float = 0.95, n_bootstrap: int = 1000, seed: int = 0) -> AnomalyEvaluation:
    """Image metrics at the model's threshold (plus AUROC interval, F1-optimal and recall thresholds), per-defect-
    type AUROC, and pixel AUROC / AUPRO when ground-truth masks exist. The model's training images must not be in
    the test set (for MVTec only the test split is used). ``score`` gives the rows and maps of image paths (torch or
    an exported graph), ``preprocess`` places ground-truth masks in the maps' geometry."""
    from ..metrics.anomaly import aupro, auroc_bootstrap_ci, image_metrics, pixel_auroc

    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    good = good_label_of(data, good_label)
    data = test_items(data)
    if not len(data):
        raise DatasetError(f"{data.root or data.name}: no test images")
    fitted = set(model.info.get("fitted_on_sha256", []))
    shas, _ = hash_files(data.paths)
    excluded = sum(1 for s in shas if s in fitted)
    if fitted and excluded == len(data):
        raise DatasetError(f"{data.root or data.name}: every test image was used to fit this model; evaluate on "
                           "other images")
    data = data.subset([i for i, s in enumerate(shas) if s not in fitted]) if excluded else data
    expect(len(data))
    by_path = {it.path: it for it in data.items}
    preds = score(data.paths)
    items = [by_path[r["path"]] for r in preds.rows]
    for r, it in zip(preds.rows, items):
        r["true"] = it.label
    is_defect = np.array([it.label != good for it in items], dtype=bool)
    scores = preds.scores
    threshold = model.decision.get("threshold")
    metrics: dict[str, Any] = image_metrics(scores, is_defect, threshold)
    metrics.update({"n": len(items), "n_skipped": len(preds.skipped), "good_label": good,
                    "n_excluded_fit_images": excluded,
                    "target_false_reject": model.decision.get("target_false_reject")})
    notes: list[str] = []
    if excluded:
        notes.append(f"{excluded} image(s) the model was fitted on were left out of the evaluation")
    if is_defect.any() and (~is_defect).any():
        metrics["image_auroc_ci"] = auroc_bootstrap_ci(scores, is_defect, n_bootstrap=n_bootstrap, seed=seed)
        metrics["ci_method"] = {"method": "percentile bootstrap, good and defective images resampled separately",
                                "n_bootstrap": int(n_bootstrap), "seed": int(seed), "confidence": 0.95}
        labelled: dict[str, Any] = {}
        for name, pick in (("f1_optimal", lambda: f1_threshold(scores, is_defect)),
                           (f"recall_{recall:g}", lambda: recall_threshold(scores, is_defect, recall))):
            try:
                t = pick()
                labelled[name] = image_metrics(scores, is_defect, t)
                for k in ("n_good", "n_defect", "image_auroc", "image_aupr"):
                    labelled[name].pop(k, None)
            except ThresholdError as err:
                labelled[name] = {"error": str(err)}
        metrics["labelled_thresholds"] = labelled
        per_type = {}
        for label in sorted({it.label for it in items} - {good}):
            sel = np.array([it.label in (good, label) for it in items])
            m = image_metrics(scores[sel], is_defect[sel], threshold)
            per_type[label] = {k: m.get(k) for k in ("n_defect", "image_auroc", "image_aupr", "miss_rate")}
        metrics["per_defect_type"] = per_type
    else:
        notes.append("image AUROC needs both good and defective test images")

    masks: list[np.ndarray | None] = [None] * len(items)
    with_mask = [i for i, it in enumerate(items) if it.mask]
    if with_mask and preds.maps is not None:
        use = [i for i, d in enumerate(is_defect) if not d] + with_mask
        for i in with_mask:  # each map's own size: a tiled model's stitched maps follow their image's size
            masks[i] = _load_mask(items[i].mask, preprocess, np.shape(preds.maps[i]))
        for i in use:
            if masks[i] is None:
                masks[i] = np.zeros(np.shape(preds.maps[i]), dtype=bool)
        missing = int(is_defect.sum()) - len(with_mask)
        if missing:
            notes.append(f"{missing} defective image(s) without a mask are left out of the pixel metrics")
        sel_maps = [preds.maps[i] for i in use]
        sel_masks = [masks[i] for i in use]
        if any(m.any() for m in sel_masks):
            metrics["pixel_auroc"] = pixel_auroc(sel_maps, sel_masks)
            if installed("scipy"):  # its connected components; not on the light install
                metrics["aupro"] = aupro(sel_maps, sel_masks)
                metrics["aupro_fpr_limit"] = 0.3
            else:
                notes.append("AUPRO needs scipy for the defect regions (pip install scipy); left out")
            metrics["n_pixel_images"] = len(use)
        else:
            notes.append("the ground-truth masks are empty: no pixel metrics")
    if notes:
        metrics["notes"] = notes
    return AnomalyEvaluation(metrics, preds, is_defect, masks)
