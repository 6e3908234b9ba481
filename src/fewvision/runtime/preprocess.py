"""A backbone's inference preprocessing as a list of steps, run with Pillow and numpy (no torch).

The steps are read off the very transform the backbone uses (open_clip's or timm's torchvision ``Compose``) when a
model is exported or packed, and the export checks that running them here gives the transform's output exactly on
its check images; so there is still one definition of the preprocessing - the library's - and a line PC without
torch replays it. Every step does what the torchvision / open_clip / timm class does for a PIL image:

* ``rgb``: ``image.convert("RGB")``;
* ``resize``: torchvision ``Resize`` - an int resizes the shorter edge (the longer one truncated to an int, then
  capped by ``max_size``), a pair sets (height, width); Pillow's resampling, which torchvision calls for PIL images;
* ``resize_keep_ratio``: open_clip / timm ``ResizeKeepRatio`` (eval: no random scale or aspect);
* ``center_crop``: torchvision ``CenterCrop`` (zero padding when the image is smaller); ``center_crop_or_pad``:
  the same with a fill colour;
* ``to_array``: ``ToTensor`` (uint8 / 255 in float32, channels first); ``normalize``: ``(x - mean) / std`` in
  float32, as torchvision computes it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


class PreprocessError(ValueError):
    """A transform that cannot be replayed without torch; one line."""


def _pair(size) -> list[int]:
    if isinstance(size, (int, np.integer)):
        return [int(size), int(size)]
    size = [int(s) for s in size]
    return size * 2 if len(size) == 1 else size


def _interpolation(mode) -> str:
    name = str(getattr(mode, "value", mode)).lower()
    if name not in INTERPOLATIONS:
        raise PreprocessError(f"interpolation {mode!r} has no Pillow equivalent here")
    return name


def steps_of(transform) -> list[dict[str, Any]]:
    """The steps of a torchvision ``Compose`` of known eval transforms; PreprocessError naming the first unknown
    one. Read by class name, so this module needs none of the libraries that define them; a transform of our own
    gives its steps itself (``steps()``)."""
    if callable(getattr(transform, "steps", None)):
        return [dict(s) for s in transform.steps()]
    steps: list[dict[str, Any]] = []
    for t in getattr(transform, "transforms", None) or [transform]:
        name = getattr(t, "__name__", None) or type(t).__name__
        if name in ("MaybeConvertMode", "_convert_to_rgb"):
            if getattr(t, "mode", "RGB") != "RGB":
                raise PreprocessError(f"{name} to mode {t.mode} is not supported")
            steps.append({"op": "rgb"})
        elif name == "Resize":
            size = t.size if isinstance(t.size, int) else list(t.size)
            if isinstance(size, list) and len(size) == 1:
                size = size[0]
            steps.append({"op": "resize", "size": size, "max_size": t.max_size,
                          "interpolation": _interpolation(t.interpolation)})
        elif name == "ResizeKeepRatio":
            if getattr(t, "random_scale_prob", 0) or getattr(t, "random_aspect_prob", 0):
                raise PreprocessError("ResizeKeepRatio with random scale or aspect is a training transform")
            interpolation = t.interpolation
            if isinstance(interpolation, (list, tuple)):
                raise PreprocessError("ResizeKeepRatio with random interpolation is a training transform")
            steps.append({"op": "resize_keep_ratio", "size": _pair(t.size), "longest": float(t.longest),
                          "interpolation": _interpolation(interpolation)})
        elif name == "CenterCrop":
            steps.append({"op": "center_crop", "size": _pair(t.size), "fill": 0})
        elif name == "CenterCropOrPad":
            if getattr(t, "padding_mode", "constant") != "constant":
                raise PreprocessError(f"CenterCropOrPad with padding mode {t.padding_mode} is not supported")
            fill = t.fill if isinstance(t.fill, (int, float)) else [int(v) for v in t.fill]
            steps.append({"op": "center_crop", "size": _pair(t.size), "fill": fill})
        elif name in ("ToTensor", "MaybeToTensor"):
            steps.append({"op": "to_array"})
        elif name == "Normalize":
            steps.append({"op": "normalize", "mean": [float(v) for v in np.asarray(t.mean).reshape(-1)],
                          "std": [float(v) for v in np.asarray(t.std).reshape(-1)]})
        else:
            raise PreprocessError(f"the preprocessing step {name} cannot be replayed without torch")
    ops = [s["op"] for s in steps]
    if "to_array" not in ops or ops.index("to_array") != len(ops) - 1 - ("normalize" in ops):
        raise PreprocessError(f"the preprocessing ({', '.join(ops)}) does not end in to_array [+ normalize]")
    return steps


def _resized_size(height: int, width: int, size, max_size: int | None) -> tuple[int, int]:
    """torchvision's output size for ``Resize(size, max_size=...)`` on an image of ``height`` x ``width``."""
    if not isinstance(size, int):
        return int(size[0]), int(size[1])
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _keep_ratio_size(height: int, width: int, target: Sequence[int], longest: float) -> tuple[int, int]:
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(height / ratio), round(width / ratio)


