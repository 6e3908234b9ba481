import math

import numpy as np
import pytest

from fewvision.decide.calibration import fit_temperature
from fewvision.decide.conformal import (
    calibrate_conformal,
    conformal_quantile,
    nonconformity,
    prediction_sets,
    set_metrics,
)
from fewvision.decide.review import REVIEW, decide


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sample(n, c=5, seed=0, temperature=1.0, spread=2.0):
    """Logits and labels drawn from softmax(logits / temperature); class frequencies deliberately unequal."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, spread, size=(n, c)) + np.linspace(0, 1.5, c)
    p = _softmax(logits / temperature)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


def test_temperature_recovers_known_temperature():
    logits, labels = _sample(20000, temperature=2.5, seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)
    logits, labels = _sample(20000, temperature=0.5, seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.05)


def test_finite_sample_quantile():
    scores = np.arange(1, 10) / 10.0  # n = 9
    assert conformal_quantile(scores, 0.1) == pytest.approx(0.9)  # ceil(10 * 0.9) = 9th smallest
    assert conformal_quantile(scores, 0.5) == pytest.approx(0.5)  # ceil(10 * 0.5) = 5th smallest
    assert math.isinf(conformal_quantile(scores[:5], 0.1))  # ceil(6 * 0.9) = 6 > 5: keep every class


def test_aps_score_is_mass_at_or_above_the_class():
    p = np.array([[0.5, 0.2, 0.3]])
    np.testing.assert_allclose(nonconformity(p, "aps"), [[0.5, 1.0, 0.8]])
    np.testing.assert_allclose(nonconformity(p, "lac"), [[0.5, 0.8, 0.7]])


@pytest.mark.parametrize("score", ["lac", "aps"])
@pytest.mark.parametrize("mondrian", [False, True])
def test_coverage_on_a_large_test_set(score, mondrian):
    alpha = 0.1
    # A miscalibrated model (the data are sharper than its probabilities): coverage must hold anyway.
    cal_logits, cal_y = _sample(3000, seed=3, temperature=0.7)
    test_logits, test_y = _sample(30000, seed=4, temperature=0.7)
    conformal = calibrate_conformal(_softmax(cal_logits), cal_y, alpha, score, mondrian)
    sets = prediction_sets(_softmax(test_logits), conformal)
    metrics = set_metrics(sets, test_y, [f"c{i}" for i in range(5)])
    assert metrics["coverage"] >= 1 - alpha - 0.015
    assert metrics["coverage"] <= 1 - alpha + 0.04  # valid, not trivially by returning every class
    assert metrics["mean_set_size"] < 5
    if mondrian:
        assert len(set(conformal["thresholds"])) == 5
        for cls, cov in metrics["coverage_per_class"].items():
            assert cov >= 1 - alpha - 0.03, cls


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_shrink_as_alpha_grows(score):
    cal_logits, cal_y = _sample(3000, seed=5)
    test_logits, test_y = _sample(5000, seed=6)
    sizes = []
    for alpha in (0.02, 0.05, 0.1, 0.2, 0.4):
        sets = prediction_sets(_softmax(test_logits), calibrate_conformal(_softmax(cal_logits), cal_y, alpha, score))
        sizes.append(set_metrics(sets, test_y)["mean_set_size"])
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert sizes[0] > sizes[-1] + 0.5


def test_abstain_routes_ambiguous_and_empty_sets_to_review_with_a_reason():
    sets = np.array([[True, False, False], [True, True, False], [False, False, False], [False, False, True]])
    proba = np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.4, 0.3, 0.3], [0.5, 0.1, 0.4]])
    out = decide(proba, ["a", "b", "c"], sets=sets, alpha=0.1, abstain=True)
    assert [label for label, _ in out] == ["a", REVIEW, REVIEW, "c"]  # a singleton set's member, even if not top
    assert out[0][1] is None and out[3][1] is None
    assert out[1][1] == "2 classes are in the 90% prediction set: a, b"
    assert out[2][1] == "no class reached the 90% coverage level"
    below = decide(proba, ["a", "b", "c"], unknown_threshold=0.6)
    assert below[0] == ("a", None) and below[1][0] == REVIEW and "below the review threshold 0.6" in below[1][1]
    with pytest.raises(ValueError, match="review"):
        decide(proba, ["a", "review", "c"], sets=sets, alpha=0.1, abstain=True)


def test_bad_alpha_and_score():
    p = _softmax(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="alpha"):
        calibrate_conformal(p, np.arange(4) % 3, 1.5)
    with pytest.raises(ValueError, match="unknown conformal score"):
        calibrate_conformal(p, np.arange(4) % 3, 0.1, "raps")


def test_temperature_scaling_is_softmax_of_logits_over_t():
    """A head's probabilities softmax(z) scaled by T must equal softmax(z / T), computed here from the logits."""
    import torch

    from fewvision.decide.calibration import apply_temperature
    from fewvision.heads import PrototypeHead
    from fewvision.heads.support import Support

    feats = torch.nn.functional.normalize(torch.randn(12, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    head = PrototypeHead().fit(Support(feats, torch.arange(12) % 3, ["a", "b", "c"]))
    logits = head.logits(feats).double().numpy()
    proba = head.predict_proba(feats)
    np.testing.assert_allclose(apply_temperature(proba, 2.7), _softmax(logits / 2.7), atol=1e-6)
    np.testing.assert_allclose(apply_temperature(proba, 0.5), _softmax(logits / 0.5), atol=1e-6)
    assert np.array_equal(apply_temperature(proba, None), proba)
