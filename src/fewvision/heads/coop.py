"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models", IJCV): learnable context vectors.

The prompt of class c is ``[SOS] v_1 ... v_M [CLASS_c] . [EOS]`` where v_1..v_M are learned word embeddings at the
text encoder's input (shared by all classes, or one set per class with ``class_specific=True``). The text tower is
open_clip's, run on these embeddings; the image tower is frozen, so training uses cached image features:

    p(y = c | x) = softmax_c(s * cos(f(x), g([v, w_c])))        trained with cross-entropy, SGD, cosine schedule.

See docs/methods/coop.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones.base import BackboneError
from .base import ClassifierHead
from .support import Support

PLACEHOLDER = "X"


def text_tower(backbone):
    """The open_clip CLIP model whose text transformer CoOp-style methods run on custom input embeddings."""
    model = getattr(backbone, "model", None)
    if model is None or not hasattr(model, "token_embedding") or not hasattr(backbone, "tokenizer"):
        raise BackboneError(f"backbone '{getattr(backbone, 'spec', backbone)}': prompt learning needs an open_clip "
                            "CLIP model with its own text transformer (openclip:...)")
    return model


def encode_text_embeddings(model, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` from input token embeddings [B, L, width] instead of token ids [B, L].

    With a causal mask and end-of-text pooling, positions after the last end token cannot change the result,
    so the sequence is cut there (several times faster than the full 77 tokens).
    """
    from open_clip.transformer import text_global_pool

    pool_type, eos_id = model.text_pool_type, getattr(model, "text_eos_id", None)
    attn_mask = model.attn_mask
    length = tokens.shape[1]
    if attn_mask is not None and pool_type in ("argmax", "eos"):
        last = tokens.argmax(dim=-1) if pool_type == "argmax" else (tokens == eos_id).int().argmax(dim=-1)
        length = int(last.max()) + 1
    tokens, embeddings = tokens[:, :length], embeddings[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = embeddings.to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=attn_mask[:length, :length] if attn_mask is not None else None)
    x = text_global_pool(model.ln_final(x), tokens, pool_type, eos_token_id=eos_id)
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


class CoOpHead(ClassifierHead):
    method = "coop"
    needs_text = True

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, class_specific: bool = False,
                 steps: int = 200, lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4,
                 init_std: float = 0.02, logit_scale: float | None = None, seed: int = 0):
        self.n_ctx = n_ctx
        self.ctx_init = ctx_init
        self.class_specific = class_specific
        self.steps = steps
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.init_std = init_std
        self.logit_scale = logit_scale
        self.seed = seed

    # --- prompts ----------------------------------------------------------------------------------------------
    def _prompts(self, model, backbone, class_names) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [C, L] of "<context words> <class name>.", initial context [M, width] or [C, M, width])."""
        prefix = self.ctx_init if self.ctx_init else " ".join([PLACEHOLDER] * self.n_ctx)
        prefix_ids = backbone.tokenizer([prefix])[0]
        n_ctx = int(prefix_ids.argmax()) - 1  # between [SOS] and [EOS], the largest id in CLIP's vocabulary
        tokens = backbone.tokenizer([f"{prefix} {name.replace('_', ' ')}." for name in class_names])
        if n_ctx < 1 or not bool((tokens[:, 1:1 + n_ctx] == prefix_ids[1:1 + n_ctx]).all()):
            raise BackboneError(f"backbone '{backbone.spec}': its tokenizer does not put the context words right "
                                "after the start token; CoOp needs a CLIP-style tokenizer")
        if self.ctx_init:
            with torch.no_grad():
                ctx = model.token_embedding(prefix_ids[1:1 + n_ctx]).float().clone()
        else:
            generator = torch.Generator().manual_seed(self.seed)
            ctx = torch.randn(n_ctx, model.token_embedding.weight.shape[1], generator=generator) * self.init_std
        return tokens, ctx.expand(len(class_names), -1, -1).clone() if self.class_specific else ctx

    def _class_embeddings(self, model, ctx: torch.Tensor, frozen: torch.Tensor, tokens: torch.Tensor):
        """Text features [C, D] of the prompts: frozen [SOS] + context + frozen class-name and end tokens."""
        n_ctx = ctx.shape[-2]
        ctx = ctx.expand(len(tokens), -1, -1) if ctx.ndim == 2 else ctx
        embeddings = torch.cat([frozen[:, :1], ctx.to(frozen.dtype), frozen[:, 1 + n_ctx:]], dim=1)
        return encode_text_embeddings(model, embeddings, tokens).float()

    def fit(self, support: Support) -> "CoOpHead":
        backbone = support.backbone
        model = text_tower(backbone)
        class_names = list(support.class_names)
        tokens, ctx = self._prompts(model, backbone, class_names)
        with torch.no_grad():
            frozen = model.token_embedding(tokens)
        self.logit_scale_ = float(self.logit_scale if self.logit_scale is not None else backbone.logit_scale)
        ctx = torch.nn.Parameter(ctx)
        steps = int(self.steps) if support.features is not None else 0
        self.losses_ = []
        if steps > 0:
            feats = F.normalize(support.features.float(), dim=-1)
            # Frozen text tower: gradients flow through it to the context only, its weights get none.
            requires = {name: p.requires_grad for name, p in model.named_parameters()}
            for p in model.parameters():
                p.requires_grad_(False)
            optimizer = torch.optim.SGD([ctx], lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
            try:
                for _ in range(steps):
                    text = F.normalize(self._class_embeddings(model, ctx, frozen, tokens), dim=-1)
                    loss = F.cross_entropy(self.logit_scale_ * feats @ text.T, support.labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    self.losses_.append(loss.item())
            finally:
                for name, p in model.named_parameters():
                    p.requires_grad_(requires[name])
        self.ctx_ = ctx.detach().clone()
        with torch.no_grad():
            # Stored so prediction needs no text tower; it is a function of ctx_ and the (id-checked) backbone.
            text = F.normalize(self._class_embeddings(model, self.ctx_, frozen, tokens), dim=-1)
            self.text_weights_ = text.T.contiguous()
        self.class_names_ = class_names
        return self

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale_ * F.normalize(features.float(), dim=-1) @ self.text_weights_

    def n_trainable_parameters(self) -> int:
        return int(self.ctx_.numel()) if hasattr(self, "ctx_") else 0
