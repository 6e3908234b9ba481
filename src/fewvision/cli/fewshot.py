"""``fewvision fit``, ``predict`` and ``benchmark``: few-shot models from a handful of labelled images.

``fewvision eval MODEL.fvm DATASET`` is routed here from the ``eval`` command.
"""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import List, Optional

import typer

from .common import (
    CONTEXT,
    EXIT_CODES_HELP,
    UserError,
    backbone_option,
    cache_dir_option,
    check_folder,
    check_output,
    check_report,
    comma_list,
    engine_option,
    exit_code_option,
    finish,
    info,
    init_parameters,
    no_cache_option,
    param_option,
    parse_params,
    print_metrics,
    report_skips,
    resolve_backbone,
    scoring_model,
    spec_has_text,
    summarise_predictions,
    weights_option,
    write_predictions,
)

FIT_EXAMPLE = """

\b
Example:
  fewvision fit my_dataset/ --method prototype --shots 8 --calibrate-fraction 0.3 --alpha 0.1 -o model.fvm
"""
PREDICT_EXAMPLE = """

\b
Example:
  fewvision predict model.fvm incoming/ -o results.csv --abstain --exit-code
"""
BENCHMARK_EXAMPLE = """

\b
Example:
  fewvision benchmark my_dataset/ --methods prototype,linear,tip --shots 1,4,16 -o bench/
  fewvision benchmark history/ --meta protonet.fvm,maml.fvm --way 5 --shots 1,5 --episodes 600 -o bench/
"""


META_EXAMPLE = """

\b
Example:
  fewvision meta-train history/ --method protonet --base-classes scratch,dent,stain --episodes 2000 -o meta.fvm
  fewvision fit new_defects/ --method protonet --meta meta.fvm --shots 5 -o model.fvm
"""


def register(app: typer.Typer) -> None:
    app.command("meta-train", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(meta_train_command.__doc__) + META_EXAMPLE)(meta_train_command)
    app.command("fit", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(fit_command.__doc__) + FIT_EXAMPLE)(fit_command)
    app.command("predict", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(predict_command.__doc__) + PREDICT_EXAMPLE)(predict_command)
    app.command("benchmark", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(benchmark_command.__doc__) + BENCHMARK_EXAMPLE)(benchmark_command)


def head_class(method: str):
    from ..heads import head_classes, head_names

    if method not in head_names():
        raise UserError(f"unknown method '{method}': expected one of {', '.join(head_names())}")
    return head_classes()[method]


def check_method(method: str, spec: str) -> type:
    cls = head_class(method)
    needs = cls.needs_text
    if needs is True and spec_has_text(spec) is False:
        raise UserError(f"method '{method}' needs a text tower, which backbone '{spec}' lacks; use a CLIP backbone "
                        "or an image-only method (prototype, linear)")
    return cls


