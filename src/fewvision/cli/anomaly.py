"""``fewvision anomaly fit | predict | eval | rethreshold | zero-shot``: anomaly detection from good images, or from
none (``zero-shot``)."""

from __future__ import annotations

import json
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
    create,
    engine_option,
    exit_code_option,
    file_sha256,
    finish,
    info,
    init_parameters,
    model_task,
    no_cache_option,
    param_option,
    parse_params,
    resolve_backbone,
    scoring_model,
    summarise,
    weights_option,
    write_table,
)

OFFLINE_HINT = (" - offline, use the built-in weight-free backbone (--backbone texture) or give a local weights "
                "file with --weights PATH")
ROW_COLUMNS = ["path", "verdict", "score", "threshold", "normalized_score", "x", "y", "n_regions",
               "largest_region_px", "largest_region_pct", "regions", "heatmap", "model_sha256", "backbone", "time",
               "error"]

FIT_EXAMPLE = """

\b
Examples:
  fewvision anomaly fit mvtec/bottle -o bottle.fvm            (uses train/good)
  fewvision anomaly fit good/ --method padim --backbone texture --target-false-reject 0.01 -o line3.fvm
  fewvision anomaly fit good/ --method anomalydino --shots 4 -o few.fvm   (bank of 4; the others set the threshold)
"""
PREDICT_EXAMPLE = """

\b
Example:
  fewvision anomaly predict line3.fvm today/ -o scores.csv --heatmaps heat/ --report report/ --exit-code
"""
EVAL_EXAMPLE = """

\b
Example:
  fewvision anomaly eval bottle.fvm mvtec/bottle -o metrics.json --report report/
"""
ZERO_SHOT_EXAMPLE = """

\b
Examples:
  fewvision anomaly zero-shot today/ -o scores.csv --heatmaps heat/        (MuSc: the images score each other)
  fewvision anomaly zero-shot today/ --method musc --backbone texture -o scores.csv
  fewvision anomaly zero-shot today/ --method winclip --param object_name=cable -o scores.csv
"""
ZERO_SHOT_COLUMNS = ["path", "score", "rank", "x", "y", "heatmap", "method", "backbone", "time", "error"]
RETHRESHOLD_EXAMPLE = """

\b
Example:
  fewvision anomaly rethreshold line3.fvm --target-false-reject 0.005
"""


def register(app: typer.Typer) -> None:
    anomaly_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                              help="Anomaly detection learned from good images only.")
    app.add_typer(anomaly_app, name="anomaly")
    for name, fn, example in (("fit", fit, FIT_EXAMPLE), ("predict", predict, PREDICT_EXAMPLE),
                              ("eval", evaluate, EVAL_EXAMPLE), ("rethreshold", rethreshold, RETHRESHOLD_EXAMPLE),
                              ("zero-shot", zero_shot, ZERO_SHOT_EXAMPLE)):
        anomaly_app.command(name, context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                            help=cleandoc(fn.__doc__) + example)(fn)


def load_anomaly_model(model_path: Path, cache_dir: str | None = None):
    from ..modelfile import load

    if model_task(model_path, cache_dir) != "anomaly":
        raise UserError(f"{model_path}: a classification model, not an anomaly model; use 'fewvision predict' / "
                        "'fewvision eval' (or fit one with 'fewvision anomaly fit')")
    return load(model_path, cache_dir)


