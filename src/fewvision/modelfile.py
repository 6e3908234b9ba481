"""One model file (``.fvm``) holds everything needed to predict identically elsewhere.

Format: a safetensors file. Tensors are the head's fitted tensors under ``head/``; the safetensors metadata holds
one JSON document under the key ``fewvision``: format version, fewvision version, task, backbone spec and id, the
backbone's preprocessing (as its repr, for people), the head's method, parameters and fitted values, calibration
and decision settings. No pickle anywhere, so loading a file cannot run code.

The backbone is not stored: its spec is, and its id must match on load (the id covers weights and preprocessing),
so a model never silently runs on other weights than it was fitted with.

A packed model (``.fvz``, written by :mod:`fewvision.deploy.pack`) is read here too: an uncompressed tar,
``manifest.json`` first (format, what it holds, the backbone's spec, the spec that loads it from the unpacked folder,
its id, and the size and sha256 of every other member), then the model file and the files its backbone reads
(weights, model config), each under the name the manifest gives it. Bare backbone bundles (``.tar``) share the
format. Opening an archive streams every member through sha256 and compares it with the manifest, so a tampered,
damaged or truncated file is refused with one line naming the member (the manifest itself is not signed: someone who
can rewrite both a file and the manifest is not caught here). The members are unpacked once, into a folder of the
cache named by the manifest's digest (temp folder, then rename), and reused by later runs - which still check the
archive's bytes. The backbone is then created from the unpacked files with downloads off, and its id must be the
one stored, so an archive cannot run other weights than the model was fitted on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

from safetensors import SafetensorError

from .io.atomic import atomic_path
from .io.paths import cache_dir as cache_root

FORMAT = "fewvision-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".fvm"
PACK_SUFFIX = ".fvz"  # a model with its backbone's files (written by fewvision.deploy.pack)


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and the reason."""


@dataclass
class FewVisionModel:
    """A fitted head bound to its backbone spec and id, plus decision settings (calibration, conformal)."""

    head: Any
    backbone_spec: str
    backbone_id: str
    task: str = "classification"
    decision: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    _backbone: Any = None
    preprocess: str | None = None  # the backbone's preprocessing as its repr, for people (kept from the file)
    offline_spec: str | None = None  # a packed model (.fvz): the spec that loads its backbone from the archive
    packed: dict[str, Any] | None = None  # a packed model: the archive, its number of files and bytes

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.head, "class_names_", []))

    @property
    def method(self) -> str:
        return self.head.method

    def backbone(self, cache_dir: str | None = None, weights: str | None = None):
        """The backbone, created on first use and checked against the id stored in the file."""
        if self._backbone is None:
            from .backbones import create_backbone

            if self.offline_spec is not None:
                if weights:
                    raise ModelFileError(f"{self.packed['file']}: a packed model carries its weights; --weights "
                                         "does not apply")
                bb = create_backbone(self.offline_spec, cache_dir=cache_dir, download=False)
            else:
                bb = create_backbone(self.backbone_spec, cache_dir=cache_dir, weights=weights)
            check_backbone(self, bb)
            self._backbone = bb
        return self._backbone

    def bind(self, backbone) -> "FewVisionModel":
        """Use an already-created backbone (checked against the stored id)."""
        check_backbone(self, backbone)
        self._backbone = backbone
        return self


def check_backbone(model: FewVisionModel, backbone) -> None:
    if backbone.id != model.backbone_id:
        raise ModelFileError(
            f"this model was fitted on backbone '{model.backbone_spec}' with id {model.backbone_id}, but the backbone "
            f"at hand ('{backbone.spec}') has id {backbone.id}: different weights or preprocessing would give "
            "different predictions; supply the original weights (--weights PATH)"
        )


def save_model(path: str | os.PathLike, model: FewVisionModel) -> Path:
    """Write ``model`` atomically (temp file in the same folder, then rename)."""
    import torch
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    tensors, config = model.head.state()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fewvision_version": __version__,
        "task": model.task,
        "backbone": {"spec": model.backbone_spec, "id": model.backbone_id,
                     "preprocess": repr(model._backbone.preprocess) if model._backbone is not None
                     else model.preprocess},
        "head": config,
        "decision": model.decision,
        "info": model.info,
    }
    payload = {f"head/{k}": v.contiguous() for k, v in tensors.items()}
    if not payload:  # safetensors needs at least one tensor to be a valid file for every reader
        payload["head/__empty__"] = torch.zeros(1)
    with atomic_path(path) as tmp:
        save_file(payload, str(tmp), metadata={"fewvision": json.dumps(meta, allow_nan=False)})
    return path


