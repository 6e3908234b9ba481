"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023).

Zero-shot (WinCLIP):

* a compositional prompt ensemble (state words x templates, filled with the object name) gives one normal and one
  anomalous text vector: the L2-normalised mean of the L2-normalised prompt embeddings of each state;
* ``ascore_0(f) = softmax(logit_scale * [<f, g_n>, <f, g_a>])[anomalous]`` for any L2-normalised visual embedding f;
* the image-level score is ``ascore_0`` of the global image embedding;
* segmentation: every k x k window of the ViT patch grid (stride 1, k in ``scales``) is embedded by running the image
  tower on the class token plus the window's patch tokens only (each with its own positional embedding), then the
  rest of the tower and the projection. A patch's score at one scale is the harmonic mean of ``ascore_0`` over the
  windows that cover it; the scales (and, with ``image_scale``, the image-level score as the largest scale) are then
  aggregated per patch.

Few-shot (WinCLIP+): the window embeddings of every scale and the patch tokens of ``shots`` good reference images form
one memory per scale. A query feature's score is ``min_r (1 - <f, r>) / 2`` over the memory of its scale; window scores
are harmonically aggregated per patch as above, the per-scale maps (patch tokens, each window scale) are averaged,
and the final map is the mean of the zero-shot and the few-shot maps.

Raw maps are at the patch-grid resolution; upsampling and smoothing happen in ``postprocess.finish_maps``.
See docs/methods/winclip.md for the equations and where this differs from the paper.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..backbones.base import BackboneError
from . import register
from .base import AnomalyHead

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
# The template list of the WinCLIP supplementary material (template-level prompts of the CPE).
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

_EPS = 1e-6


def compositional_prompts(
    object_name: str,
    states: Sequence[str],
    templates: Sequence[str],
) -> list[str]:
    """Every template filled with every state word filled with the object name."""
    return [t.format(s.format(object_name)) for s in states for t in templates]


def window_indices(grid: tuple[int, int], scale: int) -> torch.Tensor:
    """[n_windows, scale*scale] row-major patch indices of every scale x scale window at stride 1."""
    gh, gw = grid
    if scale < 1 or scale > min(gh, gw):
        raise ValueError(f"window scale {scale} does not fit the {gh}x{gw} patch grid")
    rows = []
    for r in range(gh - scale + 1):
        for c in range(gw - scale + 1):
            rows.append([(r + i) * gw + (c + j) for i in range(scale) for j in range(scale)])
    return torch.tensor(rows, dtype=torch.long)


def coverage_matrix(indices: torch.Tensor, n_patches: int) -> torch.Tensor:
    """[n_windows, n_patches] with 1 where a window covers a patch."""
    cover = torch.zeros(indices.shape[0], n_patches)
    cover.scatter_(1, indices, 1.0)
    return cover


