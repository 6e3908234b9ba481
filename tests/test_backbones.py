import numpy as np
import pytest
import torch
from PIL import Image

from fewvision.backbones import create_backbone, weights_location, with_weights
from fewvision.backbones.base import (
    BackboneError,
    WeightsUnavailable,
    pack_layers,
    unpack_layers,
)


@pytest.fixture
def hub_down(monkeypatch):
    # A closed port on loopback: the hub probe fails at once whatever network the machine has.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("spec", ["openclip:ViT-B-32/laion2b_s34b_b79k", "timm:resnet18", "hf:openai/clip-vit-base-patch32"])
def test_offline_failure_is_fast_and_explains_how_to_supply_weights(spec, hub_down, tmp_path, monkeypatch):
    # "Fast" means: only cache look-ups reach the hub client, never a download with its minute of retries.
    import huggingface_hub

    calls = []
    real = huggingface_hub.hf_hub_download

    def recording(*args, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recording)
    with pytest.raises(WeightsUnavailable) as err:
        create_backbone(spec, cache_dir=str(tmp_path))
    assert all(calls), "a network download was attempted"
    msg = str(err.value)
    assert "\n" not in msg
    assert spec in msg and "--weights PATH" in msg and "fewvision models pull" in msg and str(tmp_path) in msg


def test_hf_hub_offline_env_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE"):
        create_backbone("openclip:RN50/openai", cache_dir=str(tmp_path))


def test_local_weights_file_loads_and_id_follows_the_weights(tiny_clip, tiny_clip_config, tmp_path):
    image = Image.new("RGB", (40, 30), (120, 30, 200))
    pixels = tiny_clip.preprocess(image)[None]
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    loaded = create_backbone(f"openclip:{tiny_clip_config}@{path}")
    torch.testing.assert_close(loaded.encode_images(pixels), tiny_clip.encode_images(pixels))
    # --weights is the same as @PATH
    same = create_backbone(f"openclip:{tiny_clip_config}", weights=str(path))
    assert same.id == loaded.id

    state = tiny_clip.model.state_dict()
    state["visual.proj"] = state["visual.proj"] * 2
    other = tmp_path / "tiny2.pt"
    torch.save(state, other)
    assert create_backbone(f"openclip:{tiny_clip_config}@{other}").id != loaded.id


def test_random_init_is_deterministic(tiny_clip_config, tiny_clip):
    assert create_backbone(f"openclip:{tiny_clip_config}").id == tiny_clip.id


def test_backbone_contract(tiny_clip):
    pixels = torch.stack([tiny_clip.preprocess(Image.new("RGB", (64, 64), (i * 40, 0, 0))) for i in range(3)])
    feats = tiny_clip.encode_images(pixels)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    text = tiny_clip.encode_text(["a", "b"])
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert tiny_clip.patch_features(pixels).shape == (3, 64, 4, 4)


