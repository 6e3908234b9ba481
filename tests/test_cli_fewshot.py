"""fit / predict / eval / benchmark through the CLI entry point (in-process, so exit codes are the real ones)."""

import csv
import json
import sys

from fewvision.cli import main

IMAGE_ONLY = "texture"
CLASSES = {"nominal", "local", "global"}


def run(*args) -> int:
    old = sys.argv
    sys.argv = ["fewvision", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = old


def test_fit_predict_eval_on_an_image_only_backbone(tmp_path, textile_subset, capsys):
    model = tmp_path / "proto.fvm"
    assert run("fit", textile_subset, "--method", "prototype", "--shots", 4, "--backbone", IMAGE_ONLY,
               "--calibrate-fraction", 0.34, "--alpha", 0.2, "--conformal", "aps", "--mondrian", "-o", model) == 0
    out = tmp_path / "pred.csv"
    assert run("predict", model, textile_subset, "--out", out, "--abstain", "--report", tmp_path / "report") == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 36 and {r["label"] for r in rows} <= CLASSES | {"review"}
    for r in rows:
        assert abs(sum(float(r[f"p_{c}"]) for c in CLASSES) - 1) < 1e-4
        members = set(r["set"].split("|")) - {""}
        assert (r["label"] == "review") == (len(members) != 1)
        assert bool(r["review_reason"]) == (r["label"] == "review")
        assert r["top_label"] in CLASSES and float(r[f"p_{r['top_label']}"]) == float(r["top_probability"])
        if r["label"] == "review" and not members:
            assert r["review_reason"] == "no class reached the 80% coverage level"
    assert (tmp_path / "report" / "report.html").is_file()

    metrics_path = tmp_path / "metrics.json"
    assert run("eval", model, textile_subset, "--out", metrics_path) == 0
    m = json.loads(metrics_path.read_text())
    # 4 support + 4 calibration images per class are left out: 12 test images remain.
    assert m["n"] == 12 and m["n_excluded_fit_images"] == 24
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "coverage", "mean_set_size"):
        assert key in m, key
    assert m["method"] == "prototype" and m["conformal_score"] == "aps" and m["mondrian"] is True
    assert "coverage" in capsys.readouterr().out


def test_text_head_with_the_tiny_clip(tmp_path, tiny_clip_config, textile_subset):
    model = tmp_path / "tipf.fvm"
    assert run("fit", textile_subset, "--method", "tip-f", "--shots", 4, "--seed", 1,
               "--backbone", f"openclip:{tiny_clip_config}", "--param", "epochs=3", "-o", model) == 0
    metrics_path = tmp_path / "m.json"
    assert run("eval", model, textile_subset, "--out", metrics_path) == 0
    m = json.loads(metrics_path.read_text())
    assert m["n"] == 24 and m["method"] == "tip-f" and "coverage" not in m
    from fewvision.modelfile import read_metadata

    meta = read_metadata(model)
    assert meta["head"]["params"]["epochs"] == 3 and meta["info"]["seed"] == 1 and meta["info"]["shots"] == 4


def test_benchmark_on_a_tiny_grid(tmp_path, tiny_clip_config, textile_subset):
    out = tmp_path / "bench"
    assert run("benchmark", textile_subset, "--methods", "zeroshot,prototype,tip", "--shots", "1,2", "--seeds", 2,
               "--backbone", f"openclip:{tiny_clip_config}", "--out", out) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    for col in ("method", "shots", "accuracy_mean", "accuracy_std", "balanced_accuracy_mean",
                "balanced_accuracy_std", "fit_seconds", "n_trainable_parameters"):
        assert col in rows[0], col
    assert sorted((r["method"], r["shots"]) for r in rows) == [
        ("prototype", "1"), ("prototype", "2"), ("tip", "1"), ("tip", "2"), ("zeroshot", "0")]
    doc = json.loads((out / "results.json").read_text())
    assert doc["skipped"] == [] and doc["setup"]["split"]["kind"] == "stratified"
    assert len(doc["setup"]["test_images"]) == 18 and len(doc["runs"]) == 9
    assert (out / "accuracy_vs_shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # On an image-only backbone the text methods are skipped with the reason, not crashed.
    out2 = tmp_path / "bench2"
    assert run("benchmark", textile_subset, "--methods", "prototype,tip-f", "--shots", "1", "--seeds", 1,
               "--backbone", IMAGE_ONLY, "--out", out2) == 0
    doc = json.loads((out2 / "results.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["prototype"]
    assert doc["skipped"][0]["method"] == "tip-f" and "text tower" in doc["skipped"][0]["reason"]


def test_bad_inputs_are_one_line_errors(tmp_path, tiny_clip, tiny_clip_config, textile_subset, capsys):
    from fewvision.heads import PrototypeHead
    from fewvision.heads.support import Support
    from fewvision.modelfile import FewVisionModel, save_model

    assert run("fit", textile_subset, "--method", "nope", "--backbone", IMAGE_ONLY, "-o", tmp_path / "m.fvm") == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert run("benchmark", textile_subset, "--methods", "prototype,nope", "--backbone", IMAGE_ONLY,
               "--out", tmp_path / "b") == 2
    assert run("fit", textile_subset, "--method", "prototype", "--alpha", 0.1, "--backbone", IMAGE_ONLY,
               "-o", tmp_path / "m.fvm") == 2
    assert "--calibrate-fraction" in capsys.readouterr().err
    assert run("fit", textile_subset, "--method", "tip", "--backbone", IMAGE_ONLY, "-o", tmp_path / "m.fvm") == 2
    assert "text tower" in capsys.readouterr().err

    # A model whose backbone id does not match the backbone its spec creates.
    import torch

    head = PrototypeHead().fit(Support(torch.eye(3, 32), torch.arange(3), sorted(CLASSES)))
    foreign = save_model(tmp_path / "foreign.fvm", FewVisionModel(head, f"openclip:{tiny_clip_config}", "openclip-0"))
    assert run("predict", foreign, textile_subset) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different weights or preprocessing" in err
    assert run("eval", foreign) == 2
    assert "give the dataset" in capsys.readouterr().err
    assert run("predict", foreign, textile_subset, "--abstain") == 2
    bad = tmp_path / "bad.fvm"
    bad.write_bytes(b"not a model")
    assert run("predict", bad, textile_subset) == 2
    assert "bad.fvm" in capsys.readouterr().err
