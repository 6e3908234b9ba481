"""One file for a machine with no hub and no cache: a model (``.fvz``) or a bare backbone (a bundle ``.tar``).

An archive is an uncompressed tar: ``manifest.json`` first (format, what it holds, the backbone's spec, the spec
that loads it from the unpacked folder, its id, and the size and sha256 of every other member), then the model file
and the files its backbone reads (weights, model config), each under the name the manifest gives it. No pickle:
the model file is safetensors, the weights are whatever the backbone reads anyway (safetensors where published).

This module writes archives; reading them (checking every member against the manifest, unpacking into the cache,
loading a packed model) is :mod:`fewvision.modelfile`'s, since ``load`` takes a ``.fvz`` as it takes a ``.fvm``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from ..backbones.imported import IMPORTED, imported_backbones, register_backbone
from ..io.atomic import atomic_path
from ..runtime.engines import ENGINES, PRECISIONS, installed
from ..runtime.model import FP32_GRAPH, INT8_GRAPH
from .onnx import DEFAULT_MAX_DROP, PARITY_TOLERANCE
from ..modelfile import _BLOCK, _OPENED, MANIFEST, MODEL_MEMBER, PackError, Unpacked, check_member_name, is_pack, \
    load, load_packed, open_pack
from ..modelfile import PACK_FORMAT as FORMAT
from ..modelfile import PACK_FORMAT_VERSION as FORMAT_VERSION

# Reading archives lives in fewvision.modelfile; its names stay importable from here.
__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "MODEL_MEMBER", "IMPORTED", "PackError", "Unpacked", "open_pack",
           "is_pack", "load_packed", "write_archive", "pack_model", "check_loads_offline", "export_backbone",
           "import_backbone", "register_backbone", "imported_backbones", "_OPENED"]


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # the same files give the same archive
    return info


def write_archive(out: str | os.PathLike, manifest: dict[str, Any], files: dict[str, Path]) -> Path:
    """Write ``manifest`` (with every file's size and sha256 added) and ``files`` (archive name -> local path)."""
    from .. import __version__

    out = Path(out)
    listed = {}
    for name, path in files.items():
        check_member_name(out, name)
        if not Path(path).is_file():
            raise PackError(f"{path}: the backbone needs this file, but it is not there")
        digest, size = _sha256(Path(path))
        listed[name] = {"sha256": digest, "size": size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fewvision_version": __version__, **manifest,
                "files": listed}
    blob = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with atomic_path(out) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(MANIFEST, len(blob)), io.BytesIO(blob))
        for name, path in files.items():
            with open(path, "rb") as fh:
                tar.addfile(_member(name, listed[name]["size"]), fh)
    return out


# --- models ----------------------------------------------------------------------------------------------------
def pack_model(model_path: str | os.PathLike, out: str | os.PathLike, *, cache_dir: str | None = None,
               weights: str | None = None, precision: str = "fp32", dataset=None,
               max_drop: float = DEFAULT_MAX_DROP, force: bool = False) -> dict[str, Any]:
    """Write ``out`` (.fvz): the model file, everything its backbone reads and, when the model can be exported, its
    ONNX graph (``graph/fp32.onnx``, checked against fewvision's scores to 1e-4), which the light install scores
    without torch. Then prove it loads offline (the backbone created from the unpacked files alone has the model's
    id). ``precision`` bf16 (OpenVINO) or int8 (``graph/int8.onnx``) is measured against fp32 on the labelled
    ``dataset`` and recorded only within ``max_drop`` (unless ``force``), so every line PC runs what was checked.
    Returns the manifest."""
    model_path, out = Path(model_path), Path(out)
    if is_pack(model_path):
        raise PackError(f"{model_path}: already a packed model")
    if precision not in PRECISIONS:
        raise PackError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    if precision != "fp32" and dataset is None:
        raise PackError(f"--precision {precision} is measured on your labelled images: give them with --calibrate")
    model = load(model_path, cache_dir)
    backbone = model.backbone(cache_dir=cache_dir, weights=weights)
    files, offline_spec = backbone.portable()
    manifest = {"kind": "model", "task": model.task, "method": model.head.method, "model": MODEL_MEMBER,
                "backbone": {"spec": model.backbone_spec, "offline_spec": offline_spec, "id": model.backbone_id}}
    staged = out.with_name(f".{out.name}.{os.getpid()}.check")  # an older archive at ``out`` stays until this loads
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        graphs, extra = _graphs(model_path, Path(work), cache_dir=cache_dir, weights=weights, precision=precision,
                                dataset=dataset, max_drop=max_drop, force=force)
        manifest.update(extra)
        try:
            write_archive(staged, manifest, {MODEL_MEMBER: model_path, **graphs, **files})
            check_loads_offline(load_packed(staged, cache_dir=cache_dir).backbone())
            manifest = open_pack(staged, cache_dir).manifest
            os.replace(staged, out)
        finally:
            staged.unlink(missing_ok=True)
    return manifest


