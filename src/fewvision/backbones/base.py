"""The backbone contract every encoder honours.

A backbone owns its preprocessing (``preprocess``: PIL image -> tensor), so the same transform is used when
features are cached, when a head is fitted and when a saved model predicts elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
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

    #: True when ``patch_features`` / ``patch_layout`` take ``layers`` (the CNN stages to pack).
    selectable_layers: bool = False

    def patch_layout(self, layers=None) -> list[tuple[int, int, int]] | None:
        """(channels, h, w) of each layer packed into ``patch_features`` (see :func:`pack_layers`), or None when
        the patch features are a single map."""
        return None

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

    def portable(self) -> tuple[dict[str, Path], str]:
        """What it takes to load this backbone on another machine with no hub and no cache: the files it reads
        (archive name -> local path) and a spec that loads them from a folder, ``{root}`` standing for that folder.
        The files keep their names, so the weights digest - and with it the id - is the same there. Backbones
        with no weight files (``texture``, seeded random initialisations) need nothing."""
        return {}, self.spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, id={self.id!r})"


def hub_folder_name(path: Path) -> str | None:
    """The ``models--ORG--REPO`` folder of a file inside a Hugging Face hub cache, or None."""
    return next((part for part in Path(path).resolve().parts if part.startswith("models--")), None)


def pack_layers(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Feature maps of several layers -> one tensor on the first (finest) map's grid: every other map is repeated
    onto that grid (nearest-neighbour up-sampling) and the maps are concatenated along channels.

    Repetition loses nothing: :func:`unpack_layers` returns each layer's own map exactly, so a head can combine the
    layers its own way (PatchCore averages neighbourhoods on each layer's grid, then up-samples bilinearly; PaDiM
    uses the packed map as it is, which is the paper's nearest-neighbour combination).
    """
    size = maps[0].shape[-2:]
    return torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest") for m in maps], 1)


def _first_source_rows(native: int, packed: int) -> torch.Tensor:
    """For each of ``native`` rows, the first of ``packed`` rows that nearest-neighbour up-sampling copied it to.
    Plain integers, not tensor ops: an exported graph gets the indices as a constant."""
    first: dict[int, int] = {}
    for row in range(packed):
        first.setdefault(math.floor(row * (native / packed)), row)  # torch's "nearest" rule, in float64
    if len(first) != native:
        raise ValueError(f"a {native}-row map cannot be recovered from a {packed}-row packed grid")
    return torch.tensor([first[i] for i in range(native)], dtype=torch.long)


def unpack_layers(packed: torch.Tensor, layout: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_layers` for ``layout`` = (channels, h, w) per layer."""
    if sum(int(c) for c, _, _ in layout) != packed.shape[1]:
        raise ValueError(f"patch maps have {packed.shape[1]} channels, the layer layout {list(layout)} has "
                         f"{sum(int(c) for c, _, _ in layout)}")
    maps, start = [], 0
    for channels, h, w in layout:
        part = packed[:, start : start + int(channels)]
        start += int(channels)
        if tuple(part.shape[-2:]) != (int(h), int(w)):
            rows = _first_source_rows(int(h), part.shape[-2])
            cols = _first_source_rows(int(w), part.shape[-1])
            part = part[:, :, rows][:, :, :, cols]
        maps.append(part)
    return maps


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