def fit(
    good: List[Path] = typer.Argument(..., metavar="GOOD",
                                      help="folders and/or files of good images: an MVTec AD category (its "
                                           "train/good is used), a folder with a good/ folder, or good images"),
    method: str = typer.Option("patchcore", "--method", "-m", metavar="METHOD",
                               help="patchcore | padim | anomalydino | stpm | ae | vae | ganomaly | winclip"),
    backbone: Optional[str] = backbone_option("anomaly"),
    weights: Optional[str] = weights_option(),
    shots: Optional[int] = typer.Option(None, "--shots", min=1, metavar="K",
                                        help="fit on K good images (a seeded draw; the few-shot setting of "
                                             "anomalydino) and set the threshold on all the others"),
    target_false_reject: float = typer.Option(0.01, "--target-false-reject", min=0.0, max=1.0, metavar="RATE",
                                              help="share of good parts the threshold may reject at most (the "
                                                   "tightest the images support when there are too few)"),
    holdout_fraction: float = typer.Option(0.2, "--holdout-fraction", min=0.0, max=1.0, metavar="F",
                                           help="share of good images held out to set the threshold, for methods "
                                                "that cannot score each good image without it (ae, vae, ganomaly, stpm, winclip)"),
    all_subfolders: bool = typer.Option(False, "--all-subfolders",
                                        help="fit on every image below the folders even when sub-folders look like "
                                             "defect classes"),
    min_region_area: float = typer.Option(0.0, "--min-region-area", min=0.0, metavar="PX",
                                          help="defect regions smaller than PX image pixels are left out of the "
                                               "rows (stored in the model) [default: every region]"),
    tile: Optional[int] = typer.Option(None, "--tile", min=16, metavar="SIZE",
                                       help="score high-resolution images tile by tile at native resolution: "
                                            "SIZE px tiles, maps stitched back (stored in the model; predict and "
                                            "eval tile too) [default: the whole image resized]"),
    tile_overlap: float = typer.Option(0.25, "--tile-overlap", min=0.0, max=0.95, metavar="F",
                                       help="share of a tile its neighbours overlap (with --tile)"),
    param: List[str] = param_option(),
    seed: int = typer.Option(0, "--seed", metavar="N", help="seed of the coreset, channel draw or training"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="model file to write (.fvm)"),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
) -> None:
    """Fit an anomaly model on good images and set its threshold from good images alone (patchcore: 5-fold
    cross-conformal, padim: exact leave-one-out, so every image both fits and calibrates)."""
    from ..anomaly import anomaly_head_classes
    from ..modelfile import MODEL_SUFFIX, save_model
    from ..progress import job
    from ..tasks.anomaly import fit_anomaly, good_images

    heads = anomaly_head_classes()
    if method not in heads:
        raise UserError(f"unknown anomaly method '{method}': expected one of {', '.join(sorted(heads))}")
    params = parse_params(param, init_parameters(heads[method]), method)
    check_output(out, (MODEL_SUFFIX,))
    if not 0 < target_false_reject < 1:
        raise UserError(f"--target-false-reject must be between 0 and 1, got {target_false_reject}")
    paths, sources = good_images(good, all_subfolders)  # layout checks before any model is loaded
    if not paths:
        raise UserError(f"no good images found in {', '.join(map(str, good))}")
    if shots is not None and shots > len(paths):
        raise UserError(f"--shots {shots}: only {len(paths)} good images were found")
    with job(f"fit {method}"):
        bb = create(resolve_backbone(backbone, "anomaly"), weights, cache_dir, OFFLINE_HINT)
        for line in sources:
            info(f"good images: {line}")
        model = fit_anomaly(good, method, bb, target_false_reject=target_false_reject,
                            holdout_fraction=holdout_fraction, seed=seed, cache_dir=cache_dir,
                            use_cache=not no_cache, progress=True, all_subfolders=all_subfolders, shots=shots,
                            min_region_area=min_region_area, tile=tile, tile_overlap=tile_overlap, **params)
    save_model(out, model)
    d = model.decision
    for s in model.info.get("skipped", []):
        info(f"skipped {s}")
    if d.get("target_note"):
        info(f"note: {d['target_note']}")
    tiles = f" ({d['tiling']['size']} px tiles, overlap {d['tiling']['overlap']:g})" if d.get("tiling") else ""
    typer.echo(f"{method} on {model.info['n_fit_images']} good images{tiles}; threshold {d['threshold']:.6g}, "
               f"{d['guarantee']}")
    info(f"wrote {out}")


