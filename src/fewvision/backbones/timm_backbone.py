"""timm image models: ``timm:NAME`` (hub weights), ``timm:NAME@PATH`` (local weights), ``timm:NAME@random``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..paths import weights_dir
from .base import Backbone, BackboneError, digest_state_dict, make_id
from .weights import file_digest, hub_file

RANDOM_INIT_SEED = 0


class TimmBackbone(Backbone):
    has_text = False

    def __init__(
        self,
        spec: str,
        cache_dir: str | None = None,
        download: bool = True,
        device: str = "cpu",
        feature_layers: tuple[int, ...] = (2, 3),
    ):
        import timm

        self.spec = spec
        rest = spec.split(":", 1)[1]
        name, _, where = rest.partition("@")
        if not timm.is_model(name):
            raise BackboneError(f"unknown timm model '{name}'")
        weight_file: Path | None = None
        if where and where != "random":
            weight_file = Path(where).expanduser()
            if not weight_file.is_file():
                raise BackboneError(f"{weight_file}: weights file not found (from spec '{spec}')")
        elif not where:
            cfg = timm.models.get_pretrained_cfg(name)
            hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
            if not hub_id:
                raise BackboneError(f"timm model '{name}' has no hub weights; use timm:{name}@PATH or @random")
            weight_file = hub_file(
                spec, hub_id, ["model.safetensors", "pytorch_model.bin"], cache=weights_dir(cache_dir), download=download
            )
        torch.manual_seed(RANDOM_INIT_SEED)
        overlay = {"file": str(weight_file)} if weight_file is not None else None
        self.model = timm.create_model(
            name, pretrained=weight_file is not None, pretrained_cfg_overlay=overlay, num_classes=0
        ).eval().to(device)
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self._preprocess = timm.data.create_transform(**data_cfg)
        self._input_size = tuple(data_cfg["input_size"][1:])
        self.feature_layers = tuple(feature_layers)
        self._device = torch.device(device)
        weights = file_digest(weight_file) if weight_file is not None else digest_state_dict(self.model)
        self._id = make_id("timm", f"{name}:{weights}", [repr(self._preprocess), self.feature_layers])

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.to(self._device))

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Feature maps of ``feature_layers`` (stage indices), resized to the first one's grid and concatenated."""
        if not hasattr(self.model, "forward_intermediates"):
            raise BackboneError(f"timm model '{self.spec}' does not expose intermediate feature maps")
        with torch.inference_mode():
            maps = self.model.forward_intermediates(
                pixels.to(self._device), indices=list(self.feature_layers), intermediates_only=True, stop_early=True
            )
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else torch.nn.functional.interpolate(m, size=size, mode="bilinear") for m in maps]
        return torch.cat([m.float() for m in maps], dim=1)
