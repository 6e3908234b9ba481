"""Images -> features, through the cache.

For a list of image files: hash each file, read what the cache already holds, decode and preprocess the rest in
parallel workers (torch DataLoader), encode them in batches under ``torch.inference_mode`` and write each batch to
the cache in one transaction. Files that cannot be read are skipped with their reason; the run goes on.
"""

from __future__ import annotations

import functools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..backbones.base import Backbone
from ..io.images import BadImage, Skipped, hash_files, load_image
from ..progress import progress_bar
from .cache import FeatureCache, NullCache

BASE_VIEW = "base"
GLOBAL = "global"
PATCH = "patch"
PRE_PROJECTION = "preproj"  # image features before CLIP's last visual projection (ProLIP)
# Feature kinds and the backbone method that computes each (the kind is part of the cache key). A patch kind may
# name the CNN stages it packs: "patch:1,2,3" (see patch_kind).
ENCODERS = {GLOBAL: "encode_images", PATCH: "patch_features", PRE_PROJECTION: "encode_pre_projection"}


def patch_kind(layers=None) -> str:
    """The feature kind of patch maps from the CNN stages ``layers`` (None: the backbone's own choice)."""
    return PATCH if not layers else f"{PATCH}:{','.join(str(int(v)) for v in layers)}"


def _encoder(backbone: Backbone, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    base, _, layers = kind.partition(":")
    if base not in ENCODERS or (layers and base != PATCH):
        raise ValueError(f"unknown feature kind '{kind}': expected one of {', '.join(ENCODERS)}")
    encode = getattr(backbone, ENCODERS[base])
    if layers:
        return functools.partial(encode, layers=tuple(int(v) for v in layers.split(",")))
    return encode


@dataclass
class Features:
    """Features of the images that could be read, in input order, and the files that could not."""

    paths: list[str]
    shas: list[str]
    features: np.ndarray  # [N, D] for global features, [N, C, h, w] for patch features
    skipped: list[Skipped] = field(default_factory=list)
    encoded: int = 0  # how many images went through the encoder (0 on a fully warm cache)

    @property
    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.features, dtype=np.float32))


class AugmentedView:
    """A seeded random view of an image (RandomResizedCrop scale 0.5-1, horizontal flip), the same every run.

    Applied to the PIL image before the backbone's own preprocessing, so preprocessing stays in one place.
    """

    def __init__(self, index: int, seed: int = 0, scale: tuple[float, float] = (0.5, 1.0)):
        self.index, self.seed, self.scale = index, seed, scale

    @property
    def id(self) -> str:
        return f"rrc{self.scale[0]}-{self.scale[1]}+hflip:s{self.seed}:{self.index}"

    def __call__(self, image: Image.Image, sha: str) -> Image.Image:
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import RandomResizedCrop

        rng = random.Random(f"{self.seed}:{self.index}:{sha}")
        state = torch.random.get_rng_state()
        torch.manual_seed(rng.getrandbits(63))
        try:
            top, left, h, w = RandomResizedCrop.get_params(image, scale=self.scale, ratio=(3 / 4, 4 / 3))
        finally:
            torch.random.set_rng_state(state)
        image = F.resized_crop(image, top, left, h, w, [image.height, image.width],
                               interpolation=F.InterpolationMode.BICUBIC)
        return F.horizontal_flip(image) if rng.random() < 0.5 else image


def preprocess_file(path: str, preprocess: Callable[[Image.Image], torch.Tensor], view: AugmentedView | None = None,
                    sha: str | None = None) -> tuple[torch.Tensor | None, str | None]:
    """(preprocessed tensor, None) for an image file, or (None, the reason it cannot be used): decode, the view if
    any, the backbone's preprocessing. Never raises for a bad file."""
    try:
        image = load_image(path)
        if view is not None:
            image = view(image, sha)
        return preprocess(image), None
    except BadImage as err:
        return None, err.reason
    except Exception as err:  # noqa: BLE001 - a transform failing on one odd image must not stop the batch
        return None, f"cannot preprocess ({type(err).__name__}: {err})"


