"""Classification heads behind one create function (see ``base.ClassifierHead`` for the protocol)."""

from __future__ import annotations

from .base import ClassifierHead, NotFitted
from .bottleneck import BottleneckAdapterHead
from .clip_adapter import ClipAdapterHead
from .contrastive import ContrastiveHead
from .coop import CoOpHead
from .deep_prompt import DeepPromptHead
from .gcpl import CoMPLeHead, GCPLHead
from .linear import LinearHead
from .lora import LoRAHead
from .maml import MamlHead
from .prolip import ProLIPHead
from .protonet import ProtoNetHead
from .prototype import PrototypeHead
from .registry import REGISTRY as _REGISTRY
from .relationnet import RelationNetHead
from .slac import SLACHead
from .tip import TipAdapterFHead, TipAdapterHead
from .tlac import TLACHead
from .with_good import WithGoodImages
from .zeroshot import ZeroShotHead

_REGISTRY.update({
    "zeroshot": ZeroShotHead,
    "prototype": PrototypeHead,
    "protonet": ProtoNetHead,
    "relationnet": RelationNetHead,
    "maml": MamlHead,
    "slac": SLACHead,
    "tlac": TLACHead,
    "linear": LinearHead,
    "tip": TipAdapterHead,
    "tip-f": TipAdapterFHead,
    "clip-adapter": ClipAdapterHead,
    "prolip": ProLIPHead,
    "coop": CoOpHead,
    "lora": LoRAHead,
    "bottleneck-adapter": BottleneckAdapterHead,
    "deep-prompt": DeepPromptHead,
    "contrastive": ContrastiveHead,
    "gcpl": GCPLHead,
    "comple": CoMPLeHead,
    # not a method of its own: any image-feature head with features from good images (fit(..., good=GOOD_DIR))
    "with-good": WithGoodImages,
})


def head_names() -> list[str]:
    """The methods a user picks (``--method``); the registry also holds wrappers that are built, not chosen."""
    return [name for name in _REGISTRY if name != WithGoodImages.method]


def head_classes() -> dict[str, type[ClassifierHead]]:
    return dict(_REGISTRY)


def create_head(method: str, **params) -> ClassifierHead:
    try:
        factory = _REGISTRY[method]
    except KeyError:
        raise ValueError(f"unknown method '{method}': expected one of {', '.join(_REGISTRY)}") from None
    return factory(**params)


__all__ = ["ClassifierHead", "NotFitted", "create_head", "head_names", "ZeroShotHead", "PrototypeHead"]
