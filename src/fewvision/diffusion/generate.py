"""Synthetic support images from learned class tokens: a GCPL / CoMPLe model's Stable Diffusion pipeline draws
``per_class`` images of each class from its prompt, seeded, to enlarge the support set of another head (``fit
--synthetic MODEL``). Images are written once under ``<cache>/synthetic/<model sha>-<settings>/<class>/`` (each to a
temporary name, then renamed), so a second fit reuses them and an interrupted one leaves no half-written file."""

from __future__ import annotations

import hashlib
import os

import torch

from ..io.paths import cache_dir as cache_root


def synthesize(model, per_class: int, *, steps: int = 30, guidance: float = 7.5, seed: int = 0,
               cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """[(path, class name)] of ``per_class`` generated images per class of a fitted gcpl/comple ``model``."""
    from ..heads.gcpl import GCPLHead

    head = model.head
    if not isinstance(head, GCPLHead):
        raise ValueError(f"synthetic images come from a gcpl or comple model, not a {head.method} model")
    from .pipeline import image_size

    digest = hashlib.sha256(head.token_embeddings_.numpy().tobytes())
    digest.update(f"{head.pipeline}\n{head.template}".encode())  # the same tokens in another pipeline draw others
    settings = f"n{per_class}-s{steps}-g{guidance}-seed{seed}"
    folder = cache_root(cache_dir) / "synthetic" / f"{digest.hexdigest()[:16]}-{settings}"
    cond, pipe = head._conditioning(cache_dir)
    size = image_size(pipe)
    out = []
    for c, name in enumerate(head.class_names_):
        target = folder / f"{c:03d}"
        target.mkdir(parents=True, exist_ok=True)
        for i in range(int(per_class)):
            path = target / f"{i:04d}.png"
            if not path.exists():
                generator = torch.Generator().manual_seed(seed * 1_000_003 + c * 10_007 + i)
                with torch.no_grad():
                    image = pipe(prompt_embeds=cond[c : c + 1], num_inference_steps=steps, guidance_scale=guidance,
                                 generator=generator, height=size, width=size, output_type="pil").images[0]
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, path)
            out.append((str(path), name))
    return out
