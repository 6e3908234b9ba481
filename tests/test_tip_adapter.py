"""Tip-Adapter as the official code builds it: keys from the mean of augmented views, Tip-Adapter-F trained on
augmented views (not on its own keys), alpha and beta chosen by cross-validation on the support set."""

import pytest
import torch
from PIL import Image

from fewvision.features.encode import AugmentedView
from fewvision.heads.support import Support
from fewvision.heads.tip import ALPHA_GRID, BETA_GRID, DEFAULT_ALPHA, DEFAULT_BETA, TipAdapterFHead, TipAdapterHead
from fewvision.heads.zeroshot import ZeroShotHead
from fewvision.io.images import sha256_file

CLASSES = ["nominal", "local", "global"]


@pytest.fixture(scope="module")
def support(tiny_clip, textile_split):
    names, paths, labels, _ = textile_split
    return Support.from_files(tiny_clip, paths, labels, names)


def _views_by_hand(backbone, paths, n_views, seed=0):
    """[V, N, D]: each image cropped and flipped by AugmentedView, preprocessed and encoded here, one by one."""
    out = []
    for i in range(n_views):
        view = AugmentedView(i, seed)
        pixels = torch.stack([backbone.preprocess(view(Image.open(p).convert("RGB"), sha256_file(p))) for p in paths])
        out.append(backbone.encode_images(pixels))
    return torch.stack(out)


def test_keys_are_the_normalised_mean_of_augmented_views(tiny_clip, support):
    head = TipAdapterHead(alpha=1.0, beta=5.5, n_views=3).fit(support)
    views = _views_by_hand(tiny_clip, support.paths, 3)
    expected = torch.nn.functional.normalize(views.mean(0), dim=-1)
    torch.testing.assert_close(head.keys_, expected, atol=1e-5, rtol=1e-5)
    base = torch.nn.functional.normalize(support.features, dim=-1)
    assert (head.keys_ * base).sum(-1).max() < 0.9999  # not the un-augmented features


def test_tip_f_trains_on_augmented_views_not_on_its_keys(monkeypatch, tiny_clip, support):
    seen = {}
    original = TipAdapterFHead._train_keys

    def spy(self, keys, views, labels, values):
        seen.update(keys=keys, views=views)
        return original(self, keys, views, labels, values)

    monkeypatch.setattr(TipAdapterFHead, "_train_keys", spy)
    head = TipAdapterFHead(alpha=1.0, beta=5.5, n_views=4, epochs=8).fit(support)
    views = seen["views"]
    assert views.shape[:2] == (4, len(support.paths))
    torch.testing.assert_close(views, _views_by_hand(tiny_clip, support.paths, 4), atol=1e-5, rtol=1e-5)
    # Every training sample differs from its own key, so none is matched with affinity 1 (what training on the
    # keys' own features did).
    assert ((views * seen["keys"][None]).sum(-1) < 0.9999).all()
    assert not torch.equal(head.keys_, seen["keys"])  # trained


def _misleading_text(tiny_clip, n_per_class=6, seed=1):
    """Features of class c lie near the text vector of class c + 1, each class around its own centre: zero-shot is
    wrong on nearly every image and the cache can put them right if alpha gives it the weight."""
    text = ZeroShotHead().fit(Support(None, None, CLASSES, tiny_clip)).weights_  # [D, C]
    centres = torch.randn(3, text.shape[0], generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    feats = text.T[(labels + 1) % 3] + 0.2 * centres[labels] + 0.2 * torch.randn(len(labels), text.shape[0],
                                                                                  generator=g)
    return torch.nn.functional.normalize(feats, dim=-1), labels


def test_alpha_and_beta_come_from_cross_validation_on_the_support(tiny_clip):
    feats, labels = _misleading_text(tiny_clip)
    support = Support(feats, labels, CLASSES, tiny_clip)
    searched = TipAdapterHead(n_views=0).fit(support)
    assert searched.alpha_ in ALPHA_GRID and searched.beta_ in BETA_GRID
    assert searched.search_.startswith("5-fold cross-validation on the support: 18/18 right")
    defaults = TipAdapterHead(alpha=DEFAULT_ALPHA, beta=DEFAULT_BETA, n_views=0).fit(support)
    assert defaults.search_ == "given"
    new_feats, new_labels = _misleading_text(tiny_clip, n_per_class=50, seed=2)
    accuracy = lambda head: float((head.predict(new_feats) == new_labels.numpy()).mean())  # noqa: E731
    zero_shot = ZeroShotHead().fit(Support(None, None, CLASSES, tiny_clip))
    # Measured on 150 new images: zero-shot 0.09, the paper's defaults 0.80, the searched values 0.99.
    assert accuracy(zero_shot) < 0.2 and accuracy(defaults) < 0.9 and accuracy(searched) > 0.95
    one_shot = TipAdapterHead(n_views=0).fit(Support(feats[::6], labels[::6], CLASSES, tiny_clip))
    assert (one_shot.alpha_, one_shot.beta_) == (DEFAULT_ALPHA, DEFAULT_BETA)
    assert one_shot.search_.startswith("paper defaults")
