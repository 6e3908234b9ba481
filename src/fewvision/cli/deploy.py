"""``fewvision pack`` (one file for an offline machine) and ``fewvision export`` (ONNX)."""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import Optional

import typer

from .common import CONTEXT, EXIT_CODES_HELP, UserError, cache_dir_option, check_output, weights_option

PACK_EXAMPLE = """

\b
Example (on a connected machine, then copy line.fvz to the line PC):
  fewvision pack line3.fvm -o line3.fvz
  fewvision predict line3.fvz incoming/ -o results.csv        # on the line PC, no hub, no cache
"""


EXPORT_EXAMPLE = """

\b
Example:
  fewvision export line3.fvm --format onnx -o line3.onnx
  fewvision predict line3.onnx incoming/ -o results.csv        # onnxruntime, the same columns
"""


def register(app: typer.Typer) -> None:
    app.command("pack", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(pack.__doc__) + PACK_EXAMPLE)(pack)
    app.command("export", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(export.__doc__) + EXPORT_EXAMPLE)(export)


def pack(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file (.fvm) from 'fit' or 'anomaly fit'"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="archive to write (.fvz)"),
    precision: str = typer.Option("fp32", "--precision", metavar="P",
                                  help="fp32, bf16 (OpenVINO, on CPUs with bf16) or int8 (the encoder's "
                                       "convolutions or matrix products): a reduced precision is measured against "
                                       "fp32 on --calibrate and recorded only within --max-drop"),
    calibrate: Optional[str] = typer.Option(None, "--calibrate", metavar="DATASET",
                                            help="labelled images (yours) that measure --precision bf16 / int8 and "
                                                 "calibrate int8's activation ranges"),
    max_drop: float = typer.Option(0.01, "--max-drop", min=0.0, max=1.0, metavar="D",
                                   help="refuse a precision whose accuracy or AUROC is more than D below fp32's"),
    force: bool = typer.Option(False, "--force", help="record the precision even past --max-drop"),
    weights: Optional[str] = weights_option(),
    cache_dir: Optional[str] = cache_dir_option(),
) -> None:
    """Write one file holding the model, everything its backbone reads (weights, model config) and, when the model
    can be exported, its ONNX graph, each with its sha256 and no pickle. 'predict', 'anomaly predict', 'eval',
    'batch', 'station', 'serve --model' and 'info' take it in place of the .fvm and run with no hub and nothing
    cached beforehand; with the graph they run on the light install (no torch), on onnxruntime or OpenVINO. The
    graph's scores are checked against fewvision's (1e-4) and the archive is loaded back offline before this
    command reports success."""
    from ..deploy.pack import pack_model

    check_output(out, (".fvz",))
    if out.resolve() == model_path.resolve():
        raise UserError(f"{out}: --out would overwrite the model file")
    if precision == "fp32" and (calibrate or force or max_drop != 0.01):
        raise UserError("--calibrate, --max-drop and --force apply to --precision bf16 / int8")
    manifest = pack_model(model_path, out, cache_dir=cache_dir, weights=weights, precision=precision,
                          dataset=calibrate, max_drop=max_drop, force=force)
    total = sum(f["size"] for f in manifest["files"].values())
    graph = ("with its ONNX graph (matches fewvision to {:.1e})".format(manifest["graph"]["parity"])
             if "graph" in manifest else f"without an ONNX graph ({manifest.get('graph_note')}): scored with torch")
    typer.echo(f"{out}: {manifest['method']} on {manifest['backbone']['spec']}, {len(manifest['files'])} file(s), "
               f"{total / 1e6:.1f} MB, {graph}, loads offline")
    q = manifest.get("precision")
    if q:
        drop = q["fp32"] - q["reduced"]
        typer.echo(f"{out}: {q['engine']} {q['precision']} {q['metric']} {q['reduced']:.4f} against fp32 "
                   f"{q['fp32']:.4f} on {q['images']} image(s) (change {-drop:+.4f}, limit -{max_drop:g})"
                   + (" - recorded anyway (--force)" if drop > max_drop else "; recorded: --engine auto runs it"))


def export(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="model file (.fvm or packed .fvz)"),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="file to write (.onnx)"),
    format: str = typer.Option("onnx", "--format", metavar="FORMAT", help="onnx (the only format for now)"),
    int8: Optional[str] = typer.Option(None, "--int8", metavar="DATASET",
                                       help="also quantise the encoder's convolutions to int8 (static, per-channel, "
                                            "QDQ), calibrated on this labelled dataset's images, which also measure "
                                            "the accuracy / AUROC change; writes FILE with '-int8' before '.onnx'"),
    max_drop: float = typer.Option(0.01, "--max-drop", min=0.0, max=1.0, metavar="D",
                                   help="with --int8: refuse an int8 model whose accuracy or AUROC is more than D "
                                        "below the float model's"),
    force: bool = typer.Option(False, "--force", help="with --int8: write it even past --max-drop"),
    weights: Optional[str] = weights_option(),
    cache_dir: Optional[str] = cache_dir_option(),
) -> None:
    """Export a model to one ONNX file: encoder and head (for PatchCore, PaDiM and AnomalyDINO also the memory bank or
    Gaussians and the post-processing to the anomaly map) in one graph, with the preprocessing recipe, classes, calibration
    and threshold in its metadata. 'predict' and 'anomaly predict' run it with onnxruntime and write the same
    columns. The export is refused when onnxruntime's scores differ from fewvision's by more than 1e-4 on check
    images. Exportable: classification heads on image features (prototype, linear, tip, tip-f, clip-adapter, coop,
    zeroshot, prolip) and PatchCore / PaDiM / AnomalyDINO (without masking), on open_clip and timm backbones."""
    from ..deploy.onnx import export_onnx

    if format != "onnx":
        raise UserError(f"--format {format}: only onnx is supported")
    check_output(out, (".onnx",))
    if (max_drop != 0.01 or force) and not int8:
        raise UserError("--max-drop and --force apply to --int8")
    manifest = export_onnx(model_path, out, cache_dir=cache_dir, weights=weights)
    typer.echo(f"{out}: {manifest['method']} on {manifest['backbone']['spec']}, onnxruntime matches fewvision to "
               f"{manifest['parity']:.1e} on the check images")
    if int8:
        from ..deploy.onnx import quantize_int8

        target = out.with_name(f"{out.stem}-int8{out.suffix}")
        q = quantize_int8(out, target, int8, max_drop=max_drop, force=force)["int8"]
        drop = q["fp32"] - q["int8"]
        typer.echo(f"{target}: int8 {q['metric']} {q['int8']:.4f} against fp32 {q['fp32']:.4f} on {q['images']} "
                   f"image(s) (change {-drop:+.4f}, limit -{max_drop:g}); calibrated on {q['calibration_images']} "
                   "image(s)" + (" - written anyway (--force)" if drop > max_drop else ""))
