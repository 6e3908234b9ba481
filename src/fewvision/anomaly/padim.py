"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and Localization",
ICPR 2020).

* Patch embeddings: the backbone's mid-level feature maps - for a timm CNN the stages in ``layers``, by default
  1, 2 and 3 as in the paper, each repeated onto layer 1's grid and concatenated - reduced to ``n_features``
  randomly chosen channels (Sec. 3.1 / Table 1: d = 100 of 448 for ResNet18, 550 of 1792 for WideResNet50;
  seeded).
* One multivariate Gaussian per patch position ``ij`` (Eq. 1): mean ``mu_ij`` and sample covariance
  ``Sigma_ij = 1/(N-1) sum_k (x_ij^k - mu_ij)(x_ij^k - mu_ij)^T + eps I`` with ``eps = 0.01``.
* Anomaly map (Eq. 2): Mahalanobis distance ``M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij))``; the
  image score is the maximum of the up-sampled, Gaussian-smoothed map (``image_score = "map_max"``).

Streaming: per position the running sums of ``x`` and ``x x^T`` (shifted by the first chunk's mean for numerical
stability) are accumulated chunk by chunk, so memory is ``P * d * d`` floats whatever the number of images; the
scatter matrices are turned into inverse covariances in place, each chunk of positions inverted in float64.

Leave-one-out scores of the training images (:meth:`PaDiM.score_left_out`) are exact and need no second inverse.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from . import register
from .base import AnomalyHead, iter_chunks, selected_layers


def default_n_features(channels: int) -> int:
    """The paper's sizes: 100 for ResNet18-sized embeddings (448 channels), 550 for WideResNet50-sized (1792)."""
    return min(channels, 100 if channels < 1000 else 550)


