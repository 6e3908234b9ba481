"""The backbone contract every encoder honours.

A backbone owns its preprocessing (``preprocess``: PIL image -> tensor), so the same transform is used when
features are cached, when a head is fitted and when a saved model predicts elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
from PIL import Image


class BackboneError(RuntimeError):
    """A backbone cannot be created or cannot do what was asked (no text tower, no weights, ...)."""


class WeightsUnavailable(BackboneError):
    """Weights are neither cached nor reachable. The message names the spec and the ways to supply weights."""


class Backbone(ABC):
    """An image encoder, optionally with a text tower.

    Subclasses set ``spec`` (what the user typed), ``_preprocess`` and ``_device``, implement ``forward_images``
    and, when they have a text tower, ``encode_text``. ``id`` changes whenever the weights or the preprocessing
    change: it keys the feature cache and is stored in saved models.
    """

    spec: str
    has_text: bool = False
    # Pre-computed string describing weights and preprocessing; see ``_make_id``.
    _id: str

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self.spec

    # Set by every subclass's __init__.
    _preprocess: Callable[[Image.Image], torch.Tensor]
    _device: torch.device = torch.device("cpu")

    # --- preprocessing (the only place it happens) ---------------------------------------------------------
    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image -> float tensor [C, H, W]. Picklable, so decoding workers can run it."""
        return self._preprocess

    # --- encoders -----------------------------------------------------------------------------------------
    @abstractmethod
    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch [B, C, H, W] -> un-normalised image embeddings [B, D]."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> L2-normalised embeddings [B, D] (float32)."""
        with torch.inference_mode():
            feats = self.forward_images(pixels).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> L2-normalised embeddings [T, D]."""
        raise BackboneError(
            f"backbone '{self.spec}' has no text tower: zero-shot and text-based methods need a CLIP-style model "
            "(e.g. --backbone openclip:ViT-B-32/laion2b_s34b_b79k)"
        )

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> patch features [B, D, h, w] for the anomaly heads (not normalised)."""
        raise BackboneError(f"backbone '{self.spec}' does not provide patch features")

    @property
    def logit_scale(self) -> float:
        """Multiplier applied to cosine similarities before the softmax (CLIP's learned temperature)."""
        return 100.0

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the preprocessed tensor."""
        return (224, 224)

    @property
    def device(self) -> torch.device:
        return self._device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, id={self.id!r})"


def make_id(kind: str, weights_digest: str, preprocess_description: object) -> str:
    """A short stable id from the kind of backbone, a digest of its weights and a description of its preprocessing."""
    blob = json.dumps([kind, weights_digest, preprocess_description], sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def digest_state_dict(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order; used when no weight file identifies the weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()