# The metadata every model file must carry: (dotted field, expected type(s)). Anything else is optional.
REQUIRED_FIELDS: list[tuple[str, type | tuple[type, ...]]] = [
    ("format", str), ("format_version", int), ("fewvision_version", str), ("task", str),
    ("backbone", dict), ("backbone.spec", str), ("backbone.id", str),
    ("head", dict), ("head.method", str), ("head.params", dict), ("head.fitted", dict),
    ("decision", dict), ("info", dict),
]
TASKS = ("classification", "anomaly")


def _check_fields(path: Path, meta: Any) -> None:
    """One line naming the file and the first missing or mistyped field."""
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: the model metadata is not a JSON object")
    for field_name, kind in REQUIRED_FIELDS:
        value: Any = meta
        for part in field_name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ModelFileError(f"{path}: the model metadata has no field '{field_name}'")
            value = value[part]
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ModelFileError(f"{path}: field '{field_name}' should be {expected}, not {type(value).__name__}")
    if meta["task"] not in TASKS:
        raise ModelFileError(f"{path}: field 'task' is '{meta['task']}', expected one of {', '.join(TASKS)}")


def _not_onnx(path: Path) -> None:
    if path.suffix.lower() == ".onnx":
        raise ModelFileError(f"{path}: an exported ONNX model; predict and anomaly predict run it, this command "
                             "needs the .fvm (or .fvz) it was exported from")


def read_metadata(path: str | os.PathLike, cache_dir: str | None = None) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    _not_onnx(path)
    if path.suffix.lower() == PACK_SUFFIX:
        unpacked = open_pack(path, cache_dir, backbone=False)
        if unpacked.model_file is None:
            raise PackError(f"{path}: a backbone bundle, not a model (use 'fewvision models import {path}')")
        return read_metadata(unpacked.model_file)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="numpy") as fh:  # the metadata alone: no torch needed
            raw = (fh.metadata() or {}).get("fewvision")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a fewvision model file ({err})") from None
    if raw is None:
        raise ModelFileError(f"{path}: a safetensors file, but not a fewvision model (no 'fewvision' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise ModelFileError(f"{path}: the model metadata is not valid JSON ({err})") from None
    if isinstance(meta, dict) and (meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int)
                                   or meta["format_version"] > FORMAT_VERSION):
        raise ModelFileError(f"{path}: unsupported model format {meta.get('format')} v{meta.get('format_version')}")
    _check_fields(path, meta)
    return meta


@dataclass
class Described:
    """What a model file says of itself, read from its metadata alone (no torch, no head, no backbone): enough to
    list, store and summarise a model. ``file`` is the .fvm itself (for a .fvz, its unpacked copy)."""

    file: Path
    task: str
    method: str
    backbone_spec: str
    backbone_id: str
    class_names: list[str]
    decision: dict[str, Any]
    info: dict[str, Any]


def described(path: str | os.PathLike, cache_dir: str | None = None) -> Described:
    path = Path(path)
    _not_onnx(path)
    file = path
    if path.suffix.lower() == PACK_SUFFIX:
        unpacked = open_pack(path, cache_dir, backbone=False)
        if unpacked.model_file is None:
            raise PackError(f"{path}: a backbone bundle, not a model (use 'fewvision models import {path}')")
        file = unpacked.model_file
    meta = read_metadata(file)
    fitted = meta["head"]["fitted"]
    names = fitted.get("class_names_") if isinstance(fitted.get("class_names_"), list) else []
    return Described(file, meta["task"], meta["head"]["method"], meta["backbone"]["spec"], meta["backbone"]["id"],
                     [str(n) for n in names], meta["decision"], meta["info"])


