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

    @property
    def class_names(self) -> list[str]:
        return list(getattr(self.head, "class_names_", []))

    def backbone(self, cache_dir: str | None = None, weights: str | None = None):
        """The backbone, created on first use and checked against the id stored in the file."""
        if self._backbone is None:
            from .backbones import create_backbone

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
                     "preprocess": repr(model._backbone.preprocess) if model._backbone is not None else None},
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


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("fewvision")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a fewvision model file ({err})") from None
    if raw is None:
        raise ModelFileError(f"{path}: a safetensors file, but not a fewvision model (no 'fewvision' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(f"{path}: unsupported model format {meta.get('format')} v{meta.get('format_version')}")
    return meta


def load(path: str | os.PathLike) -> FewVisionModel:
    """Read a model file. The backbone is created (and its id checked) when first needed."""
    meta = read_metadata(path)
    tensors = {k.split("/", 1)[1]: v for k, v in load_file(str(path)).items() if k.startswith("head/")}
    tensors.pop("__empty__", None)
    method = meta["head"]["method"]
    try:
        cls = head_class(meta["task"], method)
    except KeyError:
        raise ModelFileError(f"{path}: unknown method '{method}' (saved by fewvision {meta['fewvision_version']})")
    head = cls.from_state(tensors, meta["head"])
    return FewVisionModel(head, meta["backbone"]["spec"], meta["backbone"]["id"], meta["task"],
                          meta.get("decision", {}), meta.get("info", {}))


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
    return Path(path).suffix == MODEL_SUFFIX and Path(path).is_file()


__all__: Sequence[str] = ["FewVisionModel", "save_model", "load", "ModelFileError", "read_metadata"]
