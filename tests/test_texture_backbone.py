"""Tests for the built-in, weight-free ``texture`` backbone."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from fewvision.backbones.base import Backbone, BackboneError
from fewvision.backbones.texture import TextureBackbone, TexturePreprocess

SIZE = 64  # small images keep the tests fast; 64 is a multiple of 2 * stride


@pytest.fixture(scope="module")
def bb() -> TextureBackbone:
    return TextureBackbone(image_size=SIZE)


def _noise_image(seed: int, size: int = 80, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img.convert(mode) if mode != "RGB" else img


def test_contract_attributes(bb):
    assert isinstance(bb, Backbone)
    assert bb.spec == "texture" and bb.name == "texture"
    assert bb.has_text is False
    assert bb.input_size == (SIZE, SIZE)
    assert bb.id.startswith("texture-")
    with pytest.raises(BackboneError):
        bb.encode_text(["a photo"])


def test_shapes_and_dtypes(bb):
    pixels = torch.stack([bb.preprocess(_noise_image(i)) for i in range(3)])
    assert pixels.shape == (3, 3, SIZE, SIZE) and pixels.dtype == torch.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    g = bb.forward_images(pixels)
    assert g.dim() == 2 and g.shape[0] == 3 and g.dtype == torch.float32
    assert torch.isfinite(g).all()
    p = bb.patch_features(pixels)
    assert p.shape == (3, bb.patch_dim, SIZE // bb.stride, SIZE // bb.stride) and p.dtype == torch.float32
    assert torch.isfinite(p).all()
    e = bb.encode_images(pixels)
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_default_grid_and_dims():
    bb = TextureBackbone()
    assert bb.input_size == (256, 256)
    pixels = torch.rand(1, 3, 256, 256)
    assert bb.patch_features(pixels).shape == (1, bb.patch_dim, 32, 32)
    assert bb.patch_dim <= 128


def test_deterministic(bb):
    pixels = torch.stack([bb.preprocess(_noise_image(7))])
    a, b = bb.forward_images(pixels), bb.forward_images(pixels.clone())
    assert torch.equal(a, b)
    assert torch.equal(bb.patch_features(pixels), bb.patch_features(pixels.clone()))
    assert torch.equal(TextureBackbone(image_size=SIZE).forward_images(pixels), a)
    # batch composition does not change an image's features
    other = torch.stack([bb.preprocess(_noise_image(8))])
    both = bb.forward_images(torch.cat([pixels, other]))
    assert torch.allclose(both[:1], a, atol=1e-5)


def test_different_images_differ(bb):
    a = bb.forward_images(bb.preprocess(_noise_image(1))[None])
    smooth = Image.new("RGB", (80, 80), (120, 120, 120))
    b = bb.forward_images(bb.preprocess(smooth)[None])
    assert not torch.allclose(a, b)


def test_id_stable_and_sensitive():
    base = TextureBackbone().id
    assert TextureBackbone().id == base
    assert TextureBackbone(image_size=224).id != base
    assert TextureBackbone(n_orientations=6).id != base
    assert TextureBackbone(hf_weight=1.0).id != base
    assert TextureBackbone(context=(5, 9)).id != base


def test_preprocess_picklable(bb):
    blob = pickle.dumps(bb.preprocess)
    pp = pickle.loads(blob)
    assert isinstance(pp, TexturePreprocess) and pp == bb.preprocess
    img = _noise_image(3)
    assert torch.equal(pp(img), bb.preprocess(img))


def test_grayscale_and_rgb_handling(bb):
    gray = _noise_image(5, mode="L")
    rgb = gray.convert("RGB")
    t_gray, t_rgb = bb.preprocess(gray), bb.preprocess(rgb)
    assert t_gray.shape == (3, SIZE, SIZE)
    assert torch.equal(t_gray, t_rgb)
    # a 1-channel tensor gives the same texture features as the equivalent gray RGB tensor
    one = t_rgb[:1][None]
    assert torch.allclose(bb.patch_features(one), bb.patch_features(t_rgb[None]), atol=1e-4)
    g1, g3 = bb.forward_images(one), bb.forward_images(t_rgb[None])
    assert torch.allclose(g1, g3, atol=1e-4)
    # colour changes the global descriptor (chroma statistics) of an otherwise identical texture
    arr = np.asarray(rgb).astype(np.int16)
    tinted = Image.fromarray(np.clip(arr + np.array([40, 0, -40]), 0, 255).astype(np.uint8))
    assert not torch.allclose(bb.forward_images(bb.preprocess(tinted)[None]), g3, atol=1e-3)
    with pytest.raises(BackboneError):
        bb.forward_images(torch.rand(1, 2, SIZE, SIZE))


def test_rejects_bad_parameters():
    with pytest.raises(BackboneError):
        TextureBackbone(image_size=100)


def _textile_paths(n: int):
    import conformal_clip_data as ccd  # a dev dependency: missing data is a failure, not a skip
    out = {}
    for name, d in (("nominal", ccd.nominal_dir()), ("local", ccd.local_dir()), ("global", ccd.global_dir())):
        files = sorted(f for f in os.listdir(d) if f.lower().endswith((".jpg", ".jpeg", ".png")))
        assert len(files) >= n, f"{d}: textile data set incomplete"
        out[name] = [os.path.join(d, f) for f in files[:n]]
    return out


def test_real_textiles_same_class_more_similar():
    paths = _textile_paths(20)
    bb = TextureBackbone()
    emb = {}
    for name, ps in paths.items():
        pixels = torch.stack([bb.preprocess(Image.open(p)) for p in ps])
        emb[name] = bb.encode_images(pixels)
    nom, glo = emb["nominal"], emb["global"]

    def mean_within(x):
        s = x @ x.T
        n = len(x)
        return (s.sum() - s.diagonal().sum()) / (n * (n - 1))

    across = (nom @ glo.T).mean()
    assert mean_within(nom) > across + 0.01
    assert mean_within(glo) > across + 0.01
    # nearest class prototype (built from the first 10) classifies the other 10 nominal/global images well
    protos = torch.nn.functional.normalize(torch.stack([nom[:10].mean(0), glo[:10].mean(0)]), dim=-1)
    pred_nom = (nom[10:] @ protos.T).argmax(1)
    pred_glo = (glo[10:] @ protos.T).argmax(1)
    assert (pred_nom == 0).float().mean() >= 0.8 and (pred_glo == 1).float().mean() >= 0.8


def test_real_textile_spot_raises_patch_distance():
    """A local (spot) defect image has a patch further from a small nominal bank than nominal images do."""
    paths = _textile_paths(12)
    bb = TextureBackbone()

    def feats(ps):
        pixels = torch.stack([bb.preprocess(Image.open(p)) for p in ps])
        f = bb.patch_features(pixels)
        return f.permute(0, 2, 3, 1).reshape(len(ps), -1, f.shape[1])

    bank = feats(paths["nominal"][:8]).reshape(-1, bb.patch_dim)

    def score(ps):
        return torch.stack([torch.cdist(x, bank).min(1).values.max() for x in feats(ps)])

    s_nom = score(paths["nominal"][8:12])
    s_loc = score(paths["local"][:4])
    assert s_loc.median() > s_nom.median()
