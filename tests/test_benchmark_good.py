"""`fewvision benchmark DATASET --good GOOD_DIR`: the classifier `fit --good` makes (METHOD+good) runs beside the
plain heads on the same support draws and test images, with sensible numbers on a small textile case; a bad
GOOD_DIR stops the command with one line."""

import json
import shutil

import pytest
from cli_helpers import run_cli

from fewvision.tasks.benchmark import GOOD_SUFFIX, run_benchmark

CLASSES = ("nominal", "local", "global")


@pytest.fixture(scope="module")
def case(tmp_path_factory, textile_root):
    """15 labelled images a class (a seeded half held out) and 40 other good images."""
    root = tmp_path_factory.mktemp("bench-good")
    data, good = root / "data", root / "good"
    for c, start in zip(CLASSES, (200, 0, 0)):
        (data / c).mkdir(parents=True)
        for p in sorted((textile_root / c).glob("*.jpg"))[start : start + 15]:
            shutil.copy(p, data / c / p.name)
    good.mkdir()
    for p in sorted((textile_root / "nominal").glob("*.jpg"))[:40]:
        shutil.copy(p, good / p.name)
    return data, good, root


@pytest.fixture(scope="module")
def result(case, tmp_path_factory):
    data, good, _ = case
    return run_benchmark(str(data), ["prototype", "linear"], [4], 3, backbone="texture", good=[str(good)],
                         cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_good_rows_run_beside_the_plain_heads_on_the_same_draws(result):
    methods = [r["method"] for r in result.rows]
    assert sorted(methods) == ["linear", "linear+good", "prototype", "prototype+good"]
    plain = {(r["method"], r["seed"]): r for r in result.runs if not r["method"].endswith(GOOD_SUFFIX)}
    good = [r for r in result.runs if r["method"].endswith(GOOD_SUFFIX)]
    assert len(good) == 2 * 3 and len(plain) == 2 * 3
    for run in good:
        twin = plain[(run["method"][: -len(GOOD_SUFFIX)], run["seed"])]
        assert run["support_digest"] == twin["support_digest"] and run["shots"] == twin["shots"] == 4
    assert len({r["support_digest"] for r in good}) == 3  # three different draws, each shared by both rows
    assert result.setup["good"]["n_good_images"] == 40 and result.setup["good"]["method"] == "padim"


def test_good_rows_are_sensible(result):
    rows = {r["method"]: r["balanced_accuracy_mean"] for r in result.rows}
    # Measured on this case (4 shots, 3 seeds, 24 test images): prototype 0.917 -> +good 0.931, linear 0.972 ->
    # +good 0.972 (chance: 0.333). The floors leave about two more mistakes a draw.
    assert rows["prototype+good"] >= 0.85 and rows["linear+good"] >= 0.88, rows
    assert min(rows.values()) > 0.5, rows


def test_benchmark_good_through_the_cli_and_bad_good_dirs(case, monkeypatch, capsys, tmp_path):
    data, good, root = case
    out, few = tmp_path / "out", tmp_path / "few-good"
    few.mkdir()
    for p in sorted(good.glob("*.jpg"))[:8]:  # enough for PaDiM's threshold, cheap to fit again
        shutil.copy(p, few / p.name)
    good = few
    code, stdout, err = run_cli(monkeypatch, capsys, "benchmark", data, "--methods", "prototype", "--shots", "1",
                                "--seeds", "1", "--backbone", "texture", "--good", good, "-o", out)
    assert code == 0, err
    assert "prototype+good   1-shot  accuracy" in stdout and "     prototype   1-shot  accuracy" in stdout
    doc = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["prototype", "prototype+good"]
    assert doc["setup"]["good"]["sources"] == [str(good)]
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, message in ((tmp_path / "missing", "--good names no such file or folder"),
                         (empty, "no good images found"),
                         (data / "nominal", "of the --good images are held-out test images")):  # some held out
        code, _, err = run_cli(monkeypatch, capsys, "benchmark", data, "--methods", "prototype", "--shots", "1",
                               "--seeds", "1", "--backbone", "texture", "--good", bad, "-o", tmp_path / "x")
        assert code == 2 and message in err and str(bad) in err, err
        assert len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(monkeypatch, capsys, "benchmark", data, "--good", good, "--good-method", "nosuch",
                           "--backbone", "texture", "-o", tmp_path / "x")
    assert code == 2 and "unknown --good-method 'nosuch'" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "benchmark", data, "--good", good, "--episodes", "5",
                           "--backbone", "texture", "-o", tmp_path / "x")
    assert code == 2 and "not the episodic one" in err, err
