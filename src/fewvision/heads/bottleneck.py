"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al. 2021,
"AdapterFusion"): a small down-project / non-linearity / up-project module with a skip connection, inserted in every
transformer block of both CLIP towers, the up-projection initialised to zero so the model starts as CLIP; only the
adapters train, with the loop every tuned head shares (``heads/tuned.py``).

``variant="houlsby"``: an adapter on the output of the attention sub-layer and one on the MLP's (AdapterHub's
``DoubleSeqBnConfig``: reduction factor 16, swish); ``"pfeiffer"``: one on the MLP's output only (``SeqBnConfig``:
16, ReLU). open_clip's blocks are pre-LN (``x + ls_1(attn(ln_1(x)))``, ``x + ls_2(mlp(ln_2(x)))``), so an adapter
sits where the paper puts it, after the sub-layer's output projection and before the residual addition: it wraps
``ls_1`` / ``ls_2``. Own modules on open_clip rather than AdapterHub's ``adapters`` library: that library adapts
transformers' models (its CLIP included) and pins transformers' version, while fewvision's CLIP backbones are
open_clip models; the modules are twelve lines. See docs/methods/bottleneck-adapter.md.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from ..backbones.base import BackboneError
from .coop import text_tower
from ..prompts import ClassSpec
from .tuned import TunedClipHead, open_clip_blocks

VARIANTS = {"houlsby": (("ls_1", "ls_2"), "swish"), "pfeiffer": (("ls_2",), "relu")}
ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
TOWERS = ("vision", "text")


class Bottleneck(nn.Module):
    """``h + up(act(down(h)))``, ``down``: width -> width / reduction_factor (normal, std 0.02, AdapterHub's BERT
    initialisation), ``up`` back to width, initialised to zero (the adapter starts as the identity)."""

    def __init__(self, width: int, reduction_factor: float, activation: str):
        super().__init__()
        hidden = max(1, int(width // reduction_factor))
        self.down, self.act, self.up = nn.Linear(width, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, width)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class Adapted(nn.Module):
    """A sub-layer's output scaling (open_clip's ``ls_1`` / ``ls_2``: LayerScale or identity) followed by an
    adapter."""

    def __init__(self, scale: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.scale, self.adapter = scale, adapter

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.scale(h))


def add_adapters(model: nn.Module, variant: str = "houlsby", reduction_factor: float = 16,
                 activation: str | None = None, encoder: str = "both", layers: Sequence[int] | None = None
                 ) -> nn.Module:
    """A deep copy of an open_clip CLIP model with adapters in the chosen blocks (``layers``: indices, None: all)
    of the chosen towers; only the adapters' parameters require grad."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not '{variant}'")
    places, default_activation = VARIANTS[variant]
    activation = activation or default_activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not '{activation}'")
    towers = list(TOWERS) if encoder == "both" else [encoder]
    if any(t not in TOWERS for t in towers):
        raise ValueError(f"encoder must be 'both', 'vision' or 'text', not '{encoder}'")
    if not reduction_factor > 0:
        raise ValueError(f"reduction_factor must be > 0, got {reduction_factor}")
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for tower in towers:
        blocks = open_clip_blocks(model, tower)
        if blocks is None or not all(hasattr(b, p) for b in blocks for p in places):
            raise BackboneError(f"bottleneck adapters on the {tower} tower need open_clip transformer blocks (a ViT "
                                "image tower; not ModifiedResNet): use encoder='text'")
        for index, block in enumerate(blocks):
            if layers is not None and index not in layers:
                continue
            width = block.ln_1.normalized_shape[0]
            for place in places:
                setattr(block, place, Adapted(getattr(block, place), Bottleneck(width, reduction_factor, activation)))
    return model.eval()


class BottleneckAdapterHead(TunedClipHead):
    """CLIP with bottleneck adapters in its blocks; predicts from images (``predict_proba_images``, or ``logits``
    on preprocessed pixels once bound to the backbone with ``bind``)."""

    method = "bottleneck-adapter"
    title = "the bottleneck-adapter"
    tensor_prefix = "adapter"

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 variant: str = "houlsby", reduction_factor: float = 16, activation: str | None = None,
                 encoder: str = "both", layers: Sequence[int] | None = None, steps: int | None = None,
                 iterations_per_shot: int = 500, batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.0,
                 warmup: float = 0.1, logit_scale: float | None = None, seed: int = 0):
        self.classes = classes
        self.templates = templates
        self.variant = variant
        self.reduction_factor = reduction_factor
        self.activation = activation
        self.encoder = encoder
        self.layers = layers
        self.steps = steps
        self.iterations_per_shot = iterations_per_shot
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup = warmup
        self.logit_scale = logit_scale
        self.seed = seed

    def _adapted_model(self, backbone) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the down-projections' draw
            return add_adapters(text_tower(backbone), self.variant, self.reduction_factor, self.activation,
                                self.encoder, self.layers)

    def _schedule(self, optimizer: torch.optim.Optimizer, steps: int):
        """Houlsby et al.: linear warm-up over the first ``warmup`` share of the steps, then linear decay to 0."""
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        rise = max(1, math.ceil(self.warmup * steps))

        def factor(step: int) -> float:
            return (step + 1) / rise if step < rise else max(0.0, (steps - step) / max(steps - rise, 1))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
