"""Anomaly detection building blocks against independent reference computations: post-processing, thresholds,
metrics (AUPRO), the greedy coreset, PatchCore's Eq. 7, PaDiM's streamed Gaussians, and the model-level API."""

import math

import numpy as np
import pytest
import torch
from anomaly_data import PixelPatchBackbone
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from fewvision.anomaly import anomaly_head_classes
from fewvision.anomaly.padim import PaDiM
from fewvision.anomaly.patchcore import PatchCore, greedy_coreset
from fewvision.anomaly.postprocess import finish, finish_maps, gaussian_blur
from fewvision.io.geometry import mask_view
from fewvision.backbones.base import pack_layers
from fewvision.decide.threshold import (
    ThresholdError,
    check_not_all_flagged,
    conformal_threshold,
    f1_threshold,
    min_calibration_size,
    recall_threshold,
)
from fewvision.metrics.anomaly import (
    aupro,
    auroc_bootstrap_ci,
    image_metrics,
    pixel_auroc,
)


# --- post-processing ----------------------------------------------------------------------------------------------
def test_finish_maps_upsamples_and_blurs_with_sigma_4():
    raw = torch.zeros(2, 8, 8)
    raw[0, 4, 4] = 1.0
    maps = finish_maps(raw, (64, 64), sigma=4)
    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    assert torch.allclose(maps[1], torch.zeros(64, 64))
    # A single spike: blurred profile's spread along a row is the up-sampled spike's spread plus sigma^2.
    spike = torch.zeros(1, 64, 64)
    spike[0, 32, 32] = 1.0
    blurred = gaussian_blur(spike, 4.0)[0]
    row = blurred[32].double()
    x = torch.arange(64, dtype=torch.float64)
    mean = (row * x).sum() / row.sum()
    std = math.sqrt(float(((x - mean) ** 2 * row).sum() / row.sum()))
    assert abs(float(mean) - 32) < 1e-6 and abs(std - 4.0) < 0.05
    assert abs(float(blurred.sum()) - 1.0) < 1e-4  # mass preserved away from the border
    const = finish_maps(torch.full((1, 5, 7), 3.0), (20, 28))
    assert torch.allclose(const, torch.full((1, 20, 28), 3.0), atol=1e-5)


def test_finish_takes_the_image_score_the_head_asks_for():
    raw = torch.rand(3, 6, 6)

    class MapMax:
        image_score = "map_max"

    class Own:
        image_score = "head"

    maps, scores = finish(MapMax(), raw, torch.zeros(3), (24, 24))
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    maps2, scores2 = finish(Own(), raw, torch.tensor([1.0, 2.0, 3.0]), (24, 24))
    assert torch.equal(maps, maps2) and scores2.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="2 image scores for 3 maps"):
        finish(Own(), raw, torch.zeros(2), (24, 24))


def test_mask_view_follows_the_backbone_crop():
    from PIL import Image

    bb = PixelPatchBackbone(size=64)
    mask = np.zeros((80, 128), np.uint8)  # resize 64 on the short side -> 64x102, centre crop 64 cuts 19 px each side
    mask[:, :10] = 255  # entirely inside the cropped-away strip
    mask[30:50, 60:68] = 255  # centre
    view = mask_view(Image.fromarray(mask), bb.preprocess, (64, 64))
    assert view.shape == (64, 64) and view.dtype == bool
    assert not view[:, :5].any()
    assert view[24:38, 30:34].all()


# --- thresholds ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1, 0.2, 0.3])
def test_min_calibration_size_is_the_smallest_n_with_a_valid_rank(alpha):
    need = min_calibration_size(alpha)
    ranks = [math.ceil((n + 1) * (1 - alpha) - 1e-9) for n in range(1, 400)]
    first = next(n for n, k in zip(range(1, 400), ranks) if k <= n)
    assert need == first


def test_conformal_threshold_is_the_ceil_rank_order_statistic_and_controls_false_rejects():
    rng = np.random.default_rng(0)
    n, alpha = 39, 0.1
    k = math.ceil((n + 1) * (1 - alpha))  # 36
    good = rng.normal(size=n)
    assert conformal_threshold(good, alpha) == np.sort(good)[k - 1]
    # Over many calibration draws, the false-reject rate of a new good image is 1 - k/(n+1) <= alpha on average.
    trials = rng.normal(size=(4000, n + 1))
    flagged = [row[n] > conformal_threshold(row[:n], alpha) for row in trials]
    rate = float(np.mean(flagged))
    se = math.sqrt(alpha * (1 - alpha) / len(trials))
    assert rate <= alpha + 3 * se
    assert abs(rate - (1 - k / (n + 1))) < 3 * se


