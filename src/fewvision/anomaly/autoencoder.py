"""Reconstruction-based anomaly detection: a convolutional autoencoder (``ae``) and a variational one (``vae``).

Both are trained on good images only and score a pixel by how badly it is reconstructed:

* ``ae``: encoder of stride-2 4x4 convolutions down to a small spatial bottleneck, mirrored transposed-convolution
  decoder, trained with the mean squared error (the L2 autoencoder baseline of Bergmann et al., "Improving
  Unsupervised Defect Segmentation by Applying Structural Similarity to Autoencoders", VISAPP 2019);
* ``vae``: the same network whose bottleneck predicts a diagonal Gaussian posterior ``q(z|x) = N(mu, sigma^2)``; loss
  ``0.5 * ||x - x_hat||^2 + beta * KL(q(z|x) || N(0, I))`` per image (Kingma & Welling, ICLR 2014; beta as in Higgins
  et al., ICLR 2017); at scoring the decoder gets the posterior mean.

Error maps (``error``): per-pixel squared L2 over channels, ``1 - SSIM`` (Wang et al., IEEE TIP 2004: 11x11
Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over channels), or ``both``: the mean of the two maps,
each standardised by its mean and standard deviation on the training images. Image score: the mean of the ``top_k``
largest map values (``top_k=1``: the maximum).

Images arrive preprocessed by the backbone ([N, 3, H, W]); the head resizes them to ``image_size`` (128 by default,
for CPU speed) and standardises each channel with statistics of the training images. Maps are returned at
``image_size``; upsampling to the input and smoothing happen in ``postprocess.finish_maps``.
See docs/methods/ae-vae.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .base import AnomalyHead

MODULE_PREFIX = "net."


# --- SSIM ---------------------------------------------------------------------------------------------------------
def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """[size, size] normalised Gaussian window."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-pixel SSIM [N, H, W] (channel mean) of image batches [N, C, H, W] (Wang et al. 2004, eq. 13).

    Local statistics use the Gaussian window; borders are reflect-padded so the map keeps the input size.
    """
    c = x.shape[1]
    window = gaussian_window(window_size, sigma).to(x)[None, None].expand(c, 1, -1, -1)
    pad = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), window, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return ssim.mean(dim=1)


# --- torch-module persistence shared by trained heads ---------------------------------------------------------------
def state_with_module(head: AnomalyHead, module: nn.Module, prefix: str = MODULE_PREFIX):
    """The generic head state plus the module's state_dict tensors under ``prefix`` (no pickling)."""
    tensors, config = AnomalyHead.state(head)
    for key, value in module.state_dict().items():
        tensors[prefix + key] = value.detach().cpu().contiguous().clone()
    return tensors, config


def split_module_tensors(tensors: dict[str, torch.Tensor], prefix: str = MODULE_PREFIX):
    own = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    module = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return own, module


