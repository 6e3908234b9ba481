"""AnomalyDINO as the paper scores: 1-NN distance of each patch to a bank of the good images' patches (cosine, or
Euclidean for the texture statistics), the image score the mean of the top 1% patch scores, rotations of the good
images in the bank, leave-one-out scores that leave the image's own patches (and rotations) out."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fewvision.anomaly import create_anomaly_head
from fewvision.anomaly.anomalydino import ANGLES, foreground_mask, rotate_reflect, top_percent_mean
from fewvision.anomaly.postprocess import finish
from fewvision.io.images import load_image


class FixedPatches:
    """A backbone whose patch features are a fixed function of the pixels: the pixels themselves, pooled 4x4."""

    input_size = (16, 16)

    def patch_features(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, 4) + 0.1


@pytest.fixture(scope="module")
def texture():
    from fewvision.backbones import create_backbone

    return create_backbone("texture")


@pytest.fixture(scope="module")
def textile_pixels(texture, textile_root):
    """Preprocessed textile images: 16 good to fit on, and 40 good / 40 local / 40 global to test."""
    def load(kind, start, n):
        paths = sorted((textile_root / kind).glob("*.jpg"))[start : start + n]
        return torch.stack([texture.preprocess(load_image(p)) for p in paths])

    return {"fit": load("nominal", 0, 16), "good": load("nominal", 600, 40), "local": load("local", 0, 40),
            "global": load("global", 0, 40)}


def test_rotations_turn_about_the_centre_with_a_reflected_border():
    x = torch.randn(2, 3, 20, 20)
    assert torch.equal(rotate_reflect(x, 0), x) and torch.equal(rotate_reflect(x, 360), x)
    torch.testing.assert_close(rotate_reflect(x, 90), torch.rot90(x, 1, dims=(-2, -1)))
    turned = rotate_reflect(torch.ones(1, 1, 20, 20), 45)
    assert torch.allclose(turned, torch.ones_like(turned))  # no black corners


def test_image_score_is_the_mean_of_the_top_one_percent():
    scores = torch.arange(250.0).view(1, 250)
    assert top_percent_mean(scores).item() == pytest.approx((249 + 248) / 2)  # int(250 * 0.01) = 2 patches
    assert top_percent_mean(torch.tensor([[3.0, 9.0, 1.0]])).item() == 9.0  # fewer than 100 patches: the largest


def test_patch_scores_are_the_cosine_distance_to_the_nearest_bank_patch():
    torch.manual_seed(0)
    good, test = torch.rand(3, 3, 16, 16), torch.rand(2, 3, 16, 16)
    backbone = FixedPatches()
    head = create_anomaly_head("anomalydino", rotate=False).fit(good, backbone)
    assert head.metric_ == "cosine"
    maps, scores = head.score(test, backbone)
    bank = torch.nn.functional.normalize(backbone.patch_features(good).permute(0, 2, 3, 1).reshape(-1, 3), dim=1)
    for i in range(2):
        q = torch.nn.functional.normalize(backbone.patch_features(test[i : i + 1])[0].reshape(3, -1).T, dim=1)
        expected = (1 - q @ bank.T).min(1).values.view(4, 4)  # brute force over every bank patch
        torch.testing.assert_close(maps[i], expected, atol=1e-5, rtol=1e-4)
        assert scores[i].item() == pytest.approx(expected.max().item(), abs=1e-5)  # 16 patches: top 1% = the max


def test_rotations_put_every_turned_copy_in_the_bank_and_leave_one_out_drops_them_all():
    torch.manual_seed(1)
    good = torch.rand(4, 3, 16, 16)
    backbone = FixedPatches()
    head = create_anomaly_head("anomalydino").fit(good, backbone)  # 4 images: rotated by default
    assert head.rotated_ and len(head.memory_bank_) == len(ANGLES) * 4 * 16
    left_out_maps, left_out = head.score_left_out(good, 0, backbone)
    for j in range(4):
        others = torch.cat([good[:j], good[j + 1 :]])
        refit = create_anomaly_head("anomalydino", rotate=True).fit(others, backbone)
        maps, score = refit.score(good[j : j + 1], backbone)
        torch.testing.assert_close(left_out_maps[j], maps[0], atol=1e-5, rtol=1e-4)
        assert left_out[j].item() == pytest.approx(score.item(), abs=1e-5)
    in_sample = head.score(good, backbone)[1]
    assert (in_sample < 1e-6).all() and (left_out > 1e-4).all()  # in the bank an image's own patches are at 0
    many = create_anomaly_head("anomalydino").fit(torch.rand(17, 3, 16, 16), backbone)
    assert not many.rotated_ and len(many.memory_bank_) == 17 * 16  # beyond 16 images no copies by default


def test_the_foreground_mask_keeps_the_object_whatever_the_sign_of_the_component():
    feats = torch.zeros(8, 12, 12)
    feats[:, 3:9, 3:9] = torch.linspace(20, 30, 8)[:, None, None]  # a bright square object on a flat background
    mask = foreground_mask(feats, threshold=5.0)
    assert mask[4:8, 4:8].all() and not mask[0, 0] and not mask[11, 11]
    assert torch.equal(foreground_mask(-feats, threshold=5.0), mask)


@pytest.mark.parametrize("shots, floors", [(1, (0.95, 0.88)), (4, (0.95, 0.90))])
def test_few_shot_image_auroc_on_the_textile_images(texture, textile_pixels, shots, floors):
    """Measured on these images (seed 0, texture backbone, 40 per kind): 1-shot 0.998 local / 0.924 global,
    4-shot 0.994 / 0.940; floors pinned below."""
    head = create_anomaly_head("anomalydino").fit(textile_pixels["fit"][:shots], texture)
    assert head.metric_ == "euclidean" and head.rotated_  # the texture statistics declare their distance

    def scores(kind):
        return finish(head, *head.score(textile_pixels[kind], texture), texture.input_size, 4.0)[1].numpy()

    good = scores("good")
    for kind, floor in zip(("local", "global"), floors):
        bad = scores(kind)
        auroc = roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])
        assert auroc >= floor, f"{shots}-shot {kind}: AUROC {auroc:.3f} < {floor}"


def test_shots_fit_the_bank_on_k_images_and_calibrate_on_the_others(texture, textile_subset, tmp_path):
    from model_checks import tensor_layouts

    from fewvision.modelfile import load, save_model
    from fewvision.tasks.anomaly import fit_anomaly, good_images, score_files

    good = textile_subset / "nominal"  # 12 good images
    n = len(good_images([good])[0])
    model = fit_anomaly(good, "anomalydino", texture, shots=2, target_false_reject=0.2)
    assert model.head.n_train_images_ == 2 and model.info["n_fit_images"] == 2
    assert model.decision["n_calibration"] == n - 2 and model.decision["shots"] == 2
    assert model.decision["calibration"] == "split conformal"
    probe = [str(p) for p in sorted((textile_subset / "local").glob("*.jpg"))[:3]]
    before = score_files(model, probe, use_cache=False)
    again = load(save_model(tmp_path / "few.fvm", model)).bind(texture)
    after = score_files(again, probe, use_cache=False)
    assert tensor_layouts(again.head) == tensor_layouts(model.head) and again.head.metric_ == "euclidean"
    assert np.array_equal(before.scores, after.scores) and np.array_equal(before.maps, after.maps)
    with pytest.raises(ValueError, match="shots must be in 1"):
        fit_anomaly(good, "anomalydino", texture, shots=n + 1)


def test_a_timm_vit_gives_its_last_blocks_normalised_patch_tokens_to_anomalydino():
    from fewvision.backbones import create_backbone

    vit = create_backbone("timm:vit_small_patch14_dinov2.lvd142m@random")  # DINOv2's architecture, random weights
    assert vit.is_vit and vit.feature_layers == (11,) and vit.input_size == (518, 518)
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        blocks = vit.model.forward_features(x)  # every token after the final norm: the class token, then 37 x 37 patches
    tokens = blocks[:, -37 * 37 :].transpose(1, 2).reshape(1, 384, 37, 37)
    torch.testing.assert_close(vit.patch_features(x), tokens, atol=1e-5, rtol=1e-5)
    head = create_anomaly_head("anomalydino", rotate=False)
    assert head.feature_layers(vit) is None  # the backbone's default: the last block
    head.fit(torch.randn(2, 3, 518, 518), vit)
    assert head.metric_ == "cosine" and head.grid_ == [37, 37] and head.memory_bank_.shape == (2 * 37 * 37, 384)
