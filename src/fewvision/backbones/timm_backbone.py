"""timm image models: ``timm:NAME`` (hub weights), ``timm:NAME@PATH`` (local weights), ``timm:NAME@random``.

Patch features: for a CNN the maps of its stages (default 2 and 3); for a Vision Transformer (DINOv2 among them,
e.g. ``timm:vit_small_patch14_dinov2.lvd142m``) the patch tokens of its blocks after the final LayerNorm, as a map
(default: the last block - what DINOv2's ``get_intermediate_layers`` gives and AnomalyDINO uses)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from ..io.paths import weights_dir
from .base import Backbone, BackboneError, digest_state_dict, make_id, pack_layers
from .preprocess import as_json, from_recipe
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
        feature_layers: tuple[int, ...] | None = None,
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
        self.model_name, self.weight_file = name, weight_file
        torch.manual_seed(RANDOM_INIT_SEED)
        overlay = {"file": str(weight_file)} if weight_file is not None else None
        self.model = timm.create_model(
            name, pretrained=weight_file is not None, pretrained_cfg_overlay=overlay, num_classes=0
        ).eval().to(device)
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self._data_cfg = data_cfg
        self._preprocess = from_recipe(self.preprocess_recipe)
        self._input_size = tuple(data_cfg["input_size"][1:])
        self.is_vit = hasattr(self.model, "blocks") and hasattr(self.model, "patch_embed")
        if feature_layers is None:
            feature_layers = (len(self.model.blocks) - 1,) if self.is_vit else (2, 3)
        self.feature_layers = tuple(feature_layers)
        self._device = torch.device(device)
        weights = file_digest(weight_file) if weight_file is not None else digest_state_dict(self.model)
        # "packed-nearest": how patch_features combines the layers (part of what the feature cache holds); the
        # layers themselves are in the feature kind ("patch:1,2,3") when a head asks for other ones.
        self._id = make_id("timm", f"{name}:{weights}",
                           [repr(self._preprocess), self.feature_layers, "packed-nearest", "layers-in-kind"]
                           + (["vit-tokens-normed"] if self.is_vit else []))
        self._layouts: dict[tuple[int, ...], list[tuple[int, int, int]]] = {}
        # The default stages' graph is built now, not on first use: FX tracing patches torch globally, which breaks
        # any torch module another thread runs meanwhile (other stages are traced on first use, in the caller's
        # thread, before any encoding of theirs starts).
        self._stage_nets = {self.feature_layers: self._stage_net(self.feature_layers)}

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size

    @property
    def preprocess_recipe(self) -> dict:
        return {"kind": "timm", "data_cfg": as_json(self._data_cfg)}

    def portable(self) -> tuple[dict[str, Path], str]:
        if self.weight_file is None:
            return {}, self.spec
        name = f"backbone/{self.weight_file.name}"
        return {name: self.weight_file}, f"timm:{self.model_name}@{{root}}/{name}"

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.to(self._device))

    selectable_layers = True

    def _stages(self, layers) -> tuple[int, ...]:
        layers = self.feature_layers if layers is None else tuple(int(v) for v in layers)
        levels = len(self.model.feature_info)
        if not layers or any(not 0 <= v < levels for v in layers) or list(layers) != sorted(set(layers)):
            raise BackboneError(f"backbone '{self.spec}': layers must be increasing stage numbers in 0..{levels - 1}, "
                                f"got {list(layers)}")
        if layers not in self._stage_nets:
            self._stage_nets[layers] = self._stage_net(layers)
        return layers

    def _stage_net(self, layers: tuple[int, ...]):
        if self.is_vit:
            return functools.partial(self._vit_tokens, layers=layers)
        return _fused_stage_net(self.model, layers) or functools.partial(self._intermediates, layers=layers)

    def _vit_tokens(self, pixels: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Patch tokens of the blocks ``layers`` after the final norm, as [N, C, h, w] maps (prefix tokens dropped)."""
        return self.model.forward_intermediates(pixels.contiguous(), indices=list(layers), norm=True,
                                                output_fmt="NCHW", intermediates_only=True, stop_early=True)

    def patch_features(self, pixels: torch.Tensor, layers=None) -> torch.Tensor:
        """Feature maps of the stages ``layers`` (default ``feature_layers``), packed into one tensor by
        :func:`pack_layers` (each map repeated onto the first one's grid, so heads can recover every layer
        exactly)."""
        net = self._stage_nets[self._stages(layers)]
        with torch.inference_mode():
            maps = net(pixels.to(self._device).contiguous(memory_format=torch.channels_last))
        return pack_layers([m.float().contiguous() for m in maps])

    def patch_layout(self, layers=None) -> list[tuple[int, int, int]]:
        layers = self._stages(layers)
        if layers not in self._layouts:
            with torch.inference_mode():
                maps = self._stage_nets[layers](torch.zeros(1, 3, *self.input_size, device=self._device))
            self._layouts[layers] = [tuple(int(v) for v in m.shape[1:]) for m in maps]
        return list(self._layouts[layers])

    def _intermediates(self, pixels: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        if not hasattr(self.model, "forward_intermediates"):
            raise BackboneError(f"timm model '{self.spec}' does not expose intermediate feature maps")
        return self.model.forward_intermediates(pixels, indices=list(layers), intermediates_only=True, stop_early=True)


def _fused_stage_net(model: torch.nn.Module, indices: tuple[int, ...]):
    """Callable: pixels -> the maps of stages ``indices``, or None when timm cannot trace this model.

    timm's FX feature extractor on a copy of the model, cut after the last requested stage, with every BatchNorm
    folded into the convolution before it and run in channels-last layout, which is faster on CPU than
    ``forward_intermediates`` (benchmarks/timm_patch_features.py)."""
    from timm.models import FeatureGraphNet
    from torch.fx.experimental.optimization import fuse

    try:
        net = FeatureGraphNet(copy.deepcopy(model), out_indices=tuple(indices))
    except Exception:  # noqa: BLE001 - not FX-traceable: the caller falls back to forward_intermediates
        return None
    graph = net.graph_module.eval()  # fuse() refuses modules in training mode; the copy does not keep eval()
    graph = fuse(graph, inplace=True, no_trace=True).to(memory_format=torch.channels_last)

    def run(pixels: torch.Tensor) -> list[torch.Tensor]:
        out = graph(pixels)
        return list(out.values()) if isinstance(out, dict) else list(out)

    return run
