"""One model file (``.fvm``) holds everything needed to predict identically elsewhere.

Format: a safetensors file. Tensors are the head's fitted tensors under ``head/``; the safetensors metadata holds
one JSON document under the key ``fewvision``: format version, fewvision version, task, backbone spec and id, the
backbone's preprocessing (as its repr, for people), the head's method, parameters and fitted values, calibration
and decision settings. No pickle anywhere, so loading a file cannot run code.

The backbone is not stored: its spec is, and its id must match on load (the id covers weights and preprocessing),
so a model never silently runs on other weights than it was fitted with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .io.atomic import atomic_path

FORMAT = "fewvision-model"
FORMAT_VERSION = 1
MODEL_SUFFIX = ".fvm"
PACK_SUFFIX = ".fvz"  # a model with its backbone's files (fewvision.deploy.pack)


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
        from .deploy.pack import load_packed

        model = load_packed(path, cache_dir)
        return read_metadata(model.packed["model_file"])
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
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


def load(path: str | os.PathLike, cache_dir: str | None = None) -> FewVisionModel:
    """Read and check a model file (metadata fields, finite tensors of consistent shapes). The backbone is created
    (and its id checked) when first needed. A packed model (.fvz) is unpacked into ``cache_dir``'s cache."""
    path = Path(path)
    _not_onnx(path)
    if path.suffix.lower() == PACK_SUFFIX:
        from .deploy.pack import load_packed

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


__all__: Sequence[str] = ["FewVisionModel", "save_model", "load", "ModelFileError", "read_metadata"]
