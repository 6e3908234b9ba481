"""GCPL and CoMPLe (arXiv 2409.01835, BMVC 2024): class tokens learned through Stable Diffusion, and the diffusion
classifier (Li, Prabhudesai, Duggal, Brown and Pathak, "Your Diffusion Model is Secretly a Zero-Shot Classifier",
ICCV 2023) that uses them.

Textual inversion (Gal et al. 2023) of one token ``v_c`` per class: with the VAE latent ``z0`` of a support image of
class ``c``, a timestep ``t``, noise ``ε`` and ``z_t = sqrt(ᾱ_t) z0 + sqrt(1 - ᾱ_t) ε``, GCPL minimises

    e_c(z0, t, ε) = || ε - ε_θ(z_t, t, τ(prompt(v_c))) ||^2        (mean over latent elements)

over the token embeddings only (UNet, VAE and text encoder frozen). As the official ``src/gcpl.py``
(soumitri2001/GCPL): one textual-inversion run per class on that class's images alone, AdamW (weight decay 1e-2)
at 2e-3 = 5e-4 x 4 accumulation steps (its ``scale_lr``), 4 images per step, each image resized to the full
square without a crop, flipped with probability 0.5, and its latent drawn from the VAE posterior
(``latent_dist.sample()``) afresh every time it is used. CoMPLe adds a contrastive term that makes the
other classes' tokens explain the image worse. The released code has none; the paper describes minimising the true
class's error while maximising the others'. A raw "minus the others' error" is unbounded (a token can always be
made to explain an image worse), so the term here maximises the others' error only until it exceeds the true
class's by a margin ``m`` (a ranking hinge, on the same (t, ε) for every class):

    L = e_c + λ · mean_{k ≠ c} max(0, m - (e_k - e_c)).

While the margin is not met this is the paper's description exactly (the gradient lowers e_c and raises e_k); we
first tried the cross-entropy of the classifier's own posterior (``-[e_k summed over latent elements]`` as
logits), which saturated after a few steps on the test pipeline and hardly moved the other classes' errors.

The diffusion classifier scores an image by each class's mean error over a fixed set of (t, ε) pairs - the same
pairs for every class (paired, lower variance) and for every image (seeded: predictions repeat) - and, to save
UNet passes, prunes in stages: all classes get the first ``n_samples[0]`` pairs, the best ``to_keep[0]`` continue
to ``n_samples[1]`` pairs in all, and so on (Li et al.'s adaptive schedule; the original ``(50, 500)`` and
``(5, 1)`` costs 50 C + 5 x 450 passes per image). Class logits are ``-E_k`` from the pairs each class got.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def training_pixels(pipe, images) -> torch.Tensor:
    """PIL images -> [N, 3, S, S] in [-1, 1] as GCPL trains on them: resized to the full S x S square (bicubic),
    no crop, so the whole image is seen (the aspect ratio is not kept). Prediction reads
    :func:`~fewvision.diffusion.pipeline.to_pixels` (shorter side to S, centre crop), as GCPL's inference does."""
    from PIL import Image

    from .pipeline import image_size

    size = image_size(pipe)
    out = []
    for im in images:
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


@dataclass
class SupportLatents:
    """The VAE posterior of every support image and of its mirror image, scaled as the UNet expects: ``mean`` and
    ``std`` [N, 2, ...] (index 1: flipped left-right). :meth:`draw` gives what GCPL's data loader gives - a random
    horizontal flip, then ``latent_dist.sample()`` - without running the VAE at every step."""

    mean: torch.Tensor
    std: torch.Tensor
    flip: float = 0.5

    def __len__(self) -> int:
        return len(self.mean)

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flipped = (torch.rand(len(index), generator=generator) < float(self.flip)).long()
        eps = torch.randn((len(index), *self.mean.shape[2:]), generator=generator)
        return self.mean[index, flipped] + self.std[index, flipped] * eps.to(self.mean.device)


