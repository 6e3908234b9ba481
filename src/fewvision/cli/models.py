"""``fewvision models list | pull | path``, ``fewvision info`` and ``fewvision demo``."""

from __future__ import annotations

from inspect import cleandoc
from pathlib import Path
from typing import Optional

import typer

from ..runtime.engines import installed
from .common import (
    CONTEXT,
    EXIT_CODES_HELP,
    UserError,
    cache_dir_option,
    check_folder,
    create,
    info,
    weights_option,
)

INFO_EXAMPLE = """

\b
Example:
  fewvision info line3.fvm
"""


def register(app: typer.Typer) -> None:
    models_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT,
                             help="List, download and locate model weights.")
    app.add_typer(models_app, name="models")
    models_app.command("list", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(models_list)
    models_app.command("pull", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(models_pull)
    models_app.command("path", context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(models_path)
    models_app.command("export", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                       help=cleandoc(models_export.__doc__) + EXPORT_EXAMPLE)(models_export)
    models_app.command("import", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                       help=cleandoc(models_import.__doc__) + IMPORT_EXAMPLE)(models_import)
    app.command("info", context_settings=CONTEXT, epilog=EXIT_CODES_HELP,
                help=cleandoc(model_info.__doc__) + INFO_EXAMPLE)(model_info)
    app.command(context_settings=CONTEXT, epilog=EXIT_CODES_HELP)(demo)


def models_list(
    kind: str = typer.Option("openclip", "--kind", metavar="KIND", help="openclip | timm"),
    filter: Optional[str] = typer.Option(None, "--filter", metavar="TEXT", help="only specs containing TEXT"),
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


def models_pull(spec: str = typer.Argument(..., metavar="SPEC", help="backbone spec, e.g. "
                                           "openclip:ViT-B-32/laion2b_s34b_b79k"),
                cache_dir: Optional[str] = cache_dir_option()) -> None:
    """Download a backbone's weights into the cache (run on a connected machine, then copy the cache)."""
    bb = create(spec, None, cache_dir)
    typer.echo(f"{spec}: ready ({bb.id})")


def models_path(spec: str = typer.Argument(..., metavar="SPEC", help="backbone spec"),
                cache_dir: Optional[str] = cache_dir_option()) -> None:
    """Where a backbone's weights are (or would be) cached."""
    from ..backbones import weights_location

    typer.echo(str(weights_location(spec, cache_dir)))


EXPORT_EXAMPLE = """

\b
Example (on a connected machine, then copy bundle.tar):
  fewvision models export openclip:ViT-B-32/laion2b_s34b_b79k -o vitb32.tar
"""
IMPORT_EXAMPLE = """

\b
Example (on the offline machine):
  fewvision models import vitb32.tar
  fewvision classify photos/ --classes ok,scratch --backbone openclip:ViT-B-32/laion2b_s34b_b79k
"""


def models_export(spec: str = typer.Argument(..., metavar="SPEC", help="backbone spec"),
                  out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="bundle to write (.tar)"),
                  weights: Optional[str] = weights_option(),
                  cache_dir: Optional[str] = cache_dir_option()) -> None:
    """Write one file holding everything backbone SPEC reads (weights, model config), with a sha256 for each, for
    'fewvision models import' on a machine with no hub."""
    from ..deploy.pack import export_backbone
    from .common import check_output

    check_output(out, (".tar",))
    manifest = export_backbone(spec, out, cache_dir=cache_dir, weights=weights)
    typer.echo(f"{spec}: {len(manifest['files'])} file(s), {_size(manifest)} -> {out}")


def models_import(bundle: Path = typer.Argument(..., metavar="BUNDLE", help="bundle from 'fewvision models export'"),
                  cache_dir: Optional[str] = cache_dir_option()) -> None:
    """Check a bundle (every file against its sha256) and unpack it into the cache, so its backbone spec works here
    with no hub. A tampered or truncated bundle is refused."""
    from ..deploy.pack import import_backbone

    manifest = import_backbone(bundle, cache_dir=cache_dir)
    typer.echo(f"{manifest['backbone']['spec']}: ready offline ({manifest['backbone']['id']})")


def _size(manifest: dict) -> str:
    total = sum(f["size"] for f in manifest["files"].values())
    return f"{total / 1e6:.1f} MB" if total >= 1e5 else f"{total} bytes"


def _method(model) -> str:
    good = model.info.get("good_images")
    if good and hasattr(model.head, "head"):  # fit --good: the head and the anomaly model that feeds it
        return (f"{model.head.head.method} with {good['method']} features from {good['n_good_images']} good "
                "image(s) (--good)")
    return model.head.method


def model_info(model_path: Path = typer.Argument(..., metavar="MODEL", help="model file (.fvm, packed .fvz or exported .onnx)")) -> None:
    """What a model file holds: task, method, backbone, classes or threshold and what it guarantees, the images it
    was fitted on, and the versions that wrote it. Reads the file only (no backbone, no images)."""
    from ..runtime.model import is_onnx
    from ..modelfile import load, read_metadata
    from .common import file_sha256

    from ..runtime.model import has_graph

    if is_onnx(model_path) or (has_graph(model_path) and not installed("torch")):
        return _onnx_info(model_path)  # from the graph's metadata: no torch needed
    meta = read_metadata(model_path)
    model = load(model_path)
    d, i = model.decision, model.info
    lines = [("file", str(model_path)), ("sha256", file_sha256(model_path)), ("task", model.task),
             ("method", _method(model)), ("backbone", model.backbone_spec), ("backbone id", model.backbone_id)]
    if model.task == "classification":
        lines.append(("classes", ", ".join(model.class_names)))
        lines.append(("fitted on", f"{i.get('n_support', '?')} image(s) of '{i.get('dataset', '?')}'"
                      + (f", {i['shots']} per class" if i.get("shots") else "")))
        if d.get("temperature"):
            lines.append(("temperature", f"{d['temperature']:.4g}"))
        conformal = d.get("conformal")
        if conformal:
            lines.append(("prediction sets", f"{conformal['score']}, alpha {conformal['alpha']:g}: the set holds the "
                          f"true class for at least {1 - conformal['alpha']:.0%} of images like the "
                          f"{conformal['n_calibration']} calibration images"
                          + (", per class (Mondrian)" if conformal.get("mondrian") else "")))
    else:
        lines.append(("threshold", f"{d['threshold']:.6g} (score > threshold is ng)"))
        if d.get("guarantee"):
            lines.append(("guarantee", d["guarantee"]))
        if d.get("target_note"):
            lines.append(("note", d["target_note"]))
        if d.get("tiling"):
            lines.append(("tiles", tiling_line(d["tiling"])))
        lines.append(("fitted on", f"{i.get('n_fit_images', '?')} good image(s)"))
        for source in i.get("good_sources", []):
            lines.append(("good images", source))
    lines += [("params", ", ".join(f"{k}={v}" for k, v in meta["head"]["params"].items()) or "defaults"),
              ("written by", f"fewvision {meta['fewvision_version']}, model format v{meta['format_version']}")]
    if model.packed:
        lines.append(("packed", f"{model.packed['files']} file(s), {model.packed['bytes'] / 1e6:.1f} MB: the model "
                      "and its backbone's files, loaded with no hub"))
        lines += _graph_lines(model_path)
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key:<{width}}  {value}")


def tiling_line(tiling: dict) -> str:
    """A tiled model's tiling in words (``anomaly fit --tile``)."""
    rule = "the stitched map's maximum" if tiling.get("score", "map_max") == "map_max" else "its largest tile score"
    return (f"{tiling['size']} px at native resolution, overlap {tiling['overlap']:g}; maps stitched (largest in "
            f"overlaps); image score {rule}")


def _onnx_info(path: Path) -> None:
    from ..runtime.model import is_onnx
    from ..runtime.model import manifest_of
    from .common import file_sha256

    m = manifest_of(path)
    lines = [("file", str(path)), ("sha256", file_sha256(path)),
             ("format", f"ONNX (exported by fewvision {m['fewvision_version']})" if is_onnx(path) else
              f"packed model with its ONNX graph (exported by fewvision {m['fewvision_version']})"),
             ("task", m["task"]), ("method", m["method"]), ("backbone", m["backbone"]["spec"]),
             ("backbone id", m["backbone"]["id"])]
    if m["task"] == "classification":
        lines.append(("classes", ", ".join(m["class_names"])))
    elif m["decision"].get("threshold") is not None:
        lines.append(("threshold", f"{m['decision']['threshold']:.6g} (score > threshold is ng)"))
        if m["decision"].get("guarantee"):
            lines.append(("guarantee", m["decision"]["guarantee"]))
        if m["decision"].get("tiling"):
            lines.append(("tiles", tiling_line(m["decision"]["tiling"])))
    if m.get("int8"):
        q = m["int8"]
        lines.append(("int8", f"{q['metric']} {q.get('int8', float('nan')):.4f} against fp32 {q['fp32']:.4f} on "
                      f"{q['images']} image(s); calibrated on {q['calibration_images']}"))
    lines += _graph_lines(path)
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        typer.echo(f"{key:<{width}}  {value}")


def _graph_lines(path: Path) -> list[tuple[str, str]]:
    """What runs the model here without torch: the graph, the engine ``--engine auto`` picks, a gated precision."""
    from ..modelfile import PACK_SUFFIX, open_pack
    from ..runtime.model import chosen_engine, has_graph

    if not has_graph(path):
        note = open_pack(path, backbone=False).manifest.get("graph_note") if path.suffix.lower() == PACK_SUFFIX \
            else None
        return [("graph", "none: scored with torch" + (f" ({note})" if note else ""))]
    name, precision = chosen_engine(path)
    lines = [("engine", f"{name} {precision} (--engine auto on this machine)")]
    recorded = open_pack(path, backbone=False).manifest.get("precision") if path.suffix.lower() == PACK_SUFFIX \
        else None
    if recorded:
        lines.append(("precision", f"{recorded['engine']} {recorded['precision']}: {recorded['metric']} "
                      f"{recorded['reduced']:.4f} against fp32 {recorded['fp32']:.4f} on {recorded['images']} "
                      f"image(s) (limit -{recorded['max_drop']:g})"))
    return lines


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", metavar="DIR", help="folder for the report and "
                             "metrics"),
    cache_dir: Optional[str] = cache_dir_option(),
) -> None:
    """The main job on the textile images: zero-shot with CLIP when its weights are at hand, else prototypes on the
    built-in texture backbone."""
    from ..progress import job
    from ..tasks.demo import run_demo

    check_folder(out, "--out")
    with job("demo"):
        page = run_demo(out, cache_dir=cache_dir, echo=info)
    typer.echo(str(page))
