"""The monitor: conformal p-values, the Simple Jumper test martingale, the EWMA chart and Nelson rules, and the
offline ``fewvision monitor`` command - its false-alarm rate and its detection delay measured on textile images."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fewvision.monitor.martingale import SimpleJumper
from fewvision.monitor.pvalues import OnlinePValues
from fewvision.monitor.spc import Chart
from fewvision.monitor.watch import Monitor


def test_simple_jumper_follows_its_algorithm():
    # Vovk et al. 2021, Algorithm 1 with J = 0.01, by hand: two p-values of 0.1.
    m = SimpleJumper(0.01)
    assert m.update(0.1) == pytest.approx((1.4 + 1 + 0.6) / 3)
    c_minus = (0.99 * 1.4 / 3 + 0.01 / 3) * 1.4
    c_zero = (0.99 / 3 + 0.01 / 3) * 1.0
    c_plus = (0.99 * 0.6 / 3 + 0.01 / 3) * 0.6
    assert m.update(0.1) == pytest.approx(c_minus + c_zero + c_plus)
    assert c_minus + c_zero + c_plus == pytest.approx(1.1056, abs=1e-4)


def test_online_p_values_rank_against_calibration_and_the_past():
    p = OnlinePValues([1.0, 2.0, 3.0], seed=0)
    first = p(2.5)  # one calibration score above it, no tie: (1 + theta) / 4
    assert 0.25 <= first <= 0.5
    second = p(10.0)  # nothing above it in a bag of 4: theta / 5
    assert 0 <= second <= 0.2
    assert p.seen == 5
    tie = p(10.0)  # one equal score seen before: theta * 2 / 6
    assert 0 <= tie <= 2 / 6
    # exchangeable data: the p-values are uniform (a smoothed conformal p-value is exactly uniform)
    from scipy.stats import kstest

    rng = np.random.default_rng(1)
    online = OnlinePValues(rng.normal(size=100), seed=2)
    values = [online(x) for x in rng.normal(size=3000)]
    assert kstest(values, "uniform").pvalue > 0.01


def test_ewma_limits_and_nelson_rules():
    chart = Chart([0.0, 2.0])  # mu 1, sigma sqrt(2)
    assert (chart.mu, chart.sigma) == (1.0, pytest.approx(math.sqrt(2)))
    first = chart.update(3.0)
    assert first["ewma"] == pytest.approx(0.2 * 3 + 0.8 * 1)
    half = 3 * math.sqrt(2) * math.sqrt(0.2 / 1.8 * (1 - 0.8 ** 2))
    assert (first["lower"], first["upper"]) == (pytest.approx(1 - half), pytest.approx(1 + half))
    assert 1 not in first["rules"] and chart.update(1 + 3.1 * math.sqrt(2))["rules"] == [1]

    def rules(xs):
        c = Chart([0.0, 2.0])
        return [c.update(x)["rules"] for x in xs]

    nine_above = rules([1.5] * 9)
    assert [2 in r for r in nine_above] == [False] * 8 + [True]
    rising = rules([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert [3 in r for r in rising] == [False] * 5 + [True]
    zigzag = rules([0.5, 1.5] * 7)
    assert [4 in r for r in zigzag] == [False] * 13 + [True]


def test_a_run_is_one_alarm_and_the_martingale_starts_again():
    rng = np.random.default_rng(0)
    cal = rng.normal(size=200)
    mon = Monitor(cal, threshold=2.3, seed=0).run(np.r_[rng.normal(size=100), rng.normal(3.0, 1, size=200)])
    martingale = [a["row"] for a in mon.alarms if a["kind"] == "martingale"]
    assert martingale and martingale[0] >= 100 and len(martingale) >= 2  # after each alarm, a new test
    # the EWMA left its limits once when the scores moved, and stayed out
    assert len([a for a in mon.alarms if a["kind"] == "ewma" and a["row"] >= 100]) == 1
    assert "over the threshold" in mon.alarms[0]["message"] and "median score" in mon.alarms[0]["message"]


@pytest.fixture(scope="module")
def textile_scores(textile_root, tmp_path_factory):
    """PaDiM (texture backbone) fitted on 60 good textile images; the scores of 240 other good ones and of 60 good
    ones blurred (Gaussian, sigma 2)."""
    from fewvision.tasks.anomaly import fit_anomaly, score_files

    good = sorted((textile_root / "nominal").glob("*.jpg"))
    model = fit_anomaly(good[:60], "padim", "texture", target_false_reject=0.05, use_cache=False)
    folder = tmp_path_factory.mktemp("blurred")
    blurred = []
    for p in good[300:360]:
        Image.open(p).filter(ImageFilter.GaussianBlur(2)).save(folder / p.name)
        blurred.append(folder / p.name)
    ok = score_files(model, good[60:300], keep_maps=False, use_cache=False).scores
    blur = score_files(model, blurred, keep_maps=False, use_cache=False).scores
    return model, np.asarray(ok), np.asarray(blur)


def test_false_alarms_stay_under_delta_and_a_blur_is_caught(textile_scores):
    """Measured: no martingale alarm in 200 random orders of the 240 good images' scores (the largest value
    reached: 95th percentile about 4, against 1/delta = 100); blurred images (sigma 2) after 100 good ones are
    caught after 21 of them in the median order."""
    model, ok, blur = textile_scores
    cal, thr = model.decision["calibration_scores"], model.decision["threshold"]
    rng = np.random.default_rng(0)
    false_alarms = sum(any(a["kind"] == "martingale" for a in Monitor(cal, threshold=thr, seed=k)
                           .run(rng.permutation(ok)).alarms) for k in range(200))
    assert false_alarms <= 4  # delta = 0.01: at most 2 of 200 expected at the bound; measured 0
    delays = []
    for k in range(20):
        stream = np.r_[rng.permutation(ok)[:100], rng.permutation(blur)]
        mon = Monitor(cal, threshold=thr, seed=k).run(stream)
        first = min((a["row"] for a in mon.alarms if a["kind"] == "martingale"), default=None)
        assert first is None or first >= 100, first  # no alarm before the blur started
        delays.append(math.inf if first is None else first - 99)
    assert np.percentile(delays, 90) <= 50, delays


def test_monitor_command(tmp_path, textile_scores, monkeypatch, capsys):
    from cli_helpers import run_cli

    from fewvision.modelfile import save_model

    model, ok, blur = textile_scores
    model_path = save_model(tmp_path / "padim.fvm", model)
    quiet = tmp_path / "quiet.csv"
    quiet.write_text("path,score,threshold\n" + "".join(f"g{i}.jpg,{s},{model.decision['threshold']}\n"
                                                       for i, s in enumerate(ok[:80])))
    drift = tmp_path / "drift.jsonl"
    drift.write_text(json.dumps({"path": "bad.jpg", "error": "cannot decode"}) + "\n"
                     + "".join(json.dumps({"path": f"b{i}.jpg", "score": float(s)}) + "\n"
                               for i, s in enumerate(blur)))
    out = tmp_path / "monitor.json"
    code, _, err = run_cli(monkeypatch, capsys, "monitor", quiet, "--model", model_path, "-o", out, "--exit-code")
    quiet_result = json.loads(out.read_text())
    assert code == 0 and not [a for a in quiet_result["alarms"] if a["kind"] == "martingale"], err
    code, _, err = run_cli(monkeypatch, capsys, "monitor", quiet, drift, "--model", model_path, "-o", out,
                           "--report", tmp_path / "report", "--exit-code")
    result = json.loads(out.read_text())
    assert code == 1, err
    first = next(a for a in result["alarms"] if a["kind"] == "martingale")
    assert 81 <= first["row"] <= 81 + 50  # row 80 is the unreadable file's: rows count over all inputs
    assert result["series"]["row"][80] == 81 and len(result["series"]["score"]) == 80 + len(blur)
    assert "monitor.html" in err and (tmp_path / "report" / "monitor.html").stat().st_size > 10_000
    code, _, err = run_cli(monkeypatch, capsys, "monitor", tmp_path / "nope.csv", "--model", model_path, "-o", out)
    assert code == 2 and "nope.csv: cannot read" in err and err.count("\n") == 1


def test_a_classification_model_is_watched_through_its_held_out_images(textile_root, tmp_path, monkeypatch, capsys):
    """A prototype head fitted with a calibration fraction keeps how unsure it was of each held-out image (1 - top
    probability); on that scale 180 other images raise no alarm in 200 orders, and blurred images (sigma 2: the
    head grows more sure of them) are caught (measured: 19 of 20 orders within the 60 blurred images, median 46).
    ``fewvision monitor`` reads the top probability of 'predict' rows."""
    import shutil

    from cli_helpers import run_cli

    from fewvision.modelfile import save_model
    from fewvision.monitor.watch import nonconformity, reference
    from fewvision.tasks.fewshot import fit, predict

    for c in ("nominal", "local", "global"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for p in sorted((textile_root / c).glob("*.jpg"))[:40]:
            shutil.copy(p, tmp_path / "train" / c / p.name)
    model = fit(str(tmp_path / "train"), "prototype", backbone="texture", calibrate_fraction=0.5, use_cache=False)
    calibration, threshold = reference("classification", model.decision)
    assert len(calibration) == 60 and threshold is None
    test = [p for c in ("nominal", "local", "global") for p in sorted((textile_root / c).glob("*.jpg"))[100:160]]
    rows = predict(model, test, use_cache=False).rows
    ok = np.array([nonconformity("classification", r["top_probability"]) for r in rows])
    blurred = []
    for p in test[:60]:
        Image.open(p).filter(ImageFilter.GaussianBlur(2)).save(tmp_path / f"blur-{p.name}")
        blurred.append(tmp_path / f"blur-{p.name}")
    blur_rows = predict(model, blurred, use_cache=False).rows
    blur = np.array([nonconformity("classification", r["top_probability"]) for r in blur_rows])
    rng = np.random.default_rng(0)
    assert sum(any(a["kind"] == "martingale" for a in Monitor(calibration, seed=k).run(rng.permutation(ok)).alarms)
               for k in range(200)) <= 4
    delays = []
    for k in range(20):
        mon = Monitor(calibration, seed=k).run(np.r_[rng.permutation(ok)[:100], rng.permutation(blur)])
        first = min((a["row"] for a in mon.alarms if a["kind"] == "martingale"), default=None)
        delays.append(math.inf if first is None else first - 99)
    assert sum(d <= 60 for d in delays) >= 15 and np.median(delays) <= 55, delays
    scores = tmp_path / "predict.csv"
    scores.write_text("path,label,top_label,top_probability\n" + "".join(
        f"{r['path']},{r['label']},{r['top_label']},{r['top_probability']}\n" for r in rows[:100] + blur_rows))
    model_path = save_model(tmp_path / "proto.fvm", model)
    code, _, err = run_cli(monkeypatch, capsys, "monitor", scores, "--model", model_path, "-o",
                           tmp_path / "m.json", "--exit-code")
    assert code == 1 and "martingale" in err, err
