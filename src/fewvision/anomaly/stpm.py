"""STPM: Student-Teacher Feature Pyramid Matching (Wang, Han, Xu, Zhou, BMVC 2021, arXiv 2103.04257).

The teacher is the backbone's CNN (a timm model) with frozen weights; the student is the same architecture, randomly
initialised, trained on good images only to reproduce the teacher's feature pyramid (``layers``: timm feature levels,
1-3 = ResNet ``layer1``-``layer3`` as in the paper).

With ``F_t^l, F_s^l`` the level-l feature maps and ``^`` the L2 normalisation along channels (the paper's section 3):

* ``l^l(i, j) = 0.5 * || F^_t^l(i, j) - F^_s^l(i, j) ||^2``
* training loss: ``sum_l (1 / (h_l w_l)) sum_ij l^l(i, j)``, summed over the images of a batch as in the reference
  implementations (all level weights 1);
* anomaly map: the per-level maps ``l^l`` upsampled bilinearly and multiplied over levels (``aggregation="sum"``
  adds them instead); image score: the mean of the ``top_k`` largest map values (1 = the maximum, as the paper).

Raw maps are returned at the resolution of the first (finest) level; ``postprocess.finish_maps`` upsamples them to
the input and smooths them. See docs/methods/stpm.md.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..backbones.base import BackboneError
from . import register
from .autoencoder import resize_to, split_module_tensors, state_with_module, top_k_mean
from .base import AnomalyHead

STUDENT_PREFIX = "student."


def _timm_name(backbone) -> str:
    """The timm architecture of a TimmBackbone, or a BackboneError naming what STPM supports."""
    model = getattr(backbone, "model", None)
    spec = str(getattr(backbone, "spec", backbone))
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a core dependency
        timm = None
    if timm is None or model is None or not spec.startswith("timm:"):
        raise BackboneError(
            f"STPM needs a CNN teacher from timm (e.g. --backbone timm:resnet18); backbone '{spec}' is not a timm model"
        )
    name = spec.split(":", 1)[1].partition("@")[0]
    if not timm.is_model(name):
        raise BackboneError(f"backbone '{spec}': unknown timm model '{name}'")
    return name


def pyramid_net(name: str, layers: Sequence[int]):
    """A timm ``features_only`` network returning the feature maps at ``layers`` (random weights)."""
    import timm

    try:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(int(i) for i in layers))
    except (RuntimeError, ValueError, AssertionError, IndexError) as err:
        raise BackboneError(f"timm model '{name}' cannot give feature levels {tuple(layers)} ({err})") from None


def level_distances(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per level ``0.5 * ||norm(t) - norm(s)||^2`` maps [N, h_l, w_l]."""
    return [
        0.5 * (F.normalize(t.float(), dim=1) - F.normalize(s.float(), dim=1)).pow(2).sum(dim=1)
        for t, s in zip(teacher, student)
    ]


def stpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over levels and over the images of the batch of the mean over positions of the level distance maps:
    ``sum_l sum_k (1 / (h_l w_l)) sum_ij l^l_k(i, j)``. Summed over the batch, as the reference implementations do
    (their SGD learning rate of 0.4 assumes it; a batch mean trains 1 / batch_size as fast)."""
    return sum(d.flatten(1).mean(1).sum() for d in level_distances(teacher, student))


@register
class StpmHead(AnomalyHead):
    """Student-teacher feature pyramid matching.

    Parameters
    ----------
    layers: timm feature levels matched (for ResNets 1, 2, 3 = layer1, layer2, layer3).
    image_size: side images are resized to inside the head; None keeps the backbone's preprocessed size.
    epochs, batch_size: student training on the good images.
    lr, momentum, weight_decay: SGD as in the paper (0.4, 0.9, 1e-4).
    aggregation: "product" (paper) or "sum" of the upsampled level maps.
    top_k: image score = mean of the top_k largest map values (1 = max).
    seed: student initialisation and batch order.
    """

    method = "stpm"
    inputs = "pixels"

    def __init__(
        self,
        layers: Sequence[int] = (1, 2, 3),
        image_size: int | None = None,
        epochs: int = 100,
        batch_size: int = 32,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        aggregation: str = "product",
        top_k: int = 1,
        seed: int = 0,
    ):
        self.layers = layers
        self.image_size = image_size
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.aggregation = aggregation
        self.top_k = top_k
        self.seed = seed

    # --- teacher and student ------------------------------------------------------------------------------
    def _teacher(self, backbone):
        name = _timm_name(backbone)
        cached = getattr(self, "_teacher_cache", None)
        if cached is not None and cached[0] == backbone.id:
            return cached[1]
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG untouched
            net = pyramid_net(name, self.layers)
        missing, _ = net.load_state_dict(backbone.model.state_dict(), strict=False)
        if missing:
            raise BackboneError(
                f"backbone '{backbone.spec}': its weights do not cover the feature pyramid (missing {missing[:3]}...)"
            )
        net.eval().requires_grad_(False)
        self._teacher_cache = (backbone.id, net)
        return net

    def _build_student(self):
        return pyramid_net(self.teacher_name_, self.layers)

    def _check_backbone(self, backbone) -> None:
        if backbone is None:
            raise ValueError("STPM needs the backbone: it is the teacher network")
        if backbone.id != self.backbone_id_:
            raise BackboneError(
                f"this STPM head was fitted with teacher id {self.backbone_id_}, not {backbone.id} ('{backbone.spec}')"
            )

    # --- fit ----------------------------------------------------------------------------------------------
    def fit(self, inputs: torch.Tensor | None, backbone=None) -> "StpmHead":
        if self.aggregation not in ("product", "sum"):
            raise ValueError(f"aggregation must be 'product' or 'sum', not {self.aggregation!r}")
        if backbone is None:
            raise ValueError("STPM needs the backbone: it is the teacher network")
        if inputs is None or inputs.shape[0] == 0:
            raise ValueError("StpmHead.fit needs good images ([N, 3, H, W] preprocessed pixels)")
        teacher = self._teacher(backbone)
        self.teacher_name_ = _timm_name(backbone)
        self.backbone_id_ = backbone.id
        x_all = resize_to(inputs.detach().cpu(), self.image_size)
        with torch.inference_mode():
            targets_all = [torch.cat(t) for t in zip(*(teacher(p) for p in x_all.split(max(1, int(self.batch_size)))))]

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            student = self._build_student()
        gen = torch.Generator().manual_seed(int(self.seed))
        opt = torch.optim.SGD(student.parameters(), lr=float(self.lr), momentum=float(self.momentum),
                              weight_decay=float(self.weight_decay))
        n, bs = x_all.shape[0], max(1, int(self.batch_size))
        self.loss_history_: list[float] = []
        student.train()
        for _ in range(int(self.epochs)):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                loss = stpm_loss([t[idx] for t in targets_all], student(x_all[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
            self.loss_history_.append(total / n)  # per image
        self._student = student.eval()
        return self

    # --- scoring ------------------------------------------------------------------------------------------
    def _maps(self, teacher, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            dists = level_distances(teacher(x), self._student(x))
        size = dists[0].shape[-2:]
        up = [d if d.shape[-2:] == size else F.interpolate(d[:, None], size=size, mode="bilinear",
                                                            align_corners=False)[:, 0] for d in dists]
        stacked = torch.stack(up)
        return stacked.prod(dim=0) if self.aggregation == "product" else stacked.sum(dim=0)

    def score(self, inputs: torch.Tensor | None, backbone=None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        self._check_backbone(backbone)
        if inputs is None:
            raise ValueError("StpmHead.score needs preprocessed images")
        teacher = self._teacher(backbone)
        x_all = resize_to(inputs.detach().cpu(), self.image_size)
        maps = torch.cat([self._maps(teacher, p) for p in x_all.split(max(1, int(self.batch_size)))]).float()
        return maps, top_k_mean(maps, int(self.top_k))

    # --- persistence --------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self._check_fitted()
        return state_with_module(self, self._student, prefix=STUDENT_PREFIX)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> "StpmHead":
        own, module = split_module_tensors(tensors, prefix=STUDENT_PREFIX)
        head = super().from_state(own, config)
        with torch.random.fork_rng(devices=[]):
            student = head._build_student()
        student.load_state_dict(module)
        head._student = student.eval()
        return head

    def n_trainable_parameters(self) -> int:
        student = getattr(self, "_student", None)
        if student is None:
            return 0
        return sum(p.numel() for p in student.parameters())


__all__ = ["StpmHead", "stpm_loss", "level_distances", "pyramid_net"]
