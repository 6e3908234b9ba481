import json

import numpy as np
import pytest
import torch
from model_checks import tensor_layouts
from PIL import Image

from fewvision.features.encode import encode_files
from fewvision.heads import ZeroShotHead, create_head
from fewvision.heads.prolip import ProLIPHead, fit_projection
from fewvision.heads.support import Support
from fewvision.modelfile import FewVisionModel, load, save_model

TEMPLATES = ["a photo of {}.", "a close-up photo of {}."]
TINY_RESNET = {
    # ModifiedResNet: feature width = 32 * width, attention-pool heads = 32 * width / head_width, grid = image_size / 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    from fewvision.backbones import create_backbone

    path = tmp_path_factory.mktemp("configs") / "tiny-rn.json"
    path.write_text(json.dumps(TINY_RESNET))
    return create_backbone(f"openclip:{path}")


def _support(backbone, textile_split):
    names, paths, labels, _ = textile_split
    return Support.from_files(backbone, paths, labels, names)


def _test_features(backbone, textile_split, kind):
    return encode_files(backbone, textile_split[3], kind=kind, progress=False).tensor


def _zero_shot_proba(backbone, textile_split):
    head = ZeroShotHead(templates=TEMPLATES).fit(_support(backbone, textile_split))
    return head.predict_proba(_test_features(backbone, textile_split, "global"))


@pytest.mark.parametrize("backbone_name", ["tiny_clip", "tiny_resnet"])
def test_pre_projection_features_times_projection_give_the_embedding(backbone_name, request):
    backbone = request.getfixturevalue(backbone_name)
    pixels = torch.randn(3, 3, 64, 64)
    weight, bias = backbone.visual_projection()
    pre = backbone.encode_pre_projection(pixels)
    assert pre.shape[1] == weight.shape[0] != weight.shape[1]
    torch.testing.assert_close(pre @ weight + bias, backbone.forward_images(pixels).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone_name", ["tiny_clip", "tiny_resnet"])
def test_no_steps_or_huge_lambda_is_zero_shot(backbone_name, request, textile_split):
    backbone = request.getfixturevalue(backbone_name)
    support = _support(backbone, textile_split)
    expected = _zero_shot_proba(backbone, textile_split)
    pre = _test_features(backbone, textile_split, "preproj")
    assert expected.std() > 1e-3  # the random model's zero-shot predictions are not all alike
    # Adam is blind to the loss scale, so a huge lambda keeps W within ~lr of W0 while training and the cosine
    # schedule (lr -> 0) brings it back: the paper's 300 steps and lr end at zero-shot
    for params in ({"steps": 0}, {"regularization": 1e6, "n_views": 2}):
        proba = ProLIPHead(templates=TEMPLATES, **params).fit(support).predict_proba(pre)
        np.testing.assert_allclose(proba, expected, atol=1e-5)
        assert (proba.argmax(1) == expected.argmax(1)).all()
    # the comparison can fail: without the regulariser the same training moves the predictions
    free = ProLIPHead(templates=TEMPLATES, regularization=0.0, n_views=2).fit(support)
    assert np.abs(free.predict_proba(pre) - expected).max() > 1e-3


def test_fit_trains_only_the_projection_and_loss_decreases(tiny_clip, textile_split):
    before = {k: v.clone() for k, v in tiny_clip.model.state_dict().items()}
    weight0, bias0 = tiny_clip.visual_projection()
    head = create_head("prolip", templates=TEMPLATES, steps=20, n_views=3, lr=1e-3)
    head.fit(_support(tiny_clip, textile_split))
    after = tiny_clip.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert head.projection_.shape == weight0.shape and not torch.equal(head.projection_, weight0)
    assert torch.equal(head.bias_, bias0)
    assert head.n_trainable_parameters() == weight0.numel()
    assert head.regularization_ == pytest.approx(1 / 4)  # lambda = 1/N with 4 shots
    assert len(head.losses_) == 20 and head.losses_[-1] < head.losses_[0]


def test_training_loop_cycles_views_and_lowers_loss():
    torch.manual_seed(0)
    views = torch.randn(1, 40, 24) + 0.1 * torch.randn(3, 40, 24)  # three "augmented views" of 40 images
    labels = torch.arange(4).repeat_interleave(10)
    weight0 = torch.randn(24, 8)
    text = torch.nn.functional.normalize(torch.randn(8, 4), dim=0)
    weight, losses = fit_projection(views, labels, weight0, torch.zeros(8), text, 10.0, 0.01, steps=30, lr=0.1)
    assert losses[-1] < 0.5 * losses[0]
    # the loss at step t is on view t mod 3: the first step's is recomputable from view 0 and W0
    first = torch.nn.functional.cross_entropy(
        10 * torch.nn.functional.normalize(views[0] @ weight0, dim=-1) @ text, labels)
    assert losses[0] == pytest.approx(first.item(), rel=1e-5)
    assert not torch.equal(weight, weight0)


def test_save_load_gives_identical_probabilities(tiny_clip, textile_split, tmp_path):
    head = ProLIPHead(templates=TEMPLATES, steps=10, n_views=2, lr=1e-3).fit(_support(tiny_clip, textile_split))
    pre = _test_features(tiny_clip, textile_split, "preproj")
    path = save_model(tmp_path / "m.fvm", FewVisionModel(head, tiny_clip.spec, tiny_clip.id))
    loaded = load(path).head
    assert isinstance(loaded, ProLIPHead) and loaded.feature_kind == "preproj"
    np.testing.assert_array_equal(loaded.predict_proba(pre), head.predict_proba(pre))
    assert tensor_layouts(loaded) == tensor_layouts(head)


def test_logits_reject_post_projection_features(tiny_clip, textile_split):
    head = ProLIPHead(templates=TEMPLATES, steps=0).fit(_support(tiny_clip, textile_split))
    with pytest.raises(ValueError, match="preproj"):
        head.predict_proba(_test_features(tiny_clip, textile_split, "global"))


def test_test_time_variant(tiny_clip, textile_split):
    names, *_, test_paths = textile_split
    images = [Image.open(p).convert("RGB") for p in test_paths[:2]]
    zero_shot = ProLIPHead(templates=TEMPLATES, steps=0).fit(Support.text_only(names, tiny_clip))
    plain = zero_shot.predict_proba_images(tiny_clip, images)
    np.testing.assert_allclose(plain, _zero_shot_proba(tiny_clip, textile_split)[:2], atol=1e-5)
    params = dict(templates=TEMPLATES, steps=0, test_time=True, tta_views=16)
    frozen = ProLIPHead(**params, tta_lr=0.0).fit(Support.text_only(names, tiny_clip))
    np.testing.assert_allclose(frozen.predict_proba_images(tiny_clip, images), plain, atol=1e-6)
    tuned_head = ProLIPHead(**params, tta_lr=1e-2).fit(Support.text_only(names, tiny_clip))
    assert tuned_head.feature_kind == "images" and zero_shot.feature_kind == "preproj"
    tuned = tuned_head.predict_proba_images(tiny_clip, images)
    assert np.abs(tuned - plain).max() > 1e-4
    np.testing.assert_allclose(tuned.sum(1), 1.0, atol=1e-5)
    # W is reset after each image: the same image gives the same answer alone or in a batch
    np.testing.assert_allclose(tuned_head.predict_proba_images(tiny_clip, images[1:]), tuned[1:], atol=1e-6)
