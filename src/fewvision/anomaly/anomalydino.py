"""AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with DINOv2", WACV 2025).

* Memory bank: the L2-normalised patch features of the k good images (``backbone.patch_features``: DINOv2 patch
  tokens in the paper; here any backbone with patch features). With rotation augmentation each good image also
  enters rotated by 45, 90, ..., 315 degrees (bilinear, reflected border), the paper's "agnostic" setting. By default
  (``rotate=None``) the images are rotated when there are at most ``ROTATE_UP_TO`` of them - the few-shot regime the
  paper studies; with hundreds of good images the bank has their own variation and eight copies would only cost
  memory.
* Patch score: cosine distance ``1 - cos(x, m)`` to the nearest bank patch ``m`` (1-NN; ``metric="cosine"``, the
  paper's default); ``metric="euclidean"`` uses ``|x - m|`` on the raw features instead (the official code's other
  option). By default (``metric=None``) the backbone decides: cosine, unless it declares ``patch_distance`` (the
  weight-free ``texture`` statistics are standardised, so their length is the signal: Euclidean).
* Image score: the mean of the top 1% of the patch scores (at least the largest one) - the tail value at risk at
  q = 0.99 that the paper uses instead of the maximum.
* Map: the patch scores, up-sampled bilinearly and smoothed with a Gaussian of sigma 4 (``postprocess.finish``, as
  for every head).
* Optional foreground mask (``masking``, for objects on a plain background): the first principal component of the
  test image's own patch features above ``mask_threshold`` (10, on DINOv2's feature scale), the other side when the
  central region (a 20% border dropped) is mostly (> 65%) background, then dilated and closed with a 3x3 element;
  patches outside the mask score 0. The good images are not masked (the paper's default).

Leave-one-out scores of the training images exclude the image's own bank patches (and its rotations), so every good
image both fits the bank and calibrates the threshold.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import register
from .base import AnomalyHead, selected_layers
from .patchcore import flatten_patches, nearest_rows

ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
ROTATE_UP_TO = 16
PAPER_CNN_LAYERS = (2, 3)  # for a timm CNN (not in the paper): the mid-level stages PatchCore uses


def rotate_reflect(pixels: torch.Tensor, angle: float) -> torch.Tensor:
    """``pixels`` [N, C, H, W] rotated by ``angle`` degrees (counter-clockwise) about the centre, bilinear, with the
    border reflected (no black corners), same size."""
    import torchvision.transforms.v2.functional as TF

    if angle % 360 == 0:
        return pixels
    h, w = pixels.shape[-2:]
    pad = int(math.ceil(max(h, w) * (math.sqrt(2) - 1) / 2)) + 2
    padded = F.pad(pixels, (pad, pad, pad, pad), mode="reflect")
    turned = TF.rotate(padded, float(angle), interpolation=TF.InterpolationMode.BILINEAR)
    return turned[..., pad : pad + h, pad : pad + w]


def top_percent_mean(patch_scores: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """Per row of ``patch_scores`` [N, P]: the mean of the largest ``int(P * fraction)`` values (the largest one
    when that is 0)."""
    k = max(1, int(patch_scores.shape[1] * fraction))
    return patch_scores.topk(k, dim=1).values.mean(1)


def foreground_mask(features: torch.Tensor, threshold: float = 10.0, border: float = 0.2) -> torch.Tensor:
    """bool [h, w]: the patches of one image's features [C, h, w] that its first principal component puts in the
    foreground (see the module docstring)."""
    from scipy import ndimage
    from sklearn.decomposition import PCA

    c, h, w = features.shape
    first = PCA(n_components=1, svd_solver="full").fit_transform(
        features.reshape(c, -1).T.double().numpy())[:, 0].reshape(h, w)
    mask = first > threshold
    top, left = int(h * border), int(w * border)
    centre = mask[top : int(h * (1 - border)), left : int(w * (1 - border))]
    if centre.sum() <= centre.size * 0.35:
        mask = -first > threshold
    square = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_dilation(mask, structure=square)
    mask = ndimage.binary_closing(mask, structure=square)
    return torch.from_numpy(mask)


@register
class AnomalyDINO(AnomalyHead):
    STATE_SHAPES = {"memory_bank_": ("M", "F")}
    method = "anomalydino"
    inputs = "backbone"  # it encodes rotated copies of the good images itself
    image_score = "head"
    leave_one_out = True

    def __init__(self, metric: str | None = None, rotate: bool | None = None, masking: bool = False,
                 mask_threshold: float = 10.0, top_fraction: float = 0.01, layers: Sequence[int] | None = None,
                 chunk_images: int = 8):
        self.metric = metric
        self.rotate = rotate
        self.masking = masking
        self.mask_threshold = mask_threshold
        self.top_fraction = top_fraction
        self.layers = layers
        self.chunk_images = chunk_images

    def feature_layers(self, backbone) -> list[int] | None:
        """``layers``, else the backbone's default for a ViT (its last block, as the paper's DINOv2 tokens), else
        stages 2-3 of a CNN."""
        if self.layers is None and getattr(backbone, "is_vit", False):
            return None
        return selected_layers(self.layers, backbone, PAPER_CNN_LAYERS)

    def _features(self, pixels: torch.Tensor, backbone) -> torch.Tensor:
        """Patch features [n, C, h, w] of preprocessed images (L2-normalised for the cosine metric), a chunk at a
        time."""
        if backbone is None:
            raise ValueError("anomalydino encodes images itself: it needs the backbone")
        out = []
        for start in range(0, len(pixels), max(1, int(self.chunk_images))):
            part = pixels[start : start + max(1, int(self.chunk_images))]
            with torch.inference_mode():
                feats = (backbone.patch_features(part, layers=self.feature_layers_) if self.feature_layers_
                         else backbone.patch_features(part))
            out.append(F.normalize(feats.float(), dim=1) if self.metric_ == "cosine" else feats.float())
        return torch.cat(out)

    def fit(self, inputs: torch.Tensor, backbone=None) -> "AnomalyDINO":
        pixels = torch.as_tensor(inputs).float()
        if pixels.ndim != 4 or len(pixels) == 0:
            raise ValueError(f"anomalydino expects preprocessed images [N, 3, H, W], got shape {tuple(pixels.shape)}")
        self.metric_ = self.metric or getattr(backbone, "patch_distance", "cosine")
        if self.metric_ not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got {self.metric_!r}")
        if not 0 < float(self.top_fraction) <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        n = len(pixels)
        self.feature_layers_ = self.feature_layers(backbone)
        self.rotated_ = bool(n <= ROTATE_UP_TO if self.rotate is None else self.rotate)
        angles = ANGLES if self.rotated_ else (0,)
        bank, owner = [], []
        for angle in angles:
            feats = self._features(rotate_reflect(pixels, angle), backbone)
            if angle == 0:
                self.grid_ = [int(v) for v in feats.shape[-2:]]
            bank.append(flatten_patches(feats))
            owner.append(torch.arange(n).repeat_interleave(feats.shape[-2] * feats.shape[-1]))
        self.memory_bank_ = torch.cat(bank).contiguous()
        self.n_train_images_ = n
        self._bank_image = torch.cat(owner)
        return self

    def partial_fit(self, inputs: torch.Tensor, backbone=None) -> "AnomalyDINO":
        """Add good images to the bank without a refit (the service's review loop): their patch features, and their
        rotations when the bank was built with them, are appended - the bank a fit on all the images would hold,
        in another order. The threshold is not recalibrated."""
        self._check_fitted()
        pixels = torch.as_tensor(inputs).float()
        angles = ANGLES if self.rotated_ else (0,)
        added = [flatten_patches(self._checked(self._features(rotate_reflect(pixels, a), backbone))) for a in angles]
        self.memory_bank_ = torch.cat([self.memory_bank_, *added]).contiguous()
        self.n_train_images_ = int(self.n_train_images_) + len(pixels)
        return self

    def _score_features(self, feats: torch.Tensor, exclude: torch.Tensor | None = None):
        n, _, h, w = feats.shape
        dist, _ = nearest_rows(flatten_patches(feats), self.memory_bank_, 1, exclude)
        d = dist[:, 0]
        patch = (d**2 / 2 if self.metric_ == "cosine" else d).view(n, h, w)  # unit vectors: |x - m|^2 / 2 = 1 - cos
        if self.masking:
            patch = patch * torch.stack([foreground_mask(f, float(self.mask_threshold)) for f in feats]).float()
        return patch, top_percent_mean(patch.flatten(1), float(self.top_fraction))

    def score(self, inputs: torch.Tensor, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        pixels = torch.as_tensor(inputs).float()
        if len(pixels) == 0:
            return torch.zeros(0, *self.grid_), torch.zeros(0)
        return self._score_features(self._checked(self._features(pixels, backbone)))

    def _checked(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.shape[1] != self.memory_bank_.shape[1] or list(feats.shape[-2:]) != list(self.grid_):
            raise ValueError(f"anomalydino was fitted on {self.memory_bank_.shape[1]}-channel patch features on a "
                             f"{tuple(self.grid_)} grid, got {tuple(feats.shape[1:])}")
        return feats

    # --- leave-one-out scores of the training images (their threshold calibration) --------------------------
    def score_left_out(self, inputs: torch.Tensor, first_index: int, backbone=None):
        """Scores of training images ``first_index``, ``first_index + 1``, ... (in fit order), each against the
        bank without its own patches and their rotations."""
        if getattr(self, "_bank_image", None) is None:
            raise RuntimeError("leave-one-out scores are only available right after fit")
        feats = self._checked(self._features(torch.as_tensor(inputs).float(), backbone))
        maps, scores = [], []
        for j in range(len(feats)):
            m, s = self._score_features(feats[j : j + 1], exclude=self._bank_image == first_index + j)
            maps.append(m)
            scores.append(s)
        return torch.cat(maps), torch.cat(scores)

    def release_fit_data(self) -> None:
        self._bank_image = None
