import re

import pytest
from PIL import Image

from fewvision.metrics.classification import classification_metrics
from fewvision.reports.classification import MAX_MISTAKES, write_classification_report

NAMES = ["ok", "<script>alert(1)</script>"]
EVIL = NAMES[1]


def _png(path, color):
    Image.new("RGB", (300, 200), color).save(path)
    return str(path)


@pytest.fixture
def labelled(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = [
        {"path": _png(imgs / "good_ok.png", "white"), "label": "ok", "true": "ok",
         "probabilities": {"ok": 0.9, EVIL: 0.1}},
        {"path": _png(imgs / "good_evil.png", "red"), "label": EVIL, "true": EVIL,
         "probabilities": {"ok": 0.2, EVIL: 0.8}},
        {"path": _png(imgs / "wrong_low.png", "blue"), "label": "ok", "true": EVIL,
         "probabilities": {"ok": 0.55, EVIL: 0.45}, "note": "LMM says <b>fine</b>"},
        {"path": _png(imgs / "wrong_high.png", "green"), "label": EVIL, "true": "ok",
         "probabilities": {"ok": 0.03, EVIL: 0.97}},
    ]
    broken = imgs / "broken.png"
    broken.write_bytes(b"this is not a png")
    rows.append({"path": str(broken), "label": "ok", "true": EVIL, "probabilities": {"ok": 0.7, EVIL: 0.3}})
    idx = {n: i for i, n in enumerate(NAMES)}
    m = classification_metrics([idx[r["true"]] for r in rows], [idx[r["label"]] for r in rows], NAMES,
                               n_bootstrap=100)
    return tmp_path, m, rows


def test_labelled_report(labelled):
    tmp_path, m, rows = labelled
    out = write_classification_report(tmp_path / "out", title="Run <1>", metrics=m, rows=rows, class_names=NAMES,
                                      extra={"backbone": "clip & co", "method": "zero-shot"})
    assert out == tmp_path / "out" / "report.html"
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # single file, no temp left
    html = out.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 1  # confusion matrix plot
    assert html.count("data:image/jpeg;base64,") == 2  # two loadable mistakes as thumbnails
    assert not re.search(r'(src|href)="(?!data:)', html)  # no external assets
    # misclassified shown, correctly classified not
    for name in ("wrong_low.png", "wrong_high.png", "broken.png"):
        assert name in html
    assert "good_ok.png" not in html and "good_evil.png" not in html
    # most confident mistake first
    assert html.index("wrong_high.png") < html.index("broken.png") < html.index("wrong_low.png")
    # escaping
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Run &lt;1&gt;" in html and "clip &amp; co" in html
    assert "LMM says &lt;b&gt;fine&lt;/b&gt;" in html
    # bad image reason instead of thumbnail
    assert "not an image" in html
    # summary with CI
    assert f"{m['accuracy']:.3f}" in html and "95% CI" in html
    assert "macro-F1" in html and "balanced accuracy" in html
    assert "precision" in html and "support" in html


def test_mistakes_capped(tmp_path):
    img = _png(tmp_path / "x.png", "gray")
    rows = [{"path": img, "label": "a", "true": "b", "probabilities": {"a": 0.5 + i / 1000, "b": 0.5 - i / 1000}}
            for i in range(MAX_MISTAKES + 15)]
    m = classification_metrics([1] * len(rows), [0] * len(rows), ["a", "b"], n_bootstrap=20)
    html = write_classification_report(tmp_path, title="t", metrics=m, rows=rows, class_names=["a", "b"]).read_text()
    assert html.count("data:image/jpeg;base64,") == MAX_MISTAKES
    assert "0.574" in html and "0.500" not in html  # highest confidence first, lowest cut


def test_prediction_only_report(tmp_path):
    rows = [{"path": _png(tmp_path / f"p{i}.png", "white"), "label": EVIL if i % 2 else "ok", "true": None,
             "probabilities": {"ok": 0.6, EVIL: 0.4} if i % 2 == 0 else {"ok": 0.1, EVIL: 0.9}} for i in range(4)]
    rows.append({"path": str(tmp_path / "missing.png"), "label": "ok", "true": None, "probabilities": {"ok": 1.0}})
    out = write_classification_report(tmp_path / "pred", title="Predictions", metrics=None, rows=rows,
                                      class_names=NAMES)
    html = out.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 1  # bar chart of label counts
    assert html.count("data:image/jpeg;base64,") == 4
    for i in range(4):
        assert f"p{i}.png" in html
    assert "cannot read file" in html  # missing file reason
    assert "0.900" in html and "0.600" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