def test_leave_one_out_thresholds_control_false_rejects_of_new_good_images():
    """Monte Carlo of the whole leave-one-out calibration: PaDiM fitted on n good 'images' (Gaussian patch maps),
    threshold from their leave-one-out scores, one new good image per trial."""
    from fewvision.anomaly.padim import PaDiM
    from fewvision.anomaly.postprocess import finish

    rng = torch.Generator().manual_seed(3)
    n, alpha, trials = 30, 0.1, 600
    flagged, flagged_in_sample = [], []
    for _ in range(trials):
        x = torch.randn(n + 1, 3, 2, 2, generator=rng)
        head = PaDiM(n_features=3).fit(x[:n])
        image_scores = {}
        for name, (raw, scores) in (("left_out", head.score_left_out(x[:n], 0)), ("in_sample", head.score(x[:n])),
                                    ("new", head.score(x[n:]))):
            image_scores[name] = finish(head, raw, scores, (4, 4), sigma=0)[1].numpy()
        new = float(image_scores["new"][0])
        flagged.append(new > conformal_threshold(image_scores["left_out"], alpha))
        flagged_in_sample.append(new > conformal_threshold(image_scores["in_sample"], alpha))
    rate, se = float(np.mean(flagged)), math.sqrt(alpha * (1 - alpha) / trials)
    # Measured 0.097 leave-one-out; 0.24 from in-sample scores, where each image sees itself in its own Gaussian.
    assert alpha - 3 * se <= rate <= alpha + 3 * se, rate
    assert float(np.mean(flagged_in_sample)) > alpha + 6 * se


def test_conformal_threshold_says_how_many_good_images_are_needed():
    with pytest.raises(ThresholdError, match="needs at least 99 calibration images.*got 40"):
        conformal_threshold(np.arange(40.0), 0.01)
    with pytest.raises(ThresholdError, match="got 0"):
        conformal_threshold([], 0.1)
    with pytest.raises(ThresholdError, match="in \\(0, 1\\)"):
        conformal_threshold(np.arange(40.0), 0.0)
    with pytest.raises(ThresholdError, match="NaN"):
        conformal_threshold([1.0, float("nan")] * 20, 0.1)


def test_thresholds_refuse_to_flag_every_good_image():
    with pytest.raises(ThresholdError, match="would flag all 3 good images"):
        check_not_all_flagged(0.5, [1.0, 2.0, 3.0])
    check_not_all_flagged(1.0, [1.0, 2.0, 3.0])  # the lowest good image sits at the threshold: not flagged
    # Defects that score below every good image: the best F1 flags everything, so it is refused.
    scores = np.array([5.0, 6.0, 7.0, 1.0, 2.0])
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ThresholdError, match="flag all 3 good images"):
        f1_threshold(scores, labels)
    with pytest.raises(ThresholdError, match="flag all 3 good images"):
        recall_threshold(scores, labels, 1.0)


