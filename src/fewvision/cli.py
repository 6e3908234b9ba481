"""The ``fewvision`` command.

User errors (bad arguments, unreadable class files or datasets, missing weights) print one line and exit 2;
unexpected runtime errors print one line and exit 1 (``FEWVISION_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .atomic import atomic_open

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Zero-shot and few-shot image classification and anomaly detection for visual inspection.")
models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="List, download and locate model weights.")
app.add_typer(models_app, name="models")

DEFAULT_BACKBONE_HELP = "backbone spec: openclip:MODEL[/TAG] | openclip:MODEL@PATH | hf:REPO | timm:NAME | texture"


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .backbones.base import BackboneError
    from .datasets import DatasetError
    from .images import BadImage
    from .prompts import PromptError

    return (UserError, BackboneError, DatasetError, PromptError, BadImage, FileNotFoundError, ValueError)


def _quiet_libraries() -> None:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip logs random-init notices at WARNING on the root logger
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def info(msg: str) -> None:
    typer.echo(msg, err=True)


def _classes(classes: Optional[str], classes_file: Optional[Path]):
    from .prompts import load_class_file, parse_class_names

    if classes and classes_file:
        raise UserError("give either --classes or --classes-file, not both")
    if classes_file:
        return load_class_file(classes_file)
    if classes:
        return parse_class_names(classes)
    return None


def _backbone(spec: str, weights: Optional[str], cache_dir: Optional[str]):
    from .backbones import create_backbone

    return create_backbone(spec, weights=weights, cache_dir=cache_dir)


LMM_METHODS = ("slac", "tlac")
LMM_URL_HELP = "OpenAI-compatible server for --method slac|tlac, e.g. http://localhost:11434/v1 (Ollama); 'local' runs --lmm-model in-process"


def _lmm(method: str, url: Optional[str], model: Optional[str], timeout: float, concurrency: int,
         cache_dir: Optional[str], no_cache: bool):
    """The LMM asked by --method slac|tlac (None for other methods)."""
    if method not in LMM_METHODS:
        if url or model:
            raise UserError("--lmm-url and --lmm-model apply only to --method slac or tlac")
        return None
    if not url:
        raise UserError(f"--method {method} needs --lmm-url (e.g. http://localhost:11434/v1 for Ollama, or 'local')")
    if not model:
        raise UserError(f"--method {method} needs --lmm-model (e.g. llava, qwen2.5vl, or a local model folder)")
    from .lmm import create_lmm

    return create_lmm(url, model, timeout=timeout, concurrency=concurrency, cache_dir=cache_dir,
                      use_cache=not no_cache)


def write_rows(path: Path, rows: list[dict], class_names: list[str], skipped) -> None:
    """CSV or JSONL (by suffix), written to a temp file and renamed, so a crash never leaves half a file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(f"{path}: --out must end in .csv or .jsonl")
    with atomic_open(path, newline="") as fh:
        if suffix == ".csv":
            extra = [k for k in ("true", "note") if any(k in r for r in rows)]
            w = csv.writer(fh)
            w.writerow(["path", "label", *extra, *[f"p_{n}" for n in class_names], "error"])
            for r in rows:
                w.writerow([r["path"], r["label"], *[r.get(k, "") for k in extra],
                            *[f"{r['probabilities'][n]:.6f}" for n in class_names], ""])
            for s in skipped:
                w.writerow([s.path, "", *[""] * len(extra), *[""] * len(class_names), s.reason])
        else:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            for s in skipped:
                fh.write(json.dumps({"path": s.path, "label": None, "error": s.reason}) + "\n")


def _summary(n_ok: int, skipped) -> None:
    for s in skipped:
        info(f"skipped {s.path}: {s.reason}")
    info(f"{n_ok} image(s) processed, {len(skipped)} skipped")