def resize_to(pixels: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(pixels.shape[-2:]) == (size, size):
        return pixels.float()
    return F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def top_k_mean(maps: torch.Tensor, k: int) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    return flat.topk(max(1, min(int(k), flat.shape[1])), dim=1).values.mean(dim=1)


# --- the network ----------------------------------------------------------------------------------------------------
class ConvAutoencoder(nn.Module):
    """Stride-2 conv encoder -> 1x1 conv bottleneck (``latent_channels``, doubled for mu/logvar when variational) ->
    mirrored transposed-conv decoder. Input side must be divisible by ``2 ** len(channels)``."""

    def __init__(self, channels: Sequence[int], latent_channels: int, variational: bool = False):
        super().__init__()
        self.variational = variational
        enc: list[nn.Module] = []
        prev = 3
        for ch in channels:
            enc += [nn.Conv2d(prev, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            prev = ch
        self.encoder = nn.Sequential(*enc)
        self.to_latent = nn.Conv2d(prev, latent_channels * (2 if variational else 1), 1)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, prev, 1), nn.LeakyReLU(0.2)]
        for ch in list(channels[:-1])[::-1]:
            dec += [nn.ConvTranspose2d(prev, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            prev = ch
        dec.append(nn.ConvTranspose2d(prev, 3, 4, stride=2, padding=1))
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.to_latent(self.encoder(x))
        if self.variational:
            mu, logvar = h.chunk(2, dim=1)
            return mu, logvar.clamp(-20.0, 20.0)
        return h, None

    def forward(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        mu, logvar = self.encode(x)
        z = mu
        if sample and logvar is not None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar


@register
class AutoencoderHead(AnomalyHead):
    """Convolutional autoencoder trained on good images; anomaly map = reconstruction error.

    Parameters
    ----------
    image_size: side the images are resized to inside the head (must be divisible by 2 ** len(channels)).
    channels: encoder widths, one stride-2 stage each (mirrored by the decoder).
    latent_channels: channels of the spatial bottleneck (at image_size / 2 ** len(channels)).
    error: "l2", "ssim" or "both" (mean of the two maps standardised on the training images).
    epochs, batch_size, lr: Adam training on the good images.
    top_k: image score = mean of the top_k largest map values (1 = max).
    seed: initialisation and batch order.
    """

    method = "ae"
    inputs = "pixels"
    variational = False

    def __init__(
        self,
        image_size: int = 128,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        error: str = "both",
        epochs: int = 50,
        batch_size: int = 16,
        lr: float = 1e-3,
        top_k: int = 1,
        seed: int = 0,
    ):
        self.image_size = image_size
        self.channels = channels
        self.latent_channels = latent_channels
        self.error = error
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.top_k = top_k
        self.seed = seed

    # --- helpers ------------------------------------------------------------------------------------------
    def _build(self) -> ConvAutoencoder:
        return ConvAutoencoder(list(self.channels), int(self.latent_channels), variational=self.variational)

    def _check_params(self) -> None:
        if self.error not in ("l2", "ssim", "both"):
            raise ValueError(f"error must be 'l2', 'ssim' or 'both', not {self.error!r}")
        factor = 2 ** len(self.channels)
        if int(self.image_size) % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} (2 ** len(channels))")

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        x = resize_to(pixels, int(self.image_size))
        return (x - self.mean_.view(1, -1, 1, 1)) / self.std_.view(1, -1, 1, 1)

    def _loss(self, x, recon, mu, logvar) -> torch.Tensor:
        return F.mse_loss(recon, x)

    # --- fit ----------------------------------------------------------------------------------------------
    def fit(self, inputs: torch.Tensor | None, backbone=None) -> "AutoencoderHead":
        self._check_params()
        if inputs is None or inputs.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.fit needs good images ([N, 3, H, W] preprocessed pixels)")
        raw = resize_to(inputs.detach().cpu(), int(self.image_size))
        self.mean_ = raw.mean(dim=(0, 2, 3))
        self.std_ = raw.std(dim=(0, 2, 3)).clamp_min(1e-6)
        x_all = self._prepare(inputs.detach().cpu())
        # SSIM is defined for non-negative intensities: it is computed on images mapped to [0, 1] by the range of the
        # standardised training images.
        self.data_min_ = float(x_all.min())
        self.data_range_ = max(float(x_all.max() - x_all.min()), 1e-6)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            net = self._build()
        gen = torch.Generator().manual_seed(int(self.seed))
        opt = torch.optim.Adam(net.parameters(), lr=float(self.lr))
        n = x_all.shape[0]
        bs = max(1, int(self.batch_size))
        self.loss_history_: list[float] = []
        self.recon_history_: list[float] = []
        net.train()
        for _ in range(int(self.epochs)):
            order = torch.randperm(n, generator=gen)
            total = recon_total = 0.0
            for start in range(0, n, bs):
                x = x_all[order[start:start + bs]]
                recon, mu, logvar = net(x, sample=True, generator=gen)
                loss = self._loss(x, recon, mu, logvar)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * x.shape[0]
                recon_total += float(F.mse_loss(recon.detach(), x)) * x.shape[0]
            self.loss_history_.append(total / n)
            self.recon_history_.append(recon_total / n)
        net.eval()
        self._net = net

        # Standardisation of the two error maps on the training images (used by error="both").
        l2, dssim = self._error_maps(x_all)
        self.map_stats_ = torch.tensor([[l2.mean(), l2.std()], [dssim.mean(), dssim.std()]]).float()
        return self

    # --- scoring ------------------------------------------------------------------------------------------
    def reconstruct(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised input, reconstruction), both [N, 3, image_size, image_size]."""
        self._check_fitted()
        x = self._prepare(pixels.detach().cpu())
        with torch.inference_mode():
            recon = torch.cat([self._net(part)[0] for part in x.split(max(1, int(self.batch_size)))])
        return x, recon

    def _error_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            recon = torch.cat([self._net(part)[0] for part in x.split(max(1, int(self.batch_size)))])
            l2 = ((x - recon) ** 2).sum(dim=1)
            lo, span = self.data_min_, self.data_range_
            dssim = 1.0 - ssim_map((x - lo) / span, (recon - lo) / span, 1.0)
        return l2, dssim

    def score(self, inputs: torch.Tensor | None, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        if inputs is None:
            raise ValueError(f"{type(self).__name__}.score needs preprocessed images")
        l2, dssim = self._error_maps(self._prepare(inputs.detach().cpu()))
        if self.error == "l2":
            maps = l2
        elif self.error == "ssim":
            maps = dssim
        else:
            (m1, s1), (m2, s2) = self.map_stats_.tolist()
            maps = ((l2 - m1) / max(s1, 1e-12) + (dssim - m2) / max(s2, 1e-12)) / 2
        maps = maps.float()
        return maps, top_k_mean(maps, int(self.top_k))

    # --- persistence --------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self._check_fitted()
        return state_with_module(self, self._net)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "AutoencoderHead":
        own, module = split_module_tensors(tensors)
        head = super().from_state(own, config)
        net = head._build()
        net.load_state_dict(module)
        head._net = net.eval()
        return head

    def n_trainable_parameters(self) -> int:
        net = getattr(self, "_net", None) or self._build()
        return sum(p.numel() for p in net.parameters() if p.requires_grad)


@register
class VariationalAutoencoderHead(AutoencoderHead):
    """Convolutional VAE; loss per image = 0.5 * sum of squared errors + beta * KL(q(z|x) || N(0, I)).

    Parameters as for :class:`AutoencoderHead`, plus ``beta`` (weight of the KL term).
    """

    method = "vae"
    variational = True

    def __init__(
        self,
        image_size: int = 128,
        channels: Sequence[int] = (32, 64, 128, 256),
        latent_channels: int = 16,
        beta: float = 1.0,
        error: str = "both",
        epochs: int = 50,
        batch_size: int = 16,
        lr: float = 1e-3,
        top_k: int = 1,
        seed: int = 0,
    ):
        super().__init__(image_size, channels, latent_channels, error, epochs, batch_size, lr, top_k, seed)
        self.beta = beta

    def _loss(self, x, recon, mu, logvar) -> torch.Tensor:
        b = x.shape[0]
        recon_term = 0.5 * ((recon - x) ** 2).reshape(b, -1).sum(dim=1)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).reshape(b, -1).sum(dim=1)
        return (recon_term + float(self.beta) * kl).mean()


__all__ = ["AutoencoderHead", "VariationalAutoencoderHead", "ConvAutoencoder", "ssim_map", "gaussian_window"]
