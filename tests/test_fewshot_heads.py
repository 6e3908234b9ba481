import numpy as np
import pytest
import torch
from model_checks import tensor_layouts

from fewvision.backbones.base import BackboneError
from fewvision.heads import create_head, head_names
from fewvision.heads.clip_adapter import ClipAdapterHead
from fewvision.heads.linear import LinearHead
from fewvision.heads.prototype import PrototypeHead
from fewvision.heads.support import Support
from fewvision.heads.tip import TipAdapterFHead, TipAdapterHead
from fewvision.heads.zeroshot import ZeroShotHead

CLASSES = ["nominal", "local", "global"]
# Short training for the end-to-end save/load loop; defaults are exercised on synthetic features below.
FAST = {"prolip": {"n_views": 2, "steps": 5}, "clip-adapter": {"epochs": 5}, "coop": {"steps": 3}, "lora": {"steps": 3},
        "bottleneck-adapter": {"steps": 3}, "deep-prompt": {"steps": 3, "vision": "maple"},
        "tip-f": {"epochs": 3, "n_views": 2}, "tip": {"n_views": 2}, "protonet": {"episodes": 20}, "relationnet": {"episodes": 20},
        "maml": {"episodes": 20}, "contrastive": {"steps": 3},
        "gcpl": {"steps": 2, "n_samples": (4,), "to_keep": (1,)},
        "comple": {"steps": 2, "n_samples": (4,), "to_keep": (1,)}}


def _features(n=60, d=32, c=3, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g)
    labels = torch.arange(n) % c
    return torch.nn.functional.normalize(centres[labels] + noise * torch.randn(n, d, generator=g), dim=-1), labels


def _zeroshot(tiny_clip):
    return ZeroShotHead().fit(Support(None, None, CLASSES, tiny_clip))


def test_tip_with_alpha_zero_equals_zeroshot(tiny_clip):
    feats, labels = _features()
    tip = TipAdapterHead(alpha=0.0, n_views=0).fit(Support(feats, labels, CLASSES, tiny_clip))
    assert torch.equal(tip.logits(feats), _zeroshot(tiny_clip).logits(feats))
    # With alpha 1 and beta 5.5 the cache adds sum_k exp(-5.5 (1 - f.F_k)) per class.
    tip1 = TipAdapterHead(alpha=1.0, beta=5.5, n_views=0).fit(Support(feats, labels, CLASSES, tiny_clip))
    cache = torch.stack([torch.exp(-5.5 * (1 - feats @ feats[labels == c].T)).sum(1) for c in range(3)], 1)
    torch.testing.assert_close(tip1.logits(feats) - tip.logits(feats), cache)
    assert tip1.n_trainable_parameters() == 0


