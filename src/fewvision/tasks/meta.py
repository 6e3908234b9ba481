"""Meta-training a head on a dataset's base classes (``fewvision meta-train``), for ``fit --meta`` on new classes.

>>> meta = meta_train_model("history/", "protonet", "openclip:ViT-B-32/laion2b_s34b_b79k", ["scratch", "dent"])
>>> save_model("meta.fvm", meta)
>>> model = fit("new_defects/", "protonet", None, shots=5, meta="meta.fvm")
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..backbones.base import Backbone
from ..heads.support import Support
from ..io.datasets import Dataset
from ..meta.episodes import split_classes
from ..modelfile import FewVisionModel
from .common import as_backbone, encode
from .fewshot import as_dataset, make_head

META_METHODS = ("protonet", "relationnet", "maml")


def meta_train_model(data: Dataset | str | os.PathLike, method: str, backbone: str | Backbone,
                     base_classes: Sequence[str] | None = None, *, seed: int = 0, weights: str | None = None,
                     cache_dir: str | None = None, use_cache: bool = True, progress: bool = False,
                     **params: Any) -> FewVisionModel:
    """Meta-train ``method`` on episodes of the base classes' images (default: every class) of the train split (or
    the whole dataset); the result also classifies the base classes (their prototypes), and records the split."""
    if method not in META_METHODS:
        raise ValueError(f"meta-training is for {', '.join(META_METHODS)}, not '{method}'")
    dataset = as_dataset(data)
    base, novel = split_classes(dataset.class_names, base_classes or dataset.class_names)
    keep = [i for i, it in enumerate(dataset.items)
            if dataset.labels[i] in set(base) and (not dataset.has_splits or it.split == "train")]
    bb = as_backbone(backbone, cache_dir, weights)
    feats = encode(bb, [dataset.paths[i] for i in keep], cache_dir=cache_dir, use_cache=use_cache,
                   progress=progress, description="encoding base classes")
    by_path = {dataset.paths[i]: base.index(int(dataset.labels[i])) for i in keep}
    labels = np.array([by_path[p] for p in feats.paths], dtype=np.int64)
    names = [dataset.class_names[i] for i in base]
    # Episode settings the data allows, where the caller left them open: every base class in an episode up to 5,
    # and as many queries (up to 15) as the smallest class has images beyond its shots.
    fewest = int(np.bincount(labels, minlength=len(names)).min())
    params = dict(params)
    params["way"] = params.get("way") or min(5, len(names))
    shot = int(params.get("shot") or 5)
    if not params.get("query"):
        if fewest < shot + 1:
            raise ValueError(f"{dataset.name}: the smallest base class has {fewest} image(s); {shot}-shot episodes "
                             f"need at least {shot + 1} (lower --shot)")
        params["query"] = min(15, fewest - shot)
    head = make_head(method, seed, **params).meta_fit(feats.tensor, labels)
    if head.meta_.get("validation"):  # the held-out base classes, by name
        v = head.meta_["validation"]
        v["classes"] = [names[i] for i in v.pop("class_indices")]
    head.fit(Support(feats.tensor, labels, names))
    head.meta_.update({"base_classes": names, "novel_classes": [dataset.class_names[i] for i in novel],
                       "dataset": dataset.name, "n_images": len(feats.paths)})
    info = {"method": method, "seed": seed, "dataset": dataset.name, "class_names": names,
            "n_support": len(feats.paths), "meta": head.meta_,
            "skipped": [f"{s.path}: {s.reason}" for s in feats.skipped][:20], "n_skipped": len(feats.skipped)}
    return FewVisionModel(head, bb.spec, bb.id, info=info, _backbone=bb)
