"""encode_files with a tiny deterministic backbone: order, skips, a warm cache that runs no encoder at all."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewvision.backbones.base import Backbone, make_id
from fewvision.features.cache import FeatureCache, NullCache
from fewvision.features.encode import AugmentedView, Features, encode_files

SIZE = 16
DIM = 8


class Resize16ToTensor:
    """Top-level (so picklable for DataLoader workers): PIL RGB -> float tensor [3, 16, 16] in [0, 1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
        arr = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class TinyBackbone(Backbone):
    """flatten + a fixed, seeded linear map; counts forward calls and the images they saw."""

    def __init__(self, seed: int = 0):
        self.spec = f"tiny:{seed}"
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(3 * SIZE * SIZE, DIM, generator=gen)
        self.calls = 0
        self.images_seen = 0
        self._preprocess = Resize16ToTensor()
        self._id = make_id("tiny", f"seed{seed}", "resize16+totensor")

    @property
    def preprocess(self):
        return self._preprocess

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images_seen += pixels.shape[0]
        return pixels.flatten(1) @ self.weight

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.images_seen += pixels.shape[0]
        return torch.nn.functional.avg_pool2d(pixels, 4)  # [B, 3, 4, 4]

    @property
    def input_size(self):
        return (SIZE, SIZE)


def _expected(backbone: TinyBackbone, path: Path) -> np.ndarray:
    """What the encoder must produce for one file, computed here without encode_files."""
    from fewvision.io.images import load_image

    x = Resize16ToTensor()(load_image(path))[None]
    feats = x.flatten(1) @ backbone.weight
    return torch.nn.functional.normalize(feats, dim=-1)[0].numpy()


def _make_images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(123)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
        p = root / f"img_{i:02d}.png"
        Image.fromarray(arr, mode="RGB").save(p)
        paths.append(p)
    return paths


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    return _make_images(tmp_path / "imgs", 7)


@pytest.fixture()
def bad_files(tmp_path) -> dict[str, Path]:
    d = tmp_path / "bad"
    d.mkdir()
    empty = d / "empty.jpg"
    empty.write_bytes(b"")
    text = d / "text.png"
    text.write_text("not an image")
    return {"empty": empty, "text": text, "missing": d / "missing.png"}


def _cache(tmp_path, backbone) -> FeatureCache:
    return FeatureCache(backbone.id, root=tmp_path / "cache")


def test_features_in_input_order(tmp_path, images):
    bb = TinyBackbone()
    order = [images[3], images[0], images[6], images[1], images[5], images[2], images[4]]
    out = encode_files(bb, order, _cache(tmp_path, bb), batch_size=3, workers=0, progress=False)
    assert isinstance(out, Features)
    assert out.paths == [str(p) for p in order]
    assert out.features.shape == (7, DIM) and out.features.dtype == np.float32
    assert out.skipped == []
    assert out.encoded == 7
    assert bb.images_seen == 7 and bb.calls == 3  # batches of 3, 3, 1
    assert len(set(out.shas)) == 7 and all(len(s) == 64 for s in out.shas)
    for p, row in zip(order, out.features):
        np.testing.assert_allclose(row, _expected(bb, p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out.features, axis=1), 1.0, rtol=1e-5)
    assert out.tensor.shape == (7, DIM) and out.tensor.dtype == torch.float32


def test_bad_files_are_skipped_with_reasons(tmp_path, images, bad_files):
    bb = TinyBackbone()
    mixed = [bad_files["empty"], images[0], bad_files["text"], images[1], bad_files["missing"], images[2]]
    out = encode_files(bb, mixed, _cache(tmp_path, bb), batch_size=4, workers=0, progress=False)
    assert out.paths == [str(images[0]), str(images[1]), str(images[2])]
    assert out.features.shape == (3, DIM)
    assert out.encoded == 3
    reasons = {s.path: s.reason for s in out.skipped}
    assert [s.path for s in out.skipped] == [str(bad_files[k]) for k in ("empty", "text", "missing")]
    assert "empty" in reasons[str(bad_files["empty"])]
    assert "not an image" in reasons[str(bad_files["text"])]
    assert "cannot read" in reasons[str(bad_files["missing"])]
    assert all("\n" not in r for r in reasons.values())
    for p, row in zip(images[:3], out.features):
        np.testing.assert_allclose(row, _expected(bb, p), rtol=1e-5, atol=1e-6)

    # a second run: good files come from the cache, the bad ones are reported again, not cached
    calls = bb.calls
    again = encode_files(bb, mixed, _cache(tmp_path, bb), batch_size=4, workers=0, progress=False)
    assert again.encoded == 0 and bb.calls == calls
    assert again.paths == out.paths
    assert [(s.path, s.reason) for s in again.skipped] == [(s.path, s.reason) for s in out.skipped]
    np.testing.assert_array_equal(again.features, out.features)


def test_all_files_bad(tmp_path, bad_files):
    bb = TinyBackbone()
    out = encode_files(bb, list(bad_files.values()), _cache(tmp_path, bb), workers=0, progress=False)
    assert out.paths == [] and out.encoded == 0 and bb.calls == 0
    assert len(out.skipped) == 3
    assert out.features.shape[0] == 0


def test_warm_cache_runs_no_encoder(tmp_path, images):
    bb = TinyBackbone()
    cache = _cache(tmp_path, bb)
    first = encode_files(bb, images, cache, batch_size=2, workers=0, progress=False)
    assert first.encoded == len(images) and bb.calls > 0
    calls, seen = bb.calls, bb.images_seen

    # same cache object, then a fresh FeatureCache on the same file (a new process would do that)
    for c in (cache, _cache(tmp_path, bb)):
        second = encode_files(bb, images, c, batch_size=2, workers=0, progress=False)
        assert second.encoded == 0
        assert bb.calls == calls and bb.images_seen == seen
        assert second.paths == first.paths and second.shas == first.shas
        assert second.features.dtype == np.float32
        np.testing.assert_array_equal(second.features, first.features)

    # a subset in another order is served from the cache too
    sub = encode_files(bb, [images[4], images[1]], cache, workers=0, progress=False)
    assert sub.encoded == 0 and bb.calls == calls
    np.testing.assert_array_equal(sub.features, first.features[[4, 1]])


def test_partially_warm_cache_encodes_only_new_files(tmp_path, images):
    bb = TinyBackbone()
    cache = _cache(tmp_path, bb)
    encode_files(bb, images[:4], cache, workers=0, progress=False)
    seen = bb.images_seen
    out = encode_files(bb, images, cache, workers=0, progress=False)
    assert out.encoded == 3 and bb.images_seen == seen + 3
    assert out.paths == [str(p) for p in images]
    for p, row in zip(images, out.features):
        np.testing.assert_allclose(row, _expected(bb, p), rtol=1e-5, atol=1e-6)


def test_renamed_copy_hits_the_cache(tmp_path, images):
    bb = TinyBackbone()
    cache = _cache(tmp_path, bb)
    first = encode_files(bb, images[:2], cache, workers=0, progress=False)
    calls = bb.calls
    other = tmp_path / "elsewhere" / "renamed copy.png"
    other.parent.mkdir()
    shutil.copyfile(images[1], other)
    out = encode_files(bb, [other], cache, workers=0, progress=False)
    assert out.encoded == 0 and bb.calls == calls
    assert out.paths == [str(other)]
    assert out.shas == [first.shas[1]]
    np.testing.assert_array_equal(out.features[0], first.features[1])

    # the same name with different bytes is a different image: encoded, not served from the cache
    changed = tmp_path / "elsewhere" / "img_00.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(changed)
    out2 = encode_files(bb, [changed], cache, workers=0, progress=False)
    assert out2.encoded == 1 and bb.calls == calls + 1


def test_workers_0_and_2_give_identical_results(tmp_path, bad_files):
    paths = _make_images(tmp_path / "many", 12)
    mixed = paths[:5] + [bad_files["text"]] + paths[5:] + [bad_files["empty"]]
    results = []
    for workers in (0, 2):
        bb = TinyBackbone()
        # batch_size 2 with 14 files: enough that encode_files really starts the 2 workers
        out = encode_files(bb, mixed, FeatureCache(bb.id, root=tmp_path / f"cache{workers}"), batch_size=2,
                           workers=workers, progress=False)
        assert out.encoded == 12 and bb.images_seen == 12
        results.append(out)
    a, b = results
    assert a.paths == b.paths == [str(p) for p in paths]
    assert a.shas == b.shas
    np.testing.assert_array_equal(a.features, b.features)
    assert [(s.path, s.reason) for s in a.skipped] == [(s.path, s.reason) for s in b.skipped]
    assert len(a.skipped) == 2


def test_no_cache_and_null_cache_always_encode(tmp_path, images):
    bb = TinyBackbone()
    a = encode_files(bb, images[:3], None, workers=0, progress=False)
    b = encode_files(bb, images[:3], NullCache(), workers=0, progress=False)
    assert a.encoded == b.encoded == 3
    np.testing.assert_array_equal(a.features, b.features)


def test_empty_list(tmp_path):
    bb = TinyBackbone()
    for cache in (_cache(tmp_path, bb), None):
        out = encode_files(bb, [], cache, workers=2, progress=False)
        assert out.paths == [] and out.shas == [] and out.skipped == []
        assert out.encoded == 0 and bb.calls == 0
        assert out.features.shape[0] == 0


def test_patch_kind_and_views_are_cached_separately(tmp_path, images):
    bb = TinyBackbone()
    cache = _cache(tmp_path, bb)
    glob = encode_files(bb, images[:3], cache, workers=0, progress=False)
    patch = encode_files(bb, images[:3], cache, kind="patch", workers=0, progress=False)
    assert patch.encoded == 3  # a global entry does not answer a patch request
    assert patch.features.shape == (3, 3, 4, 4)
    view = AugmentedView(0, seed=1)
    aug = encode_files(bb, images[:3], cache, view=view, workers=0, progress=False)
    assert aug.encoded == 3
    assert not np.array_equal(aug.features, glob.features)

    calls = bb.calls
    again_patch = encode_files(bb, images[:3], cache, kind="patch", workers=0, progress=False)
    again_aug = encode_files(bb, images[:3], cache, view=AugmentedView(0, seed=1), workers=0, progress=False)
    assert again_patch.encoded == again_aug.encoded == 0 and bb.calls == calls
    np.testing.assert_array_equal(again_patch.features, patch.features)
    np.testing.assert_array_equal(again_aug.features, aug.features)


def test_float16_storage(tmp_path, images):
    bb = TinyBackbone()
    cache = _cache(tmp_path, bb)
    first = encode_files(bb, images[:3], cache, dtype=np.float16, workers=0, progress=False)
    second = encode_files(bb, images[:3], cache, dtype=np.float16, workers=0, progress=False)
    assert second.encoded == 0
    assert first.features.dtype == second.features.dtype == np.float32  # always handed back as float32
    np.testing.assert_array_equal(first.features, second.features)
    stored = cache.get_many([(first.shas[0], "global:base")])
    assert next(iter(stored.values())).dtype == np.float16
