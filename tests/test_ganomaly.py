"""GANomaly on scikit-learn's digits at 16 px: the paper's losses train the encoder-decoder-encoder, and what training
adds is measured against the same network untrained (trained on one digit, other digits are the anomalies)."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fewvision.anomaly import anomaly_head_classes, create_anomaly_head
from fewvision.anomaly.ganomaly import GANomaly

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(image_size=16, width=32, steps=160, batch_size=16, seed=0)


@pytest.fixture(scope="module")
def texture():
    from fewvision.backbones import create_backbone

    return create_backbone("texture")


@pytest.fixture(scope="module")
def pixels():
    """64 images of the digit 1 to fit on, 60 more held out, and 60 of the other digits (the anomalies), as
    [N, 3, 8, 8] pixels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1) / 16.0
    ones, others = np.where(digits.target == 1)[0], np.where(digits.target != 1)[0]
    return {"fit": x[ones[:64]], "good": x[ones[64:124]], "other": x[others[:60]]}


@pytest.fixture(scope="module")
def head(pixels):
    return create_anomaly_head("ganomaly", **SMALL).fit(pixels["fit"])


def auroc(head, pixels) -> float:
    good, bad = head.score(pixels["good"])[1], head.score(pixels["other"])[1]
    return roc_auc_score([0] * len(good) + [1] * len(bad), torch.cat([good, bad]).numpy())


def test_registered_as_a_pixel_head():
    assert anomaly_head_classes()["ganomaly"] is GANomaly and GANomaly.inputs == "pixels"
    params = GANomaly().get_params()
    assert (params["w_adv"], params["w_con"], params["w_enc"]) == (1.0, 50.0, 1.0)  # the paper's weights


def test_training_lowers_the_contextual_loss(head):
    history = head.loss_history_
    assert sum(len(range(0, 64, 16)) for _ in history) == SMALL["steps"]  # 4 updates a pass over 64 images
    assert history[-1]["con"] < 0.75 * history[0]["con"]
    assert history[-1]["enc"] < history[0]["enc"]


def test_training_is_what_ranks_other_digits_above_the_good_one(head, pixels):
    untrained = create_anomaly_head("ganomaly", **{**SMALL, "steps": 0}).fit(pixels["fit"])
    # measured 0.083 untrained (a random encoder-decoder-encoder scores the thin 1s' latents as the most distant)
    # and 0.996 after 160 updates (0.987-0.996 over seeds 0-2)
    assert auroc(untrained, pixels) < 0.3
    assert auroc(head, pixels) >= 0.95


def test_score_is_the_mean_absolute_latent_difference(head, pixels):
    x = head._prepare(pixels["good"][:4])
    with torch.inference_mode():
        z = head._generator.encoder1(x)
        z_hat = head._generator.encoder2(head._generator.decoder(z))
        fake = head._generator.decoder(z)
    maps, scores = head.score(pixels["good"][:4])
    torch.testing.assert_close(scores, (z - z_hat).abs().flatten(1).mean(1))
    torch.testing.assert_close(maps, (x - fake).abs().mean(1))
    assert maps.shape == (4, 16, 16)
    assert x.min() >= -1.5 and x.max() <= 1.5  # mapped to the tanh range by the training images' range


def test_training_is_seeded(pixels):
    a = GANomaly(**{**SMALL, "steps": 3}).fit(pixels["fit"][:32])
    b = GANomaly(**{**SMALL, "steps": 3}).fit(pixels["fit"][:32])
    assert a.loss_history_ == b.loss_history_
    for (ka, va), (kb, vb) in zip(a._generator.state_dict().items(), b._generator.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_saves_and_loads_identically(head, pixels, texture, tmp_path):
    from fewvision.modelfile import FewVisionModel, load, save_model

    path = save_model(tmp_path / "g.fvm", FewVisionModel(head, texture.spec, texture.id, task="anomaly"))
    loaded = load(path).head
    assert loaded.get_params() == head.get_params() and loaded.n_trainable_parameters() == head.n_trainable_parameters()
    a, b = head.score(pixels["other"]), loaded.score(pixels["other"])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("params, message", [({"image_size": 48}, "power of two"),
                                             ({"score_norm": "max"}, "score_norm")])
def test_refuses_what_the_network_cannot_do(params, message, pixels):
    with pytest.raises(ValueError, match=message):
        GANomaly(**params).fit(pixels["fit"][:4])


def test_needs_two_good_images(pixels):
    with pytest.raises(ValueError, match="at least 2"):
        GANomaly(**SMALL).fit(pixels["fit"][:1])
