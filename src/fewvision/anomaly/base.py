"""The protocol every anomaly head follows.

A head learns from good images only. It declares what it consumes (``inputs``):

* ``"patches"`` - patch feature maps ``[N, C, h, w]`` from ``backbone.patch_features`` (cached like image features).
  ``fit`` receives either one tensor or an iterable of such tensors (chunks of images, so that a fit can stream
  over more images than fit in memory); :func:`iter_chunks` turns either into chunks. ``score`` receives a tensor.
* ``"pixels"``  - preprocessed images ``[N, 3, H, W]`` from ``backbone.preprocess`` (AE, VAE, STPM students);
* ``"backbone"`` - the head calls the backbone itself (e.g. WinCLIP needs text and multi-scale windows); it
  receives the preprocessed images ``[N, 3, H, W]`` like a ``"pixels"`` head.

``fit(inputs, backbone)`` learns; ``score(inputs, backbone)`` returns raw anomaly maps ``[N, h, w]`` (any
resolution) and image scores ``[N]``. Turning raw maps into maps at input resolution with Gaussian smoothing is
done once, for every head, by :func:`fewvision.anomaly.postprocess.finish` (which calls ``finish_maps``) - the
only post-processing code path, used by fit-time calibration, prediction, evaluation and any export alike.

``image_score`` says where the image score comes from: ``"head"`` (the head's own image score, e.g. PatchCore's
re-weighted nearest-neighbour distance) or ``"map_max"`` (the maximum of the finished, smoothed map, e.g. PaDiM).

A head whose ``leave_one_out`` is True also has ``score_left_out(inputs, first_index, backbone)``: the scores of
its own training images (``first_index`` = position of the first one in fit order), each as if the head had been
fitted without it. Then every good image both fits the head and calibrates its threshold; ``release_fit_data()``
drops what only those scores needed. Other heads are calibrated on held-out good images.

Persistence is as for classification heads: ``state()`` / ``from_state()``; the generic implementation stores
every ``*_`` tensor attribute and JSON-able ``*_`` attribute plus the ``__init__`` parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Iterator, Sequence

import torch

from ..backbones.base import BackboneError
from ..heads.base import ClassifierHead

IMAGE_SCORE_SOURCES = ("head", "map_max")


class AnomalyHead(ABC):
    method: str = ""
    inputs: str = "patches"
    image_score: str = "head"
    leave_one_out: bool = False

    @abstractmethod
    def fit(self, inputs: torch.Tensor | Iterable[torch.Tensor] | None, backbone=None) -> "AnomalyHead":
        """Learn the distribution of good images."""

    @abstractmethod
    def score(self, inputs: torch.Tensor | None, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw maps [N, h, w], image scores [N]); higher means more anomalous."""

    # Persistence and parameter introspection are shared with the classification heads.
    get_params = ClassifierHead.get_params
    state = ClassifierHead.state
    from_state = classmethod(ClassifierHead.from_state.__func__)

    def _check_fitted(self) -> None:
        if not any(k.endswith("_") and not k.startswith("_") for k in vars(self)):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit() first")

    STATE_SHAPES: dict[str, tuple[str, ...]] = {}

    def state_symbols(self) -> dict[str, int]:
        """Dimensions known before looking at the tensors (P, the positions of the fitted grid, when there is one)."""
        grid = getattr(self, "grid_", None)
        return {"P": int(grid[0]) * int(grid[1])} if grid else {}

    def release_fit_data(self) -> None:
        """Drop what only leave-one-out scores of the training images needed (heads with ``leave_one_out``)."""

    def n_trainable_parameters(self) -> int:
        return 0


def iter_chunks(inputs: torch.Tensor | Iterable[torch.Tensor], chunk: int = 32) -> Iterator[torch.Tensor]:
    """Chunks ``[n, C, h, w]`` (float32) of a tensor or of an iterable of tensors; empty chunks are dropped."""
    if torch.is_tensor(inputs):
        for start in range(0, len(inputs), chunk):
            yield inputs[start : start + chunk].float()
        return
    for part in inputs:
        part = torch.as_tensor(part)
        if len(part):
            yield part.float()


def selected_layers(layers, backbone, paper: Sequence[int]) -> list[int] | None:
    """The stages a head asks a backbone for: its ``layers`` parameter, else ``paper`` when the backbone has
    selectable stages, else None (the backbone's own patch features)."""
    if layers is not None:
        if not getattr(backbone, "selectable_layers", False):
            raise BackboneError(f"backbone '{getattr(backbone, 'spec', backbone)}' has no selectable layers; "
                                "layers=... applies to timm CNN backbones")
        if isinstance(layers, str):  # --param layers=1,2,3
            layers = layers.split(",")
        try:
            return [int(v) for v in ([layers] if isinstance(layers, int) else layers)]
        except (TypeError, ValueError):
            raise ValueError(f"layers must be stage numbers such as 1,2,3, got {layers!r}") from None
    return list(paper) if getattr(backbone, "selectable_layers", False) else None
