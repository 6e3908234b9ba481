"""Compare few-shot methods honestly on the user's own labelled images.

For every method x shots x seed: ``shots`` support images per class are drawn (seeded) from the train split, the
head is fitted on their cached features, and accuracy / balanced accuracy are measured on the held-out split. A
dataset without splits gets a seeded stratified split, recorded in the output. Features are computed once per
feature kind through the cache and reused by every cell. Results: mean and standard deviation over seeds per
(method, shots), fit time and trainable parameters, in results.csv, results.json and accuracy_vs_shots.png.

:func:`run_episode_benchmark` is the few-shot literature's protocol, for meta-trained heads: seeded N-way K-shot
episodes drawn from the *novel* classes (those no meta model was trained on), every head fitted on each episode's
support and scored on its queries, and the mean accuracy with its 95% interval (1.96 standard errors over
episodes). The frozen-embedding baselines - logistic regression (``linear``, Tian et al. 2020's "good embedding")
and the untrained prototype head - run on the very same episodes and features. Rows marked ``base`` score episodes
of the base classes, i.e. of images the meta models were trained on: not a result, the contrast that shows how much
of the meta-trained accuracy stays with the classes it was learned on.

With ``good`` (good images of the line, ``fewvision benchmark --good GOOD_DIR``), every head that classifies image
features also runs as ``METHOD+good`` - the classifier ``fewvision fit --good`` makes
(:class:`fewvision.heads.with_good.WithGoodImages`) - on the very same support draws and test images: one anomaly
model (``good_method``, PaDiM by default) is fitted on the good images, the with-good features of every image come
from ``WithGoodImages.features_of`` (the function its fit and predict call), and the inner head is fitted on them.
Good images that are also held-out test images are refused (the anomaly model would have seen what it is scored
on).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from ..backbones.base import Backbone
from ..features.encode import GLOBAL, Features
from ..heads import head_names
from ..heads.support import Support
from ..io.atomic import atomic_open
from ..io.datasets import Dataset, sample_shots, stratified_split
from .fewshot import IMAGES, as_dataset, encode, feature_kind, images_proba, make_head
from .zeroshot import as_backbone

EPISODE_COLUMNS = ["method", "classes", "shots", "way", "query", "episodes", "accuracy_mean", "accuracy_ci95",
                   "fit_seconds", "n_trainable_parameters"]
CSV_COLUMNS = ["method", "shots", "n_seeds", "accuracy_mean", "accuracy_std", "balanced_accuracy_mean",
               "balanced_accuracy_std", "fit_seconds", "n_trainable_parameters"]
TRAINING_FREE_SHOTS = 0  # the row of methods that use no support images (zero-shot)


@dataclass
class BenchmarkResult:
    rows: list[dict]  # one per (method, shots): means and standard deviations over seeds
    runs: list[dict]  # one per (method, shots, seed)
    skipped: list[dict] = field(default_factory=list)  # {"method", "reason"}
    setup: dict = field(default_factory=dict)


def parse_list(text: str | Sequence, kind: Callable = str, what: str = "value") -> list:
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    try:
        out = [kind(s) for s in items if s != ""]
    except ValueError:
        raise ValueError(f"cannot read '{text}' as a comma-separated list of {what}s") from None
    if not out:
        raise ValueError(f"no {what} given")
    return out


def split_indices(dataset: Dataset, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train, test) indices: the dataset's own splits when it has them, else a seeded stratified split."""
    if dataset.has_splits:
        train = np.array([i for i, it in enumerate(dataset.items) if it.split == "train"], dtype=np.int64)
        test = np.array([i for i, it in enumerate(dataset.items) if it.split != "train"], dtype=np.int64)
        if not len(train) or not len(test):
            raise ValueError(f"{dataset.name}: a dataset with splits needs a 'train' split and a held-out split")
        return train, test, {"kind": "dataset", "train": len(train), "test": len(test)}
    train, test = stratified_split(dataset.labels, test_fraction, seed)
    return train, test, {"kind": "stratified", "test_fraction": test_fraction, "seed": seed,
                         "train": len(train), "test": len(test)}


