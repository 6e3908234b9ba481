"""The Python API: the same jobs as the CLI, returning data instead of printing.

>>> from fewvision import classify
>>> result = classify(["photos/"], classes=["ok", "scratch", "dent"], backbone="openclip:ViT-B-32/laion2b_s34b_b79k")
>>> result.rows[0]["label"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .backbones import create_backbone
from .backbones.base import Backbone
from .cache import open_cache
from .datasets import Dataset, sample_shots
from .decide import UNKNOWN, apply_unknown_threshold
from .features import Features, encode_files
from .heads import ClassifierHead, create_head
from .images import Skipped, iter_image_files
from .prompts import ClassSpec, check_classes, parse_class_names
from .support import Support


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


def as_classes(classes: Sequence[str | ClassSpec] | str) -> list[ClassSpec]:
    if isinstance(classes, str):
        return parse_class_names(classes)
    return check_classes([c if isinstance(c, ClassSpec) else ClassSpec(str(c)) for c in classes], "classes")


def encode(backbone: Backbone, paths: Sequence[str | os.PathLike], *, cache_dir: str | None = None,
           use_cache: bool = True, progress: bool = True, batch_size: int = 32, workers: int | None = None,
           description: str = "encoding") -> Features:
    cache = open_cache(backbone.id, cache_dir, enabled=use_cache)
    return encode_files(backbone, paths, cache, batch_size=batch_size, workers=workers, progress=progress,
                        description=description)


def predictions_from(head: ClassifierHead, feats: Features, unknown_threshold: float | None = None) -> Predictions:
    names = list(head.class_names_)
    if len(feats.paths) == 0:
        return Predictions(names, [], feats.skipped, feats.encoded)
    proba = head.predict_proba(feats.tensor)
    labels = apply_unknown_threshold(proba, names, unknown_threshold)
    rows = [
        {"path": p, "label": lab, "probabilities": {n: float(v) for n, v in zip(names, pr)}}
        for p, lab, pr in zip(feats.paths, labels, proba)
    ]
    return Predictions(names, rows, feats.skipped, feats.encoded)


def classify(
    inputs: Sequence[str | os.PathLike],
    classes: Sequence[str | ClassSpec] | str,
    *,
    backbone: str | Backbone,
    templates: Sequence[str] | None = None,
    unknown_threshold: float | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
) -> Predictions:
    """Zero-shot classification of image files and folders into ``classes``."""
    paths = iter_image_files(inputs)  # a missing input is reported before any model is loaded
    bb = as_backbone(backbone, cache_dir)
    specs = as_classes(classes)
    head = create_head("zeroshot", classes=specs, templates=templates).fit(
        Support.text_only([c.name for c in specs], bb, cache_dir, use_cache))
    feats = encode(bb, paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress, batch_size=batch_size,
                   workers=workers)
    return predictions_from(head, feats, unknown_threshold)


@dataclass
class Evaluation:
    metrics: dict
    predictions: Predictions
    truths: list[str]
    support_paths: list[str] = field(default_factory=list)


def evaluate_predictions(preds: Predictions, dataset: Dataset, n_bootstrap: int = 1000) -> Evaluation:
    from .evaluation import classification_metrics

    truth_of = {it.path: it.label for it in dataset.items}
    names = preds.class_names
    index = {n: i for i, n in enumerate(names)}
    unknown_truths = sorted({truth_of[r["path"]] for r in preds.rows} - set(names))
    if unknown_truths:
        raise ValueError(f"dataset labels {unknown_truths} are not among the classes {names}")
    truths = [truth_of[r["path"]] for r in preds.rows]
    y_true = np.array([index[t] for t in truths], dtype=np.int64)
    y_pred = np.array([index.get(r["label"], -1) for r in preds.rows], dtype=np.int64)
    metrics = classification_metrics(y_true, y_pred, names, n_bootstrap=n_bootstrap)
    metrics["n_skipped"] = len(preds.skipped)
    for row, t in zip(preds.rows, truths):
        row["true"] = t
    return Evaluation(metrics, preds, truths)


def evaluate_zeroshot(
    dataset: Dataset,
    *,
    backbone: str | Backbone,
    classes: Sequence[str | ClassSpec] | None = None,
    templates: Sequence[str] | None = None,
    unknown_threshold: float | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Zero-shot accuracy on a labelled dataset (class names from the dataset unless ``classes`` is given)."""
    bb = as_backbone(backbone, cache_dir)
    specs = as_classes(classes if classes is not None else dataset.class_names)
    head = create_head("zeroshot", classes=specs, templates=templates).fit(
        Support.text_only([c.name for c in specs], bb, cache_dir, use_cache))
    feats = encode(bb, dataset.paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    return evaluate_predictions(predictions_from(head, feats, unknown_threshold), dataset)


def evaluate_prototype(
    dataset: Dataset,
    *,
    backbone: str | Backbone,
    shots: int = 10,
    seed: int = 0,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Class means of ``shots`` random images per class; evaluated on every other image of the dataset."""
    bb = as_backbone(backbone, cache_dir)
    feats = encode(bb, dataset.paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    label_of = {it.path: it.label for it in dataset.items}
    index = {c: i for i, c in enumerate(dataset.class_names)}
    labels = np.array([index[label_of[p]] for p in feats.paths], dtype=np.int64)
    pool = np.arange(len(labels))
    if dataset.has_splits:
        split_of = {it.path: it.split for it in dataset.items}
        pool = np.array([i for i, p in enumerate(feats.paths) if split_of[p] == "train"], dtype=np.int64)
    support = sample_shots(labels, shots, seed, pool)
    head = create_head("prototype").fit(Support(feats.tensor[support], labels[support], dataset.class_names, bb))
    rest = np.setdiff1d(np.arange(len(labels)) if not dataset.has_splits else np.array(
        [i for i, p in enumerate(feats.paths) if split_of[p] != "train"], dtype=np.int64), support)
    test = Features([feats.paths[i] for i in rest], [feats.shas[i] for i in rest], feats.features[rest],
                    feats.skipped, feats.encoded)
    ev = evaluate_predictions(predictions_from(head, test), dataset)
    ev.support_paths = [feats.paths[i] for i in support]
    ev.metrics["shots"] = shots
    ev.metrics["seed"] = seed
    return ev


LMM_METHODS = ("slac", "tlac")


def _lmm_head(method: str, specs: list[ClassSpec], bb: Backbone, templates, prompt, choice_prompt, top_k,
              cache_dir, use_cache):
    if method not in LMM_METHODS:
        raise ValueError(f"unknown LMM method '{method}': expected one of {', '.join(LMM_METHODS)}")
    params: dict = {"classes": specs, "templates": templates}
    if prompt:
        params["prompt"] = prompt
    if method == "tlac":
        params["top_k"] = top_k
        if choice_prompt:
            params["choice_prompt"] = choice_prompt
    return create_head(method, **params).fit(
        Support(None, None, [c.name for c in specs], bb, cache_dir=cache_dir, use_cache=use_cache))


def predictions_with_lmm(head, feats: Features, lmm, unknown_threshold: float | None = None) -> Predictions:
    """Rows of an LMM-augmented head (slac/tlac): ``note`` carries the LMM's answer or the fallback taken,
    ``decision`` the path (see the heads' docs)."""
    names = list(head.class_names_)
    if len(feats.paths) == 0:
        return Predictions(names, [], feats.skipped, feats.encoded)
    # Validates the threshold and the class names before any request is sent.
    apply_unknown_threshold(np.zeros((1, len(names))), names, unknown_threshold)
    out = head.predict_with_lmm(feats.tensor, feats.paths, lmm, shas=feats.shas)
    rows = []
    for i, path in enumerate(feats.paths):
        label = names[int(out.index[i])]
        if unknown_threshold is not None and out.proba[i, out.index[i]] < unknown_threshold:
            label = UNKNOWN
        rows.append({"path": path, "label": label,
                     "probabilities": {n: float(v) for n, v in zip(names, out.proba[i])},
                     "note": out.notes[i], "decision": out.paths[i]})
    return Predictions(names, rows, feats.skipped, feats.encoded)


def classify_with_lmm(
    inputs: Sequence[str | os.PathLike],
    classes: Sequence[str | ClassSpec] | str,
    *,
    backbone: str | Backbone,
    lmm,
    method: str = "slac",
    templates: Sequence[str] | None = None,
    prompt: str | None = None,
    choice_prompt: str | None = None,
    top_k: int = 3,
    unknown_threshold: float | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    batch_size: int = 32,
    workers: int | None = None,
) -> Predictions:
    """SLAC / TLAC: CLIP features through the feature cache, plus a large multimodal model asked about each image.

    ``lmm`` is a :class:`fewvision.lmm.LMMBackend` (e.g. ``fewvision.lmm.create_lmm(url, model)``). Unreadable files
    are skipped before any request; an image without a usable answer falls back to CLIP zero-shot (row ``note``).
    """
    paths = iter_image_files(inputs)  # a missing input is reported before any model is loaded
    bb = as_backbone(backbone, cache_dir)
    specs = as_classes(classes)
    head = _lmm_head(method, specs, bb, templates, prompt, choice_prompt, top_k, cache_dir, use_cache)
    feats = encode(bb, paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                   batch_size=batch_size, workers=workers)
    return predictions_with_lmm(head, feats, lmm, unknown_threshold)


def evaluate_with_lmm(
    dataset: Dataset,
    *,
    backbone: str | Backbone,
    lmm,
    method: str = "slac",
    classes: Sequence[str | ClassSpec] | None = None,
    templates: Sequence[str] | None = None,
    prompt: str | None = None,
    choice_prompt: str | None = None,
    top_k: int = 3,
    unknown_threshold: float | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> Evaluation:
    """SLAC / TLAC accuracy on a labelled dataset; ``metrics['decisions']`` counts the decision paths taken."""
    bb = as_backbone(backbone, cache_dir)
    specs = as_classes(classes if classes is not None else dataset.class_names)
    head = _lmm_head(method, specs, bb, templates, prompt, choice_prompt, top_k, cache_dir, use_cache)
    feats = encode(bb, dataset.paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    ev = evaluate_predictions(predictions_with_lmm(head, feats, lmm, unknown_threshold), dataset)
    counts: dict[str, int] = {}
    for row in ev.predictions.rows:
        counts[row["decision"]] = counts.get(row["decision"], 0) + 1
    ev.metrics["decisions"] = counts
    ev.metrics["lmm"] = lmm.describe()
    return ev


__all__ = ["classify", "evaluate_zeroshot", "evaluate_prototype", "Predictions", "Evaluation", "UNKNOWN"]
