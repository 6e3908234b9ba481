"""``fewvision classify`` and ``fewvision eval``: zero-shot (and LMM-assisted) classification and its evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    DEFAULT_BACKBONE_HELP,
    LMM_METHODS,
    LMM_URL_HELP,
    UserError,
    _backbone,
    _classes,
    _lmm,
    _summary,
    info,
    write_rows,
)


def register(app: typer.Typer) -> None:
    app.command()(classify)
    app.command("eval")(evaluate)


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
    from ..io.images import iter_image_files
    from ..tasks.zeroshot import classify as run_classify
    from ..tasks.zeroshot import classify_with_lmm

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
        from ..reports.classification import write_classification_report

        extra = {"backbone": bb.spec, **({"method": method, "lmm": lmm.describe()} if lmm is not None else {})}
        page = write_classification_report(report, title="fewvision classify", metrics=None, rows=preds.rows,
                                           class_names=preds.class_names, extra=extra)
        info(f"report: {page}")
    _summary(len(preds.rows), preds.skipped)


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
    from ..modelfile import is_model_file

    if is_model_file(dataset):
        from .fewshot import evaluate_model_command

        if model_dataset is None:
            raise UserError(f"{dataset}: give the dataset to evaluate the model on: fewvision eval MODEL.fvm DATASET")
        return evaluate_model_command(Path(dataset), model_dataset, out=out, report=report, abstain=abstain,
                                      weights=weights, cache_dir=cache_dir, no_cache=no_cache)
    if model_dataset is not None:
        raise UserError(f"a second argument ('{model_dataset}') is only taken after a model file (.fvm)")
    from ..io.datasets import load_dataset
    from ..metrics.classification import save_metrics
    from ..tasks.fewshot import evaluate_prototype
    from ..tasks.zeroshot import evaluate_zeroshot

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
        from ..tasks.zeroshot import evaluate_with_lmm

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
        from ..reports.classification import write_classification_report

        page = write_classification_report(report, title=f"fewvision eval: {method} on {data.name}", metrics=m,
                                           rows=ev.predictions.rows, class_names=ev.predictions.class_names,
                                           extra={"backbone": bb.spec, "method": method})
        info(f"report: {page}")
    _summary(len(ev.predictions.rows), ev.predictions.skipped)