def harmonic_aggregation(window_scores: torch.Tensor, indices: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-patch harmonic mean of the scores of the windows covering it.

    ``M_ij = |u_ij| / sum_{k in u_ij} 1 / s_k`` where ``u_ij`` are the windows covering patch (i, j).
    window_scores: [B, n_windows] (> 0); indices from :func:`window_indices`. Returns [B, gh, gw].
    """
    gh, gw = grid
    cover = coverage_matrix(indices, gh * gw).to(window_scores)
    inverse = (1.0 / window_scores.clamp_min(_EPS)) @ cover  # [B, L]
    count = cover.sum(dim=0)  # [L]
    return (count / inverse).reshape(-1, gh, gw)


def _vision_tower(backbone):
    """The open_clip ViT image tower of a backbone, or a BackboneError saying why WinCLIP cannot use it."""
    model = getattr(backbone, "model", None)
    visual = getattr(model, "visual", None)
    try:
        from open_clip.transformer import VisionTransformer
    except ImportError:  # pragma: no cover - open_clip is a core dependency
        VisionTransformer = None
    if visual is None or VisionTransformer is None or not isinstance(visual, VisionTransformer):
        raise BackboneError(
            f"WinCLIP needs an open_clip CLIP model with a ViT image tower (patch tokens and a text tower), but "
            f"backbone '{getattr(backbone, 'spec', backbone)}' is not one; use e.g. "
            "--backbone openclip:ViT-B-16-plus-240/laion400m_e31"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise BackboneError(
            f"backbone '{backbone.spec}': WinCLIP window embeddings need a ViT pooled by its class token or by "
            "averaging, not an attentional pooler (CoCa)"
        )
    if not getattr(backbone, "has_text", False):
        raise BackboneError(f"backbone '{backbone.spec}' has no text tower; WinCLIP needs one")
    return visual


def _tower(visual, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedded tokens [B, T, W] (after ln_pre) -> (projected pooled embedding [B, D], output tokens [B, T-1, W])."""
    x = visual.transformer(tokens)
    pooled, out_tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, out_tokens


def window_embeddings(
    backbone, pixels: torch.Tensor, scale: int, chunk: int = 4096, embedded: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, n_windows, D] un-normalised embeddings of every ``scale`` x ``scale`` window of the patch grid.

    The class token and the window's patch tokens (positional embeddings already added, then ``ln_pre``) go through
    the transformer, the pooling and the projection; the other patches are masked out (dropped).
    """
    visual = _vision_tower(backbone)
    with torch.inference_mode():
        x = embedded if embedded is not None else visual._embeds(pixels.to(backbone.device))
        idx = window_indices(tuple(visual.grid_size), scale).to(x.device)
        keep = torch.cat([torch.zeros(idx.shape[0], 1, dtype=torch.long, device=x.device), idx + 1], dim=1)
        b, n_windows = x.shape[0], keep.shape[0]
        seqs = x[:, keep]  # [B, nW, 1 + k*k, W]
        seqs = seqs.reshape(b * n_windows, keep.shape[1], x.shape[-1])
        out = torch.cat([_tower(visual, part)[0] for part in seqs.split(chunk)])
    return out.reshape(b, n_windows, -1).float()


@register
class WinClipHead(AnomalyHead):
    """WinCLIP (zero-shot) and WinCLIP+ (few-shot with ``shots`` good reference images).

    Parameters
    ----------
    object_name: the object word in the prompts ("object", "fabric", "bottle", ...).
    shots: good reference images kept by ``fit`` for WinCLIP+: 0 = zero-shot WinCLIP (the images given to fit are
        ignored), k = k images drawn (seeded) from those given (all of them when fewer), None = every image given.
    scales: window sizes in patches (stride 1). The paper uses 2 and 3 on the 15x15 grid of ViT-B-16-plus-240.
    image_scale: also use the image-level score as the largest scale of the zero-shot map.
    scale_aggregation: how the zero-shot per-scale maps are combined: "harmonic" (harmonic mean) or "mean".
    score_rule: the image score. "combined" = (ascore_0(image) + max of the final map) / 2; "paper" = ascore_0(image)
        in zero-shot and (ascore_0(image) + max of the few-shot map) / 2 in few-shot (WinCLIP+).
    temperature: softmax temperature; None = the backbone's learned logit scale (1 / temperature).
    normal_states, anomalous_states, templates: the compositional prompt ensemble.
    batch_size: images per forward pass.
    seed: draws the reference images when ``shots`` is smaller than the number given.
    """

    method = "winclip"
    inputs = "backbone"

    def __init__(
        self,
        object_name: str = "object",
        shots: int | None = 4,
        scales: Sequence[int] = (2, 3),
        image_scale: bool = True,
        scale_aggregation: str = "harmonic",
        score_rule: str = "combined",
        temperature: float | None = None,
        normal_states: Sequence[str] | None = None,
        anomalous_states: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        batch_size: int = 8,
        seed: int = 0,
    ):
        self.object_name = object_name
        self.shots = shots
        self.scales = scales
        self.image_scale = image_scale
        self.scale_aggregation = scale_aggregation
        self.score_rule = score_rule
        self.temperature = temperature
        self.normal_states = normal_states
        self.anomalous_states = anomalous_states
        self.templates = templates
        self.batch_size = batch_size
        self.seed = seed

    # --- fitting ------------------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if self.scale_aggregation not in ("harmonic", "mean"):
            raise ValueError(f"scale_aggregation must be 'harmonic' or 'mean', not {self.scale_aggregation!r}")
        if self.score_rule not in ("combined", "paper"):
            raise ValueError(f"score_rule must be 'combined' or 'paper', not {self.score_rule!r}")
        if self.shots is not None and int(self.shots) < 0:
            raise ValueError(f"shots must be >= 0 or None, not {self.shots}")
        if not self.image_scale and not self.scales:
            raise ValueError("WinCLIP needs at least one window scale or image_scale=True")

    def fit(self, inputs: torch.Tensor | None, backbone=None) -> "WinClipHead":
        self._check_params()
        if backbone is None:
            raise ValueError("WinClipHead.fit needs the backbone (its text tower builds the prompt ensemble)")
        visual = _vision_tower(backbone)
        grid = tuple(int(g) for g in visual.grid_size)
        scales = [int(s) for s in self.scales]
        for s in scales:
            window_indices(grid, s)  # raises when a scale does not fit the grid
        normal = compositional_prompts(self.object_name, self.normal_states or NORMAL_STATES,
                                       self.templates or TEMPLATES)
        anomalous = compositional_prompts(self.object_name, self.anomalous_states or ANOMALOUS_STATES,
                                          self.templates or TEMPLATES)
        g_n = F.normalize(backbone.encode_text(normal).float().mean(dim=0), dim=0)
        g_a = F.normalize(backbone.encode_text(anomalous).float().mean(dim=0), dim=0)
        self.text_features_ = torch.stack([g_n, g_a]).cpu()
        self.logit_scale_ = float(backbone.logit_scale if self.temperature is None else 1.0 / self.temperature)
        self.grid_ = list(grid)
        self.scales_ = scales
        self.backbone_id_ = backbone.id

        n_given = 0 if inputs is None else int(inputs.shape[0])
        k = n_given if self.shots is None else min(int(self.shots), n_given)
        self.n_shots_ = k
        if k > 0:
            gen = torch.Generator().manual_seed(int(self.seed))
            chosen = torch.randperm(n_given, generator=gen)[:k].sort().values if k < n_given else torch.arange(k)
            refs = inputs[chosen]
            patch_mem, win_mem, win_scale = [], [], []
            for part in refs.split(max(1, int(self.batch_size))):
                _, _, tokens, windows = self._encode(backbone, part)
                patch_mem.append(F.normalize(tokens, dim=-1).reshape(-1, tokens.shape[-1]))
                for s, emb in zip(scales, windows):
                    win_mem.append(F.normalize(emb, dim=-1).reshape(-1, emb.shape[-1]))
                    win_scale.append(torch.full((emb.shape[0] * emb.shape[1],), s, dtype=torch.long))
            self.patch_memory_ = torch.cat(patch_mem).cpu()
            if scales:
                self.window_memory_ = torch.cat(win_mem).cpu()
                self.window_memory_scale_ = torch.cat(win_scale)
        return self

    # --- encoding -----------------------------------------------------------------------------------------
    def _encode(self, backbone, pixels: torch.Tensor):
        """(image embedding [B, D], embedded tokens, patch tokens [B, L, W], [window embeddings [B, nW, D]])."""
        visual = _vision_tower(backbone)
        with torch.inference_mode():
            x = visual._embeds(pixels.to(backbone.device))
            image, tokens = _tower(visual, x)
            windows = [window_embeddings(backbone, pixels, s, embedded=x) for s in self.scales_]
        return image.float(), x, tokens.float(), windows

    def _ascore(self, features: torch.Tensor) -> torch.Tensor:
        """P(anomalous) for un-normalised features [..., D]."""
        f = F.normalize(features.float(), dim=-1)
        logits = self.logit_scale_ * f @ self.text_features_.to(f.device).T
        return torch.softmax(logits, dim=-1)[..., 1]

    # --- scoring ------------------------------------------------------------------------------------------
    def score(self, inputs: torch.Tensor | None, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        if backbone is None or inputs is None:
            raise ValueError("WinClipHead.score needs the preprocessed images and the backbone")
        if backbone.id != self.backbone_id_:
            raise BackboneError(
                f"this WinCLIP head was fitted with backbone id {self.backbone_id_}, "
                f"not {backbone.id} ('{backbone.spec}')"
            )
        maps, scores = [], []
        for part in inputs.split(max(1, int(self.batch_size))):
            m, s = self._score_batch(backbone, part)
            maps.append(m)
            scores.append(s)
        return torch.cat(maps), torch.cat(scores)

    def zero_shot_maps(self, image_scores: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        """[B, gh, gw] zero-shot map from image-level scores [B] and window embeddings per scale."""
        grid = tuple(self.grid_)
        per_scale = []
        if self.image_scale:
            per_scale.append(image_scores.view(-1, 1, 1).expand(-1, *grid))
        for s, emb in zip(self.scales_, windows):
            per_scale.append(harmonic_aggregation(self._ascore(emb), window_indices(grid, s).to(emb.device), grid))
        stacked = torch.stack(per_scale)
        if self.scale_aggregation == "harmonic":
            return len(per_scale) / (1.0 / stacked.clamp_min(_EPS)).sum(dim=0)
        return stacked.mean(dim=0)

    def few_shot_maps(self, tokens: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        """[B, gh, gw] WinCLIP+ map: nearest-neighbour distance to the reference memory, averaged over scales."""
        grid = tuple(self.grid_)
        b = tokens.shape[0]
        per_scale = [_nn_distance(tokens, self.patch_memory_).reshape(b, *grid)]
        for s, emb in zip(self.scales_, windows):
            memory = self.window_memory_[self.window_memory_scale_ == s]
            dist = _nn_distance(emb, memory)  # [B, nW]
            # A distance of exactly 0 (the window is in the memory) stays ~0 under harmonic aggregation.
            per_scale.append(harmonic_aggregation(dist, window_indices(grid, s).to(emb.device), grid))
        return torch.stack(per_scale).mean(dim=0)

    def _score_batch(self, backbone, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, _, tokens, windows = self._encode(backbone, pixels)
        image_scores = self._ascore(image)
        zero = self.zero_shot_maps(image_scores, windows)
        if self.n_shots_ > 0:
            few = self.few_shot_maps(tokens, windows)
            final = (zero + few) / 2
            if self.score_rule == "paper":
                scores = (image_scores + few.amax(dim=(1, 2))) / 2
            else:
                scores = (image_scores + final.amax(dim=(1, 2))) / 2
        else:
            final = zero
            scores = image_scores if self.score_rule == "paper" else (image_scores + zero.amax(dim=(1, 2))) / 2
        return final.float().cpu(), scores.float().cpu()

    def n_trainable_parameters(self) -> int:
        return 0


def _nn_distance(features: torch.Tensor, memory: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``min_r (1 - <f, r>) / 2`` for L2-normalised f (features [..., D]) against the memory rows [M, D]."""
    shape = features.shape[:-1]
    f = F.normalize(features.reshape(-1, features.shape[-1]).float(), dim=-1)
    mem = memory.to(f.device).float()
    best = torch.cat([(part @ mem.T).amax(dim=1) for part in f.split(chunk)])
    return ((1.0 - best) / 2).clamp_min(0.0).reshape(shape)


__all__ = [
    "WinClipHead",
    "harmonic_aggregation",
    "window_embeddings",
    "window_indices",
    "compositional_prompts",
    "NORMAL_STATES",
    "ANOMALOUS_STATES",
    "TEMPLATES",
]
