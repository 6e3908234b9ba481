"""`fewvision batch`: predict's rows into Parquet, in process and on a local Ray cluster; resumable; bad files are
error rows. Models: a calibrated prototype classifier and a PatchCore anomaly model on the weight-free `texture`
backbone, fitted on textile images."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from cli_helpers import run_cli

from fewvision.modelfile import save_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]  # Ray's own

TOLERANCE = 1e-6  # same code path, same batches: predict and the in-process batch
# On Ray the head sees other batches (the scheduler decides their size): the prototype head's matrix product then
# rounds differently in the last bit, and the logit scale (x100) and temperature carry that to ~1e-6 in a
# probability. The features themselves are bit-identical (no batch-dependent step in the backbone).
RAY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory, textile_subset):
    from fewvision.tasks.anomaly import fit_anomaly
    from fewvision.tasks.fewshot import fit

    folder = tmp_path_factory.mktemp("batch-models")
    cls = fit(str(textile_subset), "prototype", "texture", shots=4, calibrate_fraction=0.34, alpha=0.2)
    anomaly = fit_anomaly(textile_subset / "nominal", "patchcore", "texture", target_false_reject=0.2)
    return {"classification": save_model(folder / "cls.fvm", cls), "anomaly": save_model(folder / "an.fvm", anomaly)}


@pytest.fixture(scope="module")
def images(tmp_path_factory, textile_subset):
    """36 textile images in class folders, a file that is not an image and an empty one."""
    root = tmp_path_factory.mktemp("batch-images") / "images"
    shutil.copytree(textile_subset, root)
    (root / "local" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _jsonl(path: Path) -> dict:
    return {r["path"]: r for r in map(json.loads, path.read_text().splitlines())}


def _same(batch_row: dict, predict_row: dict, tolerance: float, skip=("time",)) -> None:
    """The same values (floats within ``tolerance``), predict's ``probabilities`` as ``p_<class>`` columns, its
    ``regions`` list as a JSON column; the batch row may have empty columns predict's JSONL leaves out."""
    expected = {k: v for k, v in predict_row.items() if k != "probabilities"}
    expected.update({f"p_{n}": v for n, v in predict_row.get("probabilities", {}).items()})
    for key, value in expected.items():
        if key in skip:
            continue
        if key == "regions" and value is not None:  # a JSON column of the table; predict's JSONL holds the list
            got = json.loads(batch_row[key])
            value = json.loads(value) if isinstance(value, str) else value
            assert [{**r, "peak": None} for r in got] == [{**r, "peak": None} for r in value], predict_row["path"]
            assert [r["peak"] for r in got] == pytest.approx([r["peak"] for r in value], abs=tolerance)
        elif isinstance(value, float):
            assert batch_row[key] == pytest.approx(value, abs=tolerance), (predict_row["path"], key)
        else:
            assert batch_row[key] == value, (predict_row["path"], key)
    assert all(key in expected or value is None for key, value in batch_row.items()), predict_row["path"]


def _rows(out: Path) -> dict:
    rows = pq.read_table(out).to_pylist()
    assert len({r["path"] for r in rows}) == len(rows), "a path twice"
    return {r["path"]: r for r in rows}


