"""Inspection service speed: single-image predict latency against the bare encoder, batch throughput against the CLI.

A ViT-B-32 weights file (open_clip's architecture, seeded random weights: speed does not depend on the values) backs
a classification project (prototype head, 4 exemplars per textile class) in a ``fewvision serve`` process on
loopback. Every timed image is one the service has not seen (so the feature cache cannot answer):

* latency: ``POST /predict`` of one image at a time, p50 / p95 over ``--requests`` requests, against the bare
  encoder forward on the same images in this process (PIL decode, open_clip preprocessing, ``encode_image`` of a batch
  of one), the two timed alternately image by image - goal p95 <= 1.2x;
* throughput: ``POST /predict-batch`` with 32 images per request over ``--images`` images, against
  ``fewvision classify`` (a new process, cold feature cache) on the same number of other images - goal >= 0.9x.

Usage: .venv/bin/python benchmarks/service_speed.py [--requests 200] [--images 128]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _report import percentile, table, write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--images", type=int, default=128)
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)

    import httpx
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from service_helpers import Server

    from fewvision.io.datasets import textile_root

    root = textile_root()
    images = {c: sorted((root / c).glob("*.jpg")) for c in ("nominal", "local", "global")}
    pool = images["nominal"][100:] + images["local"][100:] + images["global"][100:]
    work = Path(tempfile.mkdtemp(prefix="service-speed-"))
    try:
        weights = work / f"{args.model}.safetensors"
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(args.model)
        model.eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        spec = f"openclip:{args.model}@{weights}"

        server = Server(work / "data")
        server.data_dir.mkdir(parents=True)
        token = server.token("--name", "bench")
        server.start()
        h = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=server.url, headers=h, timeout=600) as c:
            classes = [{"name": n, "description": ""} for n in ("nominal", "local", "global")]
            p = c.post("/v1/projects", json={"name": "speed", "task": "classification", "backbone": spec,
                                             "method": "prototype", "classes": classes}).json()
            for cls, paths in images.items():
                for path in paths[:4]:
                    c.post(f"/v1/projects/{p['id']}/exemplars", files={"file": (path.name, path.read_bytes())},
                           data={"label": cls})
            job = c.post(f"/v1/projects/{p['id']}/fit").json()
            while c.get(f"/v1/jobs/{job['job_id']}").json()["state"] not in ("done", "failed"):
                time.sleep(0.2)
            # warm-up: the server's first request loads the model
            c.post(f"/v1/projects/{p['id']}/predict", files={"file": ("w.jpg", images["nominal"][50].read_bytes())})

            # Side by side, image by image: the bare forward first, then the same image through the service, so
            # whatever else the machine does at that moment falls on both.
            single = pool[: args.requests]
            service_ms, bare_ms = [], []
            for path in single:
                data = path.read_bytes()
                t0 = time.perf_counter()
                with torch.inference_mode():
                    model.encode_image(preprocess(Image.open(path).convert("RGB"))[None])
                bare_ms.append(1000 * (time.perf_counter() - t0))
                t0 = time.perf_counter()
                r = c.post(f"/v1/projects/{p['id']}/predict", files={"file": (path.name, data)})
                service_ms.append(1000 * (time.perf_counter() - t0))
                assert r.status_code == 200, r.text

            batch = pool[args.requests : args.requests + args.images]
            t0 = time.perf_counter()
            for start in range(0, len(batch), 32):
                files = [("files", (q.name, q.read_bytes())) for q in batch[start : start + 32]]
                r = c.post(f"/v1/projects/{p['id']}/predict-batch", files=files)
                assert r.status_code == 200, r.text
            service_rate = len(batch) / (time.perf_counter() - t0)
        server.stop()

        cli_images = work / "cli"
        cli_images.mkdir()
        for q in pool[args.requests + args.images : args.requests + 2 * args.images]:
            shutil.copy(q, cli_images / q.name)
        env = dict(os.environ, FEWVISION_CACHE_DIR=str(work / "cli-cache"))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fewvision.cli", "classify", str(cli_images), "--classes",
                        "nominal,local,global", "--backbone", spec, "-o", str(work / "cli.csv")], env=env, check=True,
                       capture_output=True)
        cli_rate = args.images / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    p50, p95 = percentile(service_ms, 0.5), percentile(service_ms, 0.95)
    b50, b95 = percentile(bare_ms, 0.5), percentile(bare_ms, 0.95)
    rows = [["service POST /predict (one image, HTTP, upload checks, cache, audit row)", f"{p50:.0f}", f"{p95:.0f}"],
            ["bare encoder forward (decode, preprocess, encode_image)", f"{b50:.0f}", f"{b95:.0f}"]]
    ratio, throughput = p95 / b95, service_rate / cli_rate
    md = (
        "## Inspection service speed (`benchmarks/service_speed.py`)\n\n"
        f"`fewvision serve` on loopback, a prototype project on `openclip:{args.model}@FILE` (seeded random "
        f"weights), {args.requests} single-image requests and {args.images} images through the batch endpoint "
        "(32 per request), every image new to the service.\n\n"
        + table(["path", "p50 ms", "p95 ms"], rows)
        + f"\n\n- p95 latency, service / bare encoder: **{ratio:.2f}x** (goal <= 1.2x)\n"
        f"- throughput, predict-batch / `fewvision classify` (a new process, cold cache): {service_rate:.1f} / "
        f"{cli_rate:.1f} images/s = **{throughput:.2f}x** (goal >= 0.9x)\n"
    )
    write_section("service_speed", md)
    print(md)


if __name__ == "__main__":
    main()