def fit_command(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="'textile', 'digits', 'textile-defects', a CSV manifest "
                                       "(path,label[,split,caption]) or a folder of class folders"),
    method: str = typer.Option(..., "--method", "-m", metavar="METHOD",
                               help="prototype, protonet, relationnet, maml, linear, tip, tip-f, prolip, clip-adapter, "
                                    "coop, lora, bottleneck-adapter, deep-prompt, contrastive, zeroshot"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="model file to write (.fvm)"),
    shots: Optional[int] = typer.Option(None, "--shots", "-k", min=1, metavar="K",
                                        help="support images per class [default: all]"),
    seed: int = typer.Option(0, "--seed", metavar="N", help="seed of the support draw and of training"),
    backbone: Optional[str] = backbone_option(),
    weights: Optional[str] = weights_option(),
    calibrate_fraction: float = typer.Option(0.0, "--calibrate-fraction", min=0.0, max=0.9, metavar="F",
                                             help="share of the images held out to fit the temperature and the "
                                                  "conformal thresholds"),
    alpha: Optional[float] = typer.Option(None, "--alpha", min=0.001, max=0.999, metavar="A",
                                          help="conformal miscoverage: prediction sets hold the true class with "
                                               "probability >= 1 - A"),
    conformal: str = typer.Option("lac", "--conformal", metavar="SCORE", help="conformal score: lac | aps"),
    mondrian: bool = typer.Option(False, "--mondrian", help="one conformal threshold per class"),
    good: Optional[List[Path]] = typer.Option(None, "--good", metavar="GOOD_DIR",
                                              help="good images (folder or files; repeatable): an anomaly model "
                                                   "fitted on them adds its map statistics and map-weighted patch "
                                                   "features to the head's features (prototype, linear)"),
    good_method: str = typer.Option("padim", "--good-method", metavar="METHOD",
                                    help="anomaly method fitted on --good: padim | patchcore | anomalydino | ..."),
    meta: Optional[Path] = typer.Option(None, "--meta", metavar="FILE",
                                        help="a model from 'fewvision meta-train': keep what it learned on the base "
                                             "classes (embedding, relation module, MAML's starting point) and fit "
                                             "only the new classes, on its backbone"),
    synthetic: Optional[Path] = typer.Option(None, "--synthetic", metavar="FILE",
                                             help="a gcpl or comple model: add images generated from its learned "
                                                  "class tokens to the support set"),
    synthetic_per_class: int = typer.Option(8, "--synthetic-per-class", min=1, metavar="N",
                                            help="generated images per class with --synthetic"),
    param: List[str] = param_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
) -> None:
    """Fit a few-shot head on labelled images (and optionally calibrate it) and write one model file. With --good,
    the many good images of a line teach the head too; with --meta, an embedding meta-trained on other classes."""
    from ..decide.conformal import SCORES
    from ..io.datasets import load_dataset
    from ..modelfile import MODEL_SUFFIX, save_model
    from ..progress import job
    from ..tasks.fewshot import fit

    if meta is not None:
        from ..modelfile import read_metadata

        meta_info = read_metadata(meta, cache_dir)
        if backbone and backbone.strip() != meta_info["backbone"]["spec"]:
            raise UserError(f"{meta}: meta-trained on backbone '{meta_info['backbone']['spec']}'; --backbone "
                            f"'{backbone}' would give features its embedding was not trained on")
        if meta_info["head"]["method"] != method:
            raise UserError(f"{meta}: a {meta_info['head']['method']} model; fit with --method "
                            f"{meta_info['head']['method']}")
        backbone = meta_info["backbone"]["spec"]
    from ..heads import head_classes

    # A head that brings its own model (gcpl, comple: a diffusion pipeline) only needs the images read: the
    # weight-free texture backbone does that without loading CLIP.
    own = getattr(head_classes().get(method), "own_model", False)
    spec = resolve_backbone(backbone) if backbone or not own else "texture"
    cls = check_method(method, spec)
    params = parse_params(param, init_parameters(cls), method)
    if conformal not in SCORES:
        raise UserError(f"--conformal must be one of {', '.join(SCORES)}, got '{conformal}'")
    check_output(out, (MODEL_SUFFIX,))
    if good:
        from ..anomaly import anomaly_head_classes
        from ..heads.with_good import check_inner

        if good_method not in anomaly_head_classes():
            raise UserError(f"unknown --good-method '{good_method}': expected one of "
                            f"{', '.join(sorted(anomaly_head_classes()))}")
        try:
            check_inner(cls(**params))
        except ValueError as err:
            raise UserError(str(err)) from None
        for folder in good:
            if not folder.exists():
                raise UserError(f"{folder}: --good names no such file or folder")
    if synthetic is not None and not synthetic.is_file():
        raise UserError(f"{synthetic}: --synthetic names no such model file")
    data = load_dataset(dataset)
    with job(f"fit {method}"):
        model = fit(data, method, spec, shots, seed, weights=weights, calibrate_fraction=calibrate_fraction,
                    alpha=alpha, conformal=conformal, mondrian=mondrian, good=[str(g) for g in good or []],
                    good_method=good_method, meta=meta, synthetic=synthetic, synthetic_per_class=synthetic_per_class,
                    cache_dir=cache_dir, use_cache=not no_cache, progress=True, **params)
    save_model(out, model)
    for s in model.info.get("skipped", []):
        info(f"skipped {s}")
    cost = getattr(getattr(model.head, "inner", model.head), "cost_", None)
    if cost:
        info(f"cost: {cost['training_unet_passes']} UNet passes to train ({cost['training_unet_passes_per_class']:.0f} "
             f"per class); {cost['inference_unet_passes_per_image']} per image to predict")
    d = model.decision
    extra = f", temperature {d['temperature']:.3f}" if "temperature" in d else ""
    calibration = d.get("calibration")
    if isinstance(calibration, dict) and calibration.get("kept") is False:
        extra += f" (the fitted temperature was not kept: {calibration['reason']})"
    if "conformal" in d:
        extra += f", {d['conformal']['score']} sets at alpha {d['conformal']['alpha']}"
    skipped = f" ({model.info['n_skipped']} unreadable skipped)" if model.info.get("n_skipped") else ""
    if "good_images" in model.info:
        g = model.info["good_images"]
        extra += f", with {g['method']} features from {g['n_good_images']} good image(s)"
    typer.echo(f"{method}: fitted on {model.info['n_support']} image(s){skipped}{extra} -> {out}")
    if meta is not None:  # say plainly what validation on held-out base classes found
        from ..meta.episodes import validation_note

        note = validation_note(getattr(model.head, "meta_", {}))
        if note:
            info(f"{meta}: {note}")