def predict(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file from 'fewvision anomaly fit' (.fvm), "
                                      "packed (.fvz) or exported (.onnx, run with onnxruntime)"),
    images: List[Path] = typer.Argument(..., metavar="IMAGES",
                                        help="image files and/or folders (searched recursively)"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="results.csv or results.jsonl"),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", metavar="DIR",
                                            help="folder for one PNG per image: the image and its heat map side by "
                                                 "side, score, threshold and verdict"),
    report: Optional[Path] = typer.Option(None, "--report", metavar="DIR",
                                          help="folder for an HTML gallery: flagged images first, then those "
                                               "nearest the threshold"),
    review_band: float = typer.Option(0.0, "--review-band", min=0.0, metavar="F",
                                      help="verdict 'review' for scores within F of the threshold (relative: 0.1 "
                                           "= 10%) [default: no review band]"),
    min_region_area: Optional[float] = typer.Option(None, "--min-region-area", min=0.0, metavar="PX",
                                                    help="leave out defect regions smaller than PX image pixels "
                                                         "[default: the model's, set at fit]"),
    weights: Optional[str] = weights_option(),
    engine: str = engine_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
    exit_code: bool = exit_code_option(),
) -> None:
    """Score images: one row per image with its verdict (ok / ng / review), score, threshold, score / threshold and
    where the heat map peaks."""
    from ..io.images import iter_image_files
    from ..progress import expect, job
    from ..runtime.model import RuntimeModel

    check_output(out, (".csv", ".jsonl"))
    check_folder(heatmaps, "--heatmaps")
    check_report(report)
    model = scoring_model(model_path, engine, cache_dir=cache_dir, weights=weights)
    if model.task != "anomaly":
        raise UserError(f"{model_path}: a {model.task} model, not an anomaly model; classify images with "
                        f"'fewvision predict {model_path} IMAGES...'")
    if min_region_area is not None:
        model.decision["min_region_area"] = float(min_region_area)
    method = model.method
    iter_image_files(images)  # a missing input is reported before any model is loaded
    keep_maps = heatmaps is not None or report is not None
    with job(f"predict {method}") as bar:
        if isinstance(model, RuntimeModel):  # its graph; the rows are built by the same task code
            from ..runtime.model import score_files

            res = score_files(model, images, review_band=review_band, keep_maps=keep_maps, progress=True)
        else:
            from ..tasks.anomaly import score_files

            res = score_files(model, images, keep_maps=keep_maps, review_band=review_band, weights=weights,
                              cache_dir=cache_dir, use_cache=not no_cache, progress=True)
        preprocess = _preprocess(model, cache_dir, weights)
        sha = file_sha256(model_path)
        for r in res.rows:
            r.update({"model_sha256": sha, "backbone": model.backbone_spec})
        if heatmaps is not None:
            bar.stage("heat maps")
            expect(len(res.rows))
            write_heatmaps(res.rows, res.maps, heatmaps, preprocess, model.decision, bar.advance)
    write_table(out, ROW_COLUMNS, [_formatted(r) for r in res.rows] if out.suffix.lower() == ".csv" else res.rows,
                res.skipped)
    info(f"wrote {out}")
    if report is not None:
        from ..reports.anomaly import write_anomaly_report

        page = write_anomaly_report(report, title=f"fewvision anomaly predict: {method}", rows=res.rows,
                                    maps=res.maps, preprocess=preprocess, decision=model.decision,
                                    extra={"model": str(model_path), "backbone": model.backbone_spec,
                                           "method": method})
        info(f"report: {page}")
    counts = {v: sum(1 for r in res.rows if r["verdict"] == v) for v in ("ok", "ng", "review")}
    flagged = sorted((r for r in res.rows if r["verdict"] in ("ng", "review")), key=lambda r: -r["score"])
    lines = [f"{r['verdict']} {r['path']}: score {r['score']:.4g} vs threshold {r['threshold']:.4g}"
             + (f" (peak at x {r['x']}, y {r['y']})" if r.get("x") is not None else "") + _regions_text(r)
             for r in flagged]
    summarise(bar, len(res.rows), res.skipped, {k: v for k, v in counts.items() if v or k != "review"}, lines)
    typer.echo(f"{len(res.rows)} image(s) scored: {counts['ok']} ok, {counts['ng']} ng"
               + (f", {counts['review']} review" if counts["review"] else "") + f", {len(res.skipped)} skipped")
    finish(len(res.rows), counts["ng"] + counts["review"], exit_code)


def _regions_text(row: dict) -> str:
    n = row.get("n_regions")
    if not n:
        return ""
    largest = row["regions"][0]
    return (f"; {n} region(s), largest {largest['area_px']} px ({largest['area_pct']:.3g} % of the image) at "
            f"x {largest['x']}, y {largest['y']}, {largest['width']} x {largest['height']} px")


def _preprocess(model, cache_dir: str | None, weights: str | None):
    """What places maps in the image: the graph's replayed steps, or the backbone's transform (a tiled model: the
    stitched maps' geometry)."""
    from ..runtime.model import RuntimeModel

    if isinstance(model, RuntimeModel):  # the light install: no torch to import
        return model.geometry
    from ..tasks.anomaly import map_geometry

    return map_geometry(model, cache_dir=cache_dir, weights=weights)


def write_heatmaps(rows: list[dict], maps, folder: Path, preprocess, decision: dict, advance=None) -> None:
    """One PNG per row (image and heat map side by side) in ``folder``; its path goes into the row's "heatmap".
    An image that cannot be read again is reported and the others go on."""
    from ..io.images import BadImage
    from ..reports.anomaly import heatmap_image, write_png

    used: set[str] = set()
    for i, r in enumerate(rows):
        name = f"{Path(r['path']).stem}_heatmap.png"
        if name in used:
            name = f"{Path(r['path']).stem}_{i}_heatmap.png"
        used.add(name)
        try:
            picture = heatmap_image(r["path"], maps[i], preprocess, decision, score=r["score"],
                                    verdict=r.get("verdict"), regions=r.get("regions"))
            r["heatmap"] = str(write_png(folder / name, picture))
        except BadImage as err:
            info(f"no heat map for {r['path']}: {err.reason}")
        if advance is not None:
            advance(1)


