"""open_clip backbones: complete identity (activation, feature-code version, tag found from a copied hub cache),
preprocessing built without the model, and weights loaded only when something needs them."""

import json
import shutil

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fewvision.backbones import create_backbone
from fewvision.backbones import openclip as oc
from fewvision.io.paths import weights_dir
from fewvision.tasks.zeroshot import classify

TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["nominal", "local", "global"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_clip_config):
    """A weight file for the tiny config (its seeded random initialisation) and the config's model name."""
    bb = create_backbone(f"openclip:{tiny_clip_config}")
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return path


def _image(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))


@pytest.mark.parametrize("tag_cfg", [None, {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                            "interpolation": "bilinear", "resize_mode": "squash"}])
@pytest.mark.parametrize("config", ["vit", "resnet"])
def test_preprocessing_built_without_the_model_is_open_clips(tmp_path, tiny_clip_config, config, tag_cfg):
    path = tiny_clip_config
    if config == "resnet":
        path = tmp_path / "tiny-resnet.json"
        path.write_text(json.dumps(TINY_RESNET))
    name = oc._register_config(str(path))
    ours, _ = oc.preprocess_for(name, tag_cfg)
    forced = {f"image_{k}": v for k, v in (tag_cfg or {}).items()}
    _, _, theirs = open_clip.create_model_and_transforms(name, **forced)
    assert repr(ours) == repr(theirs)
    assert torch.equal(ours(_image()), theirs(_image()))


def test_a_fully_cached_run_never_builds_the_model(tmp_path, tiny_clip_config, tiny_weights, textile_subset):
    spec = f"openclip:{tiny_clip_config}@{tiny_weights}"
    first = create_backbone(spec)
    assert first._model is None  # creating a backbone reads no weights
    cold = classify([textile_subset], CLASSES, backbone=first, templates=["simple"], cache_dir=str(tmp_path))
    assert first._model is not None and cold.encoded == 36
    second = create_backbone(spec)
    warm = classify([textile_subset], CLASSES, backbone=second, templates=["simple"], cache_dir=str(tmp_path))
    assert warm.encoded == 0 and second._model is None
    assert second.id == first.id
    assert [r["probabilities"] for r in warm.rows] == [r["probabilities"] for r in cold.rows]


@pytest.fixture
def openai_style_tag(monkeypatch, tiny_clip_config, tiny_weights):
    """A pretrained tag 'testopenai' of the tiny model, QuickGELU like OpenAI's, with its file in the hub cache."""
    name = oc._register_config(str(tiny_clip_config))
    cfg = open_clip.pretrained._pcfg(hf_hub="test-org/tiny-openai/", quick_gelu=True)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"testopenai": cfg})
    repo = weights_dir() / "models--test-org--tiny-openai"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_weights, snapshot / "open_clip_model.safetensors")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot / "open_clip_model.safetensors"


def test_the_same_weights_by_tag_and_by_path_give_one_identity(tmp_path, tiny_clip_config, openai_style_tag):
    by_tag = create_backbone(f"openclip:{tiny_clip_config}/testopenai")
    by_path = create_backbone(f"openclip:{tiny_clip_config}@{openai_style_tag}")
    assert by_tag.quick_gelu and by_path.quick_gelu
    assert by_tag.id == by_path.id
    pixels = by_tag.preprocess(_image())[None]
    assert torch.equal(by_tag.encode_images(pixels), by_path.encode_images(pixels))
    # The same bytes copied out of the hub cache carry no tag: plain GELU, another id, other features.
    elsewhere = tmp_path / "renamed.safetensors"
    shutil.copy(openai_style_tag, elsewhere)
    plain = create_backbone(f"openclip:{tiny_clip_config}@{elsewhere}")
    assert not plain.quick_gelu and plain.id != by_tag.id
    assert not torch.allclose(plain.encode_images(pixels), by_tag.encode_images(pixels), atol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_torchscript_checkpoint_is_recognised_as_openai(tmp_path, tiny_weights):
    scripted = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    assert oc.is_torchscript_archive(scripted)
    assert not oc.is_torchscript_archive(tiny_weights)


def test_the_feature_code_version_is_part_of_the_id(monkeypatch, tiny_clip_config, tiny_weights):
    spec = f"openclip:{tiny_clip_config}@{tiny_weights}"
    before = create_backbone(spec).id
    monkeypatch.setattr(oc, "FEATURE_VERSION", oc.FEATURE_VERSION + 1)
    assert create_backbone(spec).id != before