def load(path: str | os.PathLike, cache_dir: str | None = None) -> FewVisionModel:
    """Read and check a model file (metadata fields, finite tensors of consistent shapes). The backbone is created
    (and its id checked) when first needed. A packed model (.fvz) is unpacked into ``cache_dir``'s cache."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    _not_onnx(path)
    if path.suffix.lower() == PACK_SUFFIX:
        return load_packed(path, cache_dir)
    meta = read_metadata(path)
    try:
        tensors = {k.split("/", 1)[1]: v for k, v in load_file(str(path)).items() if k.startswith("head/")}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: cannot read the model's tensors ({err})") from None
    tensors.pop("__empty__", None)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFileError(f"{path}: tensor '{name}' holds NaN or infinite values")
    method = meta["head"]["method"]
    try:
        cls = head_class(meta["task"], method)
    except KeyError:
        raise ModelFileError(f"{path}: unknown method '{method}' (saved by fewvision {meta['fewvision_version']})")
    try:
        head = cls.from_state(tensors, meta["head"])
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError) as err:
        raise ModelFileError(f"{path}: the '{method}' head cannot be rebuilt from this file "
                             f"({type(err).__name__}: {err})") from None
    problem = state_shape_problem(head)
    if problem:
        raise ModelFileError(f"{path}: {problem}")
    return FewVisionModel(head, meta["backbone"]["spec"], meta["backbone"]["id"], meta["task"],
                          meta["decision"], meta["info"], preprocess=meta["backbone"].get("preprocess"))


def state_shape_problem(head) -> str | None:
    """A sentence naming the first fitted tensor whose shape disagrees with the head's declared ``STATE_SHAPES``
    (symbols bound across tensors, some bound up front by ``state_symbols()``), or None."""
    import torch

    shapes = getattr(head, "STATE_SHAPES", {})
    bound = dict(head.state_symbols()) if hasattr(head, "state_symbols") else {}
    for name, dims in shapes.items():
        tensor = getattr(head, name, None)
        if tensor is None:
            continue
        if not torch.is_tensor(tensor) or tensor.ndim != len(dims):
            got = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            return f"tensor '{name}' should have {len(dims)} dimensions ({', '.join(dims)}), got {got}"
        for symbol, size in zip(dims, tensor.shape):
            if bound.setdefault(symbol, int(size)) != int(size):
                return (f"tensor '{name}' has shape {tuple(tensor.shape)}, but {symbol} = {bound[symbol]} elsewhere "
                        "in the model")
    return None


def head_class(task: str, method: str) -> type:
    """The head class that implements a saved (task, method); KeyError if unknown."""
    if task == "classification":
        from .heads import head_classes

        return head_classes()[method]
    if task == "anomaly":
        from .anomaly import anomaly_head_classes

        return anomaly_head_classes()[method]
    raise KeyError(task)


def is_model_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (MODEL_SUFFIX, PACK_SUFFIX) and Path(path).is_file()


# --- packed models (.fvz) and backbone bundles: reading ---------------------------------------------------------
PACK_FORMAT = "fewvision-pack"
PACK_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_MEMBER = "model.fvm"
GRAPH_PREFIX = "graph/"  # the model's ONNX graphs (graph/fp32.onnx, graph/int8.onnx): scored without torch


def is_model_member(name: str) -> bool:
    """Members that belong to the model (unpacked by content hash), not to its backbone (shared between models)."""
    return name == MODEL_MEMBER or name.startswith(GRAPH_PREFIX)

PACK_KINDS = ("model", "backbone")
_BLOCK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 24


class PackError(ModelFileError):
    """An archive that cannot be used; the message names the file and what failed."""


@dataclass
class Unpacked:
    """An archive's checked members in the cache, and its manifest: the backbone's files under ``folder``, the
    model file (packed models) at ``model_file``."""

    folder: Path
    manifest: dict[str, Any]
    model_file: Path | None = None
    graphs: dict[str, Path] = field(default_factory=dict)  # member name -> unpacked ONNX graph

    @property
    def spec(self) -> str:
        """The spec that loads the backbone from the unpacked files."""
        return self.manifest["backbone"]["offline_spec"].replace("{root}", str(self.folder))


def check_member_name(archive: Path, name: str) -> None:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name or ":" in name:
        raise PackError(f"{archive}: member name '{name}' is not a plain relative path")


def _read_manifest(path: Path, tar: tarfile.TarFile) -> tuple[dict[str, Any], bytes]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise PackError(f"{path}: not a fewvision archive (it does not start with {MANIFEST})")
    if first.size > MAX_MANIFEST_BYTES:
        raise PackError(f"{path}: {MANIFEST} is {first.size} bytes, more than a manifest needs")
    blob = tar.extractfile(first).read()
    try:
        manifest = json.loads(blob)
    except ValueError as err:
        raise PackError(f"{path}: {MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise PackError(f"{path}: not a fewvision archive (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > PACK_FORMAT_VERSION:
        raise PackError(f"{path}: archive format v{version} is newer than this fewvision reads (v{PACK_FORMAT_VERSION})")
    files, backbone = manifest.get("files"), manifest.get("backbone")
    if manifest.get("kind") not in PACK_KINDS or not isinstance(files, dict) or not isinstance(backbone, dict) \
            or not all(isinstance(backbone.get(k), str) for k in ("spec", "offline_spec", "id")):
        raise PackError(f"{path}: {MANIFEST} lacks the kind, the file list or the backbone's spec and id")
    for name, entry in files.items():
        check_member_name(path, name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
            raise PackError(f"{path}: {MANIFEST} has no size and sha256 for '{name}'")
    return manifest, blob


_OPENED: dict[tuple, Unpacked] = {}  # archives checked by this process: (path, size, mtime, cache) -> members


def _complete(folder: Path, files: dict[str, dict]) -> bool:
    """An unpacked backbone folder that is whole: marked complete and every file there with its size."""
    try:
        return (folder / ".complete").is_file() and all((folder / n).stat().st_size == e["size"]
                                                         for n, e in files.items())
    except OSError:
        return False


def open_pack(path: str | os.PathLike, cache_dir: str | None = None, *, backbone: bool = True) -> Unpacked:
    """Check every member of an archive against its manifest and unpack what the cache lacks.

    The backbone's files go to ``packs/backbones/<digest of their entries>/``, shared by every archive with the same
    backbone (a refitted model does not bring a second copy of the weights); the model file to
    ``packs/models/<its sha256>.fvm``, and its ONNX graphs likewise. An unpacked file whose size is off is unpacked
    again. Within one process an archive whose size and modification time have not changed is checked once.
    ``backbone=False`` (scoring an ONNX graph without torch): the backbone's files are checked but not unpacked."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: no such file")
    root = cache_root(cache_dir) / "packs"
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(root), backbone)
    if key in _OPENED:
        return _OPENED[key]
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as err:
        raise PackError(f"{path}: not a fewvision archive (not an uncompressed tar file: {err})") from None
    temp_dir, temp_models = None, {}
    try:
        with tar:
            manifest, _ = _read_manifest(path, tar)
            files = manifest["files"]
            backbone_files = {n: e for n, e in files.items() if not is_model_member(n)}
            digest = hashlib.sha256(json.dumps([manifest["backbone"]["offline_spec"], backbone_files],
                                               sort_keys=True).encode()).hexdigest()[:24]
            folder = root / "backbones" / digest
            targets: dict[str, Path] = {}
            if backbone and backbone_files and not _complete(folder, backbone_files):
                folder.parent.mkdir(parents=True, exist_ok=True)
                temp_dir = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{digest}."))
                targets.update({n: temp_dir / n for n in backbone_files})
            unpacked_as = {n: root / "models" / f"{e['sha256']}{PurePosixPath(n).suffix}"
                           for n, e in files.items() if is_model_member(n)}
            temp_models = {}
            for name, final in unpacked_as.items():
                if not (final.is_file() and final.stat().st_size == files[name]["size"]):
                    final.parent.mkdir(parents=True, exist_ok=True)
                    temp_models[name] = targets[name] = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            _check_members(path, tar, files, targets, set() if backbone else set(backbone_files))
        if temp_dir is not None:
            (temp_dir / ".complete").write_text("")
            for p in [temp_dir, *temp_dir.rglob("*")]:  # mkdtemp's 0700 would lock out other users of the cache
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
            if folder.exists() and not _complete(folder, backbone_files):
                shutil.rmtree(folder, ignore_errors=True)  # a damaged earlier copy
            try:
                os.replace(temp_dir, folder)
            except OSError:  # unpacked meanwhile by another process: keep that one
                if not _complete(folder, backbone_files):
                    raise
            else:
                temp_dir = None
        for name, temp_model in list(temp_models.items()):
            os.replace(temp_model, unpacked_as[name])
            del temp_models[name]
        graphs = {n: f for n, f in unpacked_as.items() if n.startswith(GRAPH_PREFIX)}
        unpacked = Unpacked(folder, manifest, unpacked_as.get(MODEL_MEMBER), graphs)
        _OPENED[key] = unpacked
        return unpacked
    except (tarfile.TarError, EOFError) as err:
        raise PackError(f"{path}: truncated or damaged archive ({err})") from None
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        for temp_model in temp_models.values():
            temp_model.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_members(path: Path, tar: tarfile.TarFile, files: dict[str, dict], targets: dict[str, Path],
                   unused: set[str] = frozenset()) -> None:
    """Stream every member through sha256 against the manifest, writing those named in ``targets`` there. Members
    in ``unused`` (a backbone's files when only the ONNX graph will run) are checked for their size only: their
    bytes are never read, so their damage cannot change a score."""
    seen: set[str] = set()
    while (member := tar.next()) is not None:  # after the manifest (iterating the TarFile would start over)
        name = member.name
        if name not in files:
            raise PackError(f"{path}: member '{name}' is not listed in the manifest")
        if name in seen or not member.isfile():
            raise PackError(f"{path}: member '{name}' is repeated or not a plain file")
        seen.add(name)
        if name in unused and name not in targets:
            if member.size != files[name]["size"]:
                raise PackError(f"{path}: member '{name}' has {member.size} bytes, the manifest says "
                                f"{files[name]['size']} (truncated or altered)")
            continue
        h, size = hashlib.sha256(), 0
        source = tar.extractfile(member)
        target = None
        if name in targets:
            targets[name].parent.mkdir(parents=True, exist_ok=True)
            target = open(targets[name], "wb")
        try:
            for block in iter(lambda: source.read(_BLOCK), b""):
                h.update(block)
                size += len(block)
                if target is not None:
                    target.write(block)
        finally:
            if target is not None:
                target.close()
        expected = files[name]
        if size != expected["size"]:
            raise PackError(f"{path}: member '{name}' has {size} bytes, the manifest says {expected['size']} "
                            "(truncated or altered)")
        if h.hexdigest() != expected["sha256"]:
            raise PackError(f"{path}: member '{name}' fails its sha256 check (altered or damaged)")
    missing = sorted(set(files) - seen)
    if missing:
        raise PackError(f"{path}: truncated or incomplete archive: '{missing[0]}' is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def is_pack(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == PACK_SUFFIX


def load_packed(path: str | os.PathLike, cache_dir: str | None = None) -> FewVisionModel:
    """The model of a ``.fvz``; its backbone is created (on first use) from the archive's files, never the hub."""
    unpacked = open_pack(path, cache_dir)
    if unpacked.manifest["kind"] != "model":
        raise PackError(f"{path}: a backbone bundle, not a model (use 'fewvision models import {path}')")
    try:
        model = load(unpacked.model_file)
    except ModelFileError as err:  # name the archive the user gave, not the unpacked copy in the cache
        raise PackError(f"{path} (its {MODEL_MEMBER}, packed by fewvision "
                        f"{unpacked.manifest.get('fewvision_version', '?')}): "
                        f"{str(err).split(': ', 1)[-1]}") from None
    if model.backbone_id != unpacked.manifest["backbone"]["id"]:
        raise PackError(f"{path}: the model's backbone id differs from the one in {MANIFEST}")
    model.offline_spec = unpacked.spec
    model.packed = {"file": str(path), "model_file": str(unpacked.model_file), "files": len(unpacked.manifest["files"]),
                    "bytes": sum(f["size"] for f in unpacked.manifest["files"].values())}
    return model


__all__: Sequence[str] = ["FewVisionModel", "save_model", "load", "ModelFileError", "read_metadata", "PackError",
                          "open_pack", "load_packed"]
