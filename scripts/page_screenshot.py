"""Screenshots of the review page for the docs: runs the page's browser tests (a real service, Debian's chromium),
which write their screenshots under pytest's temp root, and copies them into docs/images/.

Usage: .venv/bin/python scripts/page_screenshot.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = {"page-threshold.png": "service-threshold.png", "page-inspect.png": "service-inspect.png",
         "page-review.png": "service-review.png", "page-monitor.png": "service-monitor.png"}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="fv-page-shots-") as tmp:
        basetemp = Path(tmp) / "pytest"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
                        "tests/test_service_page.py"], cwd=ROOT, check=True)
        found = {p.name: p for p in basetemp.glob("artifacts*/*.png")}
        missing = sorted(set(SHOTS) - set(found))
        if missing:
            sys.exit(f"the page tests wrote no {', '.join(missing)} under {basetemp}")
        for name, target in SHOTS.items():
            shutil.copyfile(found[name], ROOT / "docs" / "images" / target)
            print(f"docs/images/{target}")


if __name__ == "__main__":
    main()
