"""``fewvision classify`` and ``fewvision eval``: zero-shot (and LMM-assisted) classification and its evaluation."""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    CONTEXT,
    EXIT_CODES_HELP,
    LMM,
    LMM_METHODS,
    UserError,
    backbone_option,
    cache_dir_option,
    check_output,
    check_report,
    classes_from,
    create,
    engine_option,
    exit_code_option,
    finish,
    info,
    lmm_from,
    no_cache_option,
    print_metrics,
    resolve_backbone,
    spec_has_text,
    summarise_predictions,
    templates_from,
    weights_option,
    write_predictions,
)

CLASSIFY_EXAMPLE = """

\b
Example:
  fewvision classify photos/ --classes "ok,scratch,dent" -o results.csv --report report/
"""
EVAL_EXAMPLE = """

\b
Examples:
  fewvision eval my_dataset/ --method zeroshot -o metrics.json --report report/
  fewvision eval model.fvm test_set/ -o metrics.json
"""


def register(app: typer.Typer) -> None:
    app.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP, help=cleandoc(classify.__doc__) + CLASSIFY_EXAMPLE)(classify)
    app.command("eval", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(evaluate.__doc__) + EVAL_EXAMPLE)(evaluate)


def check_text_tower(method: str, spec: str) -> None:
    if spec_has_text(spec) is False:
        raise UserError(f"--method {method} needs a text tower, which backbone '{spec}' lacks; use a CLIP backbone "
                        "(openclip:... or hf:...) or a few-shot method on labelled images (fewvision fit)")


def check_rerank(rerank: str | None, method: str) -> None:
    if rerank is None:
        return
    if rerank != "itm":
        raise UserError(f"--rerank {rerank}: expected itm (the backbone's image-text matching head)")
    if method != "zeroshot":
        raise UserError(f"--rerank itm re-ranks zero-shot classes (--method zeroshot), not --method {method}")


def classify(
    images: List[Path] = typer.Argument(..., metavar="IMAGES", help="image files and/or folders (searched "
                                        "recursively)"),
    classes: Optional[str] = typer.Option(None, "--classes", "-c", metavar="A,B,...",
                                          help='comma-separated class names, e.g. "ok,scratch"'),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", metavar="FILE",
                                                help="YAML or JSON classes with synonyms and descriptions "
                                                     "(format in the README)"),
    backbone: Optional[str] = backbone_option(),
    weights: Optional[str] = weights_option(),
    template: Optional[str] = typer.Option(None, "--template", "-t", metavar="T1,T2,...",
                                           help="template sets (openai, simple, industrial) and/or templates with "
                                                "{} for the class, comma-separated (\\, for a literal comma) "
                                                "[default: industrial]"),
    review_threshold: Optional[float] = typer.Option(None, "--review-threshold", "--unknown-threshold", min=0.0,
                                                     max=1.0, metavar="P",
                                                     help="send an image to review when its top probability is "
                                                          "below P"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="results.csv or results.jsonl "
                                       "(default: one line per image on stdout)"),
    report: Optional[Path] = typer.Option(None, "--report", metavar="DIR", help="folder for an HTML report"),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    batch_size: int = typer.Option(32, "--batch-size", min=1, metavar="N", help="images per encoder batch"),
    method: str = typer.Option("zeroshot", "--method", "-m", metavar="METHOD",
                               help="zeroshot | slac | tlac (slac and tlac ask an LMM)"),
    rerank: Optional[str] = typer.Option(None, "--rerank", metavar="itm",
                                         help="re-rank each image's top classes with the backbone's image-text "
                                              "matching head (BLIP) [default: no re-ranking]"),
    rerank_k: int = typer.Option(3, "--rerank-k", min=1, metavar="K", help="classes re-ranked per image"),
    lmm_url: Optional[str] = LMM["lmm_url"],
    lmm_model: Optional[str] = LMM["lmm_model"],
    lmm_timeout: float = LMM["lmm_timeout"],
    lmm_concurrency: int = LMM["lmm_concurrency"],
    lmm_prompt: Optional[str] = LMM["lmm_prompt"],
    lmm_top_k: int = LMM["lmm_top_k"],
    exit_code: bool = exit_code_option(),
) -> None:
    """Zero-shot classification: one row per image with its label, the top class and its probability, and the
    probability of each class."""
    from ..io.images import iter_image_files
    from ..progress import job

    if method not in ("zeroshot", *LMM_METHODS):
        raise UserError(f"unknown method '{method}': expected zeroshot, slac or tlac")
    check_rerank(rerank, method)
    check_output(out, (".csv", ".jsonl"))
    check_report(report)
    spec = resolve_backbone(backbone)
    check_text_tower(method, spec)
    specs = classes_from(classes, classes_file)
    if specs is None:
        raise UserError("give the classes with --classes or --classes-file")
    templates = templates_from(template)
    lmm = lmm_from(method, lmm_url, lmm_model, lmm_timeout, lmm_concurrency, cache_dir, no_cache)
    iter_image_files(images)  # a missing input is reported before any model is loaded
    with job("classify") as bar:
        bb = create(spec, weights, cache_dir)
        if lmm is not None:
            from ..tasks.zeroshot import classify_with_lmm

            preds = classify_with_lmm(images, specs, backbone=bb, lmm=lmm, method=method, templates=templates,
                                      prompt=lmm_prompt, top_k=lmm_top_k, unknown_threshold=review_threshold,
                                      cache_dir=cache_dir, use_cache=not no_cache, progress=True,
                                      batch_size=batch_size)
        else:
            from ..tasks.zeroshot import classify as run_classify

            preds = run_classify(images, specs, backbone=bb, templates=templates, unknown_threshold=review_threshold,
                                 cache_dir=cache_dir, use_cache=not no_cache, progress=True, batch_size=batch_size,
                                 rerank=rerank, rerank_k=rerank_k)
    write_predictions(preds, out, report, title="fewvision classify",
                      extra={"backbone": bb.spec, **({"method": method, "lmm": lmm.describe()} if lmm else {})})
    summarise_predictions(bar, preds)
    finish(len(preds.rows), sum(r["label"] == "review" for r in preds.rows), exit_code)


