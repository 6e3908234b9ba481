"""Labelled image sets from the layouts a factory already has.

* folder per class: ``ROOT/<class>/*.png`` (optionally ``ROOT/train/<class>`` and ``ROOT/test/<class>`` splits);
* a CSV manifest with a header ``path,label`` (optional ``split`` and ``caption`` columns; relative paths are
  relative to the CSV);
* the MVTec AD layout: ``train/good``, ``test/<type>``, ``ground_truth/<type>/<name>_mask.png``;
* ``textile``: the 2,000 textile images of the ``conformal-clip-data`` package (nominal / local / global);
* ``digits`` and ``textile-defects`` (synthetic defect types on the textile's nominal images): many-class sets made
  on first use from installed data (:mod:`fewvision.io.generated`).
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DatasetError
from .images import is_image_path
from .textile import TEXTILE_CLASSES, textile_root
from .textile import images_in as _images_in

GOOD = "good"


@dataclass
class Item:
    path: str
    label: str | None
    split: str | None = None
    mask: str | None = None  # ground-truth defect mask (anomaly data)
    caption: str | None = None  # free text about the image (an inspection finding), for contrastive fine-tuning


@dataclass
class Dataset:
    name: str
    items: list[Item]
    class_names: list[str]
    layout: str
    root: str = ""
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [it.path for it in self.items]

    @property
    def labels(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[it.label] for it in self.items], dtype=np.int64)

    @property
    def has_splits(self) -> bool:
        return any(it.split for it in self.items)

    def subset(self, indices: Sequence[int], name: str | None = None) -> "Dataset":
        return Dataset(name or self.name, [self.items[i] for i in indices], list(self.class_names), self.layout,
                       self.root, list(self.notes))

    def split(self, which: str) -> "Dataset":
        return self.subset([i for i, it in enumerate(self.items) if it.split == which], f"{self.name}[{which}]")

    def counts(self) -> dict[str, int]:
        c = Counter(it.label for it in self.items)
        return {name: c.get(name, 0) for name in self.class_names}


def _class_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))


def from_class_folders(root: Path) -> Dataset:
    splits = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    items: list[Item] = []
    if splits and not any(is_image_path(p) for p in root.iterdir()):
        for split in splits:
            for d in _class_folders(root / split):
                items += [Item(str(p), d.name, split) for p in _images_in(d)]
    else:
        for d in _class_folders(root):
            items += [Item(str(p), d.name) for p in _images_in(d)]
    classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise DatasetError(f"{root}: expected one sub-folder of images per class, found {len(classes)} class folder(s)")
    return Dataset(root.name, items, classes, "folders", str(root))


def from_csv(path: Path) -> Dataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip().lower() for f in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise DatasetError(f"{path}: a manifest needs a header with 'path' and 'label' columns, got {fields}")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as err:
        raise DatasetError(f"{path}: cannot read manifest ({err.strerror or err})") from None
    items = []
    for n, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("label"):
            raise DatasetError(f"{path}:{n}: empty path or label")
        p = Path(row["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p
        items.append(Item(str(p), row["label"], row.get("split") or None, caption=row.get("caption") or None))
    classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise DatasetError(f"{path}: at least two labels are needed, found {len(classes)}")
    return Dataset(path.stem, items, classes, "csv", str(path.parent))


def is_mvtec(root: Path) -> bool:
    return (root / "train" / GOOD).is_dir() and (root / "test").is_dir()


def from_mvtec(root: Path) -> Dataset:
    """Train images are 'good'; test images are labelled by their defect-type folder; masks are attached."""
    items = [Item(str(p), GOOD, "train") for p in _images_in(root / "train" / GOOD)]
    for d in sorted(x for x in (root / "test").iterdir() if x.is_dir()):
        for p in _images_in(d):
            mask = None
            if d.name != GOOD:
                for cand in (root / "ground_truth" / d.name / f"{p.stem}_mask.png",
                             root / "ground_truth" / d.name / f"{p.stem}.png"):
                    if cand.is_file():
                        mask = str(cand)
                        break
            items.append(Item(str(p), d.name, "test", mask))
    classes = [GOOD] + sorted({it.label for it in items} - {GOOD})
    return Dataset(root.name, items, classes, "mvtec", str(root))


def textile() -> Dataset:
    root = textile_root()
    items = [Item(str(p), c) for c in TEXTILE_CLASSES for p in _images_in(root / c)]
    return Dataset("textile", items, list(TEXTILE_CLASSES), "textile", str(root))


def load_dataset(source: str | Path) -> Dataset:
    """A dataset from 'textile', 'digits', 'textile-defects', a CSV manifest, an MVTec AD category folder or a folder
    of class folders."""
    if str(source) == "textile":
        return textile()
    from .generated import GENERATED, generated_root

    if str(source) in GENERATED and not Path(source).exists():  # a folder of that name wins
        data = from_class_folders(generated_root(str(source)))
        data.name = str(source)
        return data
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{path}: expected a directory or a .csv manifest")
        return from_csv(path)
    if is_mvtec(path):
        return from_mvtec(path)
    return from_class_folders(path)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), stratified by label, seeded; every class keeps at least one item on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) > 1 else 0
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def sample_shots(labels: np.ndarray, shots: int, seed: int, pool: np.ndarray | None = None) -> np.ndarray:
    """``shots`` indices per class drawn from ``pool`` (all by default), seeded; fewer if a class has fewer."""
    rng = np.random.default_rng(seed)
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    chosen = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        chosen.extend(rng.choice(members, size=min(shots, len(members)), replace=False))
    return np.sort(np.array(chosen, dtype=np.int64))
