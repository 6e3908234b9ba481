"""onnxruntime against torch eager for the same exported model on this CPU, side by side in one process.

    .venv/bin/python benchmarks/onnx_speed.py [--no-write]

For each model: fit it (random backbone weights - speed does not depend on their values), export it with
``fewvision export``'s code, then time the graph's forward pass on the same preprocessed textile images three times
each way and keep the median: torch eager runs the very module that was exported (under ``inference_mode``),
onnxruntime the exported file (CPU provider, default threads); int8 is the static QDQ quantisation of the
encoder's convolutions (``--int8``), calibrated on the same images. Classification runs batches of 16, the anomaly
graphs one image at a time, as ``predict MODEL.onnx`` feeds them. Decoding and preprocessing are left out (the same
code on both sides).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = [  # (label, task, method, backbone, batch)
    ("prototype, openclip ViT-B-32", "classification", "prototype", "openclip:ViT-B-32@random", 16),
    ("patchcore, timm resnet18", "anomaly", "patchcore", "timm:resnet18@random", 1),
    ("padim, timm resnet18", "anomaly", "padim", "timm:resnet18@random", 1),
    ("patchcore, timm wide_resnet50_2", "anomaly", "patchcore", "timm:wide_resnet50_2@random", 1),
]
N_IMAGES = {"classification": 64, "anomaly": 24}


def _time(fn, batches, repeats: int = 3) -> float:
    fn(batches[0])  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
            fn(b)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from _report import table, write_section

    from fewvision.deploy.onnx import AnomalyGraph, ClassifierGraph, export_onnx, load_onnx, quantize_int8
    from fewvision.io.datasets import Dataset, Item, textile
    from fewvision.io.images import load_image
    from fewvision.modelfile import load, save_model
    from fewvision.tasks.anomaly import _settings, fit_anomaly
    from fewvision.tasks.fewshot import fit

    data = textile()
    nominal = sorted(it.path for it in data.items if it.label == "nominal")
    local = sorted(it.path for it in data.items if it.label == "local")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fv-onnx-speed-") as tmp:
        for label, task, method, spec, batch in MODELS:
            fvm, onnx_file = Path(tmp) / f"{method}.fvm", Path(tmp) / f"{method}.onnx"
            if task == "classification":
                model = fit("textile", method, backbone=spec, shots=4, use_cache=False)
            else:
                model = fit_anomaly(nominal[:20], method=method, backbone=spec, use_cache=False)
            save_model(fvm, model)
            export_onnx(fvm, onnx_file)
            model = load(fvm)
            bb = model.backbone()
            paths = (nominal[100:] if task == "classification" else nominal[100:112] + local[:12])[: N_IMAGES[task]]
            pixels = torch.stack([bb.preprocess(load_image(p)) for p in paths])
            batches = list(pixels.split(batch))
            if task == "classification":
                from fewvision.tasks.fewshot import feature_kind

                graph = ClassifierGraph(bb, model.head, feature_kind(model.head)).eval()
            else:
                size, sigma = _settings(model, bb)
                graph = AnomalyGraph(bb, model.head, size, sigma).eval()

            def eager(x):
                with torch.inference_mode():
                    graph(x)

            runtime = load_onnx(onnx_file)
            timings = {"torch eager": _time(eager, batches),
                       "onnxruntime fp32": _time(lambda x: runtime.run(x.numpy()), batches)}
            if task == "anomaly":
                check = Dataset("speed", [Item(p, "nominal" if p in nominal else "local") for p in paths],
                                ["local", "nominal"], "manifest")
                quantize_int8(onnx_file, Path(tmp) / f"{method}-int8.onnx", check, force=True)
                int8 = load_onnx(Path(tmp) / f"{method}-int8.onnx")
                timings["onnxruntime int8"] = _time(lambda x: int8.run(x.numpy()), batches)
            base = len(paths) / timings["torch eager"]
            for runtime_name, seconds in timings.items():
                rate = len(paths) / seconds
                rows.append([label, runtime_name, batch, rate, rate / base])
                print(f"{label:32s} {runtime_name:18s} {rate:7.1f} images/s  {rate / base:.2f}x", flush=True)
    md = "\n".join([
        "## onnxruntime vs torch eager (`benchmarks/onnx_speed.py`)",
        "",
        "The same fitted model, exported by `fewvision export --format onnx`: images/s of the graph's forward pass "
        "(preprocessed pixels in; probabilities, or finished anomaly maps and scores out), torch eager running the "
        "very module that was exported against onnxruntime running the file, on the same textile images, median "
        "of 3 passes after a warm-up. Random backbone weights (speed does not depend on their values). int8: the "
        "encoder's convolutions quantised statically (per-channel, QDQ), calibrated on the same images.",
        "",
        table(["model", "runtime", "batch", "images/s", "vs torch eager"], rows),
    ])
    print(md)
    if not args.no_write:
        write_section("onnx_speed", md)


if __name__ == "__main__":
    main()