def test_spec_errors(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("nope:thing")
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        create_backbone("openclip:NotAModel/openai")
    with pytest.raises(BackboneError, match="not a pretrained tag"):
        create_backbone("openclip:ViT-B-32/not-a-tag")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(f"openclip:ViT-B-32@{tmp_path / 'missing.pt'}")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(BackboneError, match="bad.json"):
        create_backbone(f"openclip:{bad}")


def test_with_weights_and_locations(tmp_path):
    assert with_weights("openclip:ViT-B-32/openai", "/w.pt") == "openclip:ViT-B-32@/w.pt"
    assert with_weights("timm:resnet18", "/w.pt") == "timm:resnet18@/w.pt"
    assert with_weights("hf:org/model", "/dir") == "hf:/dir"
    loc = weights_location("openclip:ViT-B-32/laion2b_s34b_b79k", str(tmp_path))
    assert loc.startswith(str(tmp_path)) and "laion--CLIP-ViT-B-32-laion2B-s34B-b79K" in loc


def test_timm_random_patch_features():
    bb = create_backbone("timm:resnet18@random")
    pixels = torch.randn(2, 3, 224, 224)
    assert bb.encode_images(pixels).shape == (2, 512)
    maps = bb.patch_features(pixels)
    assert maps.shape[0] == 2 and maps.shape[1] == 128 + 256 and maps.shape[-1] == 28
    assert bb.patch_layout() == [(128, 28, 28), (256, 14, 14)]


def test_timm_layers_are_selectable_per_request():
    bb = create_backbone("timm:resnet18@random")
    pixels = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        expected = bb.model.forward_intermediates(pixels, indices=[1, 2, 3], intermediates_only=True, stop_early=True)
    assert bb.patch_layout([1, 2, 3]) == [(64, 56, 56), (128, 28, 28), (256, 14, 14)]
    layers = unpack_layers(bb.patch_features(pixels, layers=(1, 2, 3)), bb.patch_layout([1, 2, 3]))
    for got, want in zip(layers, expected):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert bb.patch_layout() == [(128, 28, 28), (256, 14, 14)]  # the default stages are unchanged
    with pytest.raises(BackboneError, match="layers must be increasing stage numbers in 0..4"):
        bb.patch_features(pixels, layers=(3, 7))


def test_anomaly_heads_take_their_papers_layers_on_a_cnn_and_none_elsewhere():
    from fewvision.anomaly.padim import PaDiM
    from fewvision.anomaly.patchcore import PatchCore

    cnn, texture = create_backbone("timm:resnet18@random"), create_backbone("texture")
    assert PaDiM().feature_layers(cnn) == [1, 2, 3] and PatchCore().feature_layers(cnn) == [2, 3]
    assert PaDiM(layers="2,3").feature_layers(cnn) == [2, 3]  # as --param layers=2,3 gives it
    assert PaDiM().feature_layers(texture) is None
    with pytest.raises(BackboneError, match="no selectable layers"):
        PaDiM(layers=[1, 2]).feature_layers(texture)


def test_timm_patch_features_are_the_unfused_stage_maps_packed_losslessly(monkeypatch):
    # The fused, channels-last FX graph must compute what the model's own forward_intermediates computes.
    bb = create_backbone("timm:resnet18@random")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = bb.model.forward_intermediates(pixels, indices=[2, 3], intermediates_only=True, stop_early=True)
    layers = unpack_layers(bb.patch_features(pixels), bb.patch_layout())
    assert [m.shape for m in layers] == [e.shape for e in expected]
    for got, want in zip(layers, expected):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # A model timm cannot trace falls back to forward_intermediates, with the same result.
    import timm.models

    def untraceable(*args, **kwargs):
        raise RuntimeError("not traceable")

    monkeypatch.setattr(timm.models, "FeatureGraphNet", untraceable)
    fallback = create_backbone("timm:resnet18@random")
    assert torch.allclose(fallback.patch_features(pixels), bb.patch_features(pixels), atol=1e-4, rtol=1e-4)


def test_timm_patch_features_of_files_match_the_backbone(tmp_path):
    from fewvision.features.encode import PATCH, encode_files

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(rng.integers(0, 255, (120, 128, 3), dtype=np.uint8)).save(paths[-1])
    bb = create_backbone("timm:resnet18@random")
    feats = encode_files(bb, paths, kind=PATCH, batch_size=4, workers=0, progress=False)
    assert feats.skipped == [] and feats.features.shape == (6, 384, 28, 28)
    pixels = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in paths[-2:]])
    assert np.allclose(feats.features[-2:], bb.patch_features(pixels).numpy(), atol=1e-5)


@pytest.mark.parametrize("fine, coarse", [(28, 14), (29, 15), (30, 7), (5, 5), (8, 3)])
def test_pack_layers_round_trips_exactly(fine, coarse):
    maps = [torch.randn(2, 3, fine, fine + 1), torch.randn(2, 4, coarse, coarse + 1)]
    packed = pack_layers(maps)
    assert packed.shape == (2, 7, fine, fine + 1)
    assert torch.equal(packed[:, :3], maps[0])
    back = unpack_layers(packed, [(3, fine, fine + 1), (4, coarse, coarse + 1)])
    assert all(torch.equal(a, b) for a, b in zip(back, maps))
    with pytest.raises(ValueError, match="channels"):
        unpack_layers(packed, [(3, fine, fine + 1), (5, coarse, coarse + 1)])
