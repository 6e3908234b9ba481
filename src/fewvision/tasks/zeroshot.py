"""Zero-shot classification (CLIP prompts; SLAC / TLAC with an LMM): the same jobs as the CLI, returning data.

>>> from fewvision import classify
>>> result = classify(["photos/"], classes=["ok", "scratch", "dent"], backbone="openclip:ViT-B-32/laion2b_s34b_b79k")
>>> result.rows[0]["label"]
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from ..backbones.base import Backbone
from ..decide.review import REVIEW, decide
from ..features.encode import Features
from ..heads import create_head
from ..prompts import ClassSpec, check_classes, parse_class_names
from ..heads.rerank import DEFAULT_K, check_reranker, itm_rerank
from ..heads.support import Support
from ..io.datasets import Dataset
from ..io.images import iter_image_files, load_image
from ..progress import expect
from .common import as_backbone, encode, predictions_from
from .rows import Evaluation, Predictions, classification_rows, evaluate_predictions


def as_classes(classes: Sequence[str | ClassSpec] | str) -> list[ClassSpec]:
    if isinstance(classes, str):
        return parse_class_names(classes)
    return check_classes([c if isinstance(c, ClassSpec) else ClassSpec(str(c)) for c in classes], "classes")


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
    rerank: str | None = None,
    rerank_k: int = DEFAULT_K,
) -> Predictions:
    """Zero-shot classification of image files and folders into ``classes``; ``rerank="itm"`` re-ranks each
    image's ``rerank_k`` most likely classes with the backbone's image-text matching head (BLIP,
    :mod:`fewvision.heads.rerank`)."""
    paths = iter_image_files(inputs)  # a missing input is reported before any model is loaded
    expect(len(paths))
    bb = as_backbone(backbone, cache_dir)
    check_reranker(rerank, bb, rerank_k)
    specs = as_classes(classes)
    head = create_head("zeroshot", classes=specs, templates=templates).fit(
        Support.text_only([c.name for c in specs], bb, cache_dir, use_cache))
    feats = encode(bb, paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress, batch_size=batch_size,
                   workers=workers)
    return _predictions(head, feats, bb, unknown_threshold, rerank, rerank_k, batch_size)


def _predictions(head, feats: Features, bb: Backbone, unknown_threshold: float | None, rerank: str | None,
                 rerank_k: int, batch_size: int = 32) -> Predictions:
    """The zero-shot head's rows, re-ranked first when asked."""
    if rerank is None or len(feats.paths) == 0:
        return predictions_from(head, feats, unknown_threshold)
    proba = head.predict_proba(feats.tensor)
    for start in range(0, len(feats.paths), batch_size):  # pixels a batch at a time (BLIP's are 384 px)
        part = slice(start, start + batch_size)
        pixels = torch.stack([bb.preprocess(load_image(p)) for p in feats.paths[part]])
        proba[part] = itm_rerank(proba[part], feats.tensor[part], head.weights_, bb, pixels, head.classes_,
                                 head.templates_, rerank_k)
    names = list(head.class_names_)
    rows = classification_rows(feats.paths, proba, names, unknown_threshold=unknown_threshold)
    return Predictions(names, rows, feats.skipped, feats.encoded)


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
    rerank: str | None = None,
    rerank_k: int = DEFAULT_K,
) -> Evaluation:
    """Zero-shot accuracy on a labelled dataset (class names from the dataset unless ``classes`` is given);
    ``rerank`` as in :func:`classify`."""
    expect(len(dataset))
    bb = as_backbone(backbone, cache_dir)
    check_reranker(rerank, bb, rerank_k)
    specs = as_classes(classes if classes is not None else dataset.class_names)
    head = create_head("zeroshot", classes=specs, templates=templates).fit(
        Support.text_only([c.name for c in specs], bb, cache_dir, use_cache))
    feats = encode(bb, dataset.paths, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
    return evaluate_predictions(_predictions(head, feats, bb, unknown_threshold, rerank, rerank_k), dataset)


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
    decide(np.zeros((1, len(names))), names, unknown_threshold=unknown_threshold)
    out = head.predict_with_lmm(feats.tensor, feats.paths, lmm, shas=feats.shas)
    rows = classification_rows(feats.paths, out.proba, names, unknown_threshold=unknown_threshold,
                               top=[int(i) for i in out.index])
    for i, row in enumerate(rows):
        row.update({"note": out.notes[i], "decision": out.paths[i]})
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
    expect(len(paths))
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
    expect(len(dataset))
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


__all__ = ["classify", "evaluate_zeroshot", "classify_with_lmm", "evaluate_with_lmm", "Predictions", "Evaluation",
           "REVIEW"]
