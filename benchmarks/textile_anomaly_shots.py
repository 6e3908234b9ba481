"""Every anomaly method on the textile images at 1, 4 and 16 good images, and MuSc with none.

    .venv/bin/python benchmarks/textile_anomaly_shots.py [--no-write]

Backbone ``texture`` (weight-free; the only one with real features on this offline machine). Each head is fitted
with its default parameters on the first K nominal images (sorted) and scores the same test set: nominal [600:650],
local [0:50], global [0:50]; image AUROC good vs local and good vs global. MuSc scores the 150 test images as one
batch with no good images at all. Heads that need weights this machine cannot have (STPM's pretrained teacher,
WinCLIP's CLIP) are listed as not measured. Fit time is the head on precomputed inputs (features or pixels); score
time is the head plus the one post-processing path (``postprocess.finish``) for the 150 test images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _report import table, write_section  # noqa: E402

from fewvision.anomaly import create_anomaly_head  # noqa: E402
from fewvision.anomaly.musc import MuSc  # noqa: E402
from fewvision.anomaly.postprocess import finish  # noqa: E402
from fewvision.backbones import create_backbone  # noqa: E402
from fewvision.io.datasets import textile_root  # noqa: E402
from fewvision.io.images import load_image  # noqa: E402

SHOTS = (1, 4, 16)
METHODS = ("patchcore", "padim", "anomalydino", "ae", "vae", "ganomaly")
NOT_HERE = {"stpm": "needs a pretrained timm CNN teacher (no weights offline)",
            "winclip": "needs CLIP weights (none offline); zero-shot and few-shot alike"}
N_TEST = 50


def main() -> None:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bb = create_backbone("texture")
    root = textile_root()
    files = {c: sorted((root / c).glob("*.jpg")) for c in ("nominal", "local", "global")}
    pixels = lambda ps: torch.stack([bb.preprocess(load_image(p)) for p in ps])  # noqa: E731
    test_paths = files["nominal"][600 : 600 + N_TEST] + files["local"][:N_TEST] + files["global"][:N_TEST]
    kind = np.array([0] * N_TEST + [1] * N_TEST + [2] * N_TEST)
    test_px = pixels(test_paths)
    with torch.inference_mode():
        test_patch = bb.patch_features(test_px)
    fit_px = pixels(files["nominal"][: max(SHOTS)])
    with torch.inference_mode():
        fit_patch = bb.patch_features(fit_px)
    size = tuple(bb.input_size)

    def aurocs(scores: np.ndarray) -> tuple[float, float]:
        out = []
        for defect in (1, 2):
            keep = (kind == 0) | (kind == defect)
            out.append(float(roc_auc_score(kind[keep] == defect, scores[keep])))
        return out[0], out[1]

    rows = []
    for method in METHODS:
        for k in SHOTS:
            head = create_anomaly_head(method)
            uses_patches = head.inputs == "patches"
            fit_in, test_in = (fit_patch[:k], test_patch) if uses_patches else (fit_px[:k], test_px)
            try:
                t0 = time.perf_counter()
                head.fit(fit_in, bb)
                fit_s = time.perf_counter() - t0
            except ValueError as err:
                rows.append([method, k, "-", "-", "-", "-", f"not run: {err}"])
                print(method, k, "not run:", err, flush=True)
                continue
            t0 = time.perf_counter()
            with torch.inference_mode():
                raw, s = head.score(test_in, bb)
                _, scores = finish(head, raw, s, size)
            score_s = time.perf_counter() - t0
            local, glob = aurocs(scores.numpy())
            rows.append([method, k, local, glob, f"{fit_s:.2f}", f"{score_s:.2f}", ""])
            print(method, k, round(local, 4), round(glob, 4), round(fit_s, 2), round(score_s, 2), flush=True)
    with torch.inference_mode():
        feats = bb.encode_images(test_px)
    t0 = time.perf_counter()
    _, scores = MuSc().score([test_patch], feats, bb)
    musc_s = time.perf_counter() - t0
    local, glob = aurocs(scores.numpy())
    rows.append(["musc (zero-shot: the 150 test images score each other)", 0, local, glob, "-", f"{musc_s:.2f}", ""])
    print("musc", round(local, 4), round(glob, 4), round(musc_s, 1), flush=True)
    for method, why in NOT_HERE.items():
        rows.append([method, "-", "-", "-", "-", "-", f"not measured: {why}"])

    md = ("## Anomaly methods at 1, 4 and 16 good images, and zero-shot (`benchmarks/textile_anomaly_shots.py`)\n\n"
          "Backbone `texture` (weight-free). Each head, default parameters, is fitted on the first K nominal textile "
          f"images (sorted) and scores nominal [600:{600 + N_TEST}] against local [0:{N_TEST}] and global "
          f"[0:{N_TEST}]; image AUROC. MuSc gets the same {3 * N_TEST} test images as one unlabelled batch (a third "
          "of them good) and no good images at all. Fit: the head on precomputed inputs (patch features or "
          f"pixels); score: the head and `postprocess.finish` for the {3 * N_TEST} test images. AnomalyDINO rotates "
          "its good images (8 angles) up to 16 of them, so its K = 16 bank holds 128 images' patches.\n\n"
          + table(["method", "good images K", "AUROC good vs local", "AUROC good vs global", "fit s", "score s",
                   "note"], rows))
    print(md)
    if not args.no_write:
        write_section("textile_anomaly_shots", md)


if __name__ == "__main__":
    main()
