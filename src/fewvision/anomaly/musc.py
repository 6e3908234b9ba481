"""MuSc (Li et al., "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual Scoring of the
Unlabeled Images", ICLR 2024): zero-shot anomaly scores for a batch of unlabelled images, with no good images, no
prompts and no training.

Defects are rare and small, so most of any patch's counterparts in the other images of a batch are good: a patch
that is far from its nearest patch in most other images is anomalous. Per image layer ``l`` and aggregation degree
``r`` (paper Sec. 3; settings of the official code, xrli-U/MuSc):

* **LNAMD** (local neighbourhood aggregation with multiple degrees): each image's token map ``[C, h, w]`` of layer
  ``l`` is layer-normalised over all its elements, then every patch is replaced by the mean of its ``r x r``
  neighbourhood (zero padding counted, as the official unfold + mean); ``r`` in (1, 3, 5). Features are then
  L2-normalised.
* **MSM** (mutual scoring): for image ``i``, patch ``p`` and each other image ``j``, ``d_j(p) = min_q ||z_p -
  z_q||`` over the patches ``q`` of ``j``; the patch score is the mean of the smallest 30% of the ``N - 1`` values
  ``d_j(p)`` (the "interval average" over [0, 0.3]; at least one value).
* Patch scores are averaged over layers and degrees; the image's map is them on the patch grid; the image score is
  the map's maximum (the official maximum of the bilinearly up-sampled map, which is the same number).
* **RsCIN** (re-scoring with constrained image-level neighbourhood): image scores min-max normalised over the batch,
  then for each ``k`` in (1, 2, 3) each image takes the similarity-weighted mean of the scores of its ``k`` most
  similar images (cosine similarity of global image features: CLIP's image embedding, DINOv2's class token) and
  the ``k`` results are averaged. The official code uses (1, 8, 9) for VisA, and the plain dot product of the
  features: the same as the cosine for CLIP's (it normalises them), not for DINO's class token (it does not); ours
  are the cached, normalised features - docs/methods/musc.md says why.

Feature scale: by default the backbone decides, as for AnomalyDINO - the paper's layer norm and L2 normalisation,
unless the backbone declares ``patch_distance = "euclidean"`` (the weight-free ``texture`` statistics, standardised
against fixed constants: their size is the signal, and a per-image layer norm removes exactly the changes that
cover the whole image - textile ``global`` defects scored AUROC 0.01-0.07 with it, 0.99 without).

Layers: four evenly spaced blocks of a ViT (the official ``[5, 11, 17, 23]`` of a 24-block ViT-L; ``[2, 5, 8, 11]``
of a 12-block ViT-S/B); other backbones give their own patch map (one layer).

Cost: ``O(N^2 P^2 C)`` per layer and degree for ``N`` images of ``P`` patches - each pair of images is compared
once (the block of distances between images ``i`` and ``j`` gives both ``i``'s minima to ``j`` and ``j``'s to
``i``). Memory: the minima ``4 N^2 P`` bytes (0.5 GB for 300 images of 1369 patches) plus one block of distances of
at most ``block_elements`` floats; the features themselves ``4 N P C`` bytes per layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

PAPER_DEGREES = (1, 3, 5)
PAPER_FRACTION = 0.3
PAPER_K = (1, 2, 3)
BLOCK_ELEMENTS = 1 << 25  # 128 MiB of float32 distances at a time


def paper_layers(depth: int) -> tuple[int, ...]:
    """The four evenly spaced blocks MuSc reads from a ViT of ``depth`` blocks (0-based)."""
    return tuple(sorted({max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4)}))


def aggregate_neighbourhood(maps: torch.Tensor, r: int, normalise: bool = True) -> torch.Tensor:
    """LNAMD for one layer and degree: ``maps`` [N, C, h, w] -> patch features [N, h*w, C]; ``normalise``: the
    paper's per-image layer norm before and L2 normalisation after the neighbourhood mean."""
    if r < 1 or r % 2 == 0:
        raise ValueError(f"aggregation degrees must be odd and >= 1, got {r}")
    x = F.layer_norm(maps.float(), maps.shape[1:]) if normalise else maps.float()
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    x = x.flatten(2).transpose(1, 2)
    return F.normalize(x, dim=-1) if normalise else x


