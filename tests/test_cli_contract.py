"""The command line's contract with scripts and line systems: exit codes, usage errors, layouts, odd and hostile
inputs, model-file checks, progress only on a terminal, site defaults, info and rethreshold."""

import base64
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fewvision.cli import main

FEWVISION = [sys.executable, "-m", "fewvision.cli"]


def run(*args, env=None):
    """In-process, as the installed command runs: (exit code, stdout, stderr) through capsys-free redirection."""
    import contextlib
    import io

    old = sys.argv
    sys.argv = ["fewvision", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


def run_process(*args, timeout=120, env=None):
    return subprocess.run([*FEWVISION, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def clip(tiny_clip_config):
    return f"openclip:{tiny_clip_config}"


@pytest.fixture
def few_images(tmp_path, textile_subset):
    folder = tmp_path / "images"
    folder.mkdir()
    for p in sorted((textile_subset / "local").glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    return folder


# --- exit codes and usage errors ---------------------------------------------------------------------------------
def test_bare_command_prints_help_and_exits_2():
    code, out, err = run()
    assert code == 2 and "Usage: fewvision" in out and "Commands:" in out and "NoArgsIsHelpError" not in out + err
    code, out, _ = run("-h")
    assert code == 0 and "Exit codes: 0 done" in out
    code, out, _ = run("anomaly", "predict", "-h")
    assert code == 0 and "--review-band" in out and "Example:" in out and "<list" not in out


@pytest.mark.parametrize("args, option", [
    (["fit", "{data}", "--method", "prototype", "--shots", "0", "-o", "m.fvm"], "--shots"),
    (["fit", "{data}", "-o", "m.fvm"], "--method"),
    (["anomaly", "predict", "m.fvm", "{data}"], "--out"),
    (["classify", "{data}", "--classes", "a,b", "--bogus"], "--bogus"),
    (["fit", "{data}", "--method", "prototype", "-o", "m.fvm", "--calibrate-fraction", "2"], "--calibrate-fraction"),
])
def test_every_usage_error_is_one_line_with_the_option_and_exit_2(tmp_path, textile_subset, args, option):
    args = [str(textile_subset) if a == "{data}" else str(tmp_path / a) if a == "m.fvm" else a for a in args]
    code, _, err = run(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and option in lines[0] and lines[0].startswith("error: "), err
    assert "Exception" not in err and "Error:" not in err.replace("error:", "")


@pytest.mark.parametrize("args, message", [
    (["classify", "{img}", "--classes", "ok,,scratch", "--backbone", "{clip}"], "class name 2 is empty"),
    (["classify", "{img}", "--classes", "ok,scratch", "--backbone", "{clip}", "--template", "a {} photo {x}"],
     "use {} for the class name"),
    (["classify", "{img}", "--classes", "ok,scratch", "--backbone", "{clip}", "--out", "{dir}"],
     "names an existing directory"),
    (["classify", "{img}", "--classes", "ok,scratch", "--backbone", "{clip}", "--out", "r.xlsx"], "must end in .csv"),
    (["fit", "{data}", "--method", "prototype", "--backbone", "texture", "--param", "bogus=1", "-o", "{dir}/m.fvm"],
     "method 'prototype' has no parameter 'bogus'; it takes scale, text_weight, templates, seed"),
    (["fit", "{data}", "--method", "tip", "--backbone", "texture", "-o", "{dir}/m.fvm"], "needs a text tower"),
    (["fit", "{data}", "--method", "magic", "-o", "{dir}/m.fvm"], "unknown method 'magic'"),
    (["anomaly", "fit", "{data}", "--method", "padim", "--backbone", "texture", "--param", "coreset_ratio=0.1",
      "-o", "{dir}/m.fvm"], "method 'padim' has no parameter 'coreset_ratio'"),
])
def test_bad_arguments_are_refused_before_any_work(monkeypatch, tmp_path, textile_subset, clip, args, message):
    import fewvision.features.encode as encode

    def no_work(*a, **k):
        raise AssertionError("an image was encoded before the arguments were checked")

    monkeypatch.setattr(encode, "_encoder", no_work)  # looked up at every encoding, whoever calls encode_files
    img = next((textile_subset / "nominal").glob("*.jpg"))
    subs = {"{img}": str(img), "{clip}": clip, "{data}": str(textile_subset), "{dir}": str(tmp_path)}
    args = [subs.get(a, a.replace("{dir}", str(tmp_path))) for a in args]
    code, _, err = run(*args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_nothing_scored_is_exit_3_and_the_skips_are_still_written(tmp_path, clip):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.jpg").write_bytes(b"")
    out = tmp_path / "r.csv"
    code, _, err = run("classify", folder, "--classes", "ok,scratch", "--backbone", clip, "-o", out)
    assert code == 3 and "no image could be scored" in err
    rows = list(csv.DictReader(out.open()))
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg"] and all(r["error"] for r in rows)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("classify", empty, "--classes", "ok,scratch", "--backbone", clip)[0] == 3


def test_exit_code_flag_reports_review_rows(tmp_path, few_images, clip):
    args = ["classify", few_images, "--classes", "ok,scratch", "--backbone", clip, "--review-threshold", "0.99"]
    code, out, err = run(*args)
    assert code == 0 and out.count("\treview\t") == 3  # a random model is never 99% sure
    assert "review " in err and "below the review threshold 0.99" in err  # the closing summary names them
    code, _, _ = run(*args, "--exit-code")
    assert code == 1
    code, _, _ = run("classify", few_images, "--classes", "ok,scratch", "--backbone", clip, "--exit-code")
    assert code == 0


# --- hostile and odd inputs --------------------------------------------------------------------------------------
def test_a_fifo_is_skipped_never_opened(tmp_path, few_images, clip):
    fifo = few_images / "camera.png"
    os.mkfifo(fifo)
    named = tmp_path / "named.jpg"
    os.mkfifo(named)
    proc = run_process("classify", few_images, named, "--classes", "ok,scratch", "--backbone", clip, "-o",
                       tmp_path / "r.csv", timeout=120)  # a FIFO that was opened would hang until the timeout
    assert proc.returncode == 0, proc.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "r.csv").open())}
    assert rows["camera.png"]["error"] == rows["named.jpg"]["error"] == "not a regular file (a FIFO (named pipe))"
    assert f"skipped {fifo}: not a regular file" in proc.stderr and f"skipped {named}" in proc.stderr
    assert sum(1 for r in rows.values() if not r["error"]) == 3


def test_symlink_loops_and_directories_are_skip_lines_not_aborts(tmp_path, few_images, clip):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    inner = few_images / "inner.png"
    os.symlink(inner, inner)
    (few_images / "folder.jpg").mkdir()
    code, _, err = run("classify", few_images, loop, "--classes", "ok,scratch", "--backbone", clip, "-o",
                       tmp_path / "r.csv")
    assert code == 0, err
    rows = {Path(r["path"]).name: r["error"] for r in csv.DictReader((tmp_path / "r.csv").open())}
    assert "symbolic links" in rows["loop.png"] and "symbolic links" in rows["inner.png"]
    assert rows["folder.jpg"] == "is a directory, not an image file"
    assert "3 image(s) scored, 3 skipped" in err


def test_file_names_that_are_not_utf8_are_written_losslessly(tmp_path, few_images, clip):
    raw = b"caf\xe9 photo.jpg"
    src = next(few_images.iterdir())
    shutil.copy(src, os.path.join(os.fsencode(few_images), raw))
    out_csv, out_jsonl, report = tmp_path / "r.csv", tmp_path / "r.jsonl", tmp_path / "rep"
    for out in (out_csv, out_jsonl):
        code, _, err = run("classify", few_images, "--classes", "ok,scratch", "--backbone", clip, "-o", out,
                           "--report", report)
        assert code == 0, err
    assert raw in out_csv.read_bytes()  # the very bytes of the name, so the row names the file
    lines = [json.loads(line) for line in out_jsonl.read_text(encoding="utf-8").splitlines()]
    odd = [r for r in lines if "path_bytes_base64" in r]
    assert len(odd) == 1 and base64.b64decode(odd[0]["path_bytes_base64"]).endswith(raw)
    assert odd[0]["path"].endswith("caf\ufffd photo.jpg")
    assert (report / "report.html").read_text(encoding="utf-8")


def test_fit_reports_the_images_it_could_not_read(tmp_path, textile_subset):
    data = tmp_path / "data"
    shutil.copytree(textile_subset, data)
    (data / "local" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    code, out, err = run("fit", data, "--method", "prototype", "--backbone", "texture", "-o", tmp_path / "m.fvm")
    assert code == 0, err
    assert "skipped " in err and "broken.jpg" in err and "fitted on 36 image(s) (1 unreadable skipped)" in out


def test_a_killed_save_leaves_no_temp_file_behind(tmp_path, textile_subset):
    model = tmp_path / "m.fvm"
    dead = tmp_path / ".m.fvm.999999999.abcd1234.tmp"  # a writer that died (no such pid)
    dead.write_bytes(b"half a model")
    alive = tmp_path / f".m.fvm.{os.getppid()}.efgh5678.tmp"  # a live writer's file is left alone
    alive.write_bytes(b"in progress")
    assert run("fit", textile_subset, "--method", "prototype", "--backbone", "texture", "-o", model)[0] == 0
    assert model.is_file() and not dead.exists() and alive.exists()


# --- model files ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def linear_model(tmp_path_factory, textile_subset):
    path = tmp_path_factory.mktemp("model") / "linear.fvm"
    assert run("fit", textile_subset, "--method", "linear", "--shots", 4, "--backbone", "texture", "-o", path)[0] == 0
    return path


def _rewrite(src: Path, dst: Path, meta_change=None, tensor_change=None) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["fewvision"])
    tensors = load_file(str(src))
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, str(dst), metadata={"fewvision": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("backbone"), "has no field 'backbone'"),
    (lambda m: m["backbone"].pop("id"), "has no field 'backbone.id'"),
    (lambda m: m["head"].update(method=3), "field 'head.method' should be str, not int"),
    (lambda m: m.update(task="segmentation"), "field 'task' is 'segmentation'"),
    (lambda m: m["head"]["params"].update(bogus=1), "the 'linear' head cannot be rebuilt"),
])
def test_a_model_file_with_bad_metadata_is_one_line_naming_file_and_field(tmp_path, textile_subset, linear_model,
                                                                          change, message):
    bad = _rewrite(linear_model, tmp_path / "bad.fvm", meta_change=change)
    code, _, err = run("predict", bad, textile_subset)
    assert code == 2 and str(bad) in err and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("change, message", [
    (lambda t: t["head/weight_"].__setitem__((0, 0), float("nan")), "tensor 'weight_' holds NaN"),
    (lambda t: t.update({"head/weight_": t["head/weight_"][:2]}), "tensor 'weight_' has shape"),
    (lambda t: t.update({"head/bias_": torch.zeros(3, 2)}), "tensor 'bias_' should have 1 dimensions"),
])
def test_a_model_file_with_bad_tensors_is_refused(tmp_path, textile_subset, linear_model, change, message):
    bad = _rewrite(linear_model, tmp_path / "bad.fvm", tensor_change=change)
    code, _, err = run("predict", bad, textile_subset)
    assert code == 2 and message in err and str(bad) in err, err


def test_predict_says_an_anomaly_model_is_an_anomaly_model(tmp_path, textile_subset):
    model = tmp_path / "a.fvm"
    good = textile_subset / "nominal"
    assert run("anomaly", "fit", good, "--backbone", "texture", "--target-false-reject", "0.2", "-o", model)[0] == 0
    code, _, err = run("predict", model, textile_subset)
    assert code == 2 and "an anomaly model" in err and "fewvision anomaly predict" in err
    code, _, err = run("anomaly", "predict", tmp_path / "missing.fvm", textile_subset, "-o", tmp_path / "r.csv")
    assert code == 2 and "missing.fvm" in err


# --- anomaly layouts, eval overlap, info, rethreshold -----------------------------------------------------------------
def test_anomaly_fit_uses_the_good_class_folder_and_refuses_defect_classes(tmp_path, textile_subset):
    code, out, err = run("anomaly", "fit", textile_subset, "--backbone", "texture", "--target-false-reject", "0.2",
                         "-o", tmp_path / "a.fvm")
    assert code == 0, err
    assert f"good images: {textile_subset / 'nominal'}: 12 image(s), its nominal/ folder (not global/, local/)" in err
    assert "on 12 good images" in out
    defects = tmp_path / "line"
    for name in ("scratch", "dent"):
        shutil.copytree(textile_subset / "local", defects / name)
    code, _, err = run("anomaly", "fit", defects, "--backbone", "texture", "-o", tmp_path / "b.fvm")
    assert code == 2 and "sub-folders dent/, scratch/ look like defect classes" in err
    code, out, err = run("anomaly", "fit", defects, "--all-subfolders", "--backbone", "texture",
                         "--target-false-reject", "0.2", "-o", tmp_path / "b.fvm")
    assert code == 0 and "on 24 good images" in out, err


def test_anomaly_eval_leaves_out_the_training_images(tmp_path, textile_subset):
    model = tmp_path / "a.fvm"
    assert run("anomaly", "fit", textile_subset, "--backbone", "texture", "--target-false-reject", "0.2", "-o",
               model)[0] == 0
    code, _, err = run("anomaly", "eval", model, textile_subset, "-o", tmp_path / "m.json")
    assert code == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_excluded_fit_images"] == 12 and m["n_good"] == 0 and m["n_defect"] == 24
    assert "12 image(s) the model was fitted on were left out" in err
    only_training = tmp_path / "only"
    shutil.copytree(textile_subset / "nominal", only_training / "good")
    shutil.copytree(textile_subset / "nominal", only_training / "bad")
    code, _, err = run("anomaly", "eval", model, only_training, "-o", tmp_path / "m2.json")
    assert code == 2 and "every test image was used to fit this model" in err


def test_info_tells_what_a_model_holds(tmp_path, textile_subset):
    model = tmp_path / "a.fvm"
    assert run("anomaly", "fit", textile_subset, "--backbone", "texture", "--target-false-reject", "0.25", "-o",
               model)[0] == 0
    code, out, _ = run("info", model)
    assert code == 0
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines() if " " in line}
    assert fields["task"].strip() == "anomaly" and fields["method"].strip() == "patchcore"
    assert "target of 0.25 of good parts rejected" in out and "12 good image(s)" in out
    classifier = tmp_path / "c.fvm"
    assert run("fit", textile_subset, "--method", "prototype", "--backbone", "texture", "--calibrate-fraction", "0.34",
               "--alpha", "0.2", "-o", classifier)[0] == 0
    code, out, _ = run("info", classifier)
    assert "classes" in out and "nominal" in out and "at least 80% of images like the" in out


