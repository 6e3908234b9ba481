import numpy as np
import pytest
import torch
from model_checks import tensor_layouts

from fewvision.heads import PrototypeHead, ZeroShotHead
from fewvision.prompts import ClassSpec
from fewvision.heads.support import Support
from fewvision.modelfile import (
    FewVisionModel,
    ModelFileError,
    load,
    read_metadata,
    save_model,
)


def _support(seed=0, n=30, d=32, c=3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = torch.arange(n) % c
    return feats, labels


def test_prototype_save_load_identical(tmp_path, tiny_clip):
    feats, labels = _support()
    head = PrototypeHead().fit(Support(feats, labels, ["a", "b", "c"]))
    path = save_model(tmp_path / "m.fvm", FewVisionModel(head, tiny_clip.spec, tiny_clip.id, _backbone=tiny_clip))
    loaded = load(path)
    assert loaded.class_names == ["a", "b", "c"]
    np.testing.assert_array_equal(loaded.head.predict_proba(feats), head.predict_proba(feats))
    assert tensor_layouts(loaded.head) == tensor_layouts(head)
    meta = read_metadata(path)
    assert meta["backbone"]["id"] == tiny_clip.id and meta["head"]["method"] == "prototype"
    assert open(path, "rb").read(8) != b"\x80\x04\x95"  # not a pickle


def test_zeroshot_save_load_keeps_class_specs(tmp_path, tiny_clip):
    specs = [ClassSpec("ok", descriptions=["clean"]), ClassSpec("scratch", synonyms=["scuff"])]
    head = ZeroShotHead(specs, ["simple"]).fit(Support.text_only([], tiny_clip))
    path = save_model(tmp_path / "z.fvm", FewVisionModel(head, tiny_clip.spec, tiny_clip.id))
    loaded = load(path)
    feats, _ = _support(d=32)
    np.testing.assert_array_equal(loaded.head.predict_proba(feats), head.predict_proba(feats))
    assert tensor_layouts(loaded.head) == tensor_layouts(head)
    assert loaded.head.classes_[1].synonyms == ["scuff"]


def test_backbone_mismatch_is_refused(tmp_path, tiny_clip):
    from fewvision.backbones import create_backbone

    feats, labels = _support(d=512)
    head = PrototypeHead().fit(Support(feats, labels, ["a", "b", "c"]))
    path = save_model(tmp_path / "m.fvm", FewVisionModel(head, "timm:resnet18@random", "timm-deadbeef"))
    model = load(path)
    with pytest.raises(ModelFileError, match="different weights or preprocessing"):
        model.bind(create_backbone("timm:resnet18@random"))


def test_not_a_model_file(tmp_path):
    p = tmp_path / "x.fvm"
    p.write_bytes(b"hello")
    with pytest.raises(ModelFileError, match="x.fvm"):
        load(p)
    with pytest.raises(ModelFileError, match="no such model file"):
        load(tmp_path / "missing.fvm")
