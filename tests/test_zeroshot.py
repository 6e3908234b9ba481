import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from fewvision.decide.review import REVIEW, apply_unknown_threshold
from fewvision.heads import ZeroShotHead
from fewvision.prompts import (
    ClassSpec,
    PromptError,
    load_class_file,
    resolve_templates,
)
from fewvision.heads.support import Support

CLASSES = ["ok", "scratch", "dent", "stain"]


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((50 + 7 * i, 70, 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.mark.parametrize("template_set", ["openai", "simple"])
def test_matches_open_clip_zero_shot_classifier(tiny_clip, template_set):
    pixels = torch.stack([tiny_clip.preprocess(im) for im in _images()])
    feats = tiny_clip.encode_images(pixels)
    head = ZeroShotHead(CLASSES, [template_set]).fit(Support.text_only([], tiny_clip))
    ours = head.predict_proba(feats)

    templates = open_clip.OPENAI_IMAGENET_TEMPLATES if template_set == "openai" else open_clip.SIMPLE_IMAGENET_TEMPLATES
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(tiny_clip.model, tiny_clip.tokenizer, CLASSES, templates)
        image = tiny_clip.model.encode_image(pixels, normalize=True)
        ref = (tiny_clip.model.logit_scale.exp() * image @ weights).softmax(dim=-1).numpy()
    assert ours.shape == (6, 4)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert (ours.argmax(1) == ref.argmax(1)).all()
    # the random tiny model must not make every probability equal, or this test would prove little
    assert ours.std() > 1e-3


def test_class_embedding_is_normalised_mean_of_normalised_prompts(tiny_clip):
    spec = ClassSpec("scratch", synonyms=["scuff"], descriptions=["a thin bright line"])
    head = ZeroShotHead([spec, ClassSpec("ok")], ["a photo of {}."]).fit(Support.text_only([], tiny_clip))
    prompts = ["a photo of scratch.", "a photo of scuff.", "a thin bright line"]
    emb = tiny_clip.encode_text(prompts)
    expected = torch.nn.functional.normalize(emb.mean(0), dim=0)
    torch.testing.assert_close(head.weights_[:, 0], expected)
    assert head.class_names_ == ["scratch", "ok"]


def test_templates_resolve_sets_and_literals():
    assert len(resolve_templates(["openai"])) == 80
    assert resolve_templates(["a {c} on steel", "close-up of {}"]) == ["a {} on steel", "close-up of {}"]
    assert len(resolve_templates(None)) >= 5  # the industrial default
    with pytest.raises(PromptError, match="no-placeholder"):
        resolve_templates(["no-placeholder"])


def test_class_file_yaml_and_json(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("classes:\n  ok: a clean surface\n  scratch:\n    synonyms: [scuff]\n    descriptions: [a line]\n")
    specs = load_class_file(y)
    assert [s.name for s in specs] == ["ok", "scratch"]
    assert specs[0].descriptions == ["a clean surface"] and specs[1].synonyms == ["scuff"]
    j = tmp_path / "c.json"
    j.write_text('[{"name": "a", "synonyms": ["x"]}, "b"]')
    assert [s.name for s in load_class_file(j)] == ["a", "b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [a, a]\n")
    with pytest.raises(PromptError, match="duplicate"):
        load_class_file(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PromptError, match="broken.json"):
        load_class_file(broken)


def test_unknown_threshold():
    proba = np.array([[0.9, 0.1], [0.55, 0.45]])
    assert apply_unknown_threshold(proba, ["a", "b"], None) == ["a", "a"]
    assert apply_unknown_threshold(proba, ["a", "b"], 0.6) == ["a", REVIEW]
    with pytest.raises(ValueError):
        apply_unknown_threshold(proba, ["a", "b"], 1.5)


def test_no_text_tower_is_a_clear_error():
    from fewvision.backbones import create_backbone
    from fewvision.backbones.base import BackboneError

    bb = create_backbone("timm:resnet18@random")
    with pytest.raises(BackboneError, match="no text tower"):
        ZeroShotHead(["a", "b"]).fit(Support.text_only([], bb))
