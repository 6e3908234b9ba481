"""GANomaly (Akcay, Atapour-Abarghouei, Breckon, "GANomaly: Semi-Supervised Anomaly Detection via Adversarial
Training", ACCV 2018).

* Generator G = encoder G_E -> decoder G_D -> second encoder E (encoder-decoder-encoder): ``z = G_E(x)``,
  ``x_hat = G_D(z)``, ``z_hat = E(x_hat)``. DCGAN blocks as in the official code: stride-2 4x4 convolutions with
  BatchNorm and LeakyReLU(0.2) down to 4x4, a final 4x4 convolution to a 1x1 latent of ``latent_size`` (100); the
  decoder mirrors it with transposed convolutions, BatchNorm, ReLU and a tanh output.
* Discriminator D: the same encoder with a 1-channel sigmoid output; ``f(x)``, its last feature map, serves the
  feature-matching loss.
* Generator loss (Eq. 4): ``w_adv L_adv + w_con L_con + w_enc L_enc`` with ``L_adv = ||f(x) - f(x_hat)||_2``
  (mean squared), ``L_con = ||x - x_hat||_1`` (mean absolute), ``L_enc = ||z - z_hat||_2`` (mean squared) and the
  paper's weights 1, 50, 1. Discriminator: binary cross-entropy of real against generated images, halved; it is
  re-initialised when its loss falls below 1e-5 (as the official code does). Adam, lr 2e-4, betas (0.5, 0.999);
  DCGAN initialisation N(0, 0.02). Training runs for ``steps`` generator updates (600, batches of 16) rather than
  the official 15 epochs: those were counted on data sets of tens of thousands of images, and 15 epochs of the
  50-400 good images a line has are a few dozen updates, after which the latent score is still at chance.
* Anomaly score (Eq. 5): ``A(x) = ||G_E(x) - E(G(x))||_1``, the latent distance - the paper's L1 (the official code
  and anomalib use the mean squared difference: ``score_norm="l2"``). GANomaly scores images, not pixels; the map it
  returns for heat maps is the contextual residual ``|x - x_hat|`` (channel mean).

Images arrive preprocessed by the backbone; the head resizes them to ``image_size`` (64 by default, for CPU training
in minutes) and maps each channel to [-1, 1] with the range of the training images (the tanh output's range).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import register
from .autoencoder import resize_to, split_module_tensors, state_with_module
from .base import AnomalyHead

GENERATOR, DISCRIMINATOR = "generator.", "discriminator."


def _encoder_layers(image_size: int, in_channels: int, width: int, out_channels: int) -> list[nn.Module]:
    """DCGAN encoder: ``[N, in_channels, S, S]`` -> ``[N, out_channels, 1, 1]`` (S a power of two >= 8)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
    size, channels = image_size // 2, width
    while size > 4:
        layers += [nn.Conv2d(channels, channels * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels * 2),
                   nn.LeakyReLU(0.2, inplace=True)]
        size, channels = size // 2, channels * 2
    layers.append(nn.Conv2d(channels, out_channels, 4, 1, 0, bias=False))
    return layers