@app.command()
def classify(
    images: List[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
    classes: Optional[str] = typer.Option(None, "--classes", help='comma-separated class names, e.g. "ok,scratch"'),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="YAML/JSON classes with descriptions"),
    backbone: str = typer.Option("openclip:ViT-B-32/laion2b_s34b_b79k", "--backbone", help=DEFAULT_BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help="local weights file or folder for the backbone"),
    template: List[str] = typer.Option([], "--template", help="template set (openai|simple|industrial) or text with {}"),
    unknown_threshold: Optional[float] = typer.Option(None, "--unknown-threshold", min=0.0, max=1.0,
                                                      help="label 'unknown' when the top probability is below P"),
    out: Optional[Path] = typer.Option(None, "--out", help="results.csv or results.jsonl"),
    report: Optional[Path] = typer.Option(None, "--report", help="folder for an HTML report"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="cache root (default $FEWVISION_CACHE_DIR or ~/.cache/fewvision)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not read or write the feature cache"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    method: str = typer.Option("zeroshot", "--method", help="zeroshot | slac | tlac (slac/tlac ask an LMM)"),
    lmm_url: Optional[str] = typer.Option(None, "--lmm-url", help=LMM_URL_HELP),
    lmm_model: Optional[str] = typer.Option(None, "--lmm-model", help="LMM name on the server, or a local folder"),
    lmm_timeout: float = typer.Option(120.0, "--lmm-timeout", min=0.001, help="seconds per LMM request"),
    lmm_concurrency: int = typer.Option(4, "--lmm-concurrency", min=1, help="LMM requests in flight at most"),
    lmm_prompt: Optional[str] = typer.Option(None, "--lmm-prompt", help="the stage-1 question (SLAC's by default)"),
    lmm_top_k: int = typer.Option(3, "--lmm-top-k", min=1, help="candidates from CLIP and from SLAC (tlac)"),
) -> None:
    """Zero-shot classification: one row per image with its label and the probability of each class."""
    from .api import classify as run_classify
    from .images import iter_image_files
    from .api import classify_with_lmm

    if method not in ("zeroshot", *LMM_METHODS):
        raise UserError(f"unknown method '{method}': expected zeroshot, slac or tlac")
    specs = _classes(classes, classes_file)
    if specs is None:
        raise UserError("give the classes with --classes or --classes-file")
    lmm = _lmm(method, lmm_url, lmm_model, lmm_timeout, lmm_concurrency, cache_dir, no_cache)
    images = iter_image_files(images)  # a missing input is reported before any model is loaded
    bb = _backbone(backbone, weights, cache_dir)
    if lmm is not None:
        preds = classify_with_lmm(images, specs, backbone=bb, lmm=lmm, method=method, templates=template or None,
                                  prompt=lmm_prompt, top_k=lmm_top_k, unknown_threshold=unknown_threshold,
                                  cache_dir=cache_dir, use_cache=not no_cache, progress=True, batch_size=batch_size)
    else:
        preds = run_classify(images, specs, backbone=bb, templates=template or None,
                             unknown_threshold=unknown_threshold, cache_dir=cache_dir, use_cache=not no_cache,
                             progress=True, batch_size=batch_size)
    if out:
        write_rows(out, preds.rows, preds.class_names, preds.skipped)
        info(f"wrote {out}")
    else:
        for r in preds.rows:
            note = f"\t{r['note']}" if r.get("note") else ""
            typer.echo(f"{r['path']}\t{r['label']}\t{max(r['probabilities'].values()):.3f}{note}")
    if report:
        from .report import write_classification_report

        extra = {"backbone": bb.spec, **({"method": method, "lmm": lmm.describe()} if lmm is not None else {})}
        page = write_classification_report(report, title="fewvision classify", metrics=None, rows=preds.rows,
                                           class_names=preds.class_names, extra=extra)
        info(f"report: {page}")
    _summary(len(preds.rows), preds.skipped)


@app.command("eval")
def evaluate(
    dataset: str = typer.Argument(..., help="'textile', a CSV manifest, an MVTec folder or a folder of class folders"
                                  " - or a fitted model file (.fvm), followed by the dataset"),
    model_dataset: Optional[str] = typer.Argument(None, metavar="[DATASET]", help="the dataset, after a model file"),
    method: str = typer.Option("zeroshot", "--method", help="zeroshot | prototype | slac | tlac"),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", help="classes with descriptions (zeroshot)"),
    backbone: str = typer.Option("openclip:ViT-B-32/laion2b_s34b_b79k", "--backbone", help=DEFAULT_BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights"),
    template: List[str] = typer.Option([], "--template"),
    unknown_threshold: Optional[float] = typer.Option(None, "--unknown-threshold", min=0.0, max=1.0),
    shots: int = typer.Option(10, "--shots", min=1, help="support images per class (prototype)"),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("metrics.json"), "--out", help="metrics JSON"),
    report: Optional[Path] = typer.Option(None, "--report", help="folder for an HTML report"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
    no_cache: bool = typer.Option(False, "--no-cache"),
    lmm_url: Optional[str] = typer.Option(None, "--lmm-url", help=LMM_URL_HELP),
    lmm_model: Optional[str] = typer.Option(None, "--lmm-model", help="LMM name on the server, or a local folder"),
    lmm_timeout: float = typer.Option(120.0, "--lmm-timeout", min=0.001, help="seconds per LMM request"),
    lmm_concurrency: int = typer.Option(4, "--lmm-concurrency", min=1, help="LMM requests in flight at most"),
    lmm_prompt: Optional[str] = typer.Option(None, "--lmm-prompt", help="the stage-1 question (SLAC's by default)"),
    lmm_top_k: int = typer.Option(3, "--lmm-top-k", min=1, help="candidates from CLIP and from SLAC (tlac)"),
    abstain: bool = typer.Option(False, "--abstain", help="model files: 'review' when the conformal set is not one class"),
) -> None:
    """Accuracy, balanced accuracy, macro-F1, per-class scores and bootstrap 95% intervals on a labelled dataset."""
    from .modelfile import is_model_file

    if is_model_file(dataset):
        from .cli_fewshot import evaluate_model_command

        if model_dataset is None:
            raise UserError(f"{dataset}: give the dataset to evaluate the model on: fewvision eval MODEL.fvm DATASET")
        return evaluate_model_command(Path(dataset), model_dataset, out=out, report=report, abstain=abstain,
                                      weights=weights, cache_dir=cache_dir, no_cache=no_cache)
    if model_dataset is not None:
        raise UserError(f"a second argument ('{model_dataset}') is only taken after a model file (.fvm)")
    from .api import evaluate_prototype, evaluate_zeroshot
    from .datasets import load_dataset
    from .evaluation import save_metrics

    data = load_dataset(dataset)
    bb = _backbone(backbone, weights, cache_dir)
    if method == "zeroshot":
        ev = evaluate_zeroshot(data, backbone=bb, classes=_classes(None, classes_file), templates=template or None,
                               unknown_threshold=unknown_threshold, cache_dir=cache_dir, use_cache=not no_cache,
                               progress=True)
    elif method == "prototype":
        ev = evaluate_prototype(data, backbone=bb, shots=shots, seed=seed, cache_dir=cache_dir,
                                use_cache=not no_cache, progress=True)
    elif method in LMM_METHODS:
        from .api import evaluate_with_lmm

        lmm = _lmm(method, lmm_url, lmm_model, lmm_timeout, lmm_concurrency, cache_dir, no_cache)
        ev = evaluate_with_lmm(data, backbone=bb, lmm=lmm, method=method, classes=_classes(None, classes_file),
                               templates=template or None, prompt=lmm_prompt, top_k=lmm_top_k,
                               unknown_threshold=unknown_threshold, cache_dir=cache_dir, use_cache=not no_cache,
                               progress=True)
        info("decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(ev.metrics["decisions"].items())))
    else:
        raise UserError(f"unknown method '{method}': expected zeroshot, prototype, slac or tlac")
    ev.metrics.update({"method": method, "backbone": bb.spec, "backbone_id": bb.id, "dataset": data.name})
    save_metrics(ev.metrics, out)
    m = ev.metrics
    typer.echo(f"{method} on {data.name}: accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}"
               f"  macro-F1 {m['macro_f1']:.4f}  (n={m['n']})")
    info(f"wrote {out}")
    if report:
        from .report import write_classification_report

        page = write_classification_report(report, title=f"fewvision eval: {method} on {data.name}", metrics=m,
                                           rows=ev.predictions.rows, class_names=ev.predictions.class_names,
                                           extra={"backbone": bb.spec, "method": method})
        info(f"report: {page}")
    _summary(len(ev.predictions.rows), ev.predictions.skipped)


@models_app.command("list")
def models_list(
    kind: str = typer.Option("openclip", "--kind", help="openclip | timm"),
    filter: Optional[str] = typer.Option(None, "--filter", help="substring to match"),
) -> None:
    """Known backbones: open_clip MODEL/TAG pairs (or timm models with --kind timm), plus 'texture'."""
    if kind == "openclip":
        import open_clip

        names = [f"openclip:{m}/{t}" for m, t in open_clip.list_pretrained()]
    elif kind == "timm":
        import timm

        names = [f"timm:{m}" for m in timm.list_models(pretrained=True)]
    else:
        raise UserError(f"unknown --kind '{kind}': expected openclip or timm")
    names.append("texture")
    for n in names:
        if not filter or filter.lower() in n.lower():
            typer.echo(n)


@models_app.command("pull")
def models_pull(spec: str, cache_dir: Optional[str] = typer.Option(None, "--cache-dir")) -> None:
    """Download a backbone's weights into the cache (run on a connected machine)."""
    bb = _backbone(spec, None, cache_dir)
    typer.echo(f"{spec}: ready ({bb.id})")


@models_app.command("path")
def models_path(spec: str, cache_dir: Optional[str] = typer.Option(None, "--cache-dir")) -> None:
    """Where a backbone's weights are (or would be) cached."""
    from .backbones import weights_location

    typer.echo(str(weights_location(spec, cache_dir)))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="folder for the report and metrics"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
) -> None:
    """The main job on the textile images: zero-shot with CLIP when its weights are at hand, else prototypes."""
    from .demo import run_demo

    page = run_demo(out, cache_dir=cache_dir, echo=info)
    typer.echo(str(page))


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


# Command groups that live in their own modules; each module defines ``register(app)``.
EXTENSIONS: list[str] = ["cli_anomaly", "cli_fewshot"]


def _register_extensions() -> None:
    import importlib

    for name in EXTENSIONS:
        importlib.import_module(f"fewvision.{name}").register(app)


_register_extensions()


def main() -> None:
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        info("aborted")
        sys.exit(1)
    except KeyboardInterrupt:
        info("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the one place errors become exit codes
        import click

        if os.environ.get("FEWVISION_DEBUG"):
            raise
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        one_line = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, _user_error_types()):
            info(f"error: {one_line}")
            sys.exit(2)
        info(f"error: {type(exc).__name__}: {one_line}")
        sys.exit(1)


if __name__ == "__main__":
    main()
