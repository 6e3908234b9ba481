"""Trained anomaly heads (AE, VAE, STPM) on a few real textile images, briefly trained at low resolution."""

import math

import pytest
import torch
from model_checks import tensor_layouts

from fewvision.anomaly import anomaly_head_classes
from fewvision.anomaly.autoencoder import (
    AutoencoderHead,
    VariationalAutoencoderHead,
    gaussian_window,
    ssim_map,
)
from fewvision.anomaly.stpm import StpmHead, level_distances, stpm_loss
from fewvision.backbones import create_backbone
from fewvision.backbones.base import BackboneError
from fewvision.io.images import load_image

SMALL_AE = dict(image_size=64, channels=(16, 32, 64), latent_channels=8, epochs=8, batch_size=8, lr=3e-3, seed=0)
BLOB = (slice(80, 120), slice(80, 120))  # in the 224 x 224 preprocessed image


@pytest.fixture(scope="module")
def resnet():
    return create_backbone("timm:resnet18@random")


@pytest.fixture(scope="module")
def pixels(resnet, textile_root):
    paths = sorted((textile_root / "nominal").glob("*.jpg"))[:20]
    return torch.stack([resnet.preprocess(load_image(p)) for p in paths])


@pytest.fixture(scope="module")
def with_blob(pixels):
    q = pixels[16:].clone()
    q[:, :, BLOB[0], BLOB[1]] = pixels.max()
    return q


@pytest.fixture(scope="module")
def ae(pixels):
    return AutoencoderHead(error="both", **SMALL_AE).fit(pixels[:16])


@pytest.fixture(scope="module")
def vae(pixels):
    return VariationalAutoencoderHead(beta=1.0, error="both", **SMALL_AE).fit(pixels[:16])


@pytest.fixture(scope="module")
def stpm(pixels, resnet):
    return StpmHead(image_size=64, epochs=4, batch_size=4, seed=0).fit(pixels[:8], resnet)


def _inside_outside(maps: torch.Tensor) -> tuple[float, float]:
    up = torch.nn.functional.interpolate(maps[:, None], size=(224, 224), mode="nearest")[:, 0]
    inside = up[:, BLOB[0], BLOB[1]]
    outside_sum = up.sum() - inside.sum()
    return float(inside.mean()), float(outside_sum / (up.numel() - inside.numel()))


def _roundtrip(head, tmp_path, backbone):
    from fewvision.modelfile import FewVisionModel, load, save_model

    path = save_model(tmp_path / f"{head.method}.fvm", FewVisionModel(head, backbone.spec, backbone.id, task="anomaly"))
    loaded = load(path).head
    assert tensor_layouts(loaded) == tensor_layouts(head)
    return loaded


def test_registered_as_pixel_heads():
    classes = anomaly_head_classes()
    assert classes["ae"] is AutoencoderHead and classes["vae"] is VariationalAutoencoderHead
    assert classes["stpm"] is StpmHead
    assert {classes[m].inputs for m in ("ae", "vae", "stpm")} == {"pixels"}


# --- SSIM -----------------------------------------------------------------------------------------------------------
def test_ssim_of_identical_images_is_one_everywhere():
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    s = ssim_map(x, x, data_range=1.0)
    assert s.shape == (2, 40, 40)
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)
    assert ssim_map(x, x.flip(-1), data_range=1.0).mean() < 0.5


def test_ssim_matches_a_direct_computation_at_one_pixel():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, 30, 30, generator=gen), torch.rand(1, 1, 30, 30, generator=gen)
    y = 0.5 * x + 0.5 * y
    w = gaussian_window(11, 1.5).double()
    assert w.sum().item() == pytest.approx(1.0)
    px, py = x[0, 0, 10:21, 8:19].double(), y[0, 0, 10:21, 8:19].double()  # the window centred on (15, 13)
    mx, my = (w * px).sum(), (w * py).sum()
    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
    cxy = (w * (px - mx) * (py - my)).sum()
    c1, c2 = 0.01**2, 0.03**2
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim_map(x, y, 1.0)[0, 15, 13].item() == pytest.approx(expected.item(), abs=1e-5)


# --- AE / VAE -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ae", "vae"])
def test_training_reduces_the_reconstruction_error(name, request):
    head = request.getfixturevalue(name)
    history = head.recon_history_
    assert len(history) == 8 and len(head.loss_history_) == 8
    # Measured (8 epochs, 16 images, 64 px, seeds 0/1/2): ae drops 23/12/11 %, vae 8/11/4 %; required: 2 %.
    assert history[-1] < 0.98 * history[0]
    assert head.loss_history_[-1] < head.loss_history_[0]


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_a_bright_blob_is_hotter_inside_than_outside(name, request, with_blob):
    head = request.getfixturevalue(name)
    maps, scores = head.score(with_blob)
    assert maps.shape == (4, 64, 64) and scores.shape == (4,)
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))
    inside, outside = _inside_outside(maps)
    assert inside > outside + 1.0  # standardised units; measured ae 5.0 vs 0.04, vae 2.3 vs -0.03
    head_l2 = type(head).from_state(*head.state())
    head_l2.error = "l2"
    inside, outside = _inside_outside(head_l2.score(with_blob)[0])
    assert inside > 4 * outside  # measured ae 33 vs 2.5, vae 32 vs 3.2


