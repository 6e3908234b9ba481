import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from fewvision.metrics import save_metrics
from fewvision.metrics.classification import _metrics_from_confusions, classification_metrics

NAMES = ["ok", "scratch", "dent"]
# 10 items. Confusion (rows true, cols pred):
#   ok:      [2, 1, 0]   scratch: [0, 2, 1]   dent: [1, 0, 3]
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 2, 2, 0]


def test_point_metrics_match_hand_computed():
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES, n_bootstrap=200)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(7 / 10)
    # recalls 2/3, 2/3, 3/4
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    # precisions: ok 2/3, scratch 2/3, dent 3/4 -> F1 2/3, 2/3, 3/4
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 3 / 4) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 1], [1, 0, 3]]
    assert m["confusion_matrix"][2][0] == 1  # one dent predicted as ok
    assert m["confusion_labels"] == NAMES
    assert m["per_class"]["dent"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert m["per_class"]["ok"]["support"] == 3
    assert "n_review" not in m
    assert set(m["ci"]) == {"accuracy", "balanced_accuracy", "macro_f1"}
    json.dumps(m, allow_nan=False)  # JSON-serialisable, no numpy types


def test_unknown_predictions():
    y_pred = [0, 0, -1, 1, 1, 2, 2, 2, -1, 0]
    m = classification_metrics(Y_TRUE, y_pred, NAMES, n_bootstrap=200)
    assert m["n_review"] == 2
    assert m["accuracy"] == pytest.approx(6 / 10)
    assert m["confusion_labels"] == NAMES + ["review"]
    assert m["confusion_matrix"] == [[2, 0, 0, 1], [0, 2, 1, 0], [1, 0, 2, 1]]
    # abstentions are false negatives for their true class
    assert m["per_class"]["ok"]["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["ok"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["dent"]["recall"] == pytest.approx(2 / 4)
    assert m["per_class"]["dent"]["precision"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2) / 3)
    json.dumps(m, allow_nan=False)


def test_vectorised_bootstrap_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    c = 4
    for _ in range(20):
        n = int(rng.integers(3, 30))
        yt = rng.integers(0, c, n)
        yp = np.where(rng.random(n) < 0.6, yt, rng.integers(-1, c, n))
        cm = np.zeros((1, c, c + 1), dtype=int)
        np.add.at(cm[0], (yt, np.where(yp == -1, c, yp)), 1)
        got = _metrics_from_confusions(cm, n)
        assert got["accuracy"][0] == pytest.approx(np.mean(yt == yp))
        assert got["macro_f1"][0] == pytest.approx(f1_score(yt, yp, labels=range(c), average="macro", zero_division=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" for -1
            expected_bacc = balanced_accuracy_score(yt, yp)
        assert got["balanced_accuracy"][0] == pytest.approx(expected_bacc)


def _synthetic(n, seed=1, acc=0.8, c=3):
    rng = np.random.default_rng(seed)
    yt = rng.integers(0, c, n)
    yp = np.where(rng.random(n) < acc, yt, (yt + rng.integers(1, c, n)) % c)
    return yt, yp


def test_ci_contains_point_and_narrows_with_n():
    widths = {}
    for n in (20, 2000):
        yt, yp = _synthetic(n)
        m = classification_metrics(yt, yp, NAMES, n_bootstrap=1000, seed=0)
        for k in ("accuracy", "balanced_accuracy", "macro_f1"):
            lo, hi = m["ci"][k]
            assert 0.0 <= lo <= m[k] <= hi <= 1.0, (n, k, lo, m[k], hi)
        widths[n] = m["ci"]["accuracy"][1] - m["ci"]["accuracy"][0]
    assert widths[2000] < widths[20] / 3


def test_deterministic_for_seed_and_varies_with_seed():
    yt, yp = _synthetic(50)
    a = classification_metrics(yt, yp, NAMES, seed=7)
    b = classification_metrics(yt, yp, NAMES, seed=7)
    c = classification_metrics(yt, yp, NAMES, seed=8)
    assert a == b
    assert a["ci"] != c["ci"]


@pytest.mark.parametrize(
    "yt, yp",
    [([0, 1], [0]), ([], []), ([0, 3], [0, 1]), ([0, 1], [0, -2])],
)
def test_rejects_bad_input(yt, yp):
    with pytest.raises(ValueError):
        classification_metrics(yt, yp, NAMES, n_bootstrap=10)


def test_save_metrics_atomic_json(tmp_path):
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES, n_bootstrap=50)
    out = tmp_path / "sub" / "metrics.json"
    save_metrics(m, out)
    text = out.read_text()
    assert json.loads(text) == m
    assert text.startswith("{\n  ")  # indent=2
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from fewvision.io.atomic import atomic_write_text

    path = atomic_write_text(tmp_path / "out.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_numpy_metrics_are_scikit_learns_on_ties_absent_classes_and_abstentions():
    """The light install evaluates without scikit-learn: the numpy AUROC, AP and classification point metrics must
    be scikit-learn's numbers (ties in scores, classes never predicted or never present, review = -1)."""
    from sklearn.metrics import (accuracy_score, average_precision_score, precision_recall_fscore_support,
                                 roc_auc_score, roc_curve)

    from fewvision.metrics import ranking
    from fewvision.metrics.ranking import average_precision, roc_auc

    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.integers(4, 60))
        y = rng.random(n) < rng.uniform(0.1, 0.9)
        y[0], y[1] = True, False
        s = np.round(rng.normal(y * rng.uniform(0, 2), 1), int(rng.integers(0, 3)))  # rounding makes ties
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)  # the report's ROC chart
        assert np.allclose(np.c_[ranking.roc_curve(y, s)], np.c_[fpr, tpr], atol=1e-12), trial
        c = int(rng.integers(2, 6))
        y_true = rng.integers(0, c - 1, n)  # the last class never occurs
        y_pred = np.where(rng.random(n) < 0.15, -1, rng.integers(0, c, n))
        m = classification_metrics(y_true, y_pred, [f"c{i}" for i in range(c)], n_bootstrap=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
            assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
            assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=list(range(c)), average="macro",
                                                           zero_division=0), abs=1e-12)
            prec, rec, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=list(range(c)),
                                                                     zero_division=0)
        got = np.array([[m["per_class"][f"c{i}"][k] for k in ("precision", "recall", "f1", "support")]
                        for i in range(c)])
        assert np.allclose(got, np.c_[prec, rec, f1, support], atol=1e-12), trial