def evaluate(
    dataset: str = typer.Argument(..., metavar="DATASET_OR_MODEL",
                                  help="'textile', a CSV manifest (path,label), an MVTec folder or a folder of class "
                                       "folders - or a fitted model (.fvm, .fvz, .onnx), followed by the dataset"),
    model_dataset: Optional[str] = typer.Argument(None, metavar="[DATASET]", help="the dataset, after a model file"),
    method: str = typer.Option("zeroshot", "--method", "-m", metavar="METHOD",
                               help="zeroshot | prototype | slac | tlac (without a model file)"),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", metavar="FILE",
                                                help="classes with synonyms and descriptions (zeroshot)"),
    backbone: Optional[str] = backbone_option(),
    weights: Optional[str] = weights_option(),
    template: Optional[str] = typer.Option(None, "--template", "-t", metavar="T1,T2,...",
                                           help="template sets and/or templates with {}, comma-separated"),
    review_threshold: Optional[float] = typer.Option(None, "--review-threshold", "--unknown-threshold", min=0.0,
                                                     max=1.0, metavar="P",
                                                     help="send an image to review when its top probability is "
                                                          "below P"),
    shots: int = typer.Option(10, "--shots", min=1, metavar="K", help="support images per class (prototype)"),
    seed: int = typer.Option(0, "--seed", metavar="N", help="seed of the support draw (prototype)"),
    out: Path = typer.Option(Path("metrics.json"), "--out", "-o", metavar="FILE", help="metrics JSON"),
    report: Optional[Path] = typer.Option(None, "--report", metavar="DIR", help="folder for an HTML report"),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    lmm_url: Optional[str] = LMM["lmm_url"],
    lmm_model: Optional[str] = LMM["lmm_model"],
    lmm_timeout: float = LMM["lmm_timeout"],
    lmm_concurrency: int = LMM["lmm_concurrency"],
    lmm_prompt: Optional[str] = LMM["lmm_prompt"],
    lmm_top_k: int = LMM["lmm_top_k"],
    abstain: bool = typer.Option(False, "--abstain", help="model files: send an image to review when its conformal "
                                 "set is not exactly one class"),
    engine: str = engine_option(),
    rerank: Optional[str] = typer.Option(None, "--rerank", metavar="itm",
                                         help="re-rank each image's top classes with the backbone's image-text "
                                              "matching head (BLIP) [default: no re-ranking]"),
    rerank_k: int = typer.Option(3, "--rerank-k", min=1, metavar="K", help="classes re-ranked per image"),
) -> None:
    """Accuracy, balanced accuracy, macro-F1, calibration error, per-class scores and bootstrap 95% intervals on a
    labelled dataset."""
    from ..modelfile import is_model_file

    check_output(out, (".json",))
    check_report(report)
    if is_model_file(dataset) or Path(dataset).suffix.lower() == ".onnx":
        from .fewshot import evaluate_model_command

        if model_dataset is None:
            raise UserError(f"{dataset}: give the dataset to evaluate the model on: fewvision eval MODEL DATASET")
        if rerank is not None:
            raise UserError("--rerank re-ranks zero-shot classes (fewvision eval DATASET --backbone hf:BLIP...), not "
                            "a fitted model's")
        return evaluate_model_command(Path(dataset), model_dataset, out=out, report=report, abstain=abstain,
                                      weights=weights, cache_dir=cache_dir, no_cache=no_cache, engine=engine)
    if model_dataset is not None:
        raise UserError(f"a second argument ('{model_dataset}') is only taken after a model file (.fvm)")
    if method not in ("zeroshot", "prototype", *LMM_METHODS):
        raise UserError(f"unknown method '{method}': expected zeroshot, prototype, slac or tlac")
    check_rerank(rerank, method)
    spec = resolve_backbone(backbone)
    if method != "prototype":
        check_text_tower(method, spec)
    specs = classes_from(None, classes_file)
    templates = templates_from(template)
    lmm = lmm_from(method, lmm_url, lmm_model, lmm_timeout, lmm_concurrency, cache_dir, no_cache)
    from ..io.datasets import load_dataset
    from ..metrics import save_metrics
    from ..progress import job

    data = load_dataset(dataset)
    with job(f"eval {method}") as bar:
        bb = create(spec, weights, cache_dir)
        if method == "zeroshot":
            from ..tasks.zeroshot import evaluate_zeroshot

            ev = evaluate_zeroshot(data, backbone=bb, classes=specs, templates=templates,
                                   unknown_threshold=review_threshold, cache_dir=cache_dir, use_cache=not no_cache,
                                   progress=True, rerank=rerank, rerank_k=rerank_k)
        elif method == "prototype":
            from ..tasks.fewshot import evaluate_prototype

            ev = evaluate_prototype(data, backbone=bb, shots=shots, seed=seed, cache_dir=cache_dir,
                                    use_cache=not no_cache, progress=True)
        else:
            from ..tasks.zeroshot import evaluate_with_lmm

            ev = evaluate_with_lmm(data, backbone=bb, lmm=lmm, method=method, classes=specs, templates=templates,
                                   prompt=lmm_prompt, top_k=lmm_top_k, unknown_threshold=review_threshold,
                                   cache_dir=cache_dir, use_cache=not no_cache, progress=True)
            info("decisions: " + ", ".join(f"{k} {v}" for k, v in sorted(ev.metrics["decisions"].items())))
    ev.metrics.update({"method": method, "backbone": bb.spec, "backbone_id": bb.id, "dataset": data.name})
    save_metrics(ev.metrics, out)
    print_metrics(f"{method} on {data.name}", ev.metrics)
    info(f"wrote {out}")
    write_predictions(ev.predictions, None, report, title=f"fewvision eval: {method} on {data.name}",
                      extra={"backbone": bb.spec, "method": method}, metrics=ev.metrics)
    summarise_predictions(bar, ev.predictions)
    finish(len(ev.predictions.rows), 0, False)
