"""``fewvision anomaly fit | predict | eval``: anomaly detection from good images only."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import List, Optional

import typer

from ..defaults import DEFAULT_ANOMALY_BACKBONE
from ..io.atomic import atomic_open

ANOMALY_BACKBONE_HELP = ("backbone spec: timm:NAME (hub weights) | timm:NAME@PATH | timm:NAME@random | texture "
                         "(built in, no weights) | openclip:MODEL[/TAG]")


def _user_error(msg: str) -> Exception:
    from .common import UserError

    return UserError(msg)


def _backbone(spec: str, weights: Optional[str], cache_dir: Optional[str]):
    from ..backbones import create_backbone
    from ..backbones.base import WeightsUnavailable

    try:
        return create_backbone(spec, weights=weights, cache_dir=cache_dir)
    except WeightsUnavailable as err:
        raise _user_error(f"{err} - offline, use the built-in weight-free backbone (--backbone texture) or give a "
                          "local weights file with --weights PATH") from None


def _params(items: List[str]) -> dict:
    """``--param name=value`` pairs; values are parsed as JSON when they can be (numbers, true/false, null)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise _user_error(f"--param expects NAME=VALUE, got '{item}'")
        try:
            out[name.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[name.strip()] = value
    return out


def _load(model_path: Path):
    from ..modelfile import load

    model = load(model_path)
    if model.task != "anomaly":
        raise _user_error(f"{model_path}: a {model.task} model, not an anomaly model (fit one with 'fewvision anomaly "
                          "fit')")
    return model


def write_anomaly_rows(path: Path, rows: list[dict], skipped) -> None:
    """CSV or JSONL (by suffix), written to a temp file and renamed."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise _user_error(f"{path}: --out must end in .csv or .jsonl")
    with atomic_open(path, newline="") as fh:
        if suffix == ".csv":
            w = csv.writer(fh)
            w.writerow(["path", "score", "is_anomalous", "heatmap", "error"])
            for r in rows:
                flag = "" if r["is_anomalous"] is None else str(bool(r["is_anomalous"])).lower()
                w.writerow([r["path"], f"{r['score']:.6g}", flag, r.get("heatmap", ""), ""])
            for s in skipped:
                w.writerow([s.path, "", "", "", s.reason])
        else:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
            for s in skipped:
                fh.write(json.dumps({"path": s.path, "score": None, "is_anomalous": None, "error": s.reason}) + "\n")


def register(app: typer.Typer) -> None:
    from .common import info

    anomaly_app = typer.Typer(no_args_is_help=True, help="Anomaly detection learned from good images only.")
    app.add_typer(anomaly_app, name="anomaly")

    @anomaly_app.command("fit")
    def fit(
        good: List[Path] = typer.Argument(..., help="folder(s) and/or files of good images"),
        method: str = typer.Option("patchcore", "--method", help="patchcore | padim (or another registered method)"),
        backbone: str = typer.Option(DEFAULT_ANOMALY_BACKBONE, "--backbone", help=ANOMALY_BACKBONE_HELP),
        weights: Optional[str] = typer.Option(None, "--weights", help="local weights file for the backbone"),
        target_false_reject: float = typer.Option(0.01, "--target-false-reject", min=0.0, max=1.0,
                                                  help="false-reject rate on good images the threshold guarantees"),
        holdout_fraction: float = typer.Option(0.2, "--holdout-fraction", min=0.0, max=1.0,
                                               help="share of good images held out to set the threshold, for "
                                                    "methods without leave-one-out scores (ae, vae, stpm, winclip)"),
        param: List[str] = typer.Option([], "--param", help="method parameter NAME=VALUE (repeatable)"),
        seed: int = typer.Option(0, "--seed"),
        out: Path = typer.Option(..., "-o", "--out", help="model file to write (.fvm)"),
        cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
        no_cache: bool = typer.Option(False, "--no-cache"),
    ) -> None:
        """Fit an anomaly model on good images and set its threshold from good images alone (leave-one-out for
        patchcore and padim, so every image both fits and calibrates)."""
        from ..modelfile import MODEL_SUFFIX, save_model
        from ..tasks.anomaly import fit_anomaly

        if out.suffix != MODEL_SUFFIX:
            raise _user_error(f"{out}: the model file must end in {MODEL_SUFFIX}")
        bb = _backbone(backbone, weights, cache_dir)
        model = fit_anomaly(good, method, bb, target_false_reject=target_false_reject,
                            holdout_fraction=holdout_fraction, seed=seed, cache_dir=cache_dir,
                            use_cache=not no_cache, progress=True, **_params(param))
        save_model(out, model)
        d = model.decision
        if d.get("target_note"):
            info(f"note: {d['target_note']}")
        typer.echo(f"{method} on {model.info['n_fit_images']} good images; threshold {d['threshold']:.6g}, "
                   f"{d['guarantee']}")
        for s in model.info.get("skipped", []):
            info(f"skipped {s}")
        info(f"wrote {out}")

    @anomaly_app.command("predict")
    def predict(
        model_path: Path = typer.Argument(..., help="model file from 'fewvision anomaly fit'"),
        images: List[Path] = typer.Argument(..., help="image files and/or folders (searched recursively)"),
        out: Path = typer.Option(..., "--out", help="results.csv or results.jsonl"),
        heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", help="folder for heat-map overlay PNGs"),
        weights: Optional[str] = typer.Option(None, "--weights"),
        cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
        no_cache: bool = typer.Option(False, "--no-cache"),
    ) -> None:
        """Score images: one row per image with its anomaly score and whether it is over the threshold."""
        from ..io.images import BadImage
        from ..reports.anomaly import overlay_for, write_png
        from ..tasks.anomaly import score_files

        model = _load(model_path)
        res = score_files(model, images, keep_maps=heatmaps is not None, weights=weights, cache_dir=cache_dir,
                          use_cache=not no_cache, progress=True)
        if heatmaps is not None:
            bb = model.backbone(cache_dir=cache_dir, weights=weights)
            vrange = model.decision.get("heatmap_range") or [float(res.maps.min()), float(res.maps.max())]
            used: set[str] = set()
            for i, r in enumerate(res.rows):
                name = f"{Path(r['path']).stem}_heatmap.png"
                if name in used:
                    name = f"{Path(r['path']).stem}_{i}_heatmap.png"
                used.add(name)
                try:
                    r["heatmap"] = str(write_png(heatmaps / name, overlay_for(r["path"], res.maps[i], bb.preprocess,
                                                                               vrange)))
                except BadImage as err:
                    info(f"no heat map for {r['path']}: {err.reason}")
        write_anomaly_rows(out, res.rows, res.skipped)
        n_flag = sum(1 for r in res.rows if r["is_anomalous"])
        for s in res.skipped:
            info(f"skipped {s.path}: {s.reason}")
        typer.echo(f"{len(res.rows)} image(s) scored, {n_flag} anomalous, {len(res.skipped)} skipped")
        info(f"wrote {out}")

    @anomaly_app.command("eval")
    def evaluate(
        model_path: Path = typer.Argument(..., help="model file from 'fewvision anomaly fit'"),
        dataset: str = typer.Argument(..., help="an MVTec AD category folder, a folder with good/ and defect "
                                                "folders, a CSV manifest, or 'textile'"),
        out: Path = typer.Option(Path("metrics.json"), "--out", help="metrics JSON"),
        report: Optional[Path] = typer.Option(None, "--report", help="folder for an HTML report"),
        good_label: Optional[str] = typer.Option(None, "--good-label",
                                                 help="name of the good class (default: good, else nominal)"),
        recall: float = typer.Option(0.95, "--recall", min=0.0, max=1.0,
                                     help="also report the threshold that catches this share of defects"),
        weights: Optional[str] = typer.Option(None, "--weights"),
        cache_dir: Optional[str] = typer.Option(None, "--cache-dir"),
        no_cache: bool = typer.Option(False, "--no-cache"),
    ) -> None:
        """Image AUROC / AUPR / F1 at the model's threshold; pixel AUROC and AUPRO when masks exist."""
        from ..metrics.classification import save_metrics
        from ..tasks.anomaly import evaluate_anomaly

        model = _load(model_path)
        ev = evaluate_anomaly(model, dataset, good_label=good_label, recall=recall, weights=weights,
                              cache_dir=cache_dir, use_cache=not no_cache, progress=True)
        m = ev.metrics
        m.update({"method": model.head.method, "backbone": model.backbone_spec, "backbone_id": model.backbone_id,
                  "dataset": str(dataset), "model": str(model_path)})
        save_metrics(m, out)
        line = f"{model.head.method} on {dataset}: n_good {m['n_good']}  n_defect {m['n_defect']}"
        for key in ("image_auroc", "image_aupr", "image_f1", "pixel_auroc", "aupro"):
            if m.get(key) is not None:
                line += f"  {key} {m[key]:.4f}"
        typer.echo(line)
        info(f"wrote {out}")
        if report:
            from ..reports.anomaly import write_anomaly_report

            bb = model.backbone(cache_dir=cache_dir, weights=weights)
            page = write_anomaly_report(
                report, title=f"fewvision anomaly eval: {model.head.method} on {dataset}", rows=ev.predictions.rows,
                maps=ev.predictions.maps, preprocess=bb.preprocess,
                heatmap_range=model.decision.get("heatmap_range") or [0.0, 1.0],
                threshold=model.decision.get("threshold"), metrics=m, is_defect=ev.is_defect, masks=ev.masks,
                extra={"model": str(model_path), "backbone": model.backbone_spec, "method": model.head.method})
            info(f"report: {page}")
        for s in ev.predictions.skipped:
            info(f"skipped {s.path}: {s.reason}")