def _brute_f1(scores, labels, t):
    flag = scores > t
    tp = int((flag & (labels == 1)).sum())
    fp = int((flag & (labels == 0)).sum())
    fn = int((~flag & (labels == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def test_f1_and_recall_thresholds_against_brute_force():
    rng = np.random.default_rng(1)
    scores = np.round(np.r_[rng.normal(0, 1, 60), rng.normal(1.5, 1, 40)], 1)  # rounding makes ties
    labels = np.r_[np.zeros(60, int), np.ones(40, int)]
    grid = np.r_[np.unique(scores) - 1e-9, np.unique(scores) + 1e-9]
    best = max(_brute_f1(scores, labels, t) for t in grid)
    t = f1_threshold(scores, labels)
    assert _brute_f1(scores, labels, t) == pytest.approx(best)
    t90 = recall_threshold(scores, labels, 0.9)
    caught = (scores[labels == 1] > t90).mean()
    assert caught >= 0.9
    higher = [g for g in grid if g > t90 and (scores[labels == 1] > g).mean() >= 0.9]
    assert not higher or all((scores > g).sum() == (scores > t90).sum() for g in higher)


# --- metrics ------------------------------------------------------------------------------------------------------
def _aupro_reference(maps, masks, limit=0.3, n_thresholds=4000):
    """Straightforward PRO curve: for a dense grid of thresholds, mean per-region overlap vs FPR."""
    maps = np.stack(maps)
    masks = np.stack(masks)
    regions = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions.append([lab == r for r in range(1, n + 1)])
    ok = ~masks
    ts = np.quantile(maps, np.linspace(1, 0, n_thresholds))
    fprs, pros = [0.0], [0.0]
    for t in ts:
        pred = maps >= t
        fprs.append((pred & ok).sum() / ok.sum())
        pros.append(np.mean([pred[i][r].mean() for i, rs in enumerate(regions) for r in rs]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x, y = np.r_[fprs[keep], limit], np.r_[pros[keep], np.interp(limit, fprs, pros)]
    return np.trapezoid(y, x) / limit


def test_aupro_matches_a_dense_threshold_reference_and_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(0)
    masks, maps = [], []
    for i in range(6):
        m = np.zeros((40, 40), bool)
        if i % 3:
            m[5 + i : 12 + i, 8:20] = True
            m[30:34, 30 - i : 36 - i] = True
        masks.append(m)
        maps.append(ndimage.gaussian_filter(rng.random((40, 40)) + 0.8 * m, 1.0))
    ours = aupro(maps, masks)
    assert ours == pytest.approx(_aupro_reference(maps, masks), abs=3e-3)
    assert 0.3 < ours < 1.0
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(np.ravel(masks), np.ravel(maps)))
    perfect = [m.astype(float) for m in masks]
    assert aupro(perfect, masks) == pytest.approx(1.0)
    # Random maps: PRO ~ FPR, so the normalised area is ~0.15.
    noise = [rng.random((40, 40)) for _ in masks]
    assert abs(aupro(noise, masks) - 0.15) < 0.06


def test_image_metrics_and_auroc_interval():
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 80), rng.normal(1.2, 1, 40)]
    defect = np.r_[np.zeros(80, bool), np.ones(40, bool)]
    m = image_metrics(scores, defect, threshold=1.0)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(defect, scores))
    assert m["false_reject_rate"] == pytest.approx((scores[:80] > 1.0).mean())
    assert m["miss_rate"] == pytest.approx((scores[80:] <= 1.0).mean())
    lo, hi = auroc_bootstrap_ci(scores, defect, n_bootstrap=500, seed=0)
    assert lo < m["image_auroc"] < hi and hi - lo < 0.25
    # The vectorised bootstrap agrees with an explicit loop in distribution (same interval within noise).
    boot = []
    r = np.random.default_rng(5)
    for _ in range(500):
        d = r.choice(scores[80:], 40)
        g = r.choice(scores[:80], 80)
        boot.append(roc_auc_score(np.r_[np.ones(40), np.zeros(80)], np.r_[d, g]))
    ref_lo, ref_hi = np.quantile(boot, [0.025, 0.975])
    assert abs(lo - ref_lo) < 0.03 and abs(hi - ref_hi) < 0.03


# --- PatchCore ----------------------------------------------------------------------------------------------------
def _naive_greedy(z, k, start):
    sel = [start]
    d = np.linalg.norm(z - z[start], axis=1)
    for _ in range(k - 1):
        i = int(np.argmax(d))
        sel.append(i)
        d = np.minimum(d, np.linalg.norm(z - z[i], axis=1))
    return sel


def test_greedy_coreset_matches_a_naive_k_center():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 16)).astype(np.float32)
    g = torch.Generator().manual_seed(3)
    start = int(torch.randint(500, (1,), generator=torch.Generator().manual_seed(3)))
    ours = greedy_coreset(torch.from_numpy(z), 40, g).tolist()
    assert ours == _naive_greedy(z.astype(np.float64), 40, start)
    assert len(set(ours)) == 40


def _features(n, c=8, h=6, w=6, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, c, h, w)).astype(np.float32))