def meta_train_command(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="'textile', 'digits', 'textile-defects', a CSV manifest (path,label) or a "
                                       "folder of class folders: the classes a site already has"),
    method: str = typer.Option("protonet", "--method", "-m", metavar="METHOD", help="protonet | relationnet | maml"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="model file to write (.fvm)"),
    base_classes: Optional[str] = typer.Option(None, "--base-classes", metavar="A,B,...",
                                               help="the classes to meta-train on [default: every class]; the "
                                                    "others are recorded as novel"),
    way: Optional[int] = typer.Option(None, "--way", min=2, metavar="N",
                                      help="classes per episode [default: 5, or every base class when fewer]"),
    shot: int = typer.Option(5, "--shot", min=1, metavar="K", help="support images per class per episode"),
    query: Optional[int] = typer.Option(None, "--query", min=1, metavar="Q",
                                        help="query images per class per episode [default: 15, or what the "
                                             "smallest base class has beyond its shots]"),
    episodes: int = typer.Option(2000, "--episodes", min=1, metavar="E", help="training episodes"),
    seed: int = typer.Option(0, "--seed", metavar="N", help="seed of the episodes and of training"),
    backbone: Optional[str] = backbone_option(),
    weights: Optional[str] = weights_option(),
    param: List[str] = param_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
) -> None:
    """Meta-train a head on episodes (N-way K-shot tasks) drawn from a dataset's base classes, so that 'fit --meta'
    learns new classes from a few images with what it learned there. Episodes run on cached image features."""
    from ..modelfile import MODEL_SUFFIX, save_model
    from ..progress import job
    from ..tasks.meta import META_METHODS, meta_train_model

    if method not in META_METHODS:
        raise UserError(f"unknown --method '{method}' for meta-train: expected one of {', '.join(META_METHODS)}")
    check_output(out, (MODEL_SUFFIX,))
    spec = resolve_backbone(backbone)
    cls = head_class(method)
    params = parse_params(param, [p for p in init_parameters(cls) if p not in ("way", "shot", "query", "episodes",
                                                                                 "seed")], method)
    base = comma_list(base_classes, "class") if base_classes else None
    with job(f"meta-train {method}"):
        model = meta_train_model(dataset, method, spec, base, seed=seed, weights=weights, cache_dir=cache_dir,
                                 use_cache=not no_cache, progress=True, way=way, shot=shot, query=query,
                                 episodes=episodes, **params)
    save_model(out, model)
    m = model.info["meta"]
    losses = m["losses"]
    typer.echo(f"{method}: meta-trained on {m['n_images']} image(s) of {len(m['base_classes'])} base class(es), "
               f"{episodes} episodes, query loss {losses[0]:.3f} -> {losses[-1]:.3f} -> {out}")
    from ..meta.episodes import validation_note

    info(validation_note(m) or "not validated: no base classes held out (fewer than four, or validation_classes=0)")


