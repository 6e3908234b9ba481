"""The line PC's runtime, measured side by side in one run: the light install's size and a new process's time to its
first verdict, and images/s of every engine on the same exported models, with each engine's share of this CPU's
peak and the accuracy a reduced precision costs.

    .venv/bin/python benchmarks/runtime_engines.py [--no-write] [--skip-light]

* Sizes: a fresh virtual environment with ``pip install .`` (the light install) against the project's ``.venv``
  (``pip install -e .[full,dev]``), ``du`` of each folder.
* First verdict: ``fewvision predict MODEL.fvz ONE.jpg`` in the light environment, a new process each time, wall
  time from start to exit (the CSV written), best of 3 after a first run that unpacks the archive into the cache.
* Engines: for each model (random backbone weights - speed does not depend on their values), the graph's forward
  pass (preprocessed pixels in; probabilities, or finished anomaly maps and scores out) on the same textile images:
  torch eager runs the very module that was exported (``inference_mode``), the others the exported file.
  Classification runs batches of 16, the anomaly graphs one image at a time (as ``predict`` feeds them). The
  engines take turns, 5 rounds of a pass each after a warm-up: images/s from the median pass, the ratio to torch
  the median of the rounds' ratios; decoding and preprocessing left out (the same code for all). int8: static QDQ
  quantisation of the encoder (its convolutions for a CNN, its matrix products for a ViT) calibrated on the images.
* Share of peak: images/s x the graph's floating-point operations per image (torch's ``FlopCounterMode`` on the
  module: matrix products and convolutions, 2 per multiply-add) / this CPU's fp32 peak, taken as the best rate of a
  4096 x 4096 fp32 matrix product in torch (MKL) or onnxruntime (MLAS), every core, best of 5 before and 5 after
  the engines ran - a measured peak, not the datasheet's. Reduced precisions are divided by the same fp32 peak (so
  they can exceed 100%).
* Accuracy: ViT-B-32 prototype on the textile images (random weights: the number measures what the precision
  changes, not a real model's accuracy), fp32 against each reduced precision, on the same 150 test images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODELS = [  # (label, task, method, backbone, batch)
    ("prototype, openclip ViT-B-32", "classification", "prototype", "openclip:ViT-B-32@random", 16),
    ("patchcore, timm resnet18", "anomaly", "patchcore", "timm:resnet18@random", 1),
    ("padim, timm resnet18", "anomaly", "padim", "timm:resnet18@random", 1),
    ("patchcore, timm wide_resnet50_2", "anomaly", "patchcore", "timm:wide_resnet50_2@random", 1),
    ("padim (n_features 100), timm wide_resnet50_2", "anomaly", "padim", "timm:wide_resnet50_2@random", 1),
]
# PaDiM's default 550 features on wide_resnet50_2 make 3.8 GB of inverse covariances, past ONNX's 2 GB file limit.
PARAMS = {("padim", "timm:wide_resnet50_2@random"): {"n_features": 100}}
N_IMAGES = {"classification": 64, "anomaly": 16}


def _time_side_by_side(runners: dict, batches, rounds: int = 5) -> dict[str, list[float]]:
    """Seconds of a pass over ``batches`` for each runner, the runners taking turns round after round (after one
    warm-up batch each): a machine whose speed drifts during the run slows every runner of a round alike, so the
    ratio of the same round's times is steadier than the ratio of times measured minutes apart."""
    for run in runners.values():
        run(batches[0])
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for b in batches:
                run(b)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def fp32_peak() -> dict[str, float]:
    """FLOP/s of the best of 5 fp32 4096 x 4096 matrix products, in torch (MKL) and in onnxruntime (MLAS), every
    core: the CPU's practical fp32 peak is the larger (MKL's kernels are not the fastest on every CPU)."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    rates = {"torch": 2 * n**3 / min(_once(lambda: torch.mm(a, b)) for _ in range(5))}
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    session = ort.InferenceSession(onnx.helper.make_model(graph).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy(), "b": b.numpy()}
    session.run(None, feed)
    rates["onnxruntime"] = 2 * n**3 / min(_once(lambda: session.run(None, feed)) for _ in range(5))
    return rates


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def flops_per_image(graph, pixels) -> float:
    """Counted with nn.MultiheadAttention's fused fast path off: FlopCounterMode does not see inside that kernel, so
    a ViT's attention projections went uncounted (ViT-B-32: 5.9 of its 8.7 GFLOP)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            graph(pixels[:1])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return float(counter.get_total_flops())