def test_patchcore_memory_stays_bounded_when_streaming(monkeypatch):
    import fewvision.anomaly.patchcore as pc

    sizes = []
    real = pc.greedy_coreset

    def spy(z, k, generator):
        sizes.append(len(z))
        return real(z, k, generator)

    monkeypatch.setattr(pc, "greedy_coreset", spy)
    produced = []

    def chunks():
        for i in range(6):
            produced.append(i)
            yield _features(4, seed=i)

    head = PatchCore(coreset_ratio=0.1, chunk_images=4, exact_max_images=8, stream_oversample=2.0, seed=0)
    head.fit(chunks())
    per_chunk = 4 * 36
    total = 6 * per_chunk
    assert produced == list(range(6))
    assert head.memory_bank_.shape == (math.ceil(0.1 * total), 8)
    # Per-chunk reductions see one chunk's images of one calibration fold (the images of a chunk of 4 are in
    # distinct folds of 5: one image each); the final coreset sees 20% of all patches, never all of them.
    assert sizes[:-1] == [per_chunk // 4] * 24
    assert sizes[-1] == 24 * math.ceil(0.2 * (per_chunk // 4)) < total
    assert head.n_train_patches_ == total and head.n_train_images_ == 24
    # Up to exact_max_images: one coreset over every patch (the paper's algorithm).
    sizes.clear()
    PatchCore(coreset_ratio=0.1, chunk_images=4, exact_max_images=24, seed=0).fit(_features(4, seed=i) for i in range(6))
    assert sizes == [total]


def test_patchcore_single_chunk_is_the_exact_coreset_and_is_seeded():
    x = _features(5)
    a = PatchCore(coreset_ratio=0.25, seed=1).fit(x)
    b = PatchCore(coreset_ratio=0.25, seed=1).fit(x)
    assert torch.equal(a.memory_bank_, b.memory_bank_)
    emb = torch.nn.functional.avg_pool2d(x, 3, 1, 1).permute(0, 2, 3, 1).reshape(-1, 8)
    idx = greedy_coreset(emb, math.ceil(0.25 * len(emb)), torch.Generator().manual_seed(1))
    assert torch.equal(a.memory_bank_, emb[idx])  # 8 channels <= 128: no projection needed


def test_patchcore_image_score_is_equation_7():
    x = _features(6, c=8)
    head = PatchCore(coreset_ratio=0.5, num_neighbors=4, seed=0).fit(x[:4])
    test = x[4:].clone()
    test[0, :, 2, 3] += 6.0  # an anomalous patch
    maps, scores = head.score(test)
    bank = head.memory_bank_.double().numpy()
    emb = torch.nn.functional.avg_pool2d(test, 3, 1, 1).permute(0, 2, 3, 1).reshape(2, 36, 8).double().numpy()
    for i in range(2):
        d = np.linalg.norm(emb[i][:, None, :] - bank[None], axis=2)  # [36, M]
        patch = d.min(1)
        assert np.allclose(maps[i].numpy().ravel(), patch, atol=1e-4)
        j = int(patch.argmax())
        m_star = int(d[j].argmin())
        nb = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1), kind="stable")[:4]
        nb = np.r_[m_star, [b for b in nb if b != m_star][:3]]
        dist = np.linalg.norm(emb[i][j] - bank[nb], axis=1)
        w = 1 - np.exp(dist[0]) / np.exp(dist).sum()
        assert float(scores[i]) == pytest.approx(w * patch[j], rel=1e-4)
    r, c = divmod(int(maps[0].argmax()), 6)
    assert abs(r - 2) <= 1 and abs(c - 3) <= 1  # the spike, spread over its 3x3 neighbourhood
    assert float(scores[0]) > float(scores[1])


@pytest.mark.parametrize("k, n_bank", [(1, 50), (5, 50), (1, 1001)])  # 1001: blocked argmin with a tail
def test_nearest_rows_is_the_exact_search(monkeypatch, k, n_bank):
    from fewvision.anomaly import patchcore

    monkeypatch.setattr(patchcore, "_SEARCH_ELEMENTS", 7 * n_bank)  # 7 query rows per chunk: several chunks
    monkeypatch.setattr(patchcore, "_TILE_QUERIES", 7)  # k = 1: chunks of 7 queries x tiles of 300 items
    monkeypatch.setattr(patchcore, "_TILE_ITEMS", 300)
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(n_bank, 6, generator=g), torch.randn(33, 6, generator=g)
    dist, idx = patchcore.nearest_rows(queries, bank, k)
    ref = torch.cdist(queries.double(), bank.double())
    ref_d, ref_i = ref.sort(dim=1, stable=True)
    assert torch.equal(idx, ref_i[:, :k])
    if n_bank > 300:  # integer coordinates: exact distances, ties within and across tiles; the first item wins
        bank, queries = torch.randint(-2, 3, (n_bank, 6), generator=g).float(), torch.randint(-2, 3, (33, 6),
                                                                                             generator=g).float()
        first = torch.cdist(queries.double(), bank.double()).sort(dim=1, stable=True).indices[:, 0]
        assert torch.equal(patchcore.nearest_rows(queries, bank, 1)[1][:, 0], first)
    assert torch.allclose(dist.double(), ref_d[:, :k], atol=1e-5)
    assert patchcore.nearest_rows(queries, bank[:3], 9)[1].shape == (33, 3)  # k capped at the bank size


def test_row_argmin_is_the_first_smallest_of_each_row():
    from fewvision.anomaly.patchcore import row_argmin

    g = torch.Generator().manual_seed(0)
    for n in (10, 256, 1000, 1024, 1030):
        x = torch.randint(0, 50, (40, n), generator=g).float()  # many ties
        x[:, -3:] = float("inf")  # excluded items
        if n > 64:
            x[0, [5, 70, n - 4]] = -1.0  # a tie across blocks and with the tail: the first one counts
            x[1, [n - 5, n - 4]] = -2.0  # the minimum only in the tail
        assert torch.equal(row_argmin(x), x.argmin(1)), n


def test_patchcore_pools_each_layer_on_its_own_grid_then_upsamples():
    # Two layers packed like a CNN's layer2 + layer3: the reference computation (paper / anomalib) averages 3x3
    # neighbourhoods on each layer's grid, up-samples the coarse one bilinearly and concatenates.
    g = torch.Generator().manual_seed(0)
    fine, coarse = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 6, 4, 4, generator=g)

    class TwoLayers:
        def patch_layout(self, layers=None):
            return [(4, 8, 8), (6, 4, 4)]

    head = PatchCore(coreset_ratio=1.0).fit(pack_layers([fine, coarse]), TwoLayers())
    assert head.layers_ == [[4, 8, 8], [6, 4, 4]]
    pool = torch.nn.AvgPool2d(3, 1, 1)
    expected = torch.cat([pool(fine), torch.nn.functional.interpolate(pool(coarse), size=(8, 8), mode="bilinear")], 1)
    expected = expected.permute(0, 2, 3, 1).reshape(-1, 10)
    assert torch.allclose(head.memory_bank_, expected, atol=1e-5)  # ratio 1: every patch kept, in order
    maps, _ = PatchCore.from_state(*head.state()).score(pack_layers([fine, coarse]))
    assert float(maps.abs().max()) < 1e-3  # every test patch is in the memory bank: distance 0