def test_vae_loss_is_reconstruction_plus_beta_kl():
    head = VariationalAutoencoderHead(beta=2.0)
    x = torch.zeros(2, 3, 4, 4)
    recon = torch.ones(2, 3, 4, 4)
    mu, logvar = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    # 0.5 * 48 squared errors of 1, KL = 0.5 * 4 * mu^2 = 2 per image
    assert head._loss(x, recon, mu, logvar).item() == pytest.approx(0.5 * 48 + 2.0 * 2.0)


def test_autoencoder_training_is_seeded(pixels):
    a = AutoencoderHead(**{**SMALL_AE, "epochs": 1}).fit(pixels[:8])
    b = AutoencoderHead(**{**SMALL_AE, "epochs": 1}).fit(pixels[:8])
    assert a.loss_history_ == b.loss_history_
    for (ka, va), (kb, vb) in zip(a._net.state_dict().items(), b._net.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("name", ["ae", "vae"])
def test_autoencoders_save_and_load_identically(name, request, tmp_path, resnet, with_blob):
    head = request.getfixturevalue(name)
    loaded = _roundtrip(head, tmp_path, resnet)
    assert type(loaded) is type(head) and loaded.n_trainable_parameters() == head.n_trainable_parameters() > 0
    a, b = head.score(with_blob), loaded.score(with_blob)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_autoencoder_rejects_sizes_the_network_cannot_halve(pixels):
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderHead(image_size=60, channels=(8, 8, 8)).fit(pixels[:2])


# --- STPM -----------------------------------------------------------------------------------------------------------
def test_stpm_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    student = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 5, 2, 2, generator=g)]
    expected = 0.0
    for t, s in zip(teacher, student):
        _, _, h, w = t.shape
        for b in range(2):  # summed over the images of the batch, as the reference implementations
            for i in range(h):
                for j in range(w):
                    tv, sv = t[b, :, i, j], s[b, :, i, j]
                    expected += 0.5 * float(((tv / tv.norm() - sv / sv.norm()) ** 2).sum()) / (h * w)
    assert float(stpm_loss(teacher, student)) == pytest.approx(expected, rel=1e-5)


def test_stpm_student_learns_the_teacher(stpm):
    history = stpm.loss_history_
    assert len(history) == 4
    # Measured 1.57 -> 0.68 per image after 4 epochs (SGD lr 0.4, 8 images, 64 px, the loss summed over the batch;
    # 1.58 -> 1.18 with the batch mean it used to take); required: a 40% drop.
    assert history[-1] < 0.6 * history[0]


def test_trained_stpm_localises_a_pasted_defect_better_than_an_untrained_student(stpm, resnet, pixels, with_blob):
    from sklearn.metrics import roc_auc_score

    untrained = StpmHead(image_size=64, epochs=0, batch_size=4, seed=0).fit(pixels[:8], resnet)
    mask = torch.zeros(224, 224, dtype=torch.bool)
    mask[BLOB] = True

    def pixel_auroc(head):
        maps, _ = head.score(with_blob, resnet)
        up = torch.nn.functional.interpolate(maps[:, None], size=(224, 224), mode="bilinear")[:, 0]
        return roc_auc_score(mask.expand(len(up), -1, -1).flatten().numpy(), up.flatten().numpy())

    trained, random_student = pixel_auroc(stpm), pixel_auroc(untrained)
    # Measured 0.980 trained against 0.941 untrained (a random teacher, 4 epochs on 8 images).
    assert trained > random_student + 0.02


def test_stpm_map_is_the_product_of_level_distances(stpm, resnet, pixels):
    maps, scores = stpm.score(pixels[16:], resnet)
    assert maps.shape == (4, 16, 16) and scores.shape == (4,)  # layer1 of a 64 px input
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))
    x = torch.nn.functional.interpolate(pixels[16:], size=(64, 64), mode="bilinear", antialias=True)
    teacher = stpm._teacher(resnet)
    with torch.inference_mode():
        dists = level_distances(teacher(x), stpm._student(x))
    assert [tuple(d.shape[-2:]) for d in dists] == [(16, 16), (8, 8), (4, 4)]
    expected = dists[0].clone()
    for d in dists[1:]:
        expected *= torch.nn.functional.interpolate(d[:, None], size=(16, 16), mode="bilinear")[:, 0]
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    assert all(0 <= d.min() and d.max() <= 2 for d in dists)  # half squared distance of unit vectors


def test_stpm_save_and_load_identically(stpm, tmp_path, resnet, pixels):
    loaded = _roundtrip(stpm, tmp_path, resnet)
    a, b = stpm.score(pixels[16:], resnet), loaded.score(pixels[16:], resnet)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert loaded.n_trainable_parameters() == stpm.n_trainable_parameters() > 1_000_000


def test_stpm_needs_a_timm_teacher(tiny_clip):
    x = torch.zeros(2, 3, 64, 64)
    with pytest.raises(BackboneError, match="timm"):
        StpmHead(epochs=1).fit(x, tiny_clip)


def test_stpm_refuses_another_teacher_at_scoring(stpm, pixels):
    from fewvision.backbones.timm_backbone import TimmBackbone

    other = TimmBackbone("timm:resnet18@random", feature_layers=(1,))  # same weights, another id
    with pytest.raises(BackboneError, match="fitted with teacher"):
        stpm.score(pixels[:1], other)
    assert math.isfinite(stpm.loss_history_[-1])
