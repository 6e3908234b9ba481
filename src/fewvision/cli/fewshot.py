"""``fewvision fit``, ``predict`` and ``benchmark``: few-shot models from a handful of labelled images.

``fewvision eval MODEL.fvm DATASET`` is routed here from the ``eval`` command in cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from .common import DEFAULT_BACKBONE_HELP, UserError, _summary, info, write_rows

PARAM_HELP = "head parameter KEY=VALUE (JSON value), repeatable, e.g. --param text_weight=0.5"


def parse_params(items: List[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--param '{item}': expected KEY=VALUE")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def _check_method(method: str) -> None:
    from ..heads import head_names

    if method not in head_names():
        raise UserError(f"unknown method '{method}': expected one of {', '.join(head_names())}")


def fit_command(
    dataset: str = typer.Argument(..., help="'textile', a CSV manifest or a folder of class folders"),
    method: str = typer.Option(..., "--method", help="a registered head: prototype, linear, tip, tip-f, ..."),
    out: Path = typer.Option(..., "-o", "--out", help="model file to write (.fvm)"),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, help="support images per class (default: all)"),
    seed: int = typer.Option(0, "--seed"),
    backbone: str = typer.Option("openclip:ViT-B-32/laion2b_s34b_b79k", "--backbone", help=DEFAULT_BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights", help="local weights file or folder for the backbone"),
    calibrate_fraction: float = typer.Option(0.0, "--calibrate-fraction", min=0.0, max=0.9,
                                             help="share of the images held out to fit temperature and conformal"),
    alpha: Optional[float] = typer.Option(None, "--alpha", min=0.001, max=0.999,
                                          help="conformal miscoverage: prediction sets contain the truth >= 1-alpha"),
    conformal: str = typer.Option("lac", "--conformal", help="conformal score: lac | aps"),
    mondrian: bool = typer.Option(False, "--mondrian", help="one conformal threshold per class"),
    param: List[str] = typer.Option([], "--param", help=PARAM_HELP),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
    no_cache: bool = typer.Option(False, "--no-cache"),
) -> None:
    """Fit a few-shot head (and optionally calibrate it) and write one model file."""
    from ..decide.conformal import SCORES
    from ..modelfile import MODEL_SUFFIX, save_model
    from ..tasks.fewshot import fit

    _check_method(method)
    if conformal not in SCORES:
        raise UserError(f"--conformal must be one of {', '.join(SCORES)}, got '{conformal}'")
    if out.suffix != MODEL_SUFFIX:
        raise UserError(f"{out}: a model file must end in {MODEL_SUFFIX}")
    model = fit(dataset, method, backbone, shots, seed, weights=weights, calibrate_fraction=calibrate_fraction,
                alpha=alpha, conformal=conformal, mondrian=mondrian, cache_dir=cache_dir, use_cache=not no_cache,
                progress=True, **parse_params(param))
    save_model(out, model)
    d = model.decision
    extra = f", temperature {d['temperature']:.3f}" if "temperature" in d else ""
    if "conformal" in d:
        extra += f", {d['conformal']['score']} sets at alpha {d['conformal']['alpha']}"
    typer.echo(f"{method}: fitted on {model.info['n_support']} image(s){extra} -> {out}")


def predict_command(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file (.fvm)"),
    images: List[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
    out: Optional[Path] = typer.Option(None, "--out", help="results.csv or results.jsonl"),
    report: Optional[Path] = typer.Option(None, "--report", help="folder for an HTML report"),
    abstain: bool = typer.Option(False, "--abstain", help="label 'review' when the conformal set is not one class"),
    unknown_threshold: Optional[float] = typer.Option(None, "--unknown-threshold", min=0.0, max=1.0),
    weights: Optional[str] = typer.Option(None, "--weights", help="local weights for the model's backbone"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
    no_cache: bool = typer.Option(False, "--no-cache"),
) -> None:
    """Classify images with a fitted model: label, calibrated probabilities and (when fitted) the prediction set."""
    from ..tasks.fewshot import load, predict

    model = load(model_path)
    preds = predict(model, images, abstain=abstain, unknown_threshold=unknown_threshold, weights=weights,
                    cache_dir=cache_dir, use_cache=not no_cache, progress=True)
    if out:
        write_rows(out, preds.rows, preds.class_names, preds.skipped)
        info(f"wrote {out}")
    else:
        for r in preds.rows:
            typer.echo(f"{r['path']}\t{r['label']}\t{max(r['probabilities'].values()):.3f}"
                       + (f"\t{'|'.join(r['set'])}" if "set" in r else ""))
    if report:
        from ..reports.classification import write_classification_report

        page = write_classification_report(report, title=f"fewvision predict: {model.head.method}", metrics=None,
                                           rows=preds.rows, class_names=preds.class_names,
                                           extra={"backbone": model.backbone_spec, "model": str(model_path)})
        info(f"report: {page}")
    _summary(len(preds.rows), preds.skipped)


def evaluate_model_command(model_path: Path, dataset: str, *, out: Path, report: Optional[Path], abstain: bool,
                           weights: Optional[str], cache_dir: Optional[str], no_cache: bool) -> None:
    """``fewvision eval MODEL.fvm DATASET``: metrics of a fitted model on the dataset's held-out images."""
    from ..metrics.classification import save_metrics
    from ..tasks.fewshot import evaluate_model, load

    model = load(model_path)
    ev = evaluate_model(model, dataset, abstain=abstain, weights=weights, cache_dir=cache_dir,
                        use_cache=not no_cache, progress=True)
    ev.metrics["model"] = str(model_path)
    save_metrics(ev.metrics, out)
    m = ev.metrics
    sets = f"  coverage {m['coverage']:.4f}  mean set size {m['mean_set_size']:.3f}" if "coverage" in m else ""
    typer.echo(f"{m['method']} on {m['dataset']}: accuracy {m['accuracy']:.4f}  balanced accuracy "
               f"{m['balanced_accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}{sets}  (n={m['n']})")
    info(f"wrote {out}")
    if report:
        from ..reports.classification import write_classification_report

        page = write_classification_report(report, title=f"fewvision eval: {m['method']} on {m['dataset']}",
                                           metrics=m, rows=ev.predictions.rows, class_names=ev.predictions.class_names,
                                           extra={"backbone": model.backbone_spec, "model": str(model_path)})
        info(f"report: {page}")
    _summary(len(ev.predictions.rows), ev.predictions.skipped)