def support_latents(pipe, pixels: torch.Tensor, flip: float = 0.5) -> SupportLatents:
    """Encode images in [-1, 1] [N, 3, H, W] and their mirror images once: :class:`SupportLatents`. One image (and
    its mirror) per VAE call, so an image's latent does not depend on which other images share its batch."""
    vae = pipe.vae
    means, stds = [], []
    with torch.no_grad():
        for image in pixels:
            both = torch.stack([image, image.flip(-1)])  # [2, 3, H, W]: the image, its mirror
            dist = vae.encode(both.to(vae.device, vae.dtype)).latent_dist
            scale = vae.config.scaling_factor
            means.append(dist.mean.float() * scale)
            stds.append(dist.std.float() * scale)
    return SupportLatents(torch.stack(means), torch.stack(stds), float(flip))


def latents(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latent means (scaled as the UNet expects) of images in [-1, 1], [N, 3, H, W]."""
    vae = pipe.vae
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), 8):  # a few 512-px images at a time
            dist = vae.encode(pixels[start : start + 8].to(vae.device, vae.dtype)).latent_dist
            out.append((dist.mean * vae.config.scaling_factor).float())
    return torch.cat(out)


def noise_errors(pipe, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared noise-prediction error [B] of latents z0 [B, ...] at timesteps t [B]."""
    unet = pipe.unet
    noise, t = noise.to(z0.device), t.to(z0.device)  # drawn on the CPU (seeded the same everywhere)
    noisy = pipe.scheduler.add_noise(z0, noise, t)
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample.float()
    target = noise if pipe.scheduler.config.prediction_type == "epsilon" else pipe.scheduler.get_velocity(z0, noise, t)
    return (pred - target).pow(2).flatten(1).mean(1)


def prompt_for(template: str, token: str) -> str:
    return template.format(token)


@dataclass
class InversionResult:
    embeddings: torch.Tensor  # [C, width] the learned class tokens
    losses: list[float]  # mean training loss per block of 50 steps
    unet_passes: int


class TokenAdamW:
    """AdamW with its own state for each class token (row of ``table``, the :class:`ClassTokens` parameter
    [C, width]): :meth:`step` moves only the rows it is told got a gradient. One AdamW over the whole table would
    move every token at every step - momentum and weight decay act on rows whose gradient is zero - so a class
    absent from a batch would drift; GCPL's official code has no such coupling (one run, one optimiser per
    class)."""

    def __init__(self, table: torch.nn.Parameter, lr: float, weight_decay: float):
        self.table = table
        self.rows = [torch.nn.Parameter(row.detach().clone()) for row in table.detach()]
        self.optimiser = torch.optim.AdamW(self.rows, lr=lr, weight_decay=weight_decay)  # betas, eps: GCPL's

    def zero_grad(self) -> None:
        self.table.grad = None

    def step(self, moved) -> None:
        moved = sorted({int(k) for k in moved})
        grad = self.table.grad
        for k, row in enumerate(self.rows):  # AdamW skips a parameter whose grad is None: no momentum, no decay
            row.grad = grad[k].detach().clone() if grad is not None and k in moved else None
        self.optimiser.step()
        with torch.no_grad():
            for k in moved:
                self.table[k].copy_(self.rows[k])


class _Shuffled:
    """Indices in shuffled passes, as a data loader with ``shuffle=True`` serves them (every image once per pass)."""

    def __init__(self, indices: torch.Tensor, generator: torch.Generator):
        self.indices, self.generator, self.queue = indices, generator, []

    def take(self, n: int) -> torch.Tensor:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = self.indices[torch.randperm(len(self.indices), generator=self.generator)].tolist()
            out.append(self.queue.pop(0))
        return torch.tensor(out)


def invert(pipe, tokens, data: "SupportLatents | torch.Tensor", labels: torch.Tensor, names: Sequence[str],
           template: str, *, steps: int, batch_size: int = 4, lr: float = 2e-3, weight_decay: float = 1e-2,
           contrastive_weight: float = 0.0, margin: float = 0.1, seed: int = 0) -> InversionResult:
    """Train the class tokens (``tokens``: a :class:`~fewvision.diffusion.pipeline.ClassTokens`) on the support
    images ``data`` (:class:`SupportLatents`, or fixed latents [N, ...]) of ``labels``, ``steps`` optimiser steps
    in all.

    GCPL (``contrastive_weight`` 0): one run per class, on its own images only, with its own seeded draws - a
    class's token does not depend on the other classes' images (tested); the steps are shared out evenly.
    CoMPLe (> 0): one joint run, since its term compares every class's token on each image; a token moves only
    at a step where it got a gradient (:class:`TokenAdamW`)."""
    if not isinstance(data, SupportLatents):
        data = SupportLatents(torch.stack([data, data], 1), torch.zeros_like(torch.stack([data, data], 1)), 0.0)
    optimiser = TokenAdamW(tokens.embeddings, lr, weight_decay)
    # A half-precision UNet's gradients underflow: scale the loss (AdamW's step does not depend on the scale).
    scale = 1024.0 if pipe.unet.dtype == torch.float16 else 1.0
    prompts = [prompt_for(template, n) for n in names]
    n_train = pipe.scheduler.config.num_train_timesteps
    labels = torch.as_tensor(labels)
    losses, passes = [], 0
    if contrastive_weight > 0:
        runs = [(torch.arange(len(data)), int(steps), torch.Generator().manual_seed(int(seed)))]
    else:
        per_class = [int(steps) // len(names) + (c < int(steps) % len(names)) for c in range(len(names))]
        runs = [(torch.nonzero(labels == c).squeeze(1), per_class[c],
                 torch.Generator().manual_seed(int(seed) * 100_003 + c)) for c in range(len(names))]
    for pool, n_steps, generator in runs:
        if not len(pool) or not n_steps:
            continue
        order, block = _Shuffled(pool, generator), []
        for _ in range(n_steps):
            batch = order.take(min(batch_size, len(pool)))
            t = torch.randint(0, n_train, (len(batch),), generator=generator)
            noise = torch.randn((len(batch), *data.mean.shape[2:]), generator=generator)
            z0 = data.draw(batch, generator)
            y = labels[batch]
            optimiser.zero_grad()
            if contrastive_weight > 0:
                loss, used, moved = _comple_step(pipe, tokens, prompts, z0, t, noise, y, contrastive_weight, margin,
                                                 scale)
                passes += used
            else:
                cond = tokens.encode([prompts[int(k)] for k in y])
                loss = noise_errors(pipe, z0, t, noise, cond).mean()
                (loss * scale).backward()
                passes, moved = passes + len(batch), y.unique().tolist()
            optimiser.step(moved)
            block.append(float(loss.detach()))
            if len(block) == 50:
                losses.append(float(np.mean(block)))
                block = []
        if block:
            losses.append(float(np.mean(block)))
    return InversionResult(tokens.embeddings.detach().clone(), losses, passes)


def _comple_step(pipe, tokens, prompts, z0, t, noise, y, weight: float, margin: float, scale: float):
    """Accumulate the gradient of ``L = mean_i e_iy + weight * mean_{i, k != y} max(0, m - (e_ik - e_iy))`` class by
    class, so that at most one class's UNet graph is alive (C graphs of a 512-px UNet would not fit a GPU): first
    every error without gradients, to know which hinge terms are active, then one backward pass per class whose
    coefficient is not zero. Returns (the loss, the UNet passes, the classes whose token got a gradient)."""
    n, n_classes = len(z0), len(prompts)
    with torch.no_grad():
        cond = tokens.encode(prompts)
        errors = torch.stack([noise_errors(pipe, z0, t, noise, cond[k].expand(n, -1, -1)) for k in range(n_classes)],
                             dim=1).cpu()  # [B, C]
    own = errors.gather(1, y[:, None])
    others = ~F.one_hot(y, n_classes).bool()
    active = (margin - (errors - own) > 0) & others
    loss = own.mean() + weight * (F.relu(margin - (errors - own)) * others).sum() / (n * (n_classes - 1))
    coef = -weight * active.float() / (n * (n_classes - 1))  # d loss / d e_ik for the other classes
    coef[torch.arange(n), y] = 1.0 / n + weight * active.sum(1).float() / (n * (n_classes - 1))
    passes, moved = n * n_classes, []
    for k in range(n_classes):
        rows = torch.nonzero(coef[:, k]).squeeze(1)
        if len(rows) == 0:
            continue
        moved.append(k)
        e = noise_errors(pipe, z0[rows], t[rows], noise[rows], tokens.encode([prompts[k]]).expand(len(rows), -1, -1))
        ((coef[rows, k].to(e.device) * e).sum() * scale).backward()
        passes += len(rows)
    return loss, passes, moved


def sample_plan(n_samples: Sequence[int], n_train_timesteps: int, seed: int,
                shape) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed (timestep, noise) pairs: ``max(n_samples)`` timesteps on an even grid over the schedule, in van der
    Corput order (0.5, 0.25, 0.75, 0.125, ...), so that the pairs a stage uses - a prefix of any length - cover the
    whole schedule evenly; one seeded noise per pair."""
    total = int(max(n_samples))
    grid = (torch.arange(total) * n_train_timesteps) // total + n_train_timesteps // (2 * total)
    order, used, k = [], np.zeros(total, dtype=bool), 0
    while len(order) < total:  # the van der Corput sequence (base 2) on the grid, first come first served
        u, f, i = 0.0, 0.5, k
        while i:
            u, i, f = u + f * (i & 1), i >> 1, f / 2
        index, k = min(int(u * total), total - 1), k + 1
        if not used[index]:
            used[index] = True
            order.append(index)
    generator = torch.Generator().manual_seed(seed)
    return grid[order], torch.randn((total, *shape), generator=generator)


def check_schedule(n_samples: Sequence[int], to_keep: Sequence[int]) -> None:
    if (len(n_samples) == 0 or len(n_samples) != len(to_keep) or any(int(n) < 1 for n in n_samples)
            or any(b <= a for a, b in zip(n_samples, n_samples[1:])) or any(int(k) < 1 for k in to_keep)):
        raise ValueError(f"n_samples {list(n_samples)} must be increasing pair counts, one per stage, with a "
                         f"to_keep of at least 1 for each (got to_keep {list(to_keep)})")


def classify(pipe, z0: torch.Tensor, cond: torch.Tensor, *, n_samples: Sequence[int] = (50, 500),
             to_keep: Sequence[int] = (5, 1), seed: int = 0, batch_size: int = 32) -> tuple[np.ndarray, int]:
    """(class logits [C], UNet passes used) for one image's latent ``z0`` [1, ...] and the class conditionings
    ``cond`` [C, L, width].

    The survivor's logit is minus its summed error (over latent elements) averaged over all pairs; a class pruned
    after the first ``n`` pairs sits below it by how much worse it did on those same ``n`` pairs (paired, as the
    pruning judged it), so the logits rank the classes as the schedule did."""
    check_schedule(n_samples, to_keep)
    n_classes = len(cond)
    timesteps, noises = sample_plan(n_samples, pipe.scheduler.config.num_train_timesteps, seed, z0.shape[1:])
    elements = int(np.prod(z0.shape[1:]))
    errors = np.full((n_classes, int(max(n_samples))), np.nan)
    alive, done, passes = list(range(n_classes)), 0, 0
    with torch.no_grad():
        for n, keep in zip(n_samples, to_keep):
            for k in alive:
                for start in range(done, n, batch_size):
                    stop = min(n, start + batch_size)
                    t, noise = timesteps[start:stop], noises[start:stop]
                    e = noise_errors(pipe, z0.expand(len(t), *z0.shape[1:]), t, noise,
                                     cond[k : k + 1].expand(len(t), -1, -1))
                    errors[k, start:stop] = e.cpu().numpy() * elements
                    passes += len(t)
            done = n
            mean = errors[alive, :n].mean(1)
            alive = [alive[i] for i in np.argsort(mean, kind="stable")[: max(1, min(int(keep), len(alive)))]]
    best = alive[0]
    got = (~np.isnan(errors)).sum(1)
    logits = np.array([-errors[best].mean() - (errors[k, : got[k]].mean() - errors[best, : got[k]].mean())
                       for k in range(n_classes)])
    return logits, passes


def inference_passes(n_classes: int, n_samples: Sequence[int], to_keep: Sequence[int]) -> int:
    """UNet passes per image of the pruning schedule: n_1 C + (n_2 - n_1) min(k_1, C) + ..."""
    total, alive, done = 0, n_classes, 0
    for n, keep in zip(n_samples, to_keep):
        total += (int(n) - done) * alive
        done, alive = int(n), max(1, min(int(keep), alive))
    return total
