"""Screenshots of the review page for the README: runs the page's browser tests (a real service, Debian's chromium)
and copies the screenshots they take into docs/images/.

Usage: .venv/bin/python scripts/page_screenshot.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHOTS = {"page-threshold.png": "service-threshold.png", "page-inspect.png": "service-inspect.png",
         "page-review.png": "service-review.png"}


def main() -> None:
    artifacts = ROOT / "tests" / "artifacts"
    for name in SHOTS:
        (artifacts / name).unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "tests/test_service_page.py"], cwd=ROOT,
                   check=True)
    for name, target in SHOTS.items():
        shutil.copyfile(artifacts / name, ROOT / "docs" / "images" / target)
        print(f"docs/images/{target}")


if __name__ == "__main__":
    main()
