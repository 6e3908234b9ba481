"""Few-shot classification with and without the good images (`fewvision fit ... --good GOOD_DIR`).

    .venv/bin/python benchmarks/good_images.py [--no-write]

Textile (nominal / local / global), backbone ``texture``. The anomaly model (``padim``, the ``--good-method``
default, and ``anomalydino``) is fitted with ``fit_anomaly`` on the first 200 nominal images. Support images are
drawn per seed (5 seeds) from a pool of images [200:300] of each class; the test set is nominal [600:700], local and
global [0:100]. The with-good features of pool and test images are computed once per anomaly model by
``WithGoodImages.features_of`` - the function its fit and predict call - and each head is fitted on the global
block alone (without ``--good``) or on all of it (with); balanced accuracy, mean over seeds.
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

from fewvision.backbones import create_backbone  # noqa: E402
from fewvision.heads import create_head  # noqa: E402
from fewvision.heads.support import Support  # noqa: E402
from fewvision.heads.with_good import N_STATS, WithGoodImages  # noqa: E402
from fewvision.io.datasets import textile_root  # noqa: E402
from fewvision.io.images import load_image  # noqa: E402
from fewvision.tasks.anomaly import fit_anomaly  # noqa: E402

SHOTS = (1, 2, 4, 8, 16)
HEADS = ("prototype", "linear")
GOOD_METHODS = ("padim", "anomalydino")
CLASSES = ["nominal", "local", "global"]
SEEDS = 5


def main() -> None:
    from sklearn.metrics import balanced_accuracy_score

    ap = argparse.ArgumentParser()
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    bb = create_backbone("texture")
    root = textile_root()
    files = {c: sorted((root / c).glob("*.jpg")) for c in CLASSES}
    good = [str(p) for p in files["nominal"][:200]]
    pool = [p for c in CLASSES for p in files[c][200:300]]
    y_pool = np.repeat(np.arange(3), 100)
    test = files["nominal"][600:700] + files["local"][:100] + files["global"][:100]
    y_test = np.repeat(np.arange(3), 100)
    d = bb.encode_images(torch.zeros(1, 3, *bb.input_size)).shape[1]

    results, timing = {}, []
    for gm in GOOD_METHODS:
        t0 = time.perf_counter()
        model = fit_anomaly(good, gm, bb, target_false_reject=0.05)
        fit_s = time.perf_counter() - t0
        wrapper = WithGoodImages(create_head("prototype"), model.head, model.decision)

        def features(paths):
            return torch.cat([wrapper.features_of(bb, torch.stack([bb.preprocess(load_image(p))
                                                                   for p in paths[i : i + 32]]))
                              for i in range(0, len(paths), 32)])

        t0 = time.perf_counter()
        f_pool, f_test = features(pool), features(test)
        per_image_ms = 1000 * (time.perf_counter() - t0) / (len(pool) + len(test))
        timing.append([gm, f"{fit_s:.1f}", f"{per_image_ms:.0f}", f_pool.shape[1]])
        for head in HEADS:
            for k in SHOTS:
                acc = {"plain": [], "good": []}
                for seed in range(SEEDS):
                    rng = np.random.default_rng(seed)
                    idx = np.concatenate([rng.choice(np.where(y_pool == c)[0], k, replace=False) for c in range(3)])
                    for name, cols in (("plain", slice(0, d)), ("good", slice(None))):
                        h = create_head(head).fit(Support(f_pool[idx][:, cols], torch.as_tensor(y_pool[idx]),
                                                          CLASSES))
                        acc[name].append(balanced_accuracy_score(y_test, h.predict(f_test[:, cols])))
                results[(gm, head, k)] = {n: (float(np.mean(v)), float(np.std(v, ddof=1))) for n, v in acc.items()}
                print(gm, head, k, results[(gm, head, k)], flush=True)

    rows = []
    for head in HEADS:
        for k in SHOTS:
            plain = results[(GOOD_METHODS[0], head, k)]["plain"]
            row = [head, k, f"{plain[0]:.3f} ± {plain[1]:.3f}"]
            for gm in GOOD_METHODS:
                g = results[(gm, head, k)]["good"]
                row += [f"{g[0]:.3f} ± {g[1]:.3f}", f"{g[0] - plain[0]:+.3f}"]
            rows.append(row)
    md = ("## Few-shot classification with the good images (`benchmarks/good_images.py`)\n\n"
          "`fewvision fit textile --good GOOD_DIR`: backbone `texture`; the anomaly model is fitted on the first 200 "
          "nominal images; k support images per class are drawn per seed (5 seeds) from images [200:300] of each "
          "class; test: nominal [600:700], local and global [0:100]. Balanced accuracy, mean ± standard deviation "
          f"over seeds. With `--good` each image has {d} global dimensions, {N_STATS} map statistics and the "
          "map-weighted pooled patch features (`heads/with_good.py`).\n\n"
          + table(["head", "shots", "without --good"] + [c for gm in GOOD_METHODS
                                                            for c in (f"with --good ({gm})", "gain")], rows)
          + "\n\nCost of the good-image features:\n\n"
          + table(["--good-method", "anomaly fit on 200 good images, s", "features ms per image", "dimensions"],
                  timing))
    print(md)
    if not args.no_write:
        write_section("good_images", md)


if __name__ == "__main__":
    main()
