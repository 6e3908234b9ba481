"""A backbone's preprocessing as a recipe: plain JSON from which the very transform is built.

The open_clip and timm backbones build their transform from their recipe here, and an exported ONNX model stores
the recipe, so the runner that feeds onnxruntime builds the same transform with the same library call and no
weights - one definition of the preprocessing, not a copy of it (anomalib's exported models drifted from its
Python ones exactly there, their issue #2747).
"""

from __future__ import annotations

from typing import Any, Callable


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the libraries were given (their transforms print and compare them)."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def from_recipe(recipe: dict[str, Any]) -> Callable:
    """The transform (PIL image -> tensor [C, H, W]) of a recipe ``{"kind": ..., ...}``."""
    kind = recipe.get("kind")
    if kind == "openclip":
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**_tuples(recipe["cfg"])), is_train=False)
    if kind == "timm":
        import timm.data

        return timm.data.create_transform(**_tuples(recipe["data_cfg"]))
    if kind == "texture":
        from .texture import TexturePreprocess

        return TexturePreprocess(**recipe["params"])
    raise ValueError(f"unknown preprocessing recipe kind {kind!r}")


def as_json(value: Any) -> Any:
    """A recipe with tuples as lists (what JSON keeps)."""
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    return value