# --- PaDiM --------------------------------------------------------------------------------------------------------
def test_padim_streamed_gaussians_equal_the_batch_estimate():
    x = _features(30, c=12, h=4, w=5) * 3 + 100.0  # a large offset: checks the shifted accumulation
    streamed = PaDiM(n_features=6, seed=2).fit(list(x.split(7)))
    batch = PaDiM(n_features=6, seed=2).fit(x)
    assert torch.equal(streamed.channel_index_, batch.channel_index_)
    assert torch.allclose(streamed.mean_, batch.mean_, atol=1e-4)
    assert torch.allclose(streamed.inv_covariance_, batch.inv_covariance_, rtol=1e-3, atol=1e-5)
    sel = x[:, streamed.channel_index_].double().numpy()  # [n, d, h, w]
    pos = (2, 3)
    v = sel[:, :, pos[0], pos[1]]
    cov = np.cov(v, rowvar=False) + 0.01 * np.eye(6)
    assert np.allclose(streamed.mean_[:, pos[0] * 5 + pos[1]].numpy(), v.mean(0), atol=1e-3)
    assert np.allclose(np.linalg.inv(streamed.inv_covariance_[pos[0] * 5 + pos[1]].double().numpy()), cov, rtol=1e-3)
    test = _features(2, c=12, h=4, w=5, seed=9) * 3 + 100.0
    maps, _ = streamed.score(test)
    t = test[:, streamed.channel_index_].double().numpy()[1, :, pos[0], pos[1]]
    delta = t - v.mean(0)
    expected = math.sqrt(delta @ np.linalg.inv(cov) @ delta)
    assert float(maps[1, pos[0], pos[1]]) == pytest.approx(expected, rel=1e-3)


def test_padim_defaults_and_errors():
    assert PaDiM().fit(_features(3, c=384)).channel_index_.numel() == 100
    assert PaDiM().fit(_features(3, c=40)).channel_index_.numel() == 40
    with pytest.raises(ValueError, match="at least 2 good images"):
        PaDiM().fit(_features(1))
    with pytest.raises(ValueError, match="n_features must be in 1..8"):
        PaDiM(n_features=9).fit(_features(3))


def test_registry_has_both_heads_with_the_protocol():
    heads = anomaly_head_classes()
    assert heads["patchcore"] is PatchCore and heads["padim"] is PaDiM
    assert PatchCore.inputs == PaDiM.inputs == "patches"
    assert PaDiM.image_score == "map_max" and PatchCore.image_score == "head"
