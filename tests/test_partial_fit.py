"""Heads that take new images without a refit (the service's review loop): what ``partial_fit`` adds must be what a
fit on all the images gives - prototypes, Tip-Adapter's cache, PaDiM's Gaussians, PatchCore's and
AnomalyDINO's memory banks."""

import pytest
import torch

from fewvision.anomaly.padim import PaDiM
from fewvision.anomaly.patchcore import PatchCore
from fewvision.heads.prototype import PrototypeHead
from fewvision.heads.support import Support
from fewvision.heads.tip import TipAdapterFHead, TipAdapterHead


@pytest.fixture(scope="module")
def halves(tiny_clip, textile_split):
    """All 12 support images; the first 9 (3 per class) and the 3 others (one per class) as additions."""
    names, paths, labels, _ = textile_split
    first = [i for i in range(len(paths)) if i % 4 != 3]
    rest = [i for i in range(len(paths)) if i % 4 == 3]
    pick = lambda idx, **kw: Support.from_files(tiny_clip, [paths[i] for i in idx], [labels[i] for i in idx],  # noqa
                                                names, **kw)
    return pick(range(len(paths))), pick(first), pick(rest[:1], additions=True), pick(rest[1:], additions=True)


def test_prototypes_after_additions_equal_a_fit_on_all_images(halves):
    everything, first, one, two = halves
    head = PrototypeHead(scale=10.0).fit(first).partial_fit(one).partial_fit(two)
    full = PrototypeHead(scale=10.0).fit(everything)
    torch.testing.assert_close(head.prototypes_, full.prototypes_, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(head.class_counts_, full.class_counts_)


def test_tip_adapter_adds_keys_from_augmented_views_as_a_fit_would(halves):
    everything, first, one, two = halves
    head = TipAdapterHead(alpha=1.0, beta=5.5, n_views=3).fit(first).partial_fit(one).partial_fit(two)
    full = TipAdapterHead(alpha=1.0, beta=5.5, n_views=3).fit(everything)
    order = [everything.paths.index(p) for p in first.paths + one.paths + two.paths]
    torch.testing.assert_close(head.keys_, full.keys_[order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.values_, full.values_[order])
    assert TipAdapterFHead.partial_fit is None  # trained keys: a refit, not an append


def test_additions_need_not_cover_every_class_but_a_fit_does(tiny_clip, textile_split):
    names, paths, labels, _ = textile_split
    with pytest.raises(ValueError, match="no support images for class"):
        Support.from_files(tiny_clip, paths[:1], labels[:1], names)
    assert len(Support.from_files(tiny_clip, paths[:1], labels[:1], names, additions=True).paths) == 1


def _patch_maps(n, seed, channels=24, grid=(5, 6)):
    """Correlated patch maps (a random mixing of the channels), so the covariances are far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(channels, channels, generator=torch.Generator().manual_seed(99))
    z = torch.randn(n, grid[0] * grid[1], channels, generator=g) @ mixing
    return (z + 3.0).transpose(1, 2).reshape(n, channels, *grid)


@pytest.mark.parametrize("added", [1, 7])
def test_padim_gaussians_after_additions_equal_a_fit_on_all_images(added):
    old, new = _patch_maps(40, 0), _patch_maps(added, 1)
    head = PaDiM(n_features=16).fit(old).partial_fit(new)
    full = PaDiM(n_features=16).fit(torch.cat([old, new]))
    assert head.n_train_images_ == full.n_train_images_ == 40 + added
    torch.testing.assert_close(head.mean_, full.mean_, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.inv_covariance_, full.inv_covariance_, atol=1e-4, rtol=1e-3)
    probe = _patch_maps(5, 2) * 1.5
    torch.testing.assert_close(head.score(probe)[0], full.score(probe)[0], atol=1e-3, rtol=1e-4)
    # ... and not what the old model scores: the update changed something that matters
    before = PaDiM(n_features=16).fit(old).score(probe)[0]
    assert (before - full.score(probe)[0]).abs().max() > 100 * (head.score(probe)[0] - full.score(probe)[0]).abs().max()


def test_patchcore_memory_after_additions_holds_the_new_images_patches():
    old, new = _patch_maps(6, 0), _patch_maps(2, 1)
    head = PatchCore(coreset_ratio=1.0).fit(old).partial_fit(new)
    full = PatchCore(coreset_ratio=1.0).fit(torch.cat([old, new]))
    assert head.memory_bank_.shape == full.memory_bank_.shape and head.n_train_images_ == 8
    # the same rows, whatever their order
    sort = lambda bank: bank[torch.argsort(bank[:, 0])]  # noqa: E731
    torch.testing.assert_close(sort(head.memory_bank_), sort(full.memory_bank_))


@pytest.mark.parametrize("rotate", [False, True])
def test_anomalydino_bank_after_additions_is_a_fit_on_all_images(rotate, textile_root):
    from fewvision.anomaly.anomalydino import AnomalyDINO
    from fewvision.backbones import create_backbone
    from fewvision.io.images import load_image

    texture = create_backbone("texture")
    paths = sorted((textile_root / "nominal").glob("*.jpg"))
    x = torch.stack([texture.preprocess(load_image(p)) for p in paths[:5]])
    test = torch.stack([texture.preprocess(load_image(p)) for p in paths[600:603]])
    head = AnomalyDINO(rotate=rotate).fit(x[:3], texture).partial_fit(x[3:], texture)
    full = AnomalyDINO(rotate=rotate).fit(x, texture)
    assert head.n_train_images_ == full.n_train_images_ == 5
    assert head.memory_bank_.shape == full.memory_bank_.shape
    # the same rows in another order: each feature column holds the same values
    torch.testing.assert_close(head.memory_bank_.sort(0).values, full.memory_bank_.sort(0).values,
                               atol=1e-5, rtol=1e-5)
    a, b = head.score(test, texture), full.score(test, texture)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
