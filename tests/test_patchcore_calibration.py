"""PatchCore's threshold calibration with a coreset: every training image is scored by a coreset that never saw it
(K-fold cross-conformal), and fit_anomaly sets the threshold from exactly those scores and says what it promises."""

import math

import numpy as np
import pytest
import torch
from anomaly_data import PixelPatchBackbone

from fewvision.anomaly.patchcore import PatchCore, fold_assignment

pytestmark = pytest.mark.usefixtures("one_thread")

N = 20  # images of 8 channels on a 6 x 6 grid: 720 patches, fits in well under a second


def _features(n=N, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 8, 6, 6)).astype(np.float32))


# Exact (one coreset over every patch) and streaming (per-chunk reductions from the 9th image on).
MODES = {"exact": {}, "streaming": {"chunk_images": 4, "exact_max_images": 8}}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_an_images_calibration_score_does_not_depend_on_that_image(mode):
    """The definition of 'scored by a model fitted without it': replace training image j by a very different one,
    refit, and image j's calibration score must not move. The previous calibration (the full coreset without j's
    own items) fails this: the other items of that coreset were chosen by a greedy k-center that saw image j."""
    x = _features()
    params = {"coreset_ratio": 0.1, "seed": 0, **MODES[mode]}
    head = PatchCore(**params).fit(x.split(4) if mode == "streaming" else x)
    _, scores = head.score_left_out(x, 0)
    moved = 0
    for j in range(N):
        other = x.clone()
        other[j] = 3.0 * _features(1, seed=100 + j)[0] + 2.0  # far from every other image's patches
        refit = PatchCore(**params).fit(other.split(4) if mode == "streaming" else other)
        _, again = refit.score_left_out(x[j : j + 1], j)
        assert torch.equal(again, scores[j : j + 1]), (j, float(again), float(scores[j]))
        # the replacement does change the shipped model (so the check above is not vacuous)
        moved += not torch.equal(refit.memory_bank_, head.memory_bank_)
    assert moved == N


def test_each_image_is_scored_by_a_coreset_drawn_without_its_fold():
    x = _features()
    head = PatchCore(coreset_ratio=0.1, num_neighbors=1, seed=0).fit(x)
    _, scores = head.score_left_out(x, 0)
    folds = [head.calibration_fold(j) for j in range(N)]
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    emb = torch.nn.functional.avg_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).reshape(N, 36, 8)  # Eq. 2, p = 3
    for j in range(N):
        bank, source = head.fold_coreset(folds[j])
        fold_images = {i for i in range(N) if folds[i] == folds[j]}
        assert not set(source.tolist()) & fold_images  # no item of the image or of its fold
        # ceil(10 % of the other folds' 16 images x 36 patches) items, each one of those images' patches
        assert len(bank) == math.ceil(0.1 * (N - len(fold_images)) * 36)
        for item, src in zip(bank, source.tolist()):  # each item is one of its source image's patches
            assert bool((emb[src] - item).abs().amax(1).min() < 1e-5)
        # num_neighbors=1: the image score is the largest distance of a patch to its nearest item of that coreset
        expected = torch.cdist(emb[j].double(), bank.double()).min(1).values.max()
        assert abs(float(scores[j]) - float(expected)) < 1e-5
    # The full model's in-sample scores are lower: each image sees its own patches there.
    assert float(head.score(x)[1].mean()) < float(scores.mean())


def test_fold_assignment_is_balanced_seeded_and_prefix_stable():
    f = fold_assignment(23, 5, seed=0)
    counts = torch.bincount(f, minlength=5).tolist()
    assert sorted(counts) == [4, 4, 5, 5, 5]
    assert torch.equal(fold_assignment(23, 5, seed=0), f) and not torch.equal(fold_assignment(23, 5, seed=1), f)
    assert torch.equal(fold_assignment(40, 5, seed=0)[:23], f)  # an image's fold is known when it arrives
    assert sorted(fold_assignment(3, 5, seed=0).tolist()) == sorted(set(fold_assignment(3, 5, seed=0).tolist()))
    with pytest.raises(ValueError, match="calibration_folds must be >= 2"):
        PatchCore(calibration_folds=1).fit(_features(4))


@pytest.fixture(scope="module")
def good_paths(textile_root):
    return [str(p) for p in sorted((textile_root / "nominal").glob("*.jpg"))[:30]]


def test_fit_anomaly_thresholds_the_out_of_fold_scores_and_says_what_that_proves(good_paths):
    from fewvision.tasks.anomaly import _pixel_inputs, fit_anomaly
    from PIL import Image

    bb = PixelPatchBackbone(size=32)  # 8 x 8 patches of 48 values per image
    model = fit_anomaly(good_paths, "patchcore", bb, target_false_reject=0.2, seed=0, use_cache=False)
    d = model.decision
    assert d["calibration"] == "cross-conformal" and d["calibration_folds"] == 5 and d["n_calibration"] == 30
    # The stored calibration scores are the out-of-fold ones of a PatchCore fitted on the same features.
    pixels = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in good_paths])
    head = PatchCore(seed=0)
    x = _pixel_inputs(head, bb, pixels)
    direct = head.fit(x).score_left_out(x, 0)[1].numpy()
    in_bank = head._score_without_own_items(x, 0)[1].numpy()
    assert np.allclose(d["calibration_scores"], np.sort(direct), rtol=1e-4, atol=1e-6)
    assert not np.allclose(d["calibration_scores"], np.sort(in_bank), rtol=1e-2)
    # What is proven, and for what: 2 x 0.2 + min(2 (1 - 1/5) / (30/5 + 1), (1 - 5/30) / 6) = 0.4 + 0.1389 = 0.539
    assert "5-fold cross-conformal" in d["guarantee"] and "30 good images" in d["guarantee"]
    assert "proven at most 0.539 only for a part rejected when all 5 fold coresets" in d["guarantee"]
    assert "not proven, for this model fitted on all 30" in d["guarantee"]
    # Every patch kept: the bank without the image's own patches is a refit without it - leave-one-out.
    full = fit_anomaly(good_paths, "patchcore", bb, target_false_reject=0.2, seed=0, use_cache=False,
                       coreset_ratio=1.0)
    assert full.decision["calibration"] == "leave-one-out conformal" and "calibration_folds" not in full.decision
    assert "each scored by the model fitted without it" in full.decision["guarantee"]