def test_rethreshold_takes_the_conformal_rank(tmp_path, textile_subset):
    import math

    model = tmp_path / "a.fvm"
    assert run("anomaly", "fit", textile_subset, "--backbone", "texture", "--target-false-reject", "0.25", "-o",
               model)[0] == 0
    from fewvision import load

    scores = np.sort(load(model).decision["calibration_scores"])
    assert run("anomaly", "rethreshold", model, "--target-false-reject", "0.4", "-o", tmp_path / "b.fvm")[0] == 0
    k = math.ceil((len(scores) + 1) * (1 - 0.4))
    assert load(tmp_path / "b.fvm").decision["threshold"] == scores[k - 1]
    assert load(model).decision["target_false_reject"] == 0.25  # -o leaves the original alone


# --- site defaults and progress ------------------------------------------------------------------------------------
def test_site_default_backbone_from_the_environment_and_a_config_file(tmp_path, textile_subset):
    model = tmp_path / "m.fvm"
    code, _, err = run("fit", textile_subset, "--method", "prototype", "-o", model, env={"FEWVISION_BACKBONE": "texture"})
    assert code == 0, err
    from fewvision import load

    assert load(model).backbone_spec == "texture"
    config = tmp_path / "config.yaml"
    config.write_text("anomaly_backbone: texture\n")
    code, _, err = run("anomaly", "fit", textile_subset / "nominal", "--target-false-reject", "0.2", "-o",
                       tmp_path / "a.fvm", env={"FEWVISION_CONFIG": config})
    assert code == 0, err
    assert load(tmp_path / "a.fvm").backbone_spec == "texture"
    config.write_text("backbones: texture\n")
    code, _, err = run("fit", textile_subset, "--method", "prototype", "-o", model, env={"FEWVISION_CONFIG": config})
    assert code == 2 and "unknown setting(s) backbones" in err