def check_methods(methods: Sequence[str]) -> None:
    known = head_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}: expected some of {', '.join(known)}")


def _skip_reason(method: str, params: dict, backbone: Backbone) -> str | None:
    head = make_head(method, 0, **params)
    if head.needs_text and not backbone.has_text:
        return f"needs a text tower; backbone '{backbone.spec}' is image-only"
    return None


def run_benchmark(
    data: Dataset | str | os.PathLike,
    methods: Sequence[str],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: int = 3,
    *,
    backbone: str | Backbone,
    weights: str | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    test_fraction: float = 0.5,
    split_seed: int = 0,
    good: Sequence[str | os.PathLike] | None = None,
    good_method: str = "padim",
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> BenchmarkResult:
    """Run the grid and return the aggregated rows (see module docstring); with ``good``, the ``METHOD+good`` rows
    beside them on the same draws."""
    check_methods(methods)
    if seeds < 1 or any(k < 1 for k in shots):
        raise ValueError("seeds and shots must be >= 1")
    dataset = as_dataset(data)
    bb = as_backbone(backbone, cache_dir, weights)
    params = params or {}
    train, test, split = split_indices(dataset, test_fraction, split_seed)
    labels = dataset.labels

    skipped, runnable = [], []
    for m in dict.fromkeys(methods):
        reason = _skip_reason(m, params.get(m, {}), bb)
        if reason:
            skipped.append({"method": m, "reason": reason})
            echo(f"skipping {m}: {reason}")
        else:
            runnable.append(m)

    with_good = None
    if good:
        with_good = _WithGood(good, good_method, bb, dataset, test, cache_dir, use_cache, progress)
        echo(f"--good: {good_method} fitted on {with_good.n_good} good image(s)")
        for m in runnable:
            reason = with_good.refuses(make_head(m, 0, **params.get(m, {})))
            if reason:
                skipped.append({"method": m + GOOD_SUFFIX, "reason": reason})
                echo(f"skipping {m}{GOOD_SUFFIX}: {reason}")

    features: dict[str, tuple[Features, dict[str, int]]] = {}

    def features_of(kind: str):
        if kind not in features:
            feats = encode(bb, dataset.paths, kind, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                           description=f"{kind} features")
            features[kind] = (feats, {p: i for i, p in enumerate(feats.paths)})
        return features[kind]

    runs = []
    for method in runnable:
        kind = feature_kind(make_head(method, 0, **params.get(method, {})))
        base, base_rows = features_of(GLOBAL)
        # Heads that adapt the towers predict from the images themselves; the others from cached features.
        feats, row_of = (base, base_rows) if kind == IMAGES else features_of(kind)
        test_paths = [dataset.paths[i] for i in test if dataset.paths[i] in row_of]
        test_rows = np.array([row_of[p] for p in test_paths], dtype=np.int64)
        y_test = labels[[i for i in test if dataset.paths[i] in row_of]]
        grid = [TRAINING_FREE_SHOTS] if method == "zeroshot" else list(shots)
        for k in grid:
            for seed in range(1 if k == TRAINING_FREE_SHOTS else seeds):
                readable = np.array([i for i in train if dataset.paths[i] in base_rows], dtype=np.int64)
                chosen = sample_shots(labels, k, seed, readable) if k else readable[:0]
                head = make_head(method, seed, **params.get(method, {}))
                if k:
                    rows = [base_rows[dataset.paths[i]] for i in chosen]
                    support = Support(base.features[rows], labels[chosen], dataset.class_names, bb,
                                      [dataset.paths[i] for i in chosen], cache_dir, use_cache)
                else:
                    support = Support(None, None, list(dataset.class_names), bb, cache_dir=cache_dir,
                                      use_cache=use_cache)
                start = time.perf_counter()
                head.fit(support)
                fit_seconds = time.perf_counter() - start
                if kind == IMAGES:
                    pred = images_proba(head, bb, test_paths).proba.argmax(axis=1)
                else:
                    pred = head.predict(feats.features[test_rows])
                digest = draw_digest(chosen)
                runs.append({"method": method, "shots": k, "seed": seed,
                             "accuracy": float(accuracy_score(y_test, pred)),
                             "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
                             "fit_seconds": fit_seconds, "n_trainable_parameters": head.n_trainable_parameters(),
                             "support_digest": digest})
                echo(f"{method} {k}-shot seed {seed}: accuracy {runs[-1]['accuracy']:.4f}")
                if with_good is not None and k and not with_good.refuses(head):
                    # The classifier fit --good makes, on the same support draw and the same test images.
                    inner = make_head(method, seed, **params.get(method, {}))
                    x = with_good.features([dataset.paths[i] for i in chosen])
                    start = time.perf_counter()
                    inner.fit(Support(x, labels[chosen], dataset.class_names, bb, [dataset.paths[i] for i in chosen],
                                      cache_dir, use_cache))
                    fit_seconds = time.perf_counter() - start
                    pred = inner.predict(with_good.features(test_paths))
                    runs.append({"method": method + GOOD_SUFFIX, "shots": k, "seed": seed,
                                 "accuracy": float(accuracy_score(y_test, pred)),
                                 "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
                                 "fit_seconds": fit_seconds, "n_trainable_parameters": inner.n_trainable_parameters(),
                                 "support_digest": digest})
                    echo(f"{method}{GOOD_SUFFIX} {k}-shot seed {seed}: accuracy {runs[-1]['accuracy']:.4f}")

    rows = aggregate(runs)
    setup = {"dataset": dataset.name, "n_images": len(dataset), "classes": list(dataset.class_names),
             "backbone": bb.spec, "backbone_id": bb.id, "methods": list(methods), "shots": list(shots),
             "seeds": list(range(seeds)), "split": split,
             "test_images": [dataset.paths[i] for i in test] if split["kind"] == "stratified" else None,
             "skipped_images": sorted({s.path for f, _ in features.values() for s in f.skipped})}
    if with_good is not None:
        setup["good"] = with_good.info
    return BenchmarkResult(rows, runs, skipped, setup)


GOOD_SUFFIX = "+good"  # the row of a head fitted with the good images' features (fit --good)


def draw_digest(indices) -> str:
    """A short fingerprint of one support draw (dataset indices), to show rows shared it."""
    import hashlib

    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


class _WithGood:
    """The anomaly model fitted on the good images, and the with-good features of dataset images (computed once
    each, by ``WithGoodImages.features_of``)."""

    def __init__(self, good, method: str, bb: Backbone, dataset: Dataset, test, cache_dir, use_cache: bool,
                 progress: bool):
        from ..anomaly import anomaly_head_classes
        from ..heads.with_good import WithGoodImages
        from .anomaly import fit_anomaly, good_images

        if method not in anomaly_head_classes():
            raise ValueError(f"unknown good-image method '{method}': expected one of "
                             f"{', '.join(sorted(anomaly_head_classes()))}")
        good = [str(g) for g in good]
        for g in good:
            if not Path(g).exists():
                raise ValueError(f"{g}: --good names no such file or folder")
        paths, _ = good_images(good)
        if not paths:
            raise ValueError(f"{', '.join(good)}: no good images found (--good wants a folder of good images)")
        held_out = {os.path.realpath(dataset.paths[i]) for i in test}
        seen = [p for p in paths if os.path.realpath(p) in held_out]
        if seen:
            raise ValueError(f"{seen[0]}: {len(seen)} of the --good images are held-out test images of "
                             f"{dataset.name}; the anomaly model would have seen what it is scored on - give good "
                             "images outside the test split")
        model = fit_anomaly(good, method, bb, cache_dir=cache_dir, use_cache=use_cache, progress=progress)
        self.n_good = int(model.info.get("n_fit_images") or len(paths))
        self.info = {"method": method, "sources": good, "n_good_images": len(paths),
                     "threshold": model.decision["threshold"]}
        self.wrapper = WithGoodImages(None, model.head, model.decision)
        self.bb = bb
        self._rows: dict[str, Any] = {}

    @staticmethod
    def refuses(head) -> str | None:
        from ..heads.with_good import check_inner

        try:
            check_inner(head)
        except ValueError as err:
            return str(err)
        return None

    def features(self, paths: Sequence[str]):
        import torch

        from ..io.images import load_image

        todo = [p for p in dict.fromkeys(paths) if p not in self._rows]
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            pixels = torch.stack([self.bb.preprocess(load_image(p)) for p in chunk])
            for p, row in zip(chunk, self.wrapper.features_of(self.bb, pixels)):
                self._rows[p] = row
        return torch.stack([self._rows[p] for p in paths])


def run_episode_benchmark(
    data: Dataset | str | os.PathLike,
    metas: Sequence[Any] = (),
    methods: Sequence[str] = ("prototype", "linear"),
    shots: Sequence[int] = (1, 5),
    *,
    way: int | None = None,
    query: int = 15,
    episodes: int = 600,
    seed: int = 0,
    backbone: str | Backbone | None = None,
    weights: str | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> BenchmarkResult:
    """Episodes (``way`` classes each: default 5, or every novel class when fewer) on the novel classes (and, for
    contrast, on the base classes the meta models were trained on, when the dataset has them) for every meta model
    in ``metas`` (model files or models from ``meta-train``) and every head in ``methods``; the same episodes for
    all. See the module docstring."""
    from ..meta.episodes import EpisodeSampler
    from ..modelfile import FewVisionModel, load

    check_methods(methods)
    if episodes < 1 or any(k < 1 for k in shots):
        raise ValueError("episodes and shots must be >= 1")
    from .meta import META_METHODS

    for m in methods:  # each is fitted on every one of the episodes, from the cached features
        if m in META_METHODS:
            raise ValueError(f"'{m}' would meta-train on each of the {episodes} episodes: give it meta-trained, "
                             "with --meta (a model from 'fewvision meta-train')")
        if feature_kind(make_head(m, 0, **(params or {}).get(m, {}))) != GLOBAL:
            raise ValueError(f"'{m}' trains on the images themselves, which the episodic protocol does not run "
                             "(it fits every head on cached features, hundreds of times); compare it with "
                             "'fewvision benchmark' without --meta/--episodes")
    metas = list({str(m) if not isinstance(m, FewVisionModel) else id(m): m for m in metas}.values())
    models = [(m, f"model {i + 1}") if isinstance(m, FewVisionModel) else (load(m, cache_dir), str(m))
              for i, m in enumerate(metas)]
    labels_of = {}
    for model, origin in models:
        if "base_classes" not in model.info.get("meta", {}):
            raise ValueError(f"{origin}: not a model from 'fewvision meta-train' (no base classes recorded)")
        label = f"{model.head.method} [meta: {Path(origin).name}]" if origin in map(str, metas) else \
            f"{model.head.method} [meta-trained]"
        labels_of[origin] = label if label not in labels_of.values() else f"{label} #{len(labels_of) + 1}"
        from ..meta.episodes import validation_note

        note = validation_note(model.info["meta"])  # did meta-training help on held-out base classes?
        if note:
            echo(f"{labels_of[origin]}: {note}")
    specs = sorted({model.backbone_spec for model, _ in models})
    if len(specs) > 1:
        raise ValueError(f"the meta models were trained on different backbones ({', '.join(specs)}): benchmark "
                         "them one backbone at a time")
    if specs and backbone is not None and (backbone.spec if isinstance(backbone, Backbone) else backbone) != specs[0]:
        raise ValueError(f"the meta models were trained on backbone '{specs[0]}': their heads only fit its features")
    if models:
        bb = models[0][0].backbone(cache_dir, weights) if not isinstance(backbone, Backbone) else backbone
    elif backbone is None:
        raise ValueError("give a backbone or meta-trained models (whose backbone is used)")
    else:
        bb = as_backbone(backbone, cache_dir, weights)
    for m in methods:
        reason = _skip_reason(m, (params or {}).get(m, {}), bb)
        if reason:
            raise ValueError(f"'{m}' {reason}")
    dataset = as_dataset(data)
    base_names = sorted({c for model, _ in models for c in model.info["meta"]["base_classes"]})
    novel = [i for i, c in enumerate(dataset.class_names) if c not in base_names]
    base = [i for i, c in enumerate(dataset.class_names) if c in base_names]
    way = int(way) if way is not None else min(5, len(novel))  # 5-way, or as many as there are novel classes
    if len(novel) < max(way, 2):
        raise ValueError(f"{dataset.name}: {max(way, 2)}-way episodes need {max(way, 2)} novel classes; {len(novel)} "
                         f"of its classes ({', '.join(dataset.class_names[i] for i in novel) or 'none'}) are not base "
                         "classes of the meta models")
    feats = encode(bb, dataset.paths, GLOBAL, cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                   description="features")
    rows_of = {p: i for i, p in enumerate(feats.paths)}
    readable = [i for i, p in enumerate(dataset.paths) if p in rows_of]
    x = feats.features[[rows_of[dataset.paths[i]] for i in readable]]
    y = dataset.labels[readable]
    params = params or {}

    def fitted(method_or_model, support: Support):
        if isinstance(method_or_model, str):
            head = make_head(method_or_model, 0, **params.get(method_or_model, {}))
        else:
            model = method_or_model
            head = make_head(model.head.method, 0).adopt(model.head, {"from": "meta-trained"})
        return head.fit(support)

    contenders = [(labels_of[origin], model) for model, origin in models] + [(m, m) for m in dict.fromkeys(methods)]
    # Every episode is drawn before any head is fitted: a setting the data cannot serve stops here, not midway.
    drawn: dict[tuple[str, int], list] = {}
    eligible: dict[str, list[str]] = {}  # the classes each setting's episodes draw from (enough images)
    for which, classes in [("novel", novel)] + ([("base", base)] if models else []):
        for k in shots:
            try:
                sampler = EpisodeSampler(y, way, k, query, classes=classes, seed=seed)
            except ValueError as err:
                if which == "base":  # the contrast on base classes is a bonus; say why it is missing
                    echo(f"no base-class rows: {err}")
                    drawn = {key: eps for key, eps in drawn.items() if key[0] != "base"}
                    eligible = {key: names for key, names in eligible.items() if not key.startswith("base")}
                    break
                raise ValueError(f"{dataset.name}, novel classes: {err} (lower --shots or --query, or --way)") from None
            drawn[(which, int(k))] = [sampler.sample() for _ in range(int(episodes))]
            eligible[f"{which} {k}-shot"] = [dataset.class_names[int(c)] for c in sampler.eligible]
    runs, rows = [], []
    for (which, k), episodes_drawn in drawn.items():
        for name, contender in contenders:
            accuracy, seconds, n_params = [], 0.0, 0
            for ep in episodes_drawn:
                names = [dataset.class_names[int(c)] for c in ep.classes]
                start = time.perf_counter()
                head = fitted(contender, Support(x[ep.support], ep.support_labels, names, bb))
                seconds += time.perf_counter() - start
                accuracy.append(float((head.predict(x[ep.query]) == ep.query_labels).mean()))
                n_params = head.n_trainable_parameters()
            acc = np.asarray(accuracy)
            ci = 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
            rows.append({"method": name, "classes": which, "shots": int(k), "way": int(way), "query": int(query),
                         "episodes": len(acc), "accuracy_mean": float(acc.mean()), "accuracy_ci95": float(ci),
                         "fit_seconds": seconds / len(acc), "n_trainable_parameters": int(n_params)})
            runs.append({**rows[-1], "accuracies": accuracy, "episode_digest": episode_digest(episodes_drawn)})
            echo(f"{name} {which} {way}-way {k}-shot: {acc.mean():.4f} ± {ci:.4f}")
    setup = {"mode": "episodes", "dataset": dataset.name, "n_images": len(dataset), "backbone": bb.spec,
             "backbone_id": bb.id, "meta_models": [origin for _, origin in models], "methods": list(methods),
             "base_classes": base_names, "novel_classes": [dataset.class_names[i] for i in novel],
             "meta_validation": {labels_of[origin]: model.info["meta"].get("validation") for model, origin in models},
             "classes_in_episodes": eligible,
             "shots": list(shots), "way": way, "query": query, "episodes": episodes, "seed": seed,
             "skipped_images": sorted(s.path for s in feats.skipped)}
    return BenchmarkResult(rows, runs, [], setup)


def episode_digest(episodes) -> str:
    """A short fingerprint of a list of episodes (classes, support and query indices), to show rows shared them."""
    import hashlib

    h = hashlib.sha256()
    for ep in episodes:
        for part in (ep.classes, ep.support, ep.query):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def aggregate(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation (ddof=1 over seeds; 0 for a single seed) per (method, shots)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["shots"]), []).append(r)
    out = []
    for (method, k), group in groups.items():
        row = {"method": method, "shots": k, "n_seeds": len(group)}
        for metric in ("accuracy", "balanced_accuracy"):
            values = np.array([g[metric] for g in group])
            row[f"{metric}_mean"] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row["fit_seconds"] = float(np.mean([g["fit_seconds"] for g in group]))
        row["n_trainable_parameters"] = int(max(g["n_trainable_parameters"] for g in group))
        out.append(row)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def accuracy_plot(result: BenchmarkResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    trained = sorted({r["shots"] for r in result.rows if r["shots"] > 0})
    episodic = result.setup.get("mode") == "episodes"
    shown = [r for r in result.rows if not episodic or r["classes"] == "novel"]
    for method in dict.fromkeys(r["method"] for r in shown):
        rows = sorted((r for r in shown if r["method"] == method), key=lambda r: r["shots"])
        if rows[0]["shots"] == TRAINING_FREE_SHOTS and trained:
            ax.axhline(rows[0]["accuracy_mean"], linestyle="--", color="grey", label=f"{method} (no shots)")
            continue
        x = [r["shots"] for r in rows]
        mean = np.array([r["accuracy_mean"] for r in rows])
        std = np.array([r["accuracy_ci95" if episodic else "accuracy_std"] for r in rows])
        ax.plot(x, mean, marker="o", label=method)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    if trained:
        ax.set_xscale("log", base=2)
        ax.set_xticks(trained, [str(k) for k in trained])
    ax.set_xlabel("shots per class")
    ax.set_ylabel(f"accuracy, {result.setup['way']}-way episodes on novel classes (95% interval)" if episodic
                  else "accuracy (held-out split)")
    ax.set_title(f"{result.setup.get('dataset', '')} - {result.setup.get('backbone', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(result: BenchmarkResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.csv, results.json and accuracy_vs_shots.png in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    columns = EPISODE_COLUMNS if result.setup.get("mode") == "episodes" else CSV_COLUMNS
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.rows)
    paths = {"csv": out / "results.csv", "json": out / "results.json", "png": out / "accuracy_vs_shots.png"}
    _write_atomic(paths["csv"], text.getvalue().encode())
    doc = {"setup": result.setup, "rows": result.rows, "runs": result.runs, "skipped": result.skipped}
    _write_atomic(paths["json"], json.dumps(doc, indent=2, allow_nan=False).encode())
    _write_atomic(paths["png"], accuracy_plot(result))
    return paths


__all__ = ["run_benchmark", "run_episode_benchmark", "write_outputs", "BenchmarkResult", "aggregate", "parse_list",
           "GOOD_SUFFIX"]
