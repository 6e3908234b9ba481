"""Deep prompt tuning: learnable prompt tokens at every layer (up to ``depth``) of CLIP's text tower and, optionally,
of its image tower, on open_clip models; only the prompts (and MaPLe's coupling layers) train, with the loop every
tuned head shares (``heads/tuned.py``).

- Text (deep prompts in the P-Tuning v2 / VPT-deep sense, as MaPLe and IVLP put them in CLIP): the first
  ``n_ctx`` tokens after the start token (the start of every prompt, e.g. "a photo" in "a photo of a {}.") are
  replaced at the input by learned token embeddings (initialised from those words' own embeddings), and before each
  of the next ``depth - 1`` blocks the hidden states at those positions are replaced by fresh learned tokens.
- Image (``vision``): ``"vpt"`` appends ``n_ctx`` learned tokens after the patch tokens before the pre-norm
  (VPT-deep; independent of the text prompts, IVLP), replaced again before each of the next ``depth - 1`` blocks;
  ``"maple"`` the same tokens, each layer's computed from that layer's text prompts by its own linear map (MaPLe's
  coupling function); ``"none"``: text prompts only.

open_clip's blocks are wrapped (``PromptedBlock``) and the image tower's pre-norm too (``AppendPrompts``), so the
towers' own ``encode_text`` / ``encode_image`` run them. See docs/methods/deep-prompt.md.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..backbones.base import BackboneError
from .coop import text_tower
from ..prompts import ClassSpec
from .support import Support
from .tuned import TunedClipHead, open_clip_blocks

VISION = ("none", "vpt", "maple")
PROMPT_STD = 0.02  # MaPLe / IVLP initialise the deeper prompts from N(0, 0.02^2)


class DeepPrompts(nn.Module):
    """The learned tokens: ``text[i]`` [n_ctx, text width] for text layers 0..text_depth-1 (layer 0 in
    token-embedding space), and per image layer 0..vision_depth-1 either ``vision[i]`` (vpt) or ``couple[i](text[i])``
    (maple)."""

    def __init__(self, first: torch.Tensor, text_depth: int, vision: str, vision_depth: int,
                 vision_width: int | None):
        super().__init__()
        n, width = first.shape
        self.text = nn.ParameterList([nn.Parameter(first.clone())] + [nn.Parameter(torch.randn(n, width) * PROMPT_STD)
                                                                      for _ in range(text_depth - 1)])
        self.mode = vision
        if vision == "vpt":
            self.vision = nn.ParameterList([nn.Parameter(torch.randn(n, vision_width) * PROMPT_STD)
                                            for _ in range(vision_depth)])
        elif vision == "maple":
            self.couple = nn.ModuleList([nn.Linear(width, vision_width) for _ in range(vision_depth)])

    def prompt(self, tower: str, layer: int) -> torch.Tensor:
        if tower == "text":
            return self.text[layer]
        return self.vision[layer] if self.mode == "vpt" else self.couple[layer](self.text[layer])


class _Prompted(nn.Module):
    """The shared part of the wrappers: which tokens (``tower``, ``layer``) of the model's one ``DeepPrompts``, plus
    a fixed ``offset`` (the positions' embeddings at text layer 0)."""

    def __init__(self, prompts: DeepPrompts, tower: str, layer: int, offset: torch.Tensor | None = None):
        super().__init__()
        # a plain reference, not a sub-module: the prompts are registered once, as the model's ``deep_prompts``, and
        # a deep copy of the model maps this reference to its own copy of them
        self.__dict__["prompts"] = prompts
        self.tower, self.layer = tower, layer
        self.register_buffer("offset", offset, persistent=False)

    def tokens(self, like: torch.Tensor) -> torch.Tensor:
        p = self.prompts.prompt(self.tower, self.layer)
        return (p if self.offset is None else p + self.offset).to(like.dtype)


class PromptedBlock(_Prompted):
    """A transformer block whose input has its prompt positions (``positions``, a slice of the sequence) overwritten
    by the prompt tokens first, broadcast over the batch."""

    def __init__(self, block: nn.Module, prompts: DeepPrompts, tower: str, layer: int, positions: slice,
                 batch_first: bool, offset: torch.Tensor | None = None):
        super().__init__(prompts, tower, layer, offset)
        self.block, self.positions, self.batch_first = block, positions, batch_first

    def get_weight_dtype(self) -> torch.dtype:  # the tower asks its first block for its cast type
        return self.block.get_weight_dtype()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        p = self.tokens(x)
        start, stop = self.positions.start, self.positions.stop
        if self.batch_first:
            x = torch.cat([x[:, :start], p.expand(x.shape[0], -1, -1), x[:, stop:] if stop is not None else x[:, :0]],
                          dim=1)
        else:
            x = torch.cat([x[:start], p[:, None].expand(-1, x.shape[1], -1), x[stop:] if stop is not None else x[:0]],
                          dim=0)
        return self.block(x, *args, **kwargs)


class AppendPrompts(_Prompted):
    """The image tower's pre-norm with the layer-0 image prompts appended to its input (batch first) first."""

    def __init__(self, norm: nn.Module, prompts: DeepPrompts):
        super().__init__(prompts, "vision", 0)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.cat([x, self.tokens(x).expand(x.shape[0], -1, -1)], dim=1))


