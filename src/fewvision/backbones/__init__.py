"""Backbones: one create function from a spec string.

====================================  ==========================================================================
spec                                  what it loads
====================================  ==========================================================================
``openclip:MODEL[/TAG]``              open_clip architecture with a pretrained tag (weights via the model hub)
``openclip:MODEL@PATH``               open_clip architecture with local weights; MODEL may be a config JSON path
``hf:REPO_OR_PATH``                   a transformers CLIP or SigLIP model, or a BLIP / BLIP-2 image-text retrieval model
``timm:NAME[@PATH|@random]``          a timm image model (image-only)
``texture``                           built-in, weight-free multi-scale Gabor texture features (image-only)
====================================  ==========================================================================
"""

from __future__ import annotations

import os
from typing import Callable

from ..defaults import DEFAULT_CLIP_SPEC
from .base import Backbone, BackboneError, WeightsUnavailable


def _openclip(spec: str, **kw) -> Backbone:
    from .openclip import OpenClipBackbone

    return OpenClipBackbone(spec, **kw)


def _hf_model_type(spec: str, cache_dir: str | None = None, download: bool = True) -> str | None:
    """``model_type`` from the config.json of an ``hf:`` spec (a local folder, else the hub cache or the hub)."""
    import json
    from pathlib import Path

    from ..io.paths import weights_dir
    from .weights import hub_file

    target = spec.split(":", 1)[1]
    local = Path(target).expanduser()
    if local.exists():
        config = local / "config.json"
    else:
        config = hub_file(spec, target, ["config.json"], cache=weights_dir(cache_dir), download=download)
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _hf(spec: str, **kw) -> Backbone:
    from .hf import HFClipBackbone

    kind = _hf_model_type(spec, kw.get("cache_dir"), kw.get("download", True))
    if kind == "blip":
        from .blip import BlipBackbone

        return BlipBackbone(spec, **kw)
    if kind == "blip-2":
        from .blip2 import Blip2Backbone

        return Blip2Backbone(spec, **kw)
    return HFClipBackbone(spec, **kw)


def _timm(spec: str, **kw) -> Backbone:
    from .timm_backbone import TimmBackbone

    return TimmBackbone(spec, **kw)


def _texture(spec: str, **kw) -> Backbone:
    from .texture import TextureBackbone

    kw.pop("cache_dir", None)
    kw.pop("download", None)
    kw.pop("device", None)
    return TextureBackbone(**kw)


_REGISTRY: dict[str, Callable[..., Backbone]] = {
    "openclip": _openclip,
    "hf": _hf,
    "timm": _timm,
    "texture": _texture,
}


def backbone_kinds() -> list[str]:
    return sorted(_REGISTRY)


def with_weights(spec: str, weights: str | None) -> str:
    """Apply ``--weights PATH`` to a spec: ``openclip:M/TAG`` -> ``openclip:M@PATH``, ``hf:X`` -> ``hf:PATH``."""
    if not weights:
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "openclip":
        from .openclip import parse_openclip_spec

        model, _, _ = parse_openclip_spec(rest)
        return f"openclip:{model}@{weights}"
    if kind == "timm":
        return f"timm:{rest.split('@', 1)[0]}@{weights}"
    if kind == "hf":
        return f"hf:{weights}"
    raise BackboneError(f"--weights does not apply to backbone '{spec}'")


def create_backbone(
    spec: str, *, cache_dir: str | None = None, download: bool = True, device: str = "cpu", weights: str | None = None
) -> Backbone:
    """Create a backbone from its spec. Raises :class:`BackboneError` (or :class:`WeightsUnavailable`)."""
    spec = with_weights(spec.strip(), weights)
    factory = _REGISTRY[check_backbone_spec(spec)]
    imported = None if weights else _imported(spec, cache_dir)
    if imported is not None and imported["spec"] == spec:  # a weight-free backbone packed as itself (texture)
        imported = None
    if imported is not None:  # 'fewvision models import' unpacked its files: load those, never the hub
        backbone = create_backbone(imported["spec"], cache_dir=cache_dir, download=False, device=device)
        if backbone.id != imported["id"]:
            raise BackboneError(f"backbone '{spec}' imported into the cache has id {backbone.id}, not the bundle's "
                                f"{imported['id']}: import the bundle again")
        backbone.spec = spec
        return backbone
    return factory(spec, cache_dir=cache_dir, download=download, device=device)


def check_backbone_spec(spec: str) -> str:
    """The kind of backbone ``spec`` names (texture, openclip, hf, timm), checked without loading anything; raises
    :class:`BackboneError` for a spec no backbone could be created from."""
    kind, colon, model = spec.strip().partition(":")
    if kind not in _REGISTRY:
        raise BackboneError(f"unknown backbone '{spec}': expected one of {', '.join(k + ':...' for k in backbone_kinds())}")
    if kind != "texture" and not (colon and model.strip()):
        raise BackboneError(f"backbone '{spec}' needs a model after '{kind}:'")
    return kind


def _imported(spec: str, cache_dir: str | None) -> dict | None:
    from ..io.paths import weights_dir
    from .imported import IMPORTED, imported_backbones

    if not (weights_dir(cache_dir) / IMPORTED).is_file():
        return None
    return imported_backbones(cache_dir).get(spec)


__all__ = ["Backbone", "BackboneError", "WeightsUnavailable", "create_backbone", "check_backbone_spec", "backbone_kinds",
           "DEFAULT_CLIP_SPEC"]


def weights_location(spec: str, cache_dir: str | None = None) -> str:
    """Where the weights of ``spec`` live or would be downloaded to (a hub-cache folder or the local path)."""
    from ..io.paths import weights_dir

    kind, _, rest = spec.partition(":")
    hub_folder = lambda repo: str(weights_dir(cache_dir) / ("models--" + repo.replace("/", "--")))  # noqa: E731
    if kind == "texture":
        return "texture: built in, no weights"
    if kind == "openclip":
        import open_clip

        from .openclip import hub_repo_and_file, parse_openclip_spec

        model, tag, path = parse_openclip_spec(rest)
        if path:
            return path
        if tag is None:
            raise BackboneError(f"'{spec}' names no pretrained tag")
        cfg = open_clip.get_pretrained_cfg(model, tag)
        if not cfg.get("hf_hub"):
            raise BackboneError(f"'{spec}' is not a known open_clip MODEL/TAG pair")
        return hub_folder(hub_repo_and_file(cfg)[0])
    if kind == "hf":
        return rest if os.path.exists(rest) else hub_folder(rest)
    if kind == "timm":
        import timm

        name, _, path = rest.partition("@")
        if path:
            return path
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not getattr(cfg, "hf_hub_id", None):
            raise BackboneError(f"timm model '{name}' has no hub weights")
        return hub_folder(cfg.hf_hub_id)
    raise BackboneError(f"unknown backbone '{spec}'")