def test_prototype_is_the_normalised_class_mean():
    feats, labels = _features()
    head = PrototypeHead().fit(Support(feats, labels, CLASSES))
    x = feats.numpy()
    for c in range(3):
        mean = x[labels.numpy() == c].mean(axis=0)
        np.testing.assert_allclose(head.prototypes_[c].numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    assert PrototypeHead.needs_text is False and head.needs_text is False


def test_prototype_text_blend(tiny_clip):
    feats, labels = _features()
    support = Support(feats, labels, CLASSES, tiny_clip)
    proto = PrototypeHead().fit(support).logits(feats)
    zs = _zeroshot(tiny_clip).logits(feats)
    torch.testing.assert_close(PrototypeHead(text_weight=1.0).fit(support).logits(feats), zs)
    half = PrototypeHead(text_weight=0.3)
    assert half.needs_text
    torch.testing.assert_close(half.fit(support).logits(feats), 0.7 * proto + 0.3 * zs)
    with pytest.raises(ValueError, match="text_weight"):
        PrototypeHead(text_weight=1.5).fit(support)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_is_scikit_learn_logistic_regression(n_classes):
    from sklearn.linear_model import LogisticRegression

    feats, labels = _features(c=n_classes, noise=1.5)
    head = LinearHead(C=2.0, seed=0).fit(Support(feats, labels, CLASSES[:n_classes]))
    ref = LogisticRegression(C=2.0, max_iter=1000, random_state=0).fit(feats.numpy(), labels.numpy())
    np.testing.assert_allclose(head.predict_proba(feats), ref.predict_proba(feats.numpy()), rtol=1e-4, atol=1e-5)
    assert head.n_trainable_parameters() == n_classes * 33


def test_linear_zeroshot_init_is_anchored_to_the_text_classifier(tiny_clip):
    feats, labels = _features(noise=1.0)
    support = Support(feats, labels, CLASSES, tiny_clip)
    zs = _zeroshot(tiny_clip)
    anchored = LinearHead(init="zeroshot", text_reg=1e6).fit(support)
    torch.testing.assert_close(anchored.weight_, zs.logit_scale_ * zs.weights_.T, rtol=1e-3, atol=1e-3)
    free = LinearHead(init="zeroshot", text_reg=1e-4).fit(support)
    accuracy = lambda h: float((h.predict(feats) == labels.numpy()).mean())  # noqa: E731
    assert accuracy(free) > accuracy(zs) + 0.3  # random text tower: the support data must do the work
    assert LinearHead.needs_text is False and LinearHead(init="zeroshot").needs_text


def test_tip_f_trains_the_keys_deterministically(tiny_clip):
    feats, labels = _features(noise=1.2)
    support = Support(feats, labels, CLASSES, tiny_clip)
    tip = TipAdapterHead(alpha=1.0, beta=5.5, n_views=0).fit(support)
    fine = TipAdapterFHead(alpha=1.0, beta=5.5, n_views=0, epochs=50, lr=1e-2).fit(support)
    ce = lambda h: float(torch.nn.functional.cross_entropy(h.logits(feats), labels))  # noqa: E731
    assert not torch.equal(fine.keys_, tip.keys_)
    assert ce(fine) < ce(tip)
    assert fine.n_trainable_parameters() == feats.numel()
    again = TipAdapterFHead(alpha=1.0, beta=5.5, n_views=0, epochs=50, lr=1e-2).fit(support)
    assert torch.equal(again.keys_, fine.keys_)


def test_clip_adapter(tiny_clip):
    feats, labels = _features(noise=0.8)
    support = Support(feats, labels, CLASSES, tiny_clip)
    untouched = ClipAdapterHead(ratio=0.0, epochs=1).fit(support)
    torch.testing.assert_close(untouched.logits(feats), _zeroshot(tiny_clip).logits(feats))
    head = ClipAdapterHead(ratio=0.6, epochs=100, seed=1).fit(support)
    acc = float((head.predict(feats) == labels.numpy()).mean())
    assert acc > float((_zeroshot(tiny_clip).predict(feats) == labels.numpy()).mean()) + 0.2
    assert head.n_trainable_parameters() == 2 * 32 * 8
    assert torch.equal(ClipAdapterHead(ratio=0.6, epochs=100, seed=1).fit(support).up_, head.up_)


def test_text_heads_refuse_image_only_backbones():
    from fewvision.tasks.fewshot import check_text

    class ImageOnly:
        spec, id, has_text = "timm:resnet18@random", "timm-0", False

    feats, labels = _features()
    for method in head_names():
        head = create_head(method)
        if head.needs_text:
            with pytest.raises(BackboneError, match="text tower"):
                check_text(head, ImageOnly())
    with pytest.raises(BackboneError, match="text tower"):
        TipAdapterHead().fit(Support(feats, labels, CLASSES, ImageOnly()))


def test_save_load_gives_identical_probabilities_for_every_head(tmp_path, tiny_clip, textile_subset, tiny_sd):
    from fewvision.heads import head_classes
    from fewvision.modelfile import load, save_model
    from fewvision.tasks.fewshot import fit, predict

    for method in head_names():
        own = {"pipeline": str(tiny_sd)} if getattr(head_classes()[method], "own_model", False) else {}
        model = fit(str(textile_subset), method, tiny_clip, shots=4, seed=0, calibrate_fraction=0.25, alpha=0.2,
                    **FAST.get(method, {}), **own)
        path = save_model(tmp_path / f"{method}.fvm", model)
        loaded = load(path).bind(tiny_clip)
        assert loaded.decision == model.decision and loaded.info["method"] == method
        before, after = predict(model, [textile_subset]), predict(loaded, [textile_subset])
        assert tensor_layouts(loaded.head) == tensor_layouts(model.head), method  # after predict: heads built lazily
        assert len(before.rows) == 36
        for a, b in zip(before.rows, after.rows):
            assert a["probabilities"] == b["probabilities"] and a["set"] == b["set"], method