def test_one_progress_bar_on_a_terminal_and_none_on_a_pipe(tmp_path, textile_subset):
    import pty
    import select

    args = [*FEWVISION, "eval", textile_subset, "--method", "prototype", "--shots", "2", "--backbone", "texture",
            "--no-cache", "-o", tmp_path / "m.json"]
    env = dict(os.environ, FEWVISION_PROGRESS_DELAY="0", COLUMNS="100")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a terminal has a width
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "eval prototype" in terminal and "img/s" in terminal and "/36" in terminal  # one bar, the job's total
    assert "support" not in terminal and "encoding:" not in terminal  # no bar per stage
    piped = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, timeout=120)
    assert piped.returncode == 0 and "img/s" not in piped.stderr and "\r" not in piped.stderr
    assert "image(s) scored" in piped.stderr and " s, " in piped.stderr  # the closing summary with time and rate


# --- help --------------------------------------------------------------------------------------------------------
def _commands():
    import typer.main

    from fewvision.cli import app

    group = typer.main.get_command(app)

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    return list(walk(group, []))


def test_every_option_has_help_and_a_readable_metavar():
    commands = _commands()
    assert len(commands) >= 14
    for path, cmd in commands:
        for param in cmd.params:
            if param.name == "help":
                continue
            assert param.help, (path, param.name)
        code, out, _ = run(*path, "-h")
        assert code == 0 and "<list[" not in out and "range>" not in out and "<float" not in out, (path, out)
        assert "Exit codes" in out, path
        outputs = [p for p in cmd.params if "--out" in getattr(p, "opts", [])]
        assert all("-o" in p.opts for p in outputs), path


def test_the_command_line_imports_no_heavy_library_for_help():
    """--help must answer at once: the CLI modules import neither torch nor the models until a command runs."""
    code = ("import sys, fewvision.cli; heavy = [m for m in ('torch', 'open_clip', 'timm', 'sklearn', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