def predict_command(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file (.fvm) from 'fewvision fit', packed "
                                      "(.fvz) or exported (.onnx, run with onnxruntime)"),
    images: List[Path] = typer.Argument(..., metavar="IMAGES",
                                        help="image files and/or folders (searched recursively)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE",
                                       help="results.csv or results.jsonl (default: one line per image on stdout)"),
    report: Optional[Path] = typer.Option(None, "--report", metavar="DIR", help="folder for an HTML report"),
    abstain: bool = typer.Option(False, "--abstain", help="send an image to review when its conformal set is not "
                                 "exactly one class"),
    review_threshold: Optional[float] = typer.Option(None, "--review-threshold", "--unknown-threshold", min=0.0,
                                                     max=1.0, metavar="P",
                                                     help="send an image to review when its top probability is "
                                                          "below P"),
    weights: Optional[str] = weights_option(),
    engine: str = engine_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    exit_code: bool = exit_code_option(),
) -> None:
    """Classify images with a fitted model: the label (or review, with the reason), the top class and its calibrated
    probability, every class's probability and, when fitted, the prediction set."""
    from ..io.images import iter_image_files
    from ..progress import job
    from ..runtime.model import RuntimeModel

    check_output(out, (".csv", ".jsonl"))
    check_report(report)
    model = scoring_model(model_path, engine, cache_dir=cache_dir, weights=weights)
    if model.task == "anomaly":
        raise UserError(f"{model_path}: an anomaly model; score images with 'fewvision anomaly predict "
                        f"{model_path} IMAGES...'")
    if abstain and not model.decision.get("conformal"):
        raise UserError(f"{model_path}: --abstain needs conformal thresholds in the model (fit it with --alpha and "
                        "--calibrate-fraction)")
    iter_image_files(images)  # a missing input is reported before any model is loaded
    with job(f"predict {model.method}") as bar:
        if isinstance(model, RuntimeModel):  # its graph; calibration, sets and rows by the same task code
            from ..runtime.model import predict

            preds = predict(model, images, abstain=abstain, unknown_threshold=review_threshold, progress=True)
        else:
            from ..tasks.fewshot import predict

            preds = predict(model, images, abstain=abstain, unknown_threshold=review_threshold, weights=weights,
                            cache_dir=cache_dir, use_cache=not no_cache, progress=True)
    method = model.method
    write_predictions(preds, out, report, title=f"fewvision predict: {method}",
                      extra={"backbone": model.backbone_spec, "model": str(model_path)})
    summarise_predictions(bar, preds)
    finish(len(preds.rows), sum(r["label"] == "review" for r in preds.rows), exit_code)


def evaluate_model_command(model_path: Path, dataset: str, *, out: Path, report: Optional[Path], abstain: bool,
                           weights: Optional[str], cache_dir: Optional[str], no_cache: bool,
                           engine: str = "auto") -> None:
    """``fewvision eval MODEL DATASET``: metrics of a fitted model on the dataset's held-out images."""
    from ..metrics import save_metrics
    from ..progress import job
    from ..runtime.model import RuntimeModel

    model = scoring_model(model_path, engine, cache_dir=cache_dir, weights=weights)
    if model.task == "anomaly":
        raise UserError(f"{model_path}: an anomaly model; evaluate it with 'fewvision anomaly eval {model_path} "
                        "DATASET'")
    with job(f"eval {model.method}") as bar:
        if isinstance(model, RuntimeModel):
            from ..runtime.model import evaluate

            ev = evaluate(model, dataset, abstain=abstain, progress=True)
        else:
            from ..tasks.fewshot import evaluate_model

            ev = evaluate_model(model, dataset, abstain=abstain, weights=weights, cache_dir=cache_dir,
                                use_cache=not no_cache, progress=True)
    ev.metrics["model"] = str(model_path)
    save_metrics(ev.metrics, out)
    m = ev.metrics
    print_metrics(f"{m['method']} on {m['dataset']}", m)
    if m.get("n_excluded_fit_images"):
        info(f"{m['n_excluded_fit_images']} image(s) the model was fitted or calibrated on were left out")
    info(f"wrote {out}")
    write_predictions(ev.predictions, None, report, title=f"fewvision eval: {m['method']} on {m['dataset']}",
                      extra={"backbone": model.backbone_spec, "model": str(model_path)}, metrics=m)
    summarise_predictions(bar, ev.predictions)
    finish(len(ev.predictions.rows), 0, False)


