"""Screenshots of every report kind for docs/reports.md, made from real runs on the textile images.

Runs the commands a user runs (``fewvision eval``, ``predict``, ``anomaly eval``, ``anomaly predict``) with the
weight-free ``texture`` backbone into a temp folder, then renders each HTML report with headless Chromium (Debian's
``chromium``) and copies one heat-map file. Writes ``docs/images/*.png``.

Usage: .venv/bin/python scripts/report_screenshots.py [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "images"
FEWVISION = [sys.executable, "-m", "fewvision.cli"]


def fewvision(*args) -> None:
    subprocess.run([*FEWVISION, *map(str, args)], check=True)


def screenshot(chromium: str, page: Path, png: Path, height: int = 1600) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                    f"--user-data-dir={page.parent / '.chromium'}", f"--window-size=1280,{height}",
                    f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from anomaly_data import build_mvtec  # tests/anomaly_data.py: textile images with pasted scratches and spots

    from fewvision.io.datasets import textile_root

    root = textile_root()
    DOCS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fv-screens-") as tmp:
        work = Path(tmp)
        data = work / "textile"
        for cls in ("nominal", "local", "global"):
            (data / cls).mkdir(parents=True)
            for p in sorted((root / cls).glob("*.jpg"))[:40]:
                shutil.copy(p, data / cls / p.name)
        model = work / "proto.fvm"
        fewvision("fit", data, "--method", "prototype", "--shots", 8, "--backbone", "texture",
                  "--calibrate-fraction", 0.3, "--alpha", 0.1, "-o", model)
        fewvision("eval", model, data, "-o", work / "m.json", "--report", work / "eval")
        fewvision("predict", model, data / "local", "--abstain", "-o", work / "p.csv", "--report", work / "predict")
        nominal = sorted((root / "nominal").glob("*.jpg"))[300:]
        mvtec = build_mvtec(work / "mvtec" / "textile", nominal, n_train=60, n_test_good=12, n_per_defect=8, seed=3)
        anomaly = work / "anomaly.fvm"
        fewvision("anomaly", "fit", mvtec, "--backbone", "texture", "--target-false-reject", 0.05, "-o", anomaly)
        fewvision("anomaly", "eval", anomaly, mvtec, "-o", work / "a.json", "--report", work / "anomaly-eval")
        today = work / "today"
        shutil.copytree(mvtec / "test", today)
        subprocess.run([*FEWVISION, "anomaly", "predict", anomaly, today, "-o", work / "a.csv", "--heatmaps",
                        work / "heat", "--report", work / "anomaly-predict"], check=False)
        for name in ("eval", "predict", "anomaly-eval", "anomaly-predict"):
            screenshot(args.chromium, work / name / "report.html", DOCS / f"report-{name}.png")
        import csv

        rows = [r for r in csv.DictReader((work / "a.csv").open()) if r["heatmap"]]
        shutil.copy(max(rows, key=lambda r: float(r["score"]))["heatmap"], DOCS / "heatmap.png")
    print(f"wrote {', '.join(sorted(p.name for p in DOCS.glob('*.png')))} in {DOCS}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    main()