@register
class PaDiM(AnomalyHead):
    STATE_SHAPES = {"channel_index_": ("d",), "mean_": ("d", "P"), "inv_covariance_": ("P", "d", "d")}
    method = "padim"
    inputs = "patches"
    image_score = "map_max"
    leave_one_out = True

    def __init__(self, n_features: int | None = None, epsilon: float = 0.01, layers: Sequence[int] | None = None,
                 chunk_images: int = 32, seed: int = 0):
        self.n_features = n_features
        self.epsilon = epsilon
        self.layers = layers
        self.chunk_images = chunk_images
        self.seed = seed

    def feature_layers(self, backbone) -> list[int] | None:
        """The CNN stages whose maps are combined: ``layers``, else the paper's 1-3 on a backbone with selectable
        stages (timm CNNs), else the backbone's own patch features (None)."""
        return selected_layers(self.layers, backbone, PAPER_LAYERS)

    def fit(self, inputs: torch.Tensor | Iterable[torch.Tensor], backbone=None) -> "PaDiM":
        if self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon}")
        self.feature_layers_ = self.feature_layers(backbone)
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
            x = chunk[:, idx].flatten(2).float()  # [n, d, P]
            if shift is None:
                shift = x.mean(0)
                s1 = torch.zeros_like(shift, dtype=torch.float64)
                s2 = torch.zeros(x.shape[2], x.shape[1], x.shape[1], dtype=torch.float32)
            # contiguous: a batched matmul on a permuted view is ~50x slower on some CPU builds (measured)
            xc = (x - shift).permute(2, 0, 1).contiguous()  # [P, n, d]
            s1 += xc.sum(1).T.double()
            s2 += xc.transpose(1, 2) @ xc
            n += len(chunk)
        if n < 2:
            raise ValueError(f"padim needs at least 2 good images to estimate a covariance, got {n}")
        m = (s1 / n).T  # [P, d], mean of the shifted data
        self.channel_index_ = idx
        self.mean_ = (shift + m.T).float()  # [d, P]
        # sum (x - mean)(x - mean)^T per position, then its regularised inverse, both in place (s2 is the largest
        # array of the fit: P * d * d floats, 3.8 GB for the paper's WideResNet-50 configuration)
        s2 -= (n * m.unsqueeze(2) * m.unsqueeze(1)).float()
        self.inv_covariance_ = _regularised_inverse_(s2, n - 1, self.epsilon)  # [P, d, d]
        self.grid_ = list(grid)
        self.n_train_images_ = int(n)
        return self

    def partial_fit(self, inputs: torch.Tensor, backbone=None, chunk: int = 64) -> "PaDiM":
        """Add good images to the Gaussians without a refit: the same means and covariances a fit on all the images
        would give (to float32 precision), with no pass over the old images.

        Per position the old scatter comes back from the stored inverse, S_a = (n - 1)((Sigma^-1)^-1 - eps I), in
        float64; the k new images' mean m_b and scatter S_b join it by the pairwise rule
        S = S_a + S_b + n k / (n + k) (m_b - m_a)(m_b - m_a)^T, mean = (n m_a + k m_b) / (n + k), and the result is
        inverted as in :meth:`fit`. The threshold is not recalibrated."""
        self._check_fitted()
        x = torch.as_tensor(inputs).float()
        if x.ndim != 4 or list(x.shape[-2:]) != list(self.grid_) or int(self.channel_index_.max()) >= x.shape[1]:
            raise ValueError(f"padim was fitted on patch maps with a {tuple(self.grid_)} grid, got shape {tuple(x.shape)}")
        n, k = int(self.n_train_images_), len(x)
        if k == 0:
            return self
        new = x[:, self.channel_index_].flatten(2).double().permute(2, 0, 1)  # [P, k, d]
        mean_b = new.mean(1)  # [P, d]
        diff = mean_b - self.mean_.T.double()
        eye = self.epsilon * torch.eye(new.shape[-1], dtype=torch.float64)
        for start in range(0, len(new), chunk):
            part = self.inv_covariance_[start : start + chunk]
            scatter = (n - 1) * (torch.linalg.inv(part.double()) - eye)
            centred = new[start : start + chunk] - mean_b[start : start + chunk, None]
            scatter += centred.transpose(1, 2) @ centred
            d = diff[start : start + chunk]
            scatter += (n * k / (n + k)) * d[:, :, None] * d[:, None, :]
            part.copy_(torch.linalg.inv(scatter / (n + k - 1) + eye).float())
        self.mean_ = (self.mean_.double() + (k / (n + k)) * diff.T).float().contiguous()
        self.n_train_images_ = n + k
        return self

    def score(self, inputs: torch.Tensor, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        x = torch.as_tensor(inputs).float()
        if x.ndim != 4 or list(x.shape[-2:]) != list(self.grid_) or (
                not torch.compiler.is_exporting() and int(self.channel_index_.max()) >= x.shape[1]):
            raise ValueError(f"padim was fitted on patch maps with a {tuple(self.grid_)} grid, got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        delta = self._delta(x)
        dist2 = ((delta @ self.inv_covariance_) * delta).sum(-1)  # [P, n]
        maps = dist2.clamp_min(0).sqrt().T.reshape(n, h, w)
        return maps, maps.flatten(1).amax(1) if n else torch.zeros(0)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, self.channel_index_].flatten(2) - self.mean_).permute(2, 0, 1).contiguous()  # [P, n, d]

    # --- leave-one-out scores of the training images (their threshold calibration) --------------------------
    def score_left_out(self, inputs: torch.Tensor, first_index: int = 0, backbone=None):
        """Maps of training images, each from the Gaussians fitted without it - exactly, in closed form.

        Without image i (d = x_i - mean, S the scatter of all n images): mean_-i = mean - d / (n - 1) and
        Sigma_-i = S_-i / (n - 2) + eps I = A - c d d^T with A = S / (n - 2) + eps I, c = n / ((n - 1)(n - 2)),
        because S_-i = S - n / (n - 1) d d^T. So x_i - mean_-i = n / (n - 1) d and, by Sherman-Morrison,
        M^2 = (n / (n - 1))^2 q / (1 - c q) with q = d^T A^-1 d.

        A^-1 comes from the stored Sigma^-1 (Sigma = S / (n - 1) + eps I), with no second inverse in memory:
        A = a Sigma - b I with a = (n - 1) / (n - 2), b = eps / (n - 2), so
        A^-1 = (1 / a) sum_k r^k Sigma^-(k+1), r = b / a = eps / (n - 1); Sigma >= eps I makes each term at most
        1 / (n - 1) of the one before, so a few terms reach float precision.
        """
        self._check_fitted()
        n = self.n_train_images_
        if n < 3:
            raise ValueError(f"leave-one-out scores need at least 3 training images, the model has {n}")
        x = torch.as_tensor(inputs).float()
        delta = self._delta(x)  # [P, b, d]
        a, r = (n - 1) / (n - 2), self.epsilon / (n - 1)
        terms = max(1, min(60, math.ceil(math.log(1e-9) / math.log(1.0 / (n - 1)))))
        q = torch.zeros(delta.shape[:2], dtype=torch.float64)
        power = delta
        for k in range(terms):
            power = power @ self.inv_covariance_  # d^T Sigma^-(k+1), row vectors; Sigma^-1 is symmetric
            q += (r ** k) * (power * delta).sum(-1).double()
        q /= a
        c = n / ((n - 1) * (n - 2))
        dist2 = (n / (n - 1)) ** 2 * q / (1.0 - c * q).clamp_min(1e-12)
        maps = dist2.clamp_min(0).sqrt().float().T.reshape(len(x), *x.shape[-2:])
        return maps, maps.flatten(1).amax(1)


def _regularised_inverse_(scatter: torch.Tensor, dof: int, epsilon: float, chunk: int = 64) -> torch.Tensor:
    """(scatter / dof + eps I)^-1 per position, written over ``scatter`` (float32, row-major: a loaded model's layout,
    so both run the same BLAS path); each chunk of positions is inverted in float64."""
    eye = epsilon * torch.eye(scatter.shape[-1], dtype=torch.float64)
    for start in range(0, len(scatter), chunk):
        part = scatter[start : start + chunk]
        part.copy_(torch.linalg.inv(part.double() / dof + eye).float())
    return scatter


PAPER_LAYERS = (1, 2, 3)