def benchmark_command(
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="'textile', 'digits', 'textile-defects', a CSV manifest "
                                       "(path,label[,split,caption]) or a folder of class folders"),
    methods: str = typer.Option("prototype,linear", "--methods", metavar="M1,M2,...",
                                help="comma-separated methods"),
    shots: Optional[str] = typer.Option(None, "--shots", metavar="K1,K2,...",
                                        help="comma-separated shots per class [default: 1,2,4,8,16; episodic: 1,5]"),
    seeds: int = typer.Option(3, "--seeds", min=1, metavar="S", help="support draws per cell (seeds 0..S-1)"),
    backbone: Optional[str] = backbone_option(),
    weights: Optional[str] = weights_option(),
    test_fraction: float = typer.Option(0.5, "--test-fraction", min=0.05, max=0.95, metavar="F",
                                        help="held-out share when the dataset has no splits"),
    meta: Optional[str] = typer.Option(None, "--meta", metavar="FILE1,FILE2,...",
                                       help="models from 'fewvision meta-train': score them, next to --methods, on "
                                            "episodes of the classes they were not trained on"),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, metavar="E",
                                           help="episodic protocol: E seeded N-way K-shot episodes per shot count, "
                                                "mean accuracy with a 95% interval [default with --meta: 600]"),
    way: Optional[int] = typer.Option(None, "--way", min=2, metavar="N",
                                      help="classes per episode (episodic protocol) [default: 5, or every novel "
                                           "class when fewer]"),
    query: int = typer.Option(15, "--query", min=1, metavar="Q",
                              help="query images per class per episode (episodic protocol)"),
    good: Optional[List[Path]] = typer.Option(None, "--good", metavar="GOOD_DIR",
                                              help="good images (folder or files; repeatable): each head that "
                                                   "classifies image features also runs as METHOD+good (fit --good) "
                                                   "on the same draws; not with --meta/--episodes"),
    good_method: str = typer.Option("padim", "--good-method", metavar="METHOD",
                                    help="anomaly method fitted on --good: padim | patchcore | anomalydino | ..."),
    out: Path = typer.Option(Path("benchmark-out"), "--out", "-o", metavar="DIR",
                             help="folder for results.csv, results.json and the plot"),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
) -> None:
    """Accuracy of several methods at several shot counts, mean and standard deviation over seeds, on a held-out
    split. With --good GOOD_DIR, each head that classifies image features also runs as METHOD+good (the classifier
    fit --good makes) on the same support draws. With --meta (or --episodes): the few-shot protocol - N-way K-shot
    episodes on the novel classes, the meta-trained heads next to the frozen-embedding baselines (linear = logistic
    regression, prototype)."""
    from ..progress import job
    from ..tasks.benchmark import run_benchmark, run_episode_benchmark, write_outputs

    method_list = comma_list(methods, "method")
    for m in method_list:
        head_class(m)
    episodic = meta is not None or episodes is not None
    shots = shots or ("1,5" if episodic else "1,2,4,8,16")
    try:
        shot_list = [int(s) for s in comma_list(shots, "shot count")]
    except ValueError:
        raise UserError(f"--shots '{shots}': expected whole numbers such as 1,2,4") from None
    if min(shot_list) < 1:
        raise UserError(f"--shots '{shots}': every shot count must be at least 1")
    check_folder(out, "--out")
    if good:
        from ..anomaly import anomaly_head_classes

        if episodic:
            raise UserError("--good runs beside the held-out-split benchmark, not the episodic one (--meta/--episodes)")
        if good_method not in anomaly_head_classes():
            raise UserError(f"unknown --good-method '{good_method}': expected one of "
                            f"{', '.join(sorted(anomaly_head_classes()))}")
        for folder in good:
            if not folder.exists():
                raise UserError(f"{folder}: --good names no such file or folder")
    if episodic:
        metas = [Path(m) for m in comma_list(meta, "model file")] if meta else []
        for m in metas:
            if not m.is_file():
                raise UserError(f"{m}: no such model file")
        with job("benchmark"):
            result = run_episode_benchmark(dataset, metas, method_list, shot_list, way=way, query=query,
                                           episodes=episodes or 600, backbone=backbone or (None if metas else
                                                                                          resolve_backbone(None)),
                                           weights=weights, cache_dir=cache_dir, use_cache=not no_cache,
                                           progress=True, echo=info)
        paths = write_outputs(result, out)
        for r in result.rows:
            typer.echo(f"{r['method']:>28} {r['classes']:>5} {r['way']}-way {r['shots']:>2}-shot  accuracy "
                       f"{r['accuracy_mean']:.4f} ± {r['accuracy_ci95']:.4f}")
        info(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}")
        return
    with job("benchmark"):
        result = run_benchmark(dataset, method_list, shot_list, seeds, backbone=resolve_backbone(backbone),
                               weights=weights, test_fraction=test_fraction, good=[str(g) for g in good or []],
                               good_method=good_method, cache_dir=cache_dir, use_cache=not no_cache, progress=True,
                               echo=info)
    paths = write_outputs(result, out)
    for r in result.rows:
        typer.echo(f"{r['method']:>14} {r['shots']:>3}-shot  accuracy {r['accuracy_mean']:.4f} ± "
                   f"{r['accuracy_std']:.4f}  balanced {r['balanced_accuracy_mean']:.4f} ± "
                   f"{r['balanced_accuracy_std']:.4f}")
    for s in result.skipped:
        info(f"skipped {s['method']}: {s['reason']}")
    info(f"wrote {paths['csv']}, {paths['json']}, {paths['png']}")


__all__ = ["register", "report_skips"]