def mutual_scores(z: torch.Tensor, fraction: float = PAPER_FRACTION,
                  block_elements: int = BLOCK_ELEMENTS) -> torch.Tensor:
    """MSM: patch scores [N, P] of features ``z`` [N, P, C], each against the other N - 1 images of the batch."""
    n, p, c = z.shape
    if n < 2:
        raise ValueError("mutual scoring needs at least 2 images in the batch")
    z = z.float().contiguous()
    sq = (z * z).sum(-1)  # [N, P]
    minima = torch.empty(n, p, n)  # minima[i, :, j]: distance of i's patches to their nearest patch of j
    step = max(1, int(math.sqrt(block_elements)) // p)
    for a in range(0, n, step):
        za, sa = z[a : a + step], sq[a : a + step]
        for b in range(a, n, step):
            zb, sb = z[b : b + step], sq[b : b + step]
            d2 = (sa.reshape(-1, 1) + sb.reshape(1, -1) - 2 * za.reshape(-1, c) @ zb.reshape(-1, c).T)
            d2 = d2.clamp_min_(0).view(len(za), p, len(zb), p)
            minima[a : a + len(za), :, b : b + len(zb)] = d2.amin(3)
            if b != a:
                minima[b : b + len(zb), :, a : a + len(za)] = d2.amin(1).permute(1, 2, 0)
    minima.sqrt_()
    idx = torch.arange(n)
    minima[idx, :, idx] = float("inf")  # an image is not its own reference
    k = max(1, int((n - 1) * float(fraction)))
    return minima.topk(k, dim=2, largest=False, sorted=True).values.mean(2)


def rescore(scores: torch.Tensor, image_features: torch.Tensor, k_list: Sequence[int] = PAPER_K) -> torch.Tensor:
    """RsCIN: min-max normalised image scores [N] smoothed over each image's ``k`` most similar images, averaged
    over ``k_list``."""
    s = scores.double()
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    f = F.normalize(image_features.double(), dim=-1)
    sim = f @ f.T
    out = []
    for k in k_list:
        k = min(max(1, int(k)), len(s))
        vals, idx = sim.topk(k, dim=1)
        out.append((vals * s[idx]).sum(1) / vals.sum(1))
    return torch.stack(out).mean(0).float()


class MuSc:
    """Zero-shot batch scorer (see the module docstring). Parameters as scikit-learn: set here, used by ``score``.

    layers: ViT blocks to read (None: four evenly spaced blocks of a ViT, else the backbone's own patch map).
    degrees: LNAMD neighbourhood sizes ``r``. fraction: share of the other images whose minima are averaged.
    k_list: RsCIN neighbourhood sizes; empty: no re-scoring. block_elements: most distances held at once.
    normalise: LNAMD's layer norm and L2 normalisation (None: yes, unless the backbone's ``patch_distance`` is
    "euclidean").
    """

    method = "musc"

    def __init__(self, layers: Sequence[int] | None = None, degrees: Sequence[int] = PAPER_DEGREES,
                 fraction: float = PAPER_FRACTION, k_list: Sequence[int] = PAPER_K,
                 block_elements: int = BLOCK_ELEMENTS, normalise: bool | None = None):
        self.layers = layers
        self.degrees = degrees
        self.fraction = fraction
        self.k_list = k_list
        self.block_elements = block_elements
        self.normalise = normalise

    def feature_layers(self, backbone) -> tuple[int, ...] | None:
        if self.layers is not None:
            layers = self.layers.split(",") if isinstance(self.layers, str) else self.layers
            return tuple(int(v) for v in layers)
        if getattr(backbone, "is_vit", False):
            return paper_layers(len(backbone.model.blocks))
        return None

    def normalises(self, backbone=None) -> bool:
        if self.normalise is not None:
            return bool(self.normalise)
        return getattr(backbone, "patch_distance", "cosine") != "euclidean"

    def score(self, layer_maps: Sequence[torch.Tensor], image_features: torch.Tensor | None = None,
              backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps [N, h, w], image scores [N]) for the batch: ``layer_maps`` one [N, C, h, w] map per layer (the
        same grid), ``image_features`` [N, D] for RsCIN (None: the maxima without re-scoring), ``backbone`` the
        one that made them (it decides ``normalise=None``)."""
        if not 0 < float(self.fraction) <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        n, _, h, w = layer_maps[0].shape
        if any(tuple(m.shape[-2:]) != (h, w) or len(m) != n for m in layer_maps):
            raise ValueError("MuSc needs every layer's map on the same grid for the same images")
        total = torch.zeros(n, h * w)
        degrees = [int(r) for r in self.degrees]
        normalise = self.normalises(backbone)
        for maps in layer_maps:
            for r in degrees:
                total += mutual_scores(aggregate_neighbourhood(maps, r, normalise), float(self.fraction),
                                       int(self.block_elements))
        patch = (total / (len(layer_maps) * len(degrees))).view(n, h, w)
        scores = patch.flatten(1).amax(1)
        if image_features is not None and len(self.k_list):
            scores = rescore(scores, image_features, self.k_list)
        return patch, scores


__all__ = ["MuSc", "aggregate_neighbourhood", "mutual_scores", "rescore", "paper_layers"]