# --- in process ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "anomaly"])
def test_in_process_rows_are_predicts_rows(monkeypatch, capsys, tmp_path, models, images, task):
    model = models[task]
    predict = ["predict"] if task == "classification" else ["anomaly", "predict"]
    for suffix in ("csv", "jsonl"):
        code, _, err = run_cli(monkeypatch, capsys, *predict, model, images, "-o", tmp_path / f"p.{suffix}")
        assert code == 0, err
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` would now fail: in process, Ray is not used
    out = tmp_path / "results.parquet"
    code, stdout, err = run_cli(monkeypatch, capsys, "batch", model, images, "-o", out)
    assert code == 0, err
    assert "36 image(s) scored, 2 unreadable, 0 already done" in stdout and f"skipped {images / 'empty.jpg'}" in err

    with open(tmp_path / "p.csv") as fh:
        header = next(csv.reader(fh))
    assert pq.read_schema(out).names == header  # the very columns of predict, in its order
    expected, got = _jsonl(tmp_path / "p.jsonl"), _rows(out)
    assert set(got) == set(expected) and len(got) == 38
    for path, row in expected.items():
        _same(got[path], row, TOLERANCE)
    errors = {Path(p).name: r["error"] for p, r in got.items() if r["error"]}
    assert set(errors) == {"broken.png", "empty.jpg"} and errors["empty.jpg"] == "empty file (0 bytes)"
    if task == "classification":
        assert all(isinstance(r["set"], list) for r in got.values() if not r["error"])  # native types
    else:
        assert all(isinstance(r["x"], int) and isinstance(r["score"], float) for r in got.values() if not r["error"])


def test_anomaly_columns_are_those_of_anomaly_predict():
    from fewvision.cli.anomaly import ROW_COLUMNS
    from fewvision.tasks.batch import ANOMALY_COLUMNS

    assert ANOMALY_COLUMNS == ROW_COLUMNS


def test_a_rerun_scores_only_new_images_and_keeps_the_old_rows(monkeypatch, capsys, tmp_path, models, images):
    import fewvision.tasks.fewshot as fewshot
    from fewvision.tasks.batch import run_batch

    scored: list[str] = []
    real = fewshot.score_files

    def counting(head, backbone, paths, **kw):
        scored.extend(paths)
        return real(head, backbone, paths, **kw)

    monkeypatch.setattr(fewshot, "score_files", counting)
    root = tmp_path / "images"
    shutil.copytree(images / "nominal", root / "nominal")
    shutil.copytree(images / "local", root / "local")
    out = tmp_path / "results.parquet"
    first = run_batch(models["classification"], root, out)
    assert (first.n_found, first.n_done_before, first.n_scored, len(first.skipped)) == (25, 0, 24, 1)
    before = pq.read_table(out)

    shutil.copytree(images / "global", root / "global")
    (root / "global" / "also-broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    scored.clear()
    second = run_batch(models["classification"], root, out)
    assert (second.n_found, second.n_done_before, second.n_scored, len(second.skipped)) == (38, 25, 12, 1)
    assert len(scored) == 13 and all("/global/" in p for p in scored)  # the new images only
    after = pq.read_table(out)
    assert after.num_rows == second.n_rows == 38 and len(set(after.column("path").to_pylist())) == 38
    assert after.slice(0, before.num_rows).equals(before)  # the old rows, first and unchanged

    scored.clear()
    blob = out.read_bytes()
    code, stdout, err = run_cli(monkeypatch, capsys, "batch", models["classification"], root, "-o", out)
    assert code == 0 and scored == [] and out.read_bytes() == blob, err  # nothing new: the file is left alone
    assert "0 image(s) scored, 0 unreadable, 38 already done" in stdout

    # one file never mixes two models' rows, or rows written with other options
    code, _, err = run_cli(monkeypatch, capsys, "batch", models["anomaly"], root, "-o", out)
    assert code == 2 and "holds the results of another model file" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "batch", models["classification"], root, "-o", out,
                           "--review-threshold", "0.9")
    assert code == 2 and "was written with other options" in err


def test_an_interrupted_run_keeps_what_it_scored(monkeypatch, tmp_path, models, images):
    import fewvision.tasks.batch as batch

    calls = {"n": 0}
    real = batch.Scorer.score_files

    def interrupted(self, paths, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, paths, **kw)

    monkeypatch.setattr(batch, "CHUNK_IMAGES", 10)
    monkeypatch.setattr(batch.Scorer, "score_files", interrupted)
    out = tmp_path / "results.parquet"
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(models["anomaly"], images, out, checkpoint_rows=10_000)
    assert pq.read_table(out).num_rows == 10  # the first chunk was written before the interruption went on
    monkeypatch.setattr(batch.Scorer, "score_files", real)
    summary = batch.run_batch(models["anomaly"], images, out)
    assert (summary.n_done_before, summary.n_scored + len(summary.skipped), summary.n_rows) == (10, 28, 38)


def test_nothing_readable_is_exit_3_and_the_errors_are_written(monkeypatch, capsys, tmp_path, models):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    out = tmp_path / "r.parquet"
    code, _, err = run_cli(monkeypatch, capsys, "batch", models["anomaly"], folder, "-o", out)
    assert code == 3 and "no image could be scored" in err
    assert pq.read_table(out).column("error").to_pylist() == ["not an image (unknown or unsupported format)"]


@pytest.mark.parametrize("args, message", [
    (["{model}", "{images}", "-o", "{tmp}/r.csv"], "must end in .parquet"),
    (["{model}", "{tmp}/missing", "-o", "{tmp}/r.parquet"], "no such folder"),
    (["{model}", "{images}", "-o", "{tmp}/r.parquet", "--review-band", "0.1"], "--review-band applies to anomaly"),
    (["{model}", "{images}", "-o", "{tmp}/r.parquet", "--workers", "0"], "--workers"),
    (["{tmp}/missing.fvm", "{images}", "-o", "{tmp}/r.parquet"], "missing.fvm"),
])
def test_usage_errors_are_one_line(monkeypatch, capsys, tmp_path, models, images, args, message):
    subs = {"{model}": str(models["classification"]), "{images}": str(images)}
    args = [subs.get(a, a.replace("{tmp}", str(tmp_path))) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "batch", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_missing_ray_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path, models, images):
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = run_cli(monkeypatch, capsys, "batch", models["anomaly"], images, "-o", tmp_path / "r.parquet",
                           "--ray", "auto")
    assert code == 2 and "pip install 'fewvision[ray]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.parquet").exists()


def test_the_command_line_does_not_import_ray_or_pyarrow_for_help():
    code = "import sys, fewvision.cli; print([m for m in ('ray', 'pyarrow') if m in sys.modules])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("total", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("workers", [None, 1, 2, 8])
def test_the_actor_pool_never_holds_every_cpu(total, workers):
    from fewvision.tasks.batch import ray_resources

    n, actor, read = ray_resources(total, workers)
    assert n == (workers or max(1, total - 1))
    assert n * actor + read <= total + 1e-9 and n * actor < total  # a read task can always run beside the actors
    assert 0 < actor <= 1 and not math.isclose(actor, read)  # unequal requests: Ray Data does not fuse the two


# --- on a local Ray cluster -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("task, workers", [("classification", 2), ("anomaly", 1)])
def test_ray_rows_equal_the_in_process_rows(tmp_path, models, images, ray_cluster, task, workers):
    from fewvision.tasks.batch import run_batch

    root, out = tmp_path / "images", tmp_path / "ray.parquet"
    shutil.copytree(images / "nominal", root / "nominal")
    run_batch(models[task], root, out)  # in process: one class; Ray resumes from there
    for name in ("local", "global", "empty.jpg"):
        (shutil.copytree if (images / name).is_dir() else shutil.copy)(images / name, root / name)
    odd = os.path.join(os.fsencode(root / "local"), b"caf\xe9.jpg")  # not UTF-8: no Arrow string on its own
    shutil.move(next((root / "local").glob("*.jpg")), os.fsdecode(odd))
    local = tmp_path / "local.parquet"
    run_batch(models[task], root, local)

    summary = run_batch(models[task], root, out, ray="auto", workers=workers, batch_size=8)
    assert summary.engine == "ray" and summary.workers == workers and ray_cluster.is_initialized()
    assert (summary.n_done_before, summary.n_scored, len(summary.skipped)) == (12, 24, 2)
    expected, got = _rows(local), _rows(out)
    assert sum("caf\ufffd.jpg" in p for p in got) == 1
    old = [p for p in expected if "/nominal/" in p]
    assert list(got) == old + [p for p in expected if p not in old]  # old rows first, then the new in listing order
    for path, row in expected.items():
        _same(got[path], row, RAY_TOLERANCE)