def benchmark_command(
    dataset: str = typer.Argument(..., help="'textile', a CSV manifest or a folder of class folders"),
    methods: str = typer.Option("prototype,linear", "--methods", help="comma-separated registered methods"),
    shots: str = typer.Option("1,2,4,8,16", "--shots", help="comma-separated shots per class"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="support draws per cell (seeds 0..S-1)"),
    backbone: str = typer.Option("openclip:ViT-B-32/laion2b_s34b_b79k", "--backbone", help=DEFAULT_BACKBONE_HELP),
    weights: Optional[str] = typer.Option(None, "--weights"),
    test_fraction: float = typer.Option(0.5, "--test-fraction", min=0.05, max=0.95,
                                        help="held-out share when the dataset has no splits"),
    out: Path = typer.Option(Path("benchmark-out"), "--out", help="folder for results.csv/.json and the plot"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
    no_cache: bool = typer.Option(False, "--no-cache"),
) -> None:
    """Accuracy of several methods at several shot counts, mean and std over seeds, on a held-out split."""
    from ..tasks.benchmark import parse_list, run_benchmark, write_outputs

    method_list = parse_list(methods, str, "method")
    for m in method_list:
        _check_method(m)
    result = run_benchmark(dataset, method_list, parse_list(shots, int, "shot count"), seeds, backbone=backbone,
                           weights=weights, test_fraction=test_fraction, cache_dir=cache_dir,
                           use_cache=not no_cache, progress=True, echo=info)
    paths = write_outputs(result, out)
    for r in result.rows:
        typer.echo(f"{r['method']:>14} {r['shots']:>3}-shot  accuracy {r['accuracy_mean']:.4f} ± "
                   f"{r['accuracy_std']:.4f}  balanced {r['balanced_accuracy_mean']:.4f} ± "
                   f"{r['balanced_accuracy_std']:.4f}")
    for s in result.skipped:
        info(f"skipped {s['method']}: {s['reason']}")
    info(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}")


def register(app: typer.Typer) -> None:
    app.command("fit")(fit_command)
    app.command("predict")(predict_command)
    app.command("benchmark")(benchmark_command)
