"""AnomalyDINO and GANomaly: fewvision against anomalib on identical weights and images.

    .venv/bin/python benchmarks/anomalib_parity_fewshot.py [--anomalib-python /tmp/venv-anomalib/bin/python]

anomalib (2.7.0, its own virtual environment, never a fewvision dependency) runs in a subprocess of that
environment's Python, driven through its torch models.

* AnomalyDINO: timm ``vit_small_patch14_dinov2`` with seeded random weights saved once to a safetensors file and
  loaded by both (fewvision ``timm:vit_small_patch14_dinov2@FILE``; anomalib's ``AnomalyDINOModel`` with the file
  loaded into its timm encoder), the same timm preprocessing (518 px) of the same images: 16 good textile images to
  fit (the paper's few-shot regime), 50 good + 50 local + 50 global to test. Rotations off on both sides (anomalib
  has none); fewvision's default for 16 images (8 rotations) is reported as a further row.
* GANomaly: training is stochastic in both libraries, so parity is checked on one set of trained weights: fewvision
  trains its GANomaly (defaults: 64 px, 600 updates) on 200 good images; the generator's weights go into anomalib's
  ``GanomalyModel`` (same layer shapes, parameters mapped in order) and both score the same prepared test tensors
  with the latent mean squared difference (anomalib's score; fewvision ``score_norm="l2"``). anomalib's first
  encoder convolution pads by 4 pixels where the official GANomaly code pads by 1; the comparison is made both as
  anomalib ships and with that padding set to 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_ANOMALIB_PYTHON = "/tmp/venv-anomalib/bin/python"
DINO = "vit_small_patch14_dinov2"
N_FIT_DINO, N_FIT_GAN, N_TEST = 16, 200, 50


def _aurocs(scores, labels) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    out = {}
    for name in ("local", "global"):
        sel = [i for i, lab in enumerate(labels) if lab in ("nominal", name)]
        out[name] = float(roc_auc_score([labels[i] == name for i in sel], [scores[i] for i in sel]))
    return out


# --- workers -------------------------------------------------------------------------------------------------
def fewvision_dino(job: dict) -> dict:
    from fewvision.backbones import create_backbone
    from fewvision.tasks.anomaly import fit_anomaly, score_files

    bb = create_backbone(f"timm:{DINO}@{job['weights']}")
    out = {}
    for name, rotate in (("no rotations", False), ("default (8 rotations)", None)):
        t0 = time.perf_counter()
        model = fit_anomaly(job["train"], "anomalydino", bb, target_false_reject=0.1, use_cache=False, rotate=rotate)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = score_files(model, job["test"], use_cache=False, keep_maps=False)
        by_path = {r["path"]: r["score"] for r in res.rows}
        out[name] = {"fit_s": fit_s, "predict_s": time.perf_counter() - t0,
                     "scores": [by_path[p] for p in job["test"]]}
    return out


def anomalib_dino(job: dict) -> dict:
    import timm
    import torch
    from PIL import Image, ImageOps
    from safetensors.torch import load_file

    real_create = timm.create_model
    timm.create_model = lambda *a, **k: real_create(*a, **{**k, "pretrained": False})  # no download: our file
    from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel

    model = AnomalyDINOModel(encoder_name=DINO, masking=False)
    encoder = model.feature_encoder.feature_extractor
    missing = encoder.load_state_dict(load_file(job["weights"]), strict=False).missing_keys
    if missing:
        raise RuntimeError(f"anomalib encoder: weights missing for {missing}")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder))

    def batches(paths):
        for start in range(0, len(paths), 16):
            ims = []
            for p in paths[start : start + 16]:
                with Image.open(p) as im:
                    ims.append(transform(ImageOps.exif_transpose(im).convert("RGB")))
            yield torch.stack(ims)

    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for x in batches(job["train"]):
            model(x)
    model.fit()
    fit_s = time.perf_counter() - t0
    model.eval()
    scores = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for x in batches(job["test"]):
            scores += model(x).pred_score.reshape(-1).tolist()
    return {"fit_s": fit_s, "predict_s": time.perf_counter() - t0, "scores": scores}


def fewvision_gan(job: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    from fewvision.anomaly.ganomaly import GANomaly
    from fewvision.backbones import create_backbone
    from fewvision.io.images import load_image

    bb = create_backbone("texture")  # only its preprocessing: GANomaly reads pixels
    load = lambda ps: torch.stack([bb.preprocess(load_image(p)) for p in ps])  # noqa: E731
    t0 = time.perf_counter()
    head = GANomaly(score_norm="l2").fit(load(job["train"]))
    fit_s = time.perf_counter() - t0
    test = load(job["test"])
    t0 = time.perf_counter()
    scores = head.score(test)[1]
    predict_s = time.perf_counter() - t0
    # numbered: safetensors returns tensors sorted by name, and the mapping onto anomalib's layers goes by order
    state = head._generator.state_dict().items()
    tensors = {f"generator.{i:03d}.{k}": v.contiguous() for i, (k, v) in enumerate(state)}
    tensors["prepared_test"] = head._prepare(test).contiguous()
    save_file(tensors, job["tensors"])
    return {"fit_s": fit_s, "predict_s": predict_s, "scores": scores.tolist(),
            "contextual_l1": [round(h["con"], 4) for h in head.loss_history_[:: max(1, len(head.loss_history_) // 5)]]}


def anomalib_gan(job: dict) -> dict:
    import torch
    from anomalib.models.image.ganomaly.torch_model import GanomalyModel
    from safetensors.torch import load_file

    tensors = load_file(job["tensors"])
    x = tensors.pop("prepared_test")
    ours = [tensors[k] for k in sorted(tensors) if k.startswith("generator.")]
    out = {}
    for name, padding in (("as shipped (first conv padding 4)", None), ("first conv padding 1 (official)", 1)):
        model = GanomalyModel(input_size=(64, 64), num_input_channels=3, n_features=64, latent_vec_size=100)
        theirs = model.generator.state_dict()
        if [tuple(v.shape) for v in theirs.values()] != [tuple(v.shape) for v in ours]:
            raise RuntimeError("anomalib's generator has other layer shapes")
        model.generator.load_state_dict(dict(zip(theirs, ours)))
        if padding is not None:
            for enc in (model.generator.encoder1, model.generator.encoder2):
                enc.input_layers[0].padding = (padding, padding)
        model.eval()
        with torch.no_grad():
            out[name] = model(x).pred_score.reshape(-1).tolist()
    return out


WORKERS = {"fewvision-dino": fewvision_dino, "anomalib-dino": anomalib_dino, "fewvision-gan": fewvision_gan,
           "anomalib-gan": anomalib_gan}


def _run(python: str, worker: str, job: dict, workdir: Path) -> dict:
    job_file, out_file = workdir / f"{worker}.json", workdir / f"{worker}.out.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", worker, str(job_file), str(out_file)],
                          env=dict(os.environ), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out_file.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anomalib-python", default=DEFAULT_ANOMALIB_PYTHON)
    ap.add_argument("--worker", nargs=3, metavar=("NAME", "JOB", "OUT"))
    ap.add_argument("--no-write", action="store_true", help="print, do not write docs/benchmarks.md")
    args = ap.parse_args()
    if args.worker:
        name, job_file, out_file = args.worker
        Path(out_file).write_text(json.dumps(WORKERS[name](json.loads(Path(job_file).read_text()))))
        return

    sys.path.insert(0, str(HERE))
    import numpy as np
    import timm
    import torch
    from _report import table, write_section
    from anomalib_parity import anomalib_status
    from safetensors.torch import save_file

    from fewvision.io.datasets import textile

    title = "## AnomalyDINO and GANomaly vs anomalib (`benchmarks/anomalib_parity_fewshot.py`)\n\n"
    status = anomalib_status(args.anomalib_python)
    if status is not None:
        print(status)
        if not args.no_write:
            write_section("anomalib_parity_fewshot", title + f"**Not measured**: {status}.")
        return
    version = subprocess.run([args.anomalib_python, "-c", "import anomalib; print(anomalib.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    data = textile()
    by = {c: sorted(it.path for it in data.items if it.label == c) for c in ("nominal", "local", "global")}
    test = by["nominal"][600 : 600 + N_TEST] + by["local"][:N_TEST] + by["global"][:N_TEST]
    labels = ["nominal"] * N_TEST + ["local"] * N_TEST + ["global"] * N_TEST

    with tempfile.TemporaryDirectory(prefix="fv-parity-") as tmp:
        work = Path(tmp)
        weights = work / "dinov2-s-random-seed0.safetensors"
        torch.manual_seed(0)
        net = timm.create_model(DINO, pretrained=False)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        dino_job = {"weights": str(weights), "train": by["nominal"][:N_FIT_DINO], "test": test}
        fv_dino = _run(sys.executable, "fewvision-dino", dino_job, work)
        an_dino = _run(args.anomalib_python, "anomalib-dino", dino_job, work)
        gan_job = {"train": by["nominal"][:N_FIT_GAN], "test": test, "tensors": str(work / "gan.safetensors")}
        fv_gan = _run(sys.executable, "fewvision-gan", gan_job, work)
        an_gan = _run(args.anomalib_python, "anomalib-gan", gan_job, work)

    def compare(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)), float(np.corrcoef(a, b)[0, 1])

    rows = []
    an_auc = _aurocs(an_dino["scores"], labels)
    for name, r in fv_dino.items():
        auc = _aurocs(r["scores"], labels)
        rel, corr = compare(r["scores"], an_dino["scores"])
        rows.append([f"anomalydino, fewvision {name}", auc["local"], auc["global"], an_auc["local"], an_auc["global"],
                     f"{rel:.2e}", f"{corr:.6f}", f"{r['fit_s']:.1f} / {an_dino['fit_s']:.1f}",
                     f"{r['predict_s']:.1f} / {an_dino['predict_s']:.1f}"])
    fv_auc = _aurocs(fv_gan["scores"], labels)
    for name, scores in an_gan.items():
        auc = _aurocs(scores, labels)
        rel, corr = compare(fv_gan["scores"], scores)
        rows.append([f"ganomaly, anomalib {name}", fv_auc["local"], fv_auc["global"], auc["local"], auc["global"],
                     f"{rel:.2e}", f"{corr:.6f}", f"{fv_gan['fit_s']:.1f} / -", "-"])
    md = (title
          + f"anomalib {version} in its own virtual environment, through its torch models; fewvision through "
          "`fit_anomaly` / `score_files` (AnomalyDINO, feature cache off) and the head (GANomaly). Same weights, same "
          f"images: AnomalyDINO fits {N_FIT_DINO} good textile images with a seeded random `{DINO}` (518 px, the "
          f"same weights file on both sides); GANomaly is trained once by fewvision on {N_FIT_GAN} good images "
          "(64 px, 600 updates) and its generator's weights are loaded into anomalib's `GanomalyModel`. Test: "
          f"{N_TEST} good + {N_TEST} local + {N_TEST} global images. Random ViT weights make AnomalyDINO's absolute "
          "AUROC meaningless - the point is agreement. Max relative difference: the largest absolute difference of "
          "the image scores over the largest anomalib score.\n\n"
          + table(["comparison", "fewvision AUROC local", "fewvision AUROC global", "anomalib AUROC local",
                   "anomalib AUROC global", "max relative score difference", "score correlation",
                   "fit s fewvision / anomalib", "score s fewvision / anomalib"], rows)
          + "\n\nGANomaly's contextual L1 loss during fewvision's training: "
          + " -> ".join(str(v) for v in fv_gan["contextual_l1"])
          + ". AnomalyDINO fit time on fewvision's side includes leave-one-out scoring of the 16 good images for "
          "its threshold. anomalib's GANomaly as shipped pads its first convolution by 4 pixels (the official code "
          "and fewvision by 1), so the same weights score differently there; with that padding set to 1 the two "
          "networks are the same computation.")
    print(md)
    if not args.no_write:
        write_section("anomalib_parity_fewshot", md)


if __name__ == "__main__":
    main()
