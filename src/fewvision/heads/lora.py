"""CLIP-LoRA (Zanella & Ben Ayed 2024, "Low-Rank Few-Shot Adaptation of Vision-Language Models"; LoRA: Hu et al.
2021): low-rank updates W + (alpha/r) B A, with dropout on the LoRA input, on the query, key and value projections
of every attention block of both towers, trained with cross-entropy on augmented support images.

open_clip's blocks use ``nn.MultiheadAttention``, whose packed ``in_proj_weight`` is used functionally, so (as
CLIP-LoRA does) each one is replaced, in a private copy of the model, by the same attention computed with separate
q/k/v/out ``nn.Linear`` layers; peft then puts its standard LoRA layers on those. The towers change, so the head
works from images (``feature_kind = "images"``). See docs/methods/lora.md.
"""

from __future__ import annotations

import copy
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import BackboneError
from .coop import text_tower
from ..prompts import ClassSpec
from .tuned import TunedClipHead, open_clip_blocks

TOWERS = {"vision": "visual.", "text": "transformer."}
PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}


class SplitAttention(nn.Module):
    """``nn.MultiheadAttention`` (self or cross attention, no key/value bias tokens) with separate q, k, v and
    output ``nn.Linear`` layers holding copies of its weights, so each projection can carry its own LoRA."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise BackboneError("unsupported attention layer for LoRA (separate q/k/v sizes or bias tokens)")
        width, bias = mha.embed_dim, mha.in_proj_bias is not None
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(width, width, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            for i, layer in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                layer.weight.copy_(mha.in_proj_weight[i * width:(i + 1) * width])
                if bias:
                    layer.bias.copy_(mha.in_proj_bias[i * width:(i + 1) * width])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None, key_padding_mask=None):
        if key_padding_mask is not None or need_weights:
            raise ValueError("SplitAttention supports neither key_padding_mask nor need_weights")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, width = query.shape

        def heads(x):
            return x.view(batch, -1, self.num_heads, width // self.num_heads).transpose(1, 2)

        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # MHA: True = masked out; as an additive float mask for SDPA
                attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(attn_mask, float("-inf"))
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, *attn_mask.shape[-2:])
        out = F.scaled_dot_product_attention(
            heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value)), attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, width))
        return (out if self.batch_first else out.transpose(0, 1)), None


def split_attention_model(model: nn.Module, encoder: str = "both", layers: Sequence[int] | None = None,
                          targets: Sequence[str] = ("q", "k", "v")) -> tuple[nn.Module, list[str]]:
    """A deep copy of an open_clip CLIP model with every attention block split (``SplitAttention``), and the
    names of the q/k/v/out linears that LoRA should adapt (towers per ``encoder``, blocks per ``layers``)."""
    towers = list(TOWERS) if encoder == "both" else [encoder]
    if any(t not in TOWERS for t in towers):
        raise ValueError(f"encoder must be 'both', 'vision' or 'text', not '{encoder}'")
    if any(t not in PROJECTIONS for t in targets):
        raise ValueError(f"targets must be among {', '.join(PROJECTIONS)}, got {list(targets)}")
    model = copy.deepcopy(model)
    names = []
    for tower in TOWERS:
        blocks = open_clip_blocks(model, tower)
        if blocks is None or not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) for b in blocks):
            if tower in towers:
                raise BackboneError(f"LoRA on the {tower} tower needs open_clip transformer blocks with "
                                    "nn.MultiheadAttention (a ViT image tower; not ModifiedResNet)")
            continue
        for index, block in enumerate(blocks):
            block.attn = SplitAttention(block.attn)
            if tower in towers and (layers is None or index in layers):
                names += [f"{TOWERS[tower]}{'transformer.' if tower == 'vision' else ''}resblocks.{index}.attn."
                          f"{PROJECTIONS[t]}" for t in targets]
    return model, names


class LoRAHead(TunedClipHead):
    """LoRA-adapted CLIP; predicts from images (``predict_proba_images``, or ``logits`` on preprocessed pixels
    once bound to the backbone with ``bind``)."""

    method = "lora"
    title = "LoRA"
    tensor_prefix = "lora"  # peft's state-dict names under it

    def __init__(self, classes: Sequence[ClassSpec | str] | None = None, templates: Sequence[str] | None = None,
                 rank: int = 2, alpha: float = 1.0, dropout: float = 0.25, encoder: str = "both",
                 layers: Sequence[int] | None = None, targets: Sequence[str] = ("q", "k", "v"),
                 steps: int | None = None, iterations_per_shot: int = 500, batch_size: int = 32, lr: float = 2e-4,
                 weight_decay: float = 1e-2, logit_scale: float | None = None, seed: int = 0):
        self.classes = classes
        self.templates = templates
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.encoder = encoder
        self.layers = layers
        self.targets = targets
        self.steps = steps
        self.iterations_per_shot = iterations_per_shot
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.logit_scale = logit_scale
        self.seed = seed

    def _adapted_model(self, backbone) -> nn.Module:
        """A private copy of the backbone's model with split attention and freshly initialised LoRA (B = 0)."""
        from peft import LoraConfig, inject_adapter_in_model

        model, names = split_attention_model(text_tower(backbone), self.encoder, self.layers, self.targets)
        # A full-match pattern: a list would also match by suffix ("transformer.resblocks.0..." is a suffix of
        # "visual.transformer.resblocks.0...").
        pattern = "|".join(re.escape(n) for n in names)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=pattern,
                            bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # peft draws A from the global generator
            model = inject_adapter_in_model(config, model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        return model.eval()

    def _tuned_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}

    def _load_tuned(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"LoRA tensors do not fit this model: {result.unexpected_keys[:3]}")

    def _train_mode(self, model: nn.Module) -> None:
        for name, module in model.named_modules():  # only LoRA's dropout trains; frozen layers stay in eval mode
            if name.split(".")[-1] == "lora_dropout":
                module.train()