def du_mb(path: Path) -> int:
    return int(subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def light_install(work: Path) -> Path:
    python = work / "light" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", str(work / "light")], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], check=True)
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0, "torch is importable in the light install"
    return python


def first_verdict(python: Path, command: list[str], env: dict) -> float:
    """Seconds from starting ``fewvision COMMAND...`` in the light environment to its exit, best of 3 (after a first
    run that unpacks the archive into the cache)."""
    run = [str(python.parent / "fewvision"), *command]
    subprocess.run(run, check=True, capture_output=True, env=env)
    return min(_once(lambda: subprocess.run(run, check=True, capture_output=True, env=env)) for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--skip-light", action="store_true", help="leave out the light install's size and start time")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    import torch
    from _report import table, write_section

    from fewvision.deploy.onnx import AnomalyGraph, ClassifierGraph, export_onnx, load_onnx, quantize_int8
    from fewvision.deploy.pack import pack_model
    from fewvision.io.datasets import Dataset, Item, textile
    from fewvision.io.images import load_image
    from fewvision.modelfile import load, save_model
    from fewvision.runtime.engines import cpu_has_bf16, installed
    from fewvision.runtime.model import predict
    from fewvision.tasks.anomaly import _settings, fit_anomaly
    from fewvision.tasks.fewshot import feature_kind, fit

    data = textile()
    by_class = {c: sorted(it.path for it in data.items if it.label == c) for c in data.class_names}
    nominal, local = by_class["nominal"], by_class["local"]
    test = [p for c in data.class_names for p in by_class[c][100:150]]
    rates = fp32_peak()
    print("fp32 4096^2 matrix product: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()),
          flush=True)
    bf16 = installed("openvino") and cpu_has_bf16()
    speed_rows, accuracy_rows, light_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="fv-runtime-") as tmp:
        tmp = Path(tmp)
        packs = {}
        for label, task, method, spec, batch in MODELS:
            fvm, fp32 = tmp / f"{method}-{spec.split(':')[1].split('@')[0]}.fvm", None
            if task == "classification":
                model = fit("textile", method, backbone=spec, shots=4, use_cache=False)
            else:
                model = fit_anomaly(nominal[:20], method=method, backbone=spec, use_cache=False,
                                    **PARAMS.get((method, spec), {}))
            save_model(fvm, model)
            fp32 = fvm.with_suffix(".onnx")
            export_onnx(fvm, fp32)
            model = load(fvm)
            bb = model.backbone()
            paths = (nominal[100:] if task == "classification" else nominal[100:108] + local[:8])[: N_IMAGES[task]]
            pixels = torch.stack([bb.preprocess(load_image(p)) for p in paths])
            batches = list(pixels.split(batch))
            if task == "classification":
                graph = ClassifierGraph(bb, model.head, feature_kind(model.head)).eval()
            else:
                size, sigma = _settings(model, bb)
                graph = AnomalyGraph(bb, model.head, size, sigma).eval()
            flops = flops_per_image(graph, pixels)

            def eager(x):
                with torch.inference_mode():
                    graph(x)

            check = Dataset("speed", [Item(p, "nominal" if p in nominal else "local") for p in paths],
                            ["local", "nominal"], "manifest")
            if task == "classification":
                check = Dataset("textile-test", [Item(p, it_label) for p, it_label in
                                                 ((p, c) for c in data.class_names for p in by_class[c][100:150])],
                                list(data.class_names), "manifest")
            int8_file = fvm.with_name(fvm.stem + "-int8.onnx")
            quantize_int8(fp32, int8_file, check, force=True)
            engines = {"onnxruntime fp32": load_onnx(fp32), "onnxruntime int8": load_onnx(int8_file)}
            if installed("openvino"):
                engines["openvino fp32"] = load_onnx(fp32, engine="openvino")
                if bf16:
                    engines["openvino bf16"] = load_onnx(fp32, engine="openvino", precision="bf16")
                engines["openvino int8"] = load_onnx(int8_file, engine="openvino")
            runners = {"torch eager fp32": eager}
            runners.update({name: (lambda x, r=runtime: r.run(x.numpy())) for name, runtime in engines.items()})
            seconds = _time_side_by_side(runners, batches)
            base = seconds["torch eager fp32"]
            for name, times in seconds.items():
                rate = len(paths) / statistics.median(times)
                ratios = sorted(b / t for b, t in zip(base, times))
                spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
                speed_rows.append([label, name, batch, rate, statistics.median(ratios), spread, rate * flops])
                print(f"{label:34s} {name:18s} {rate:7.1f} images/s  {statistics.median(ratios):.2f}x "
                      f"({spread})  {rate * flops / 1e9:.0f} GFLOP/s", flush=True)
            if task == "classification":
                reference = _accuracy(predict(engines["onnxruntime fp32"], test), test, data)
                for name, runtime in engines.items():
                    if name != "onnxruntime fp32":
                        value = _accuracy(predict(runtime, test), test, data)
                        accuracy_rows.append([label, name, len(test), reference, value, reference - value])
                        print(f"{label}: {name} accuracy {value:.4f} vs fp32 {reference:.4f}", flush=True)
            packs[method + "-" + spec] = (fvm, paths[0])

        # measured again after the engines: on a machine shared with busy neighbours one measurement can come low
        for engine, rate in fp32_peak().items():
            rates[engine] = max(rates[engine], rate)
        peak = max(rates.values())
        for row in speed_rows:
            row[-1] = f"{100 * row[-1] / peak:.0f}%"
        print("fp32 peak (best of both measurements): " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in
                                                                    rates.items()), flush=True)

        if not args.skip_light:
            python = light_install(tmp)
            env = dict(os.environ, FEWVISION_CACHE_DIR=str(tmp / "line-pc-cache"))
            light_rows.append(["light (`pip install .`)", du_mb(tmp / "light")])
            light_rows.append(["full (`.venv`: `pip install -e .[full,dev]`)", du_mb(ROOT / ".venv")])
            start_rows = []
            for key, command in (("prototype-openclip:ViT-B-32@random", ["predict"]),
                                 ("patchcore-timm:resnet18@random", ["anomaly", "predict"])):
                fvm, image = packs[key]
                pack = pack_model(fvm, fvm.with_suffix(".fvz"))
                assert "graph/fp32.onnx" in pack["files"]
                seconds = first_verdict(python, [*command, str(fvm.with_suffix(".fvz")), image, "-o",
                                                 str(tmp / "one.csv")], env)
                start_rows.append([key.split("@")[0], f"{seconds:.2f} s"])
                print(f"first verdict, {key}: {seconds:.2f} s", flush=True)

    md = [
        "## The line PC's runtime: engines, precisions, light install (`benchmarks/runtime_engines.py`)",
        "",
        "Images/s of each exported graph's forward pass on the same textile images (random backbone weights; "
        "classification in batches of 16, anomaly graphs one image at a time), torch eager running the very "
        "module that was exported; the engines take turns, 5 rounds of a pass over the images each: images/s "
        "from the median pass, 'vs torch eager' the median of the 5 rounds' ratios (the same round's passes), "
        "with the lowest and highest; share of this CPU's fp32 peak, taken as the best rate of a 4096 x 4096 fp32 "
        "matrix product here, measured before and after the engines ("
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items()) + " GFLOP/s: "
        f"{peak / 1e9:.0f}), from the floating-point operations per image that torch's FlopCounterMode counts in "
        "the module (matrix products and convolutions, with nn.MultiheadAttention's fused fast path off, whose "
        "kernel it cannot see into; reduced precisions against the same fp32 peak, so above "
        "100% is possible). `--engine auto` runs, of what the pack recorded, the gated reduced precision, else the "
        "fastest fp32 engine.",
        "",
        table(["model", "engine", "batch", "images/s", "vs torch eager", "range over rounds",
               "share of fp32 peak"], speed_rows),
        "",
        "Accuracy of the reduced precisions against fp32 (onnxruntime), ViT-B-32 prototype on 150 textile test "
        "images - the gate `fewvision pack --precision` applies on the user's own images (random weights: this "
        "measures what the precision changes, not a real model's accuracy):",
        "",
        table(["model", "engine", "images", "fp32 accuracy", "accuracy", "drop"], accuracy_rows),
    ]
    if light_rows:
        md += ["", "Install size (`du` of the virtual environment) and a new process's time to its first verdict "
               "on one image with the light install (`fewvision predict PACK.fvz ONE.jpg`, best of 3 after the "
               "first run unpacked the archive):", "", table(["install", "MB"], light_rows), "",
               table(["packed model", "first verdict"], start_rows)]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        write_section("runtime_engines", text)


def _accuracy(preds, paths, data) -> float:
    truth = {it.path: it.label for it in data.items}
    rows = {r["path"]: r for r in preds.rows}
    return sum(rows[p]["top_label"] == truth[p] for p in paths) / len(paths)


if __name__ == "__main__":
    main()
