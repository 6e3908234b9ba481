"""``fewvision demo``: the main job on an embedded default, the textile images of conformal-clip-data.

With CLIP weights in the cache it runs zero-shot classification with the packaged class descriptions; without
them (an air-gapped machine) it runs a prototype head, the class means of ten images per class, on the built-in
weight-free texture backbone. Either way it writes metrics.json and an HTML report and returns the report's path.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Callable

from ..backbones import DEFAULT_CLIP_SPEC, create_backbone
from ..backbones.base import WeightsUnavailable

DEMO_SHOTS = 10


def textile_classes_file() -> Path:
    return Path(str(files("fewvision") / "data" / "textile_classes.yaml"))


def run_demo(out: Path, cache_dir: str | None = None, echo: Callable[[str], None] = print) -> Path:
    from ..prompts import load_class_file
    from ..io.datasets import textile
    from ..metrics import save_metrics
    from ..reports.classification import write_classification_report
    from .fewshot import evaluate_prototype
    from .zeroshot import evaluate_zeroshot

    data = textile()
    echo(f"textile images: {len(data)} ({', '.join(f'{k} {v}' for k, v in data.counts().items())})")
    try:
        clip = create_backbone(DEFAULT_CLIP_SPEC, cache_dir=cache_dir, download=False)
    except WeightsUnavailable:
        clip = None
    if clip is not None:
        echo(f"zero-shot with {clip.spec}")
        ev = evaluate_zeroshot(data, backbone=clip, classes=load_class_file(textile_classes_file()),
                               cache_dir=cache_dir, progress=True)
        method, spec = "zeroshot", clip.spec
    else:
        echo(f"no CLIP weights in the cache ({DEFAULT_CLIP_SPEC}); running the offline default: "
             f"a prototype head ({DEMO_SHOTS} images per class) on the built-in texture backbone")
        ev = evaluate_prototype(data, backbone="texture", shots=DEMO_SHOTS, seed=0, cache_dir=cache_dir, progress=True)
        method, spec = "prototype", "texture"
    m = ev.metrics
    m.update({"method": method, "backbone": spec, "dataset": "textile"})
    out.mkdir(parents=True, exist_ok=True)
    save_metrics(m, out / "metrics.json")
    lo, hi = m["ci"]["balanced_accuracy"]
    echo(f"{method} on textile ({spec}): accuracy {m['accuracy']:.3f}, balanced accuracy "
         f"{m['balanced_accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}), macro-F1 {m['macro_f1']:.3f}, n={m['n']}")
    extra = {"backbone": spec, "method": method}
    if method == "prototype":
        extra["support"] = f"{DEMO_SHOTS} images per class, seed 0"
    return write_classification_report(out, title=f"fewvision demo: {method} on the textile images", metrics=m,
                                       rows=ev.predictions.rows, class_names=ev.predictions.class_names, extra=extra)