def _decoder_layers(image_size: int, latent: int, width: int, out_channels: int) -> list[nn.Module]:
    """DCGAN generator: ``[N, latent, 1, 1]`` -> ``[N, out_channels, S, S]`` in [-1, 1]."""
    channels, size = width // 2, 4
    while size != image_size:
        channels, size = channels * 2, size * 2
    layers: list[nn.Module] = [nn.ConvTranspose2d(latent, channels, 4, 1, 0, bias=False), nn.BatchNorm2d(channels),
                               nn.ReLU(True)]
    size = 4
    while size < image_size // 2:
        layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                   nn.ReLU(True)]
        channels, size = channels // 2, size * 2
    layers += [nn.ConvTranspose2d(channels, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
    return layers


class Generator(nn.Module):
    def __init__(self, image_size: int, latent_size: int, width: int):
        super().__init__()
        self.encoder1 = nn.Sequential(*_encoder_layers(image_size, 3, width, latent_size))
        self.decoder = nn.Sequential(*_decoder_layers(image_size, latent_size, width, 3))
        self.encoder2 = nn.Sequential(*_encoder_layers(image_size, 3, width, latent_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.encoder1(x)
        fake = self.decoder(z)
        return fake, z, self.encoder2(fake)


class Discriminator(nn.Module):
    def __init__(self, image_size: int, width: int):
        super().__init__()
        layers = _encoder_layers(image_size, 3, width, 1)
        self.features = nn.Sequential(*layers[:-1])
        self.classifier = nn.Sequential(layers[-1], nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.classifier(f).view(-1), f


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: convolutions N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@register
class GANomaly(AnomalyHead):
    method = "ganomaly"
    inputs = "pixels"
    image_score = "head"

    def __init__(
        self,
        image_size: int = 64,
        latent_size: int = 100,
        width: int = 64,
        w_adv: float = 1.0,
        w_con: float = 50.0,
        w_enc: float = 1.0,
        score_norm: str = "l1",
        steps: int = 600,
        batch_size: int = 16,
        lr: float = 2e-4,
        seed: int = 0,
    ):
        self.image_size = image_size
        self.latent_size = latent_size
        self.width = width
        self.w_adv = w_adv
        self.w_con = w_con
        self.w_enc = w_enc
        self.score_norm = score_norm
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def _check_params(self) -> None:
        size = int(self.image_size)
        if size < 8 or size & (size - 1):
            raise ValueError(f"image_size must be a power of two >= 8, got {self.image_size}")
        if self.score_norm not in ("l1", "l2"):
            raise ValueError(f"score_norm must be 'l1' (the paper) or 'l2' (the official code), got {self.score_norm!r}")

    def _nets(self) -> tuple[Generator, Discriminator]:
        return (Generator(int(self.image_size), int(self.latent_size), int(self.width)),
                Discriminator(int(self.image_size), int(self.width)))

    def _prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        x = resize_to(pixels.detach().cpu(), int(self.image_size))
        return 2 * (x - self.low_.view(1, -1, 1, 1)) / self.span_.view(1, -1, 1, 1) - 1

    def fit(self, inputs: torch.Tensor | None, backbone=None) -> "GANomaly":
        self._check_params()
        if inputs is None or len(inputs) < 2:
            raise ValueError("ganomaly needs at least 2 good images ([N, 3, H, W] preprocessed pixels)")
        raw = resize_to(inputs.detach().cpu(), int(self.image_size))
        self.low_ = raw.amin(dim=(0, 2, 3))
        self.span_ = (raw.amax(dim=(0, 2, 3)) - self.low_).clamp_min(1e-6)
        x_all = self._prepare(inputs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            gen, disc = self._nets()
            gen.apply(dcgan_init)
            disc.apply(dcgan_init)
        order_rng = torch.Generator().manual_seed(int(self.seed))
        betas = (0.5, 0.999)
        opt_g = torch.optim.Adam(gen.parameters(), lr=float(self.lr), betas=betas)
        opt_d = torch.optim.Adam(disc.parameters(), lr=float(self.lr), betas=betas)
        n, bs = len(x_all), max(2, int(self.batch_size))  # BatchNorm needs two images in a batch
        self.loss_history_: list[dict[str, float]] = []
        gen.train()
        disc.train()
        step = 0
        while step < int(self.steps):
            order = torch.randperm(n, generator=order_rng)
            sums, seen = {"adv": 0.0, "con": 0.0, "enc": 0.0, "d": 0.0}, 0
            for start in range(0, n, bs):
                if step == int(self.steps):
                    break
                idx = order[start : start + bs]
                if len(idx) < 2:
                    idx = torch.cat([idx, order[:1]])
                x = x_all[idx]
                fake, z, z_hat = gen(x)
                # generator step: feature matching, contextual L1, latent L2 (Eq. 1-4)
                adv = F.mse_loss(disc(fake)[1], disc(x)[1].detach())
                con = F.l1_loss(fake, x)
                enc = F.mse_loss(z_hat, z)
                loss_g = float(self.w_adv) * adv + float(self.w_con) * con + float(self.w_enc) * enc
                opt_g.zero_grad()
                loss_g.backward()
                opt_g.step()
                # discriminator step: real against generated
                p_real, _ = disc(x)
                p_fake, _ = disc(fake.detach())
                loss_d = 0.5 * (F.binary_cross_entropy(p_real, torch.ones_like(p_real))
                                + F.binary_cross_entropy(p_fake, torch.zeros_like(p_fake)))
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                if float(loss_d.detach()) < 1e-5:  # a discriminator that has won teaches nothing: start it again
                    disc.apply(dcgan_init)
                for key, value in (("adv", adv), ("con", con), ("enc", enc), ("d", loss_d)):
                    sums[key] += float(value.detach()) * len(idx)
                seen += len(idx)
                step += 1
            self.loss_history_.append({k: v / seen for k, v in sums.items()})
        self._generator = gen.eval()
        self._discriminator = disc.eval()
        return self

    def score(self, inputs: torch.Tensor | None, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        if inputs is None:
            raise ValueError("ganomaly scores preprocessed images")
        x = self._prepare(inputs)
        maps, scores = [], []
        with torch.inference_mode():
            for part in x.split(max(1, int(self.batch_size))):
                fake, z, z_hat = self._generator(part)
                diff = (z - z_hat).flatten(1)
                scores.append(diff.abs().mean(1) if self.score_norm == "l1" else (diff**2).mean(1))
                maps.append((part - fake).abs().mean(1))
        if not maps:
            size = int(self.image_size)
            return torch.zeros(0, size, size), torch.zeros(0)
        return torch.cat(maps), torch.cat(scores)

    # --- persistence: both networks' tensors, no pickling ------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self._check_fitted()
        tensors, config = state_with_module(self, self._generator, GENERATOR)
        disc, _ = state_with_module(self, self._discriminator, DISCRIMINATOR)
        tensors.update({k: v for k, v in disc.items() if k.startswith(DISCRIMINATOR)})
        return tensors, config

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "GANomaly":
        own, gen_tensors = split_module_tensors(tensors, GENERATOR)
        own, disc_tensors = split_module_tensors(own, DISCRIMINATOR)
        head = super().from_state(own, config)
        gen, disc = head._nets()
        gen.load_state_dict(gen_tensors)
        disc.load_state_dict(disc_tensors)
        head._generator, head._discriminator = gen.eval(), disc.eval()
        return head

    def n_trainable_parameters(self) -> int:
        gen, disc = (self._generator, self._discriminator) if hasattr(self, "_generator") else self._nets()
        return sum(p.numel() for net in (gen, disc) for p in net.parameters())