def _formatted(row: dict) -> dict:
    out = dict(row)
    for key in ("score", "threshold", "normalized_score"):
        if out.get(key) is not None:
            out[key] = f"{out[key]:.6g}"
    if out.get("regions") is not None:  # one JSON list of boxes per CSV cell
        out["regions"] = json.dumps(out["regions"], separators=(",", ":"))
    return out


def evaluate(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file from 'fewvision anomaly fit' (.fvm), "
                                      "packed (.fvz) or exported (.onnx)"),
    dataset: str = typer.Argument(..., metavar="DATASET",
                                  help="an MVTec AD category folder, a folder with good/ and defect folders, a CSV "
                                       "manifest (path,label), or 'textile'"),
    out: Path = typer.Option(Path("metrics.json"), "--out", "-o", metavar="FILE", help="metrics JSON"),
    report: Optional[Path] = typer.Option(None, "--report", metavar="DIR", help="folder for an HTML report"),
    good_label: Optional[str] = typer.Option(None, "--good-label", metavar="NAME",
                                             help="name of the good class [default: good, else nominal]"),
    recall: float = typer.Option(0.95, "--recall", min=0.0, max=1.0, metavar="R",
                                 help="also report the threshold that catches this share of defects"),
    min_region_area: Optional[float] = typer.Option(None, "--min-region-area", min=0.0, metavar="PX",
                                                    help="leave out defect regions smaller than PX image pixels "
                                                         "[default: the model's, set at fit]"),
    weights: Optional[str] = weights_option(),
    engine: str = engine_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
) -> None:
    """Image AUROC / AUPR / F1 at the model's threshold, labelled thresholds for comparison, and pixel AUROC and
    AUPRO when masks exist. Images the model was fitted on are left out."""
    from ..metrics import save_metrics
    from ..progress import job
    from ..runtime.model import RuntimeModel

    check_output(out, (".json",))
    check_report(report)
    model = scoring_model(model_path, engine, cache_dir=cache_dir, weights=weights)
    if model.task != "anomaly":
        raise UserError(f"{model_path}: a classification model, not an anomaly model; use 'fewvision eval'")
    if min_region_area is not None:
        model.decision["min_region_area"] = float(min_region_area)
    with job(f"eval {model.method}") as bar:
        if isinstance(model, RuntimeModel):
            from ..runtime.model import evaluate_anomaly

            ev = evaluate_anomaly(model, dataset, good_label=good_label, recall=recall, progress=True)
        else:
            from ..tasks.anomaly import evaluate_anomaly

            ev = evaluate_anomaly(model, dataset, good_label=good_label, recall=recall, weights=weights,
                                  cache_dir=cache_dir, use_cache=not no_cache, progress=True)
        preprocess = _preprocess(model, cache_dir, weights)
    m = ev.metrics
    m.update({"method": model.method, "backbone": model.backbone_spec, "backbone_id": model.backbone_id,
              "dataset": str(dataset), "model": str(model_path), "guarantee": model.decision.get("guarantee")})
    save_metrics(m, out)
    line = f"{model.method} on {dataset}: n_good {m['n_good']}  n_defect {m['n_defect']}"
    for key in ("image_auroc", "image_aupr", "image_f1", "pixel_auroc", "aupro"):
        if m.get(key) is not None:
            line += f"  {key} {m[key]:.4f}"
    typer.echo(line)
    for note in m.get("notes", []):
        info(f"note: {note}")
    info(f"wrote {out}")
    if report:
        from ..reports.anomaly import write_anomaly_report

        page = write_anomaly_report(
            report, title=f"fewvision anomaly eval: {model.method} on {dataset}", rows=ev.predictions.rows,
            maps=ev.predictions.maps, preprocess=preprocess, decision=model.decision, metrics=m,
            is_defect=ev.is_defect, masks=ev.masks,
            extra={"model": str(model_path), "backbone": model.backbone_spec, "method": model.method})
        info(f"report: {page}")
    counts = {"ok": sum(r["verdict"] == "ok" for r in ev.predictions.rows),
              "ng": sum(r["verdict"] == "ng" for r in ev.predictions.rows)}
    summarise(bar, len(ev.predictions.rows), ev.predictions.skipped, counts)
    finish(len(ev.predictions.rows), 0, False)


