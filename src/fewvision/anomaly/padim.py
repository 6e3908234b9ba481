"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization",
ICPR 2020).

* Patch embeddings: the backbone's concatenated mid-level feature maps, reduced to ``n_features`` randomly chosen
  channels (Sec. 3.1 / Table 1: d = 100 of 448 for ResNet18, 550 of 1792 for WideResNet50; seeded).
* One multivariate Gaussian per patch position ``ij`` (Eq. 1): mean ``mu_ij`` and sample covariance
  ``Sigma_ij = 1/(N-1) sum_k (x_ij^k - mu_ij)(x_ij^k - mu_ij)^T + eps I`` with ``eps = 0.01``.
* Anomaly map (Eq. 2): Mahalanobis distance ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))``; the
  image score is the maximum of the up-sampled, Gaussian-smoothed map (``image_score = "map_max"``).

Streaming: per position the running sums of ``x`` and ``x x^T`` (float64, shifted by the first chunk's mean for
numerical stability) are accumulated chunk by chunk, so memory is ``P * d * d`` doubles whatever the number of
images.
"""

from __future__ import annotations

from typing import Iterable

import torch

from . import register
from .base import AnomalyHead, iter_chunks


def default_n_features(channels: int) -> int:
    """The paper's sizes: 100 for ResNet18-sized embeddings (448 channels), 550 for WideResNet50-sized (1792)."""
    return min(channels, 100 if channels < 1000 else 550)


@register
class PaDiM(AnomalyHead):
    method = "padim"
    inputs = "patches"
    image_score = "map_max"

    def __init__(self, n_features: int | None = None, epsilon: float = 0.01, chunk_images: int = 32, seed: int = 0):
        self.n_features = n_features
        self.epsilon = epsilon
        self.chunk_images = chunk_images
        self.seed = seed

    def fit(self, inputs: torch.Tensor | Iterable[torch.Tensor], backbone=None) -> "PaDiM":
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        idx = shift = s1 = s2 = grid = None
        n = 0
        for chunk in iter_chunks(inputs, self.chunk_images):
            if chunk.ndim != 4:
                raise ValueError(f"padim expects patch maps [N, C, h, w], got shape {tuple(chunk.shape)}")
            if idx is None:
                channels, grid = chunk.shape[1], tuple(chunk.shape[-2:])
                d = default_n_features(channels) if self.n_features is None else int(self.n_features)
                if not 1 <= d <= channels:
                    raise ValueError(f"n_features must be in 1..{channels} for {channels}-channel patch maps, got {d}")
                generator = torch.Generator().manual_seed(int(self.seed))
                idx = torch.randperm(channels, generator=generator)[:d].sort().values
            elif tuple(chunk.shape[-2:]) != grid:
                raise ValueError(f"patch maps changed grid during fit: {tuple(chunk.shape[-2:])} after {grid}")
            x = chunk[:, idx].flatten(2).double()  # [n, d, P]
            if shift is None:
                shift = x.mean(0)
                s1 = torch.zeros_like(shift)
                s2 = torch.zeros(x.shape[2], x.shape[1], x.shape[1], dtype=torch.float64)
            # contiguous: a batched matmul on a permuted view is ~50x slower on some CPU builds (measured)
            xc = (x - shift).permute(2, 0, 1).contiguous()  # [P, n, d]
            s1 += xc.sum(1).T
            s2 += xc.transpose(1, 2) @ xc
            n += len(chunk)
        if n < 2:
            raise ValueError(f"padim needs at least 2 good images to estimate a covariance, got {n}")
        m = (s1 / n).T  # [P, d], mean of the shifted data
        cov = (s2 - n * m.unsqueeze(2) * m.unsqueeze(1)) / (n - 1)
        cov += self.epsilon * torch.eye(cov.shape[-1], dtype=cov.dtype)
        self.channel_index_ = idx
        self.mean_ = (shift + m.T).float()  # [d, P]
        # linalg.inv returns column-major matrices; row-major as a loaded model has them (same BLAS path)
        self.inv_covariance_ = torch.linalg.inv(cov).float().contiguous()  # [P, d, d]
        self.grid_ = list(grid)
        self.n_train_images_ = int(n)
        return self

    def score(self, inputs: torch.Tensor, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        x = torch.as_tensor(inputs).float()
        if x.ndim != 4 or list(x.shape[-2:]) != list(self.grid_) or int(self.channel_index_.max()) >= x.shape[1]:
            raise ValueError(f"padim was fitted on patch maps with a {tuple(self.grid_)} grid, got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        delta = (x[:, self.channel_index_].flatten(2) - self.mean_).permute(2, 0, 1).contiguous()  # [P, n, d]
        dist2 = ((delta @ self.inv_covariance_) * delta).sum(-1)  # [P, n]
        maps = dist2.clamp_min(0).sqrt().T.reshape(n, h, w)
        return maps, maps.flatten(1).amax(1) if n else torch.zeros(0)