def _graphs(model_path: Path, work: Path, *, cache_dir, weights, precision, dataset, max_drop,
            force) -> tuple[dict[str, Path], dict[str, Any]]:
    """The ONNX graphs to pack (member name -> file) and what the manifest says of them: ``graph_note`` when the
    model cannot be exported (it then needs torch), ``precision`` when a reduced precision passed its gate."""
    from .onnx import ExportError, export_onnx, gate, quantize_int8

    fp32 = work / "fp32.onnx"
    try:
        exported = export_onnx(model_path, fp32, cache_dir=cache_dir, weights=weights, engines=ENGINES)
    except ExportError as err:
        if precision != "fp32":
            raise PackError(f"--precision {precision} needs the ONNX graph, and {str(err).split(': ', 1)[-1]}") \
                from None
        return {}, {"graph_note": str(err)}
    graphs = {FP32_GRAPH: fp32}
    # The fp32 engines whose scores matched fewvision's to the export's tolerance, each timed here on the check
    # images: --engine auto runs the fastest of them that the line PC has.
    engines = {name: entry for name, entry in exported["engines"].items() if entry["parity"] <= PARITY_TOLERANCE}
    # The graph's own metadata again (as in the ONNX file): the light runtime reads it without opening the graph.
    manifest = {k: v for k, v in exported.items() if k not in ("parity", "engines")}
    extra: dict[str, Any] = {"graph": {"parity": exported["parity"], "engines": engines, "manifest": manifest}}
    if precision == "int8":
        int8 = work / "int8.onnx"
        q = quantize_int8(fp32, int8, dataset, max_drop=max_drop, force=force)["int8"]
        graphs[INT8_GRAPH] = int8
        extra["precision"] = {"engine": "onnxruntime", "precision": "int8", "metric": q["metric"], "fp32": q["fp32"],
                              "reduced": q["int8"], "images": q["images"], "max_drop": max_drop,
                              "calibration_images": q["calibration_images"]}
    elif precision == "bf16":
        if not installed("openvino"):
            raise PackError("--precision bf16 runs on OpenVINO: pip install 'fewvision[openvino]'")
        extra["precision"] = gate((fp32, "openvino", "fp32"), (fp32, "openvino", "bf16"), dataset,
                                  max_drop=max_drop, force=force, what=f"{model_path}: bf16")
    return graphs, extra


def check_loads_offline(backbone) -> None:
    """Encode one image with a backbone created from unpacked files: the weights are read, not just hashed."""
    from PIL import Image

    backbone.encode_images(backbone.preprocess(Image.new("RGB", (64, 64), (128, 96, 64)))[None])


# --- bare backbones ----------------------------------------------------------------------------------------------
def export_backbone(spec: str, out: str | os.PathLike, *, cache_dir: str | None = None,
                    weights: str | None = None) -> dict[str, Any]:
    """Write a bundle of the files backbone ``spec`` reads; ``import_backbone`` makes the spec work offline."""
    from ..backbones import create_backbone

    backbone = create_backbone(spec, cache_dir=cache_dir, weights=weights)
    files, offline_spec = backbone.portable()
    # The spec the weights really answer to (with --weights: MODEL@PATH, not the hub name they replace).
    manifest = {"kind": "backbone", "backbone": {"spec": backbone.spec, "offline_spec": offline_spec,
                                                 "id": backbone.id}}
    write_archive(out, manifest, files)
    return open_pack(out, cache_dir).manifest


def import_backbone(path: str | os.PathLike, *, cache_dir: str | None = None) -> dict[str, Any]:
    """Check and unpack a bundle into the cache and register its spec there, so ``--backbone SPEC`` loads it with
    no hub; the backbone created from the unpacked files must have the bundle's id."""
    from ..backbones import create_backbone

    unpacked = open_pack(path, cache_dir)
    if unpacked.manifest["kind"] != "backbone":
        raise PackError(f"{path}: a packed model, not a backbone bundle (predict with it directly)")
    entry = unpacked.manifest["backbone"]
    backbone = create_backbone(unpacked.spec, cache_dir=cache_dir, download=False)
    if backbone.id != entry["id"]:
        raise PackError(f"{path}: the unpacked backbone has id {backbone.id}, the bundle says {entry['id']}")
    register_backbone(entry["spec"], unpacked.spec, entry["id"], cache_dir)
    return unpacked.manifest