def _crop_or_pad(pixels: np.ndarray, size: Sequence[int], fill) -> np.ndarray:
    """``CenterCrop`` / ``CenterCropOrPad`` on an ``[H, W, C]`` uint8 array: pad (left/top get the floor of half
    the missing pixels) with ``fill``, then crop at ``round((H - h) / 2)``."""
    crop_h, crop_w = int(size[0]), int(size[1])
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:
        left = (crop_w - width) // 2 if crop_w > width else 0
        top = (crop_h - height) // 2 if crop_h > height else 0
        padded = np.empty((max(height, crop_h), max(width, crop_w), pixels.shape[2]), pixels.dtype)
        padded[...] = np.asarray(fill, dtype=pixels.dtype)
        padded[top : top + height, left : left + width] = pixels
        pixels = padded
        height, width = pixels.shape[:2]
        if (height, width) == (crop_h, crop_w):
            return pixels
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return pixels[top : top + crop_h, left : left + crop_w]


class Preprocess:
    """PIL image -> float32 array ``[3, H, W]``, as the backbone's transform gives it (see the module's doc)."""

    def __init__(self, steps: Sequence[dict[str, Any]]):
        self.steps = [dict(s) for s in steps]
        unknown = [s.get("op") for s in self.steps if s.get("op") not in _OPS]
        if unknown:
            raise PreprocessError(f"unknown preprocessing step {unknown[0]!r} (made by a newer fewvision?)")

    def __call__(self, image: Image.Image) -> np.ndarray:
        value: Any = image
        for step in self.steps:
            value = _OPS[step["op"]](value, step)
        return value

    def __repr__(self) -> str:
        return f"Preprocess({self.steps})"


def _as_array(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _rgb(value, step):
    return value.convert("RGB") if isinstance(value, Image.Image) else value


def _pil(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    raise PreprocessError("a resize step after the pixels were cropped to an array")


def _resize(value, step):
    image = _pil(value)
    height, width = _resized_size(image.height, image.width, step["size"], step.get("max_size"))
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), INTERPOLATIONS[step["interpolation"]])


def _resize_keep_ratio(value, step):
    image = _pil(value)
    height, width = _keep_ratio_size(image.height, image.width, step["size"], step["longest"])
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), INTERPOLATIONS[step["interpolation"]])


def _center_crop(value, step):
    pixels = _as_array(value)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return _crop_or_pad(pixels, step["size"], step.get("fill", 0))


def _to_array(value, step):
    pixels = _as_array(value)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.dtype != np.uint8:
        raise PreprocessError(f"to_array expects 8-bit pixels, got {pixels.dtype}")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


def _normalize(value, step):
    mean = np.asarray(step["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(step["std"], np.float32).reshape(-1, 1, 1)
    return (value - mean) / std


_OPS = {"rgb": _rgb, "resize": _resize, "resize_keep_ratio": _resize_keep_ratio, "center_crop": _center_crop,
        "to_array": _to_array, "normalize": _normalize}


def output_size(steps: Sequence[dict[str, Any]]) -> tuple[int, int] | None:
    """The (height, width) the steps produce, where the last crop or resize fixes it."""
    for step in reversed(steps):
        if step["op"] == "center_crop":
            return int(step["size"][0]), int(step["size"][1])
        if step["op"] == "resize" and not isinstance(step["size"], int):
            return int(step["size"][0]), int(step["size"][1])
    return None


__all__ = ["Preprocess", "PreprocessError", "steps_of", "output_size"]