def encode_pixels(backbone: Backbone, pixels: torch.Tensor, kind: str = GLOBAL,
                  dtype: np.dtype = np.float32) -> np.ndarray:
    """Features of ``kind`` for a preprocessed batch [N, C, H, W], as ``dtype`` (what the cache stores): the one
    encoding step of :func:`encode_files`, for callers that decode and preprocess elsewhere (``fewvision batch``)."""
    with torch.inference_mode():
        return _to_numpy(_encoder(backbone, kind)(pixels), dtype)


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths, shas, preprocess, view):
        self.paths, self.shas, self.preprocess, self.view = paths, shas, preprocess, view

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        tensor, reason = preprocess_file(self.paths[i], self.preprocess, self.view, self.shas[i])
        return i, tensor, reason


def _collate(items):
    return items


def default_workers() -> int:
    """Decoding workers: none on 1-2 cores, where a worker takes CPU the encoder needs (measured in
    benchmarks/classify_speed.py); otherwise half the cores, at most 4."""
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


def encode_files(
    backbone: Backbone,
    paths: Sequence[str | os.PathLike],
    cache: FeatureCache | NullCache | None = None,
    *,
    kind: str = GLOBAL,
    view: AugmentedView | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    description: str = "encoding",
    dtype: np.dtype = np.float32,
) -> Features:
    """Features of ``paths`` from ``backbone`` (``kind`` 'global' or 'patch'), reading and filling ``cache``."""
    cache = cache if cache is not None else NullCache()
    paths = [str(p) for p in paths]
    shas, bad = hash_files(paths)
    view_id = f"{kind}:{view.id if view is not None else BASE_VIEW}"
    readable = [i for i, s in enumerate(shas) if s is not None]
    cached = cache.get_many({(shas[i], view_id) for i in readable})
    by_index: dict[int, np.ndarray] = {}
    todo = []
    for i in readable:
        hit = cached.get((shas[i], view_id))
        if hit is not None:
            by_index[i] = hit
        else:
            todo.append(i)

    _encoder(backbone, kind)  # an unknown kind is refused before any file is decoded
    with progress_bar(len(paths), description, enabled=progress) as advance:
        advance(len(paths) - len(todo))  # cached or unreadable: done already
        if todo:
            dataset = _DecodeDataset([paths[i] for i in todo], [shas[i] for i in todo], backbone.preprocess, view)
            n_workers = default_workers() if workers is None else workers
            n_workers = 0 if len(todo) < 2 * batch_size else n_workers
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, num_workers=n_workers, collate_fn=_collate,
                persistent_workers=False, prefetch_factor=4 if n_workers else None,
            )
            for items in loader:
                good = [(j, t) for j, t, err in items if err is None]
                for j, _, err in items:
                    if err is not None:
                        bad[todo[j]] = err
                if good:
                    out = encode_pixels(backbone, torch.stack([t for _, t in good]), kind, dtype)
                    new = {}
                    for (j, _), vec in zip(good, out):
                        by_index[todo[j]] = vec
                        new[(shas[todo[j]], view_id)] = vec
                    cache.put_many(new)
                advance(len(items))

    order = [i for i in range(len(paths)) if i in by_index]
    skipped = [Skipped(paths[i], bad[i]) for i in sorted(bad)]
    if order:
        feats = _to_numpy(torch.from_numpy(np.stack([by_index[i] for i in order])), np.float32)
    else:
        feats = np.zeros((0, 0), dtype=np.float32)
    return Features(
        paths=[paths[i] for i in order],
        shas=[shas[i] for i in order],
        features=feats,
        skipped=skipped,
        encoded=sum(1 for i in todo if i in by_index),
    )


def _to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    # torch converts float32 <-> float16 with vector instructions, numpy's astype does not (measured 10x on CPU)
    return t.to(torch.from_numpy(np.zeros(0, dtype=dtype)).dtype).cpu().numpy()


def encode_images_in_memory(backbone: Backbone, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """Encode PIL images (no cache): used by the service and by tests."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([backbone.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]])
        out.append(backbone.encode_images(batch))
    return torch.cat(out) if out else torch.zeros(0, 0)


def as_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    return [Path(p) for p in paths]
