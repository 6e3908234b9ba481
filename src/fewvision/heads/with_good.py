"""Few-shot classification that also uses the plentiful good images (``fewvision fit DATASET --good GOOD_DIR``).

A line has hundreds of good images and a handful of labelled defects. An anomaly model fitted on the good images
(:func:`fewvision.tasks.anomaly.fit_anomaly`; ``--good-method``, PaDiM by default) knows what "good" looks like far
better than a few labelled good examples can tell a classifier. This head gives any image-feature head (prototype, linear, ...)
that knowledge as extra features of every image, next to its global image features:

* **map statistics**, each relative to the good images the anomaly model was calibrated on: the image score over
  its threshold; the maximum and the mean of the top 1% of the map's excess over the median good map
  (``heatmap_baseline``), both over the largest excess any good image showed; and the share of the image whose
  excess is above that largest good excess (the "area" of the defect). Ratios enter as ``log(1 + max(r, 0))``.
* **map-weighted pooled patch features**: the backbone's patch features averaged with the positive excess as
  weights (L2-normalised; zero when nothing exceeds the good images), so the classifier sees *what* the unusual
  region looks like - what tells defect types apart.

The three blocks are concatenated: the global features and the pooled features have unit length (the pooled block
is zero for an image with no excess); the four statistics are divided by 2 (= sqrt 4), so a good image's block is
shorter than the others (each of its statistics is at most about log 2 = 0.69: the block at most about 0.6),
while a defect's grows with the log of how far it exceeds the good images - that size is the signal, so it is not
normalised away.
The inner head is fitted and predicts on that vector. Fitting and prediction compute it with the same function
(:meth:`WithGoodImages.features_of`) from the preprocessed images, and the anomaly maps are finished by
:func:`fewvision.anomaly.postprocess.finish`, the one post-processing path.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import ClassifierHead, _from_json, _to_json
from .support import Support

INNER, ANOMALY = "inner/", "anomaly/"
N_STATS = 4


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


class WithGoodImages(ClassifierHead):
    """``head`` (an image-feature classification head) on global features plus features from ``anomaly`` (an
    anomaly head fitted on good images) and its ``decision`` (threshold, median good map)."""

    method = "with-good"
    feature_kind = "images"

    def __init__(self, head: ClassifierHead | None = None, anomaly=None, decision: dict | None = None):
        self.head = head
        self.anomaly = anomaly
        self.decision = decision

    def get_params(self) -> dict[str, Any]:
        return {}

    def _check(self) -> None:
        if self.head is None or self.anomaly is None or not self.decision:
            raise ValueError("with-good needs a classification head, an anomaly head fitted on good images and its "
                             "decision (fewvision.tasks.fewshot.fit(..., good=GOOD_DIR) builds them)")
        check_inner(self.head)

    # --- the features ----------------------------------------------------------------------------------
    def features_of(self, backbone, pixels: torch.Tensor) -> torch.Tensor:
        """[N, D + 4 + C]: global features, map statistics and map-weighted pooled patch features of
        preprocessed images ``pixels`` [N, 3, H, W]."""
        from ..anomaly.postprocess import finish

        a, d = self.anomaly, self.decision
        size = tuple(int(v) for v in (d.get("map_size") or backbone.input_size))
        with torch.inference_mode():
            glob = F.normalize(backbone.encode_images(pixels).float(), dim=-1)
            layers = getattr(a, "feature_layers_", None)
            patches = (backbone.patch_features(pixels, layers=layers) if layers else
                       backbone.patch_features(pixels)).float()
            raw, scores = a.score(patches if a.inputs == "patches" else pixels, backbone)
            maps, scores = finish(a, raw, scores, size, float(d.get("sigma", 4.0)))
            base = torch.as_tensor(d["heatmap_baseline"], dtype=torch.float32)[None, None]
            excess = maps - F.interpolate(base, size=size, mode="bilinear", align_corners=False)[:, 0]
            hottest = max(float(d["heatmap_range"][1]) / 2, 1e-12)  # the largest excess of a good image
            flat = excess.flatten(1)
            top = flat.topk(max(1, int(flat.shape[1] * 0.01)), dim=1).values.mean(1)
            ratios = torch.stack([scores / max(abs(float(d["threshold"])), 1e-12), flat.amax(1) / hottest,
                                  top / hottest], 1)
            stats = torch.cat([torch.log1p(ratios.clamp_min(0)), (flat > hottest).float().mean(1, keepdim=True)], 1)
            weights = F.adaptive_avg_pool2d(excess.clamp_min(0)[:, None], patches.shape[-2:])[:, 0]
            unit = F.normalize(patches, dim=1)
            pooled = (unit * weights[:, None]).sum((2, 3)) / weights.sum((1, 2)).clamp_min(1e-12)[:, None]
            pooled = F.normalize(pooled, dim=-1)  # zero stays zero
        # unit-length features, statistics / 2: a good image's statistics block is about as long as the others, a
        # defect's grows with log1p of its ratios (not normalised: its size is the signal)
        return torch.cat([glob, stats / math.sqrt(N_STATS), pooled], 1)

    def _pixels(self, backbone, images) -> torch.Tensor:
        return torch.stack([backbone.preprocess(im) for im in images])

    # --- fit / predict ---------------------------------------------------------------------------------
    def fit(self, support: Support) -> "WithGoodImages":
        from ..io.images import load_image

        self._check()
        if support.backbone is None or not support.paths:
            raise ValueError("with-good fits from the support images themselves: the support needs its backbone and "
                             "paths")
        feats = torch.cat([self.features_of(support.backbone, self._pixels(support.backbone,
                                                                              [load_image(p) for p in chunk]))
                           for chunk in _chunks(support.paths, 32)])
        self.head.fit(Support(feats, support.labels, support.class_names, support.backbone, list(support.paths),
                              support.cache_dir, support.use_cache))
        self.class_names_ = list(self.head.class_names_)
        self.feature_dims_ = [int(feats.shape[1])]
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head.logits(features)

    def predict_proba_images(self, backbone, images: Sequence) -> np.ndarray:
        self._check_fitted()
        return self.head.predict_proba(self.features_of(backbone, self._pixels(backbone, images)))

    def n_trainable_parameters(self) -> int:
        return self.head.n_trainable_parameters()

    # --- persistence: both heads' own states, side by side ---------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self._check_fitted()
        inner_t, inner_c = self.head.state()
        anomaly_t, anomaly_c = self.anomaly.state()
        tensors = {**{INNER + k: v for k, v in inner_t.items()}, **{ANOMALY + k: v for k, v in anomaly_t.items()}}
        fitted = {"class_names_": self.class_names_, "feature_dims_": self.feature_dims_, "inner_": inner_c,
                  "anomaly_": anomaly_c, "decision_": _to_json(self.decision)}
        return tensors, {"method": self.method, "params": {}, "fitted": fitted}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "WithGoodImages":
        from ..anomaly import anomaly_head_classes
        from .registry import REGISTRY

        fitted = config["fitted"]
        inner_c, anomaly_c = fitted["inner_"], fitted["anomaly_"]
        inner = REGISTRY[inner_c["method"]].from_state(_split(tensors, INNER), inner_c)
        anomaly = anomaly_head_classes()[anomaly_c["method"]].from_state(_split(tensors, ANOMALY), anomaly_c)
        head = cls(inner, anomaly, _from_json(fitted["decision_"]))
        head.class_names_ = list(fitted["class_names_"])
        head.feature_dims_ = list(fitted["feature_dims_"])
        return head


def check_inner(head: ClassifierHead) -> None:
    """Refuse a head the extra features cannot be given to: one that compares image features with text or adapts
    the towers (the extra dimensions have no text counterpart)."""
    if getattr(head, "feature_kind", "global") != "global" or head.needs_text:
        raise ValueError(f"--good adds features to heads that classify image features (prototype, linear); "
                         f"'{head.method}' also compares them with text or adapts the towers")


def _chunks(items: Sequence, n: int):
    for start in range(0, len(items), n):
        yield items[start : start + n]


__all__ = ["WithGoodImages", "check_inner"]