def rethreshold(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file from 'fewvision anomaly fit'"),
    target_false_reject: float = typer.Option(..., "--target-false-reject", min=0.0, max=1.0, metavar="RATE",
                                              help="the new share of good parts the threshold may reject at most"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE",
                                       help="model file to write [default: replace MODEL]"),
) -> None:
    """Set a new threshold from the good images' calibration scores stored in the model - no refit, no images."""
    from ..modelfile import MODEL_SUFFIX, save_model
    from ..tasks.anomaly import rethreshold as new_threshold

    target = check_output(out, (MODEL_SUFFIX,)) or model_path
    if target.suffix.lower() != MODEL_SUFFIX:
        raise UserError(f"{model_path}: a packed or exported model cannot be rewritten in place; write a model file "
                        "with -o NEW.fvm (and pack that again)")
    if not 0 < target_false_reject < 1:
        raise UserError(f"--target-false-reject must be between 0 and 1, got {target_false_reject}")
    model = load_anomaly_model(model_path)
    before = model.decision["threshold"]
    new_threshold(model, target_false_reject)
    save_model(target, model)
    d = model.decision
    if d.get("target_note"):
        info(f"note: {d['target_note']}")
    typer.echo(f"threshold {before:.6g} -> {d['threshold']:.6g}, {d['guarantee']}")
    info(f"wrote {target}")


def zero_shot(
    images: List[Path] = typer.Argument(..., metavar="IMAGES",
                                        help="image files and/or folders (searched recursively)"),
    method: str = typer.Option("musc", "--method", "-m", metavar="METHOD",
                               help="musc (the images score each other; the batch must be mostly good) | winclip "
                                    "(text prompts)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", metavar="SPEC",
                                           help="backbone spec [default: musc timm:vit_small_patch14_dinov2."
                                                "lvd142m, winclip openclip:ViT-B-16-plus-240/laion400m_e31]"),
    weights: Optional[str] = weights_option(),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="scores.csv or scores.jsonl"),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", metavar="DIR",
                                            help="folder for one PNG per image: the image and its heat map"),
    param: List[str] = param_option(),
    cache_dir: Optional[str] = cache_dir_option(),
    no_cache: bool = no_cache_option(),
) -> None:
    """Score images with no model and no good images: one row per image with its score and its rank in the batch
    (1 = most anomalous). There is no threshold: nothing says what a good image scores (fit a model with 'fewvision
    anomaly fit' once good images exist)."""
    from ..anomaly.musc import MuSc
    from ..anomaly.winclip import WinClipHead
    from ..io.images import iter_image_files
    from ..progress import job
    from ..tasks.zeroshot_anomaly import DEFAULT_ZERO_SHOT_BACKBONES, ZERO_SHOT_METHODS, zero_shot_anomaly

    if method not in ZERO_SHOT_METHODS:
        raise UserError(f"unknown zero-shot method '{method}': expected {' or '.join(ZERO_SHOT_METHODS)}")
    params = parse_params(param, init_parameters(MuSc if method == "musc" else WinClipHead), method)
    params.pop("shots", None)
    check_output(out, (".csv", ".jsonl"))
    check_folder(heatmaps, "--heatmaps")
    iter_image_files(images)  # a missing input is reported before any model is loaded
    spec = (backbone or DEFAULT_ZERO_SHOT_BACKBONES[method]).strip()
    with job(f"zero-shot {method}") as bar:
        bb = create(spec, weights, cache_dir, OFFLINE_HINT if method == "musc" else
                    " - offline, give a local CLIP checkpoint with --weights PATH (winclip needs CLIP's text tower)")
        try:
            res = zero_shot_anomaly(images, method, bb, params=params, keep_maps=heatmaps is not None,
                                    cache_dir=cache_dir, use_cache=not no_cache)
        except ValueError as err:
            raise UserError(str(err)) from None
        for r in res.rows:
            r.update({"method": method, "backbone": spec})
        if heatmaps is not None:
            bar.stage("heat maps")
            write_heatmaps(res.rows, res.maps, heatmaps, bb.preprocess, res.decision)
    rows = res.rows if out.suffix.lower() == ".jsonl" else [{**r, "score": f"{r['score']:.6g}"} for r in res.rows]
    write_table(out, ZERO_SHOT_COLUMNS, rows, res.skipped)
    info(f"wrote {out}")
    top = sorted(res.rows, key=lambda r: r["rank"])[:5]
    summarise(bar, len(res.rows), res.skipped, {}, [f"#{r['rank']} {r['path']}: score {r['score']:.4g}" for r in top])
    typer.echo(f"{len(res.rows)} image(s) scored with {method}, {len(res.skipped)} skipped; most anomalous: "
               + (top[0]["path"] if top else "none"))
