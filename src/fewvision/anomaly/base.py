"""The protocol every anomaly head follows.

A head learns from good images only. It declares what it consumes (``inputs``):

* ``"patches"`` - patch feature maps ``[N, C, h, w]`` from ``backbone.patch_features`` (cached like image features);
* ``"pixels"``  - preprocessed images ``[N, 3, H, W]`` from ``backbone.preprocess`` (AE, VAE, STPM students);
* ``"backbone"`` - the head calls the backbone itself (e.g. WinCLIP needs text and multi-scale windows).

``fit(inputs, backbone)`` learns; ``score(inputs, backbone)`` returns raw anomaly maps ``[N, h, w]`` (any
resolution) and image scores ``[N]``. Turning raw maps into maps at input resolution with Gaussian smoothing is
done once, for every head, by :func:`fewvision.anomaly.postprocess.finish_maps` - the only post-processing code
path, used by fit-time calibration, prediction, evaluation and any export alike.

Persistence is as for classification heads: ``state()`` / ``from_state()``; the generic implementation stores
every ``*_`` tensor attribute and JSON-able ``*_`` attribute plus the ``__init__`` parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from ..heads.base import ClassifierHead


class AnomalyHead(ABC):
    method: str = ""
    inputs: str = "patches"

    @abstractmethod
    def fit(self, inputs: torch.Tensor | None, backbone=None) -> "AnomalyHead":
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

    def n_trainable_parameters(self) -> int:
        return 0
