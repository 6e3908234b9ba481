"""Loading a Stable Diffusion pipeline (diffusers) from the Hugging Face hub cache or a local folder, offline-safe,
and giving it one new token per class whose embeddings are the only thing textual inversion trains."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..backbones.base import BackboneError

DEFAULT_PIPELINE = "CompVis/stable-diffusion-v1-4"  # GCPL's model
_LOADED: dict[tuple[str, str, str], object] = {}  # one copy per process: a pipeline is gigabytes


def device_and_dtype() -> tuple[str, torch.dtype]:
    """CUDA in half precision when present (the real pipeline's speed), else CPU in float32."""
    return ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)


def load_pipeline(spec: str = DEFAULT_PIPELINE, cache_dir: str | os.PathLike | None = None):
    """A ``StableDiffusionPipeline`` from a local folder (``save_pretrained`` layout) or a hub repo id, without
    network access unless the hub is reachable and allowed; a fresh private copy of its text encoder and tokenizer
    is made by :func:`with_class_tokens`, so the cached pipeline itself never changes."""
    from diffusers import StableDiffusionPipeline

    from ..io.paths import weights_dir

    device, dtype = device_and_dtype()
    key = (str(spec), device, str(dtype))
    if key in _LOADED:
        return _LOADED[key]
    local = Path(spec).expanduser()
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        if local.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(str(local), **kwargs)
        else:  # the hub cache first; the hub only if one short probe reaches it (no minute of retries offline)
            from ..backbones.weights import hub_reachable

            cache = str(weights_dir(cache_dir))
            try:
                pipe = StableDiffusionPipeline.from_pretrained(str(spec), cache_dir=cache, local_files_only=True,
                                                               **kwargs)
            except (OSError, ValueError):
                reachable, why = hub_reachable()
                if not reachable:
                    raise OSError(f"not in the cache {cache}, and the hub cannot be reached: {why}") from None
                pipe = StableDiffusionPipeline.from_pretrained(str(spec), cache_dir=cache, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackboneError(f"Stable Diffusion pipeline '{spec}' cannot be loaded ({first[:240]}): give a local "
                            "folder saved with save_pretrained (-p pipeline=PATH), or download it on a connected "
                            f"machine into {weights_dir(cache_dir)}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    _LOADED[key] = pipe
    return pipe


class AddedTokens(nn.Module):
    """A frozen token embedding table extended by ``new`` rows (the class tokens): ids below the table's size read
    the table, the ids after it read ``new`` - so training ``new`` cannot move any existing word."""

    def __init__(self, base: nn.Embedding, new: torch.Tensor):
        super().__init__()
        self.base = base
        self.new = nn.Parameter(new.clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads for the dtype
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + len(self.new)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        size = self.base.num_embeddings
        out = self.base(ids.clamp(max=size - 1))
        added = ids >= size
        if bool(added.any()):
            out = out.clone()
            out[added] = self.new[ids[added] - size].to(out.dtype)
        return out


class ClassTokens:
    """A pipeline's text encoder and tokenizer, privately copied, with one new token per class: ``encode(prompts)``
    gives the UNet's conditioning, ``embeddings`` the trainable rows [C, width]."""

    def __init__(self, pipe, names: Sequence[str], initial: torch.Tensor):
        import copy

        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        # In float32 even when the pipeline runs in half precision: the gradients that train the tokens pass
        # through it (as diffusers' textual-inversion recipe keeps it); the UNet takes its output cast to fp16.
        self.text_encoder = copy.deepcopy(pipe.text_encoder).float()
        size = self.text_encoder.get_input_embeddings().num_embeddings
        if len(self.tokenizer) != size:
            raise BackboneError(f"the pipeline's tokenizer has {len(self.tokenizer)} tokens but its text encoder "
                                f"{size} embeddings: cannot add class tokens")
        added = self.tokenizer.add_tokens(list(names))
        if added != len(names):
            raise BackboneError(f"the class tokens {list(names)} clash with the tokenizer's vocabulary")
        self.ids = self.tokenizer.convert_tokens_to_ids(list(names))
        self.layer = AddedTokens(self.text_encoder.get_input_embeddings(), initial)
        self.text_encoder.set_input_embeddings(self.layer)

    @property
    def embeddings(self) -> nn.Parameter:
        return self.layer.new

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        length = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=length,
                             truncation=True, return_tensors="pt").input_ids.to(self.layer.new.device)
        return self.text_encoder(ids)[0]


def word_embedding(pipe, word: str) -> torch.Tensor:
    """The input embedding of ``word`` (the mean of its sub-word tokens'): where the class tokens start."""
    ids = pipe.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"the initial word '{word}' has no tokens")
    table = pipe.text_encoder.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].float().mean(0).detach()


def image_size(pipe) -> int:
    """The pixel size the UNet was trained at (512 for Stable Diffusion v1)."""
    return int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))


def to_pixels(pipe, images) -> torch.Tensor:
    """PIL images -> [N, 3, S, S] in [-1, 1]: shorter side resized to S (bicubic), centre crop - the one place
    this head's images are preprocessed, for fitting, prediction and generation alike."""
    import numpy as np
    from PIL import Image

    size = image_size(pipe)
    out = []
    for im in images:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)
