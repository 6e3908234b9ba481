"""transformers CLIP / SigLIP models: ``hf:REPO_OR_PATH``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..io.paths import weights_dir
from .base import Backbone, BackboneError, make_id
from .weights import file_digest, hub_snapshot


class HFPixelTransform:
    """A transformers image processor wrapped as PIL -> tensor, picklable for decoding workers."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFPixelTransform({self.processor.to_dict()})"


def model_folder(spec: str, cache_dir: str | None, download: bool) -> Path:
    """The folder of an ``hf:REPO_OR_PATH`` spec: the local path if it exists, else the hub snapshot."""
    target = spec.split(":", 1)[1]
    local = Path(target).expanduser()
    return local if local.exists() else hub_snapshot(spec, target, cache=weights_dir(cache_dir), download=download)


def portable_folder(folder: Path) -> tuple[dict[str, Path], str]:
    """Every file of a transformers model folder (hub snapshots link to blobs: the files they point to)."""
    files = {f"backbone/model/{p.relative_to(folder).as_posix()}": p.resolve()
             for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return files, "hf:{root}/backbone/model"


class HFClipBackbone(Backbone):
    has_text = True

    def __init__(self, spec: str, cache_dir: str | None = None, download: bool = True, device: str = "cpu"):
        from transformers import AutoModel, AutoProcessor  # heavy import, only when this backbone is used
        self.spec = spec
        folder = model_folder(spec, cache_dir, download)
        self.folder = folder
        try:
            self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval().to(device)
            self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise BackboneError(f"{folder}: cannot load a transformers model from here ({err})") from None
        if not hasattr(self.model, "get_image_features"):
            raise BackboneError(f"'{spec}' is not a CLIP-style model (no get_image_features)")
        self.is_siglip = "siglip" in type(self.model).__name__.lower()
        self._preprocess = HFPixelTransform(self.processor.image_processor)
        self._device = torch.device(device)
        self._id = make_id("hf", file_digest(folder), repr(self._preprocess))

    def portable(self) -> tuple[dict[str, Path], str]:
        return portable_folder(self.folder)

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.model.config.vision_config.image_size
        return (size, size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixels.to(self._device))
        return out if torch.is_tensor(out) else out.pooler_output

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        padding = "max_length" if self.is_siglip else True
        tokens = self.processor.tokenizer(list(texts), padding=padding, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(**{k: v.to(self._device) for k, v in tokens.items()})
        out = out if torch.is_tensor(out) else out.pooler_output
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.vision_model(pixel_values=pixels.to(self._device))
        tokens = out.last_hidden_state.float()
        n = tokens.shape[1]
        side = int(n**0.5)
        if side * side != n:  # a class token in front
            tokens = tokens[:, 1:]
            side = int((n - 1) ** 0.5)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
