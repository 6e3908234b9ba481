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
    leave_one_out = True

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
        scatter = s2 - n * m.unsqueeze(2) * m.unsqueeze(1)  # sum of (x - mean)(x - mean)^T per position
        del s2
        self.channel_index_ = idx
        self.mean_ = (shift + m.T).float()  # [d, P]
        self.inv_covariance_ = _regularised_inverse(scatter, n - 1, self.epsilon)  # [P, d, d]
        # For leave-one-out scores (not saved): with A = scatter / (n - 2) + eps I, see score_left_out.
        self._loo_inverse = _regularised_inverse(scatter, n - 2, self.epsilon) if n >= 3 else None
        self.grid_ = list(grid)
        self.n_train_images_ = int(n)
        return self

    # --- leave-one-out scores of the training images (their threshold calibration) --------------------------
    def score_left_out(self, inputs: torch.Tensor, first_index: int = 0, backbone=None):
        """Maps of training images, each from the Gaussians fitted without it - exactly, in closed form.

        Without image i (d = x_i - mean, S the scatter of all n images): mean_-i = mean - d / (n - 1) and
        Sigma_-i = S_-i / (n - 2) + eps I = A - c d d^T with A = S / (n - 2) + eps I, c = n / ((n - 1)(n - 2)),
        because S_-i = S - n / (n - 1) d d^T. So x_i - mean_-i = n / (n - 1) d and, by Sherman-Morrison,
        M^2 = (n / (n - 1))^2 q / (1 - c q) with q = d^T A^-1 d: one inverse per position for every image.
        """
        self._check_fitted()
        if getattr(self, "_loo_inverse", None) is None:
            raise RuntimeError("leave-one-out scores need at least 3 training images and are only available right "
                               "after fit")
        n = self.n_train_images_
        x = torch.as_tensor(inputs).float()
        delta = (x[:, self.channel_index_].flatten(2) - self.mean_).permute(2, 0, 1).contiguous()  # [P, b, d]
        q = ((delta @ self._loo_inverse) * delta).sum(-1).double()  # [P, b]
        c = n / ((n - 1) * (n - 2))
        dist2 = (n / (n - 1)) ** 2 * q / (1.0 - c * q).clamp_min(1e-12)
        maps = dist2.clamp_min(0).sqrt().float().T.reshape(len(x), *x.shape[-2:])
        return maps, maps.flatten(1).amax(1)

    def release_fit_data(self) -> None:
        self._loo_inverse = None

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


def _regularised_inverse(scatter: torch.Tensor, dof: int, epsilon: float, chunk: int = 64) -> torch.Tensor:
    """(scatter / dof + eps I)^-1 per position, in float64, returned as row-major float32 (a loaded model's layout,
    so both run the same BLAS path); inverted ``chunk`` positions at a time to bound the float64 peak."""
    eye = epsilon * torch.eye(scatter.shape[-1], dtype=scatter.dtype)
    out = torch.empty(scatter.shape, dtype=torch.float32)
    for start in range(0, len(scatter), chunk):
        out[start : start + chunk] = torch.linalg.inv(scatter[start : start + chunk] / dof + eye).float()
    return out