def add_deep_prompts(model: nn.Module, first: torch.Tensor, depth: int = 9, vision: str = "none") -> nn.Module:
    """A deep copy of an open_clip CLIP model prompted as the module docstring says; ``first``: the layer-0 text
    prompts [n_ctx, width] (token embeddings). Only the prompts and coupling layers require grad; ``depth`` is
    capped at each tower's block count (and, for MaPLe, the image depth at the text depth: each image prompt comes
    from that layer's text prompt)."""
    import copy

    if vision not in VISION:
        raise ValueError(f"vision must be one of {', '.join(VISION)}, not '{vision}'")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.requires_grad_(False)
    n = first.shape[0]
    text_blocks = open_clip_blocks(model, "text")
    if text_blocks is None:
        raise BackboneError("deep prompts need an open_clip CLIP model with its own text transformer")
    visual = model.visual
    vision_blocks = open_clip_blocks(model, "vision") if vision != "none" else None
    if vision != "none" and (vision_blocks is None or getattr(visual, "attn_pool", None) is not None
                             or getattr(visual, "pool_type", "tok") != "tok"):
        raise BackboneError("image prompts need an open_clip ViT image tower pooled by its class token (not "
                            "ModifiedResNet or attention pooling): use vision='none'")
    text_depth = min(depth, len(text_blocks))
    vision_depth = 0 if vision_blocks is None else min(depth, len(vision_blocks))
    if vision == "maple":
        vision_depth = min(vision_depth, text_depth)
    prompts = DeepPrompts(first, text_depth, vision, vision_depth,
                          visual.transformer.width if vision_blocks is not None else None)
    model.deep_prompts = prompts
    # text layer 0: token embeddings, then their positions, as the tower does for the words they replace
    positions = model.positional_embedding.detach()[1:1 + n].clone()
    for i in range(text_depth):
        text_blocks[i] = PromptedBlock(text_blocks[i], prompts, "text", i, slice(1, 1 + n),
                                       model.transformer.batch_first, positions if i == 0 else None)
    if vision_blocks is not None:
        visual.ln_pre = AppendPrompts(visual.ln_pre, prompts)
        for i in range(1, vision_depth):
            vision_blocks[i] = PromptedBlock(vision_blocks[i], prompts, "vision", i, slice(-n, None),
                                             visual.transformer.batch_first)
    return model.eval()


class DeepPromptHead(TunedClipHead):
    """CLIP with deep prompts; predicts from images (``predict_proba_images``, or ``logits`` on preprocessed pixels
    once bound to the backbone with ``bind``)."""

    method = "deep-prompt"
    title = "the deep-prompt"
    tensor_prefix = "prompt"

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 n_ctx: int = 2, depth: int = 9, vision: str = "none", steps: int | None = None, epochs: int = 5,
                 batch_size: int = 4, lr: float = 0.0035, momentum: float = 0.9, weight_decay: float = 5e-4,
                 warmup_lr: float = 1e-5, logit_scale: float | None = None, seed: int = 0):
        self.classes = classes
        self.templates = templates
        self.n_ctx = n_ctx
        self.depth = depth
        self.vision = vision
        self.steps = steps
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_lr = warmup_lr
        self.logit_scale = logit_scale
        self.seed = seed

    def _adapted_model(self, backbone) -> nn.Module:
        model = text_tower(backbone)
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        for template in self.templates_:  # the learned tokens take the place of the first n_ctx words
            lead = template.split("{}")[0].strip()
            words = int((backbone.tokenizer([lead])[0] != 0).sum()) - 2 if lead else 0
            if words < self.n_ctx:
                raise ValueError(f"deep prompts replace the first {self.n_ctx} token(s) of every prompt: the template "
                                 f"'{template}' has {words} before the class name; give n_ctx <= {words} or a "
                                 "template such as 'a photo of a {}.'")
        with torch.no_grad():
            first = model.token_embedding(backbone.tokenizer([self.templates_[0]]))[0, 1:1 + self.n_ctx].float()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the deeper prompts' and coupling layers' draw
            return add_deep_prompts(model, first, self.depth, self.vision)

    # MaPLe's optimisation: SGD, a constant warm-up epoch at warmup_lr, then cosine; epochs over the support images
    def _n_steps(self, support: Support) -> int:
        if self.steps is not None:
            return int(self.steps)
        return self.epochs * math.ceil(len(support.paths) / self.batch_size)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def _schedule(self, optimizer: torch.optim.Optimizer, steps: int):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        warm = min(steps, max(1, steps // max(self.epochs, 1)))  # one epoch
        rest = max(steps - warm, 1)

        def factor(step: int) -> float:
            if step < warm:
                return self.warmup_lr / self.lr
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / rest))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
