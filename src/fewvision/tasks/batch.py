"""Score an archive of images with a fitted model into one Parquet file, in process or as a Ray Data pipeline.

>>> from fewvision.tasks.batch import run_batch
>>> summary = run_batch("line3.fvm", "archive/2024/", "results.parquet")               # in process
>>> summary = run_batch("line3.fvm", "archive/2024/", "results.parquet", ray="auto")   # on a local Ray cluster

The rows and their columns are those of ``fewvision predict`` (a classification model) or ``fewvision anomaly
predict`` (an anomaly model), with native types (floats, a list for the conformal ``set``). An unreadable image
gets a row with its reason under ``error``; the batch goes on.

The scores come from the task functions the predict commands use, never a copy of them: in process,
:func:`fewvision.tasks.fewshot.score_files` / :func:`fewvision.tasks.anomaly._score_paths` on chunks of files
(through the feature cache, like predict); on Ray, read tasks decode and preprocess each image (``load_image``, the
backbone's ``preprocess``), and an actor pool - each actor loads the model once and runs one torch thread - encodes
and applies the head with :func:`fewvision.tasks.fewshot.score_pixels` / :func:`fewvision.tasks.anomaly.score_pixels`
(the same encoder, head and post-processing; no feature cache). Heads that predict from PIL images (LoRA,
with-good) decode in the actors.

Resumable: the output is rewritten atomically (temp file and rename) at every checkpoint and at the end, and a
re-run with the same ``out`` skips every image already in it (by path, as listed under ``root``), keeps the old
rows as they are and adds the new ones. The file records the model's sha256 and the options; a re-run with another
model or other options is refused, so one file never mixes two models' rows. Ray is imported only for ``ray=``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..io.atomic import atomic_path
from ..io.images import Skipped, iter_image_files
from ..progress import expect, progress_bar

METADATA_KEY = b"fewvision_batch"
# The columns of `fewvision anomaly predict` (cli/anomaly.py ROW_COLUMNS; tests/test_batch.py checks they agree).
ANOMALY_COLUMNS = ["path", "verdict", "score", "threshold", "normalized_score", "x", "y", "n_regions",
                   "largest_region_px", "largest_region_pct", "regions", "heatmap", "model_sha256", "backbone", "time",
                   "error"]
_ANOMALY_TYPES = {"score": pa.float64(), "threshold": pa.float64(), "normalized_score": pa.float64(),
                  "x": pa.int64(), "y": pa.int64(), "n_regions": pa.int64(), "largest_region_px": pa.int64(),
                  "largest_region_pct": pa.float64()}  # regions: a JSON list of boxes, as in the CSV
CHUNK_IMAGES = 256  # files per in-process chunk (each goes through score_files / _score_paths as predict's would)
BATCH_SIZE = 32  # images per Ray batch: one read task decodes it, one actor call encodes it
CHECKPOINT_ROWS = 2000
CHECKPOINT_SECONDS = 60.0
RAY_EXTRA = "--ray needs Ray, which is not installed: pip install 'fewvision[ray]'"


class BatchError(ValueError):
    """A batch that cannot run as asked (one line; exit code 2 on the command line)."""


@dataclass
class BatchSummary:
    """What a run did. ``n_scored`` and ``skipped`` count this run's new rows only."""

    out: Path
    task: str
    engine: str  # "process" or "ray"
    workers: int
    n_found: int  # images under the root
    n_done_before: int  # already in the output, not scored again
    n_scored: int
    skipped: list[Skipped] = field(default_factory=list)
    n_rows: int = 0  # rows in the output now
    counts: dict[str, int] = field(default_factory=dict)  # decisions (label or verdict) of the new rows
    flagged: list[str] = field(default_factory=list)  # one line per new review / ng row, most anomalous first
    seconds: float = 0.0

    @property
    def n_flagged(self) -> int:
        return len(self.flagged)

    @property
    def images_per_second(self) -> float:
        return (self.n_scored + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


def printable(path: str) -> str:
    """A path as valid UTF-8 text (Parquet strings must be): undecodable bytes become U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")


# --- columns --------------------------------------------------------------------------------------------------------
def batch_schema(model, options: dict) -> pa.Schema:
    """The Parquet schema of a model's rows: predict's columns for its task, with native types."""
    if model.task == "anomaly":
        return pa.schema([(c, _ANOMALY_TYPES.get(c, pa.string())) for c in ANOMALY_COLUMNS])
    fields = [("path", pa.string()), ("label", pa.string()), ("top_label", pa.string()),
              ("top_probability", pa.float64())]
    if model.decision.get("conformal"):
        fields.append(("set", pa.list_(pa.string())))
    if options.get("abstain") or options.get("review_threshold") is not None:
        fields.append(("review_reason", pa.string()))
    fields += [(f"p_{n}", pa.float64()) for n in model.class_names]
    fields.append(("error", pa.string()))
    return pa.schema(fields)


def _flat(row: dict, task: str, extra: dict) -> dict:
    row = dict(row)
    row["path"] = printable(row["path"])
    if task == "anomaly":
        row.update(extra)
        if row.get("regions") is not None:
            row["regions"] = json.dumps(row["regions"], separators=(",", ":"))
        return row
    for name, p in row.pop("probabilities").items():
        row[f"p_{name}"] = p
    return row


def rows_table(rows: Sequence[dict], skipped: Sequence[Skipped], schema: pa.Schema, task: str,
               extra: dict | None = None) -> pa.Table:
    """Scored rows (as the task functions return them) and skipped files -> one Arrow table of ``schema``."""
    flat = [_flat(r, task, extra or {}) for r in rows]
    flat += [{"path": printable(s.path), "error": s.reason} for s in skipped]
    names = set(schema.names)
    return pa.Table.from_pylist([{k: v for k, v in r.items() if k in names} for r in flat], schema=schema)


# --- scoring: what the in-process loop and each Ray actor run ------------------------------------------------------
class Scorer:
    """A loaded model and its options; scores files, or images already decoded and preprocessed, into Arrow."""

    def __init__(self, model_path: str, options: dict, *, weights: str | None = None, cache_dir: str | None = None,
                 model_sha256: str | None = None, threads: int | None = None, engine: str = "torch"):
        from ..io.images import sha256_file
        from ..runtime.model import RuntimeModel, scoring_model

        self.model = scoring_model(model_path, engine, cache_dir=cache_dir, weights=weights)
        self.runtime = isinstance(self.model, RuntimeModel)  # its ONNX graph, no torch
        if threads and not self.runtime:
            import torch

            torch.set_num_threads(int(threads))
        self.options = dict(options)
        self.weights, self.cache_dir = weights, cache_dir
        self.backbone = None if self.runtime else self.model.backbone(cache_dir, weights)
        self.task = self.model.task
        self.schema = batch_schema(self.model, self.options)
        sha = self.model_sha256 = model_sha256 or sha256_file(model_path)
        self.extra = {"model_sha256": sha, "backbone": self.model.backbone_spec} if self.task == "anomaly" else {}

    @property
    def takes_pixels(self) -> bool:
        """False for classification heads that predict from PIL images and for tiled anomaly models (their tiles
        are cut from the full image): their actors decode the files."""
        if self.task == "anomaly" and self.model.decision.get("tiling"):
            return False
        if self.task == "anomaly" or self.runtime:
            return True
        from .fewshot import IMAGES, feature_kind

        return feature_kind(self.model.head) != IMAGES

    def _classification(self, scored) -> tuple[list[dict], list[Skipped]]:
        from .rows import predictions

        preds = predictions(self.model, scored, abstain=bool(self.options.get("abstain")),
                            unknown_threshold=self.options.get("review_threshold"))
        return preds.rows, preds.skipped

    def score_files(self, paths: Sequence[str], *, use_cache: bool = True, progress: bool = False) -> pa.Table:
        """Rows for image files, through predict's own functions (and the feature cache)."""
        paths = list(paths)
        if self.runtime:
            from ..runtime import model as runtime

            if self.task == "anomaly":
                res = runtime._score_paths(self.model, paths, keep_maps=False, progress=progress,
                                           review_band=float(self.options["review_band"]))
                rows, skipped = res.rows, res.skipped
            else:
                rows, skipped = self._classification(runtime.score_classes(self.model, paths, progress=progress))
        elif self.task == "anomaly":
            from .anomaly import DEFAULT_CHUNK_IMAGES, _score_paths

            res = _score_paths(self.model, paths, keep_maps=False, weights=self.weights, cache_dir=self.cache_dir,
                               use_cache=use_cache, progress=progress, batch_size=16,
                               chunk_images=DEFAULT_CHUNK_IMAGES, review_band=float(self.options["review_band"]))
            rows, skipped = res.rows, res.skipped
        else:
            from .fewshot import score_files

            rows, skipped = self._classification(score_files(self.model.head, self.backbone, paths,
                                                             cache_dir=self.cache_dir, use_cache=use_cache,
                                                             progress=progress))
        return _in_order(rows_table(rows, skipped, self.schema, self.task, self.extra), paths)

    def score_pixels(self, paths: Sequence[str], pixels, errors: Sequence[str | None]) -> pa.Table:
        """Rows for decoded and preprocessed images (``pixels`` [N, C, H, W], one per path; ``errors[i]`` the
        reason path i could not be decoded, its pixels then ignored)."""
        import torch

        ok = [i for i, e in enumerate(errors) if not e]
        skipped = [Skipped(paths[i], str(errors[i])) for i, e in enumerate(errors) if e]
        ok_paths = [paths[i] for i in ok]
        batch = torch.from_numpy(np.ascontiguousarray(pixels[ok], dtype=np.float32)) if ok else None
        if self.task == "anomaly":
            from .anomaly import score_pixels

            res = score_pixels(self.model, ok_paths, batch, review_band=float(self.options["review_band"]),
                               weights=self.weights, cache_dir=self.cache_dir)
            rows = res.rows
        else:
            from .fewshot import score_pixels

            rows, more = self._classification(score_pixels(self.model.head, self.backbone, ok_paths, batch))
            skipped += more
        return _in_order(rows_table(rows, skipped, self.schema, self.task, self.extra), list(paths))


def _in_order(table: pa.Table, paths: Sequence[str]) -> pa.Table:
    index = {printable(p): i for i, p in enumerate(paths)}
    order = np.argsort([index.get(p, len(index)) for p in table.column("path").to_pylist()], kind="stable")
    return table.take(pa.array(order, type=pa.int64()))


# --- Ray -------------------------------------------------------------------------------------------------------
def _decode(batch: dict, preprocess) -> dict:
    """A Ray read task: decode and preprocess a batch of files (``load_image``, then the backbone's preprocess);
    ``error`` holds the reason a file could not be, its ``pixels`` are then zeros."""
    import torch

    from ..features.encode import preprocess_file

    torch.set_num_threads(1)
    paths = [os.fsdecode(p) for p in batch["path"]]
    tensors, errors = [], []
    for p in paths:
        t, why = preprocess_file(p, preprocess)
        tensors.append(t)
        errors.append(why or "")
    shape = next((tuple(t.shape) for t in tensors if t is not None), None)
    for i, t in enumerate(tensors):
        if t is not None and tuple(t.shape) != shape:
            tensors[i], errors[i] = None, f"cannot preprocess (shape {list(t.shape)}, not {list(shape)})"
    blank = np.zeros(shape or (1,), dtype=np.float32)
    pixels = np.stack([t.numpy() if t is not None else blank for t in tensors]) if paths else np.zeros((0, 1))
    return {"path": batch["path"], "error": np.array(errors, dtype=object),
            "pixels": pixels.astype(np.float32, copy=False)}


class _RayScorer:
    """One actor of the pool: loads the model once, one torch thread."""

    def __init__(self, model_path: str, options: dict, weights: str | None, cache_dir: str | None,
                 model_sha256: str):
        self.scorer = Scorer(model_path, options, weights=weights, cache_dir=cache_dir, model_sha256=model_sha256,
                             threads=1)

    def __call__(self, batch: dict) -> pa.Table:
        paths = [os.fsdecode(p) for p in batch["path"]]
        if "pixels" in batch:
            return self.scorer.score_pixels(paths, batch["pixels"], [str(e) for e in batch["error"]])
        return self.scorer.score_files(paths, use_cache=False)


def ray_resources(total_cpus: float, workers: int | None) -> tuple[int, float, float]:
    """(actors, CPUs per actor, CPUs per read task) on a cluster of ``total_cpus``.

    The actors never hold every CPU: one (half the cluster on a one-CPU cluster) is kept for the read tasks that
    feed them, else the pipeline stalls (Ray issue #44687); an actor takes one CPU, less when ``workers`` would not
    fit otherwise. A read task asks half the reserve (decoding is far cheaper than encoding), and never exactly what
    an actor asks: equal requests would let Ray Data fuse the decoding into the actors."""
    total = max(float(total_cpus), 0.01)
    workers = max(1, int(workers) if workers else int(total) - 1)
    reserve = min(1.0, total / 2)
    actor = min(1.0, (total - reserve) / workers)
    read = reserve / 2 if not math.isclose(reserve / 2, actor) else reserve / 3
    return workers, actor, read


def ray_module():
    """``ray`` with Ray Data, or a one-line :class:`BatchError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships with the 'data' extra of ray
    except ImportError:
        raise BatchError(RAY_EXTRA) from None
    return ray


def _ray_tables(model_path: str, todo: Sequence[str], options: dict, *, address: str, workers: int | None,
                weights: str | None, cache_dir: str | None, model_sha256: str, preprocess, takes_pixels: bool,
                batch_size: int, info: dict) -> Iterator[pa.Table]:
    ray = ray_module()
    import logging

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "auto" else address, logging_level=logging.ERROR,
                     log_to_driver=False, configure_logging=True)
        except ConnectionError as err:
            raise BatchError(f"--ray {address}: cannot connect to the Ray cluster ({err})") from None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
        n_actors, actor_cpus, read_cpus = ray_resources(ray.cluster_resources().get("CPU", 1), workers)
        info["workers"] = n_actors
        if not todo:
            return
        # at least two batches per actor, so that every actor has work and the read tasks run ahead of them
        batch_size = max(1, min(batch_size, math.ceil(len(todo) / (2 * n_actors))))
        # paths travel as bytes: a file name that is not valid UTF-8 is no Arrow string
        ds = ray.data.from_items([{"path": os.fsencode(p)} for p in todo],
                                 override_num_blocks=max(1, math.ceil(len(todo) / batch_size)))
        if takes_pixels:
            ds = ds.map_batches(_decode, batch_size=batch_size, batch_format="numpy",
                                fn_kwargs={"preprocess": preprocess}, num_cpus=read_cpus)
        ds = ds.map_batches(_RayScorer, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=actor_cpus,
                            fn_constructor_kwargs={"model_path": str(Path(model_path).resolve()),
                                                   "options": options, "weights": weights, "cache_dir": cache_dir,
                                                   "model_sha256": model_sha256})
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield table
    finally:
        if started:
            ray.shutdown()


# --- the output -----------------------------------------------------------------------------------------------------
def _identity(model_sha256: str, task: str, options: dict) -> dict:
    return {"model_sha256": model_sha256, "task": task, "options": options}


def _as_listed(table: pa.Table, listed: dict[str, str]) -> pa.Table:
    """A table from the Ray pipeline with its absolute paths back as they were listed."""
    index = table.column_names.index("path")
    paths = [listed.get(p, p) for p in table.column("path").to_pylist()]
    return table.set_column(index, "path", pa.array(paths, type=table.schema.field("path").type))


def read_existing(out: Path, identity: dict, schema: pa.Schema) -> pa.Table | None:
    """The rows already in ``out`` (None when there is no such file); refused when another model or other options
    wrote them."""
    if not out.exists():
        return None
    try:
        table = pq.read_table(out)
    except (OSError, pa.ArrowException) as err:
        raise BatchError(f"{out}: not a readable Parquet file ({' '.join(str(err).split())}); give another --out "
                         "or remove it") from None
    meta = (table.schema.metadata or {}).get(METADATA_KEY)
    if meta is None:
        raise BatchError(f"{out}: a Parquet file not written by fewvision batch; give another --out")
    before = json.loads(meta)
    if before.get("model_sha256") != identity["model_sha256"]:
        raise BatchError(f"{out} holds the results of another model file (sha256 {before.get('model_sha256')}); "
                         "resume with that model, or give another --out")
    if before.get("options") != identity["options"]:
        raise BatchError(f"{out} was written with other options ({_describe(before.get('options'))}, now "
                         f"{_describe(identity['options'])}); resume with the same options, or give another --out")
    if table.schema.remove_metadata() != schema:
        raise BatchError(f"{out}: its columns are not those this model writes; give another --out")
    return table.replace_schema_metadata(None)


def _describe(options: Any) -> str:
    if not isinstance(options, dict):
        return str(options)
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "none"


def write_output(out: Path, tables: Sequence[pa.Table], schema: pa.Schema, identity: dict) -> int:
    """All ``tables`` as one Parquet file at ``out``, written to a temp file and renamed; returns the row count."""
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(identity).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows


def _tally(table: pa.Table, task: str, summary: BatchSummary, flagged: list[tuple[float, str]]) -> None:
    for r in table.to_pylist():
        if r.get("error"):
            summary.skipped.append(Skipped(r["path"], r["error"]))
            continue
        summary.n_scored += 1
        key = r["verdict"] if task == "anomaly" else r["label"]
        summary.counts[key] = summary.counts.get(key, 0) + 1
        if task == "anomaly" and key in ("ng", "review"):
            peak = f" (peak at x {r['x']}, y {r['y']})" if r.get("x") is not None else ""
            flagged.append((-r["score"], f"{key} {r['path']}: score {r['score']:.4g} vs threshold "
                                         f"{r['threshold']:.4g}{peak}"))
        elif task != "anomaly" and key == "review":
            flagged.append((0.0, f"review {r['path']}: {r.get('review_reason') or ''} (top {r['top_label']} "
                                 f"{r['top_probability']:.2f})"))


# --- the run ------------------------------------------------------------------------------------------------------
def run_batch(
    model_path: str | os.PathLike,
    root: str | os.PathLike,
    out: str | os.PathLike,
    ray: str | None = None,
    workers: int | None = None,
    *,
    abstain: bool = False,
    review_threshold: float | None = None,
    review_band: float = 0.0,
    weights: str | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
    batch_size: int = BATCH_SIZE,
    checkpoint_rows: int = CHECKPOINT_ROWS,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
    progress: bool = False,
    engine: str = "auto",
) -> BatchSummary:
    """Score every image below ``root`` (searched recursively) with the model file ``model_path`` into the Parquet
    file ``out``, skipping the images ``out`` already holds.

    ``ray``: None runs in this process (Ray is not imported); ``"auto"`` starts (or joins) a local Ray cluster with
    ``ray.init()``, any other value is a cluster address. An already initialised Ray session is used as it is and
    left running. ``workers``: the actor pool's size on Ray (default: the cluster's CPUs less one, at least 1);
    ignored in process. ``abstain`` / ``review_threshold`` (classification) and ``review_band`` (anomaly) are those
    of the predict commands. ``use_cache`` / ``cache_dir``: the feature cache, in process only. ``engine``: what
    runs a packed or exported model in process (see :func:`fewvision.runtime.model.scoring_model`).
    """
    started = time.perf_counter()
    if ray:
        ray_module()  # before any work
    model_path, out = Path(model_path), Path(out)
    scorer = Scorer(str(model_path), {}, weights=weights, cache_dir=cache_dir,
                    engine="torch" if ray else engine)  # Ray's actors run torch
    sha = scorer.model_sha256
    task = scorer.task
    if task == "anomaly":
        if abstain or review_threshold is not None:
            raise BatchError("--abstain and --review-threshold apply to classification models; an anomaly model "
                             "takes --review-band")
        if review_band < 0:
            raise BatchError(f"--review-band must be >= 0, got {review_band}")
        options: dict[str, Any] = {"review_band": float(review_band)}
    else:
        if review_band:
            raise BatchError("--review-band applies to anomaly models; a classification model takes --abstain and "
                             "--review-threshold")
        options = {"abstain": bool(abstain),
                   "review_threshold": None if review_threshold is None else float(review_threshold)}
    if batch_size < 1:
        raise BatchError(f"batch size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise BatchError(f"--workers must be >= 1, got {workers}")
    paths = [str(p) for p in iter_image_files([root])]
    scorer.options = options
    scorer.extra = {"model_sha256": sha, "backbone": scorer.model.backbone_spec} if task == "anomaly" else {}
    scorer.schema = batch_schema(scorer.model, options)
    if task != "anomaly" and abstain and not scorer.model.decision.get("conformal"):
        raise BatchError(f"{model_path}: --abstain needs conformal thresholds in the model (fit it with --alpha and "
                         "--calibrate-fraction)")
    schema, identity = scorer.schema, _identity(sha, task, options)
    existing = read_existing(out, identity, schema)
    done = set(existing.column("path").to_pylist()) if existing is not None else set()
    todo = [p for p in paths if printable(p) not in done]
    summary = BatchSummary(out, task, "ray" if ray else "process", 1, len(paths), len(paths) - len(todo), 0)
    expect(len(todo))

    old = [existing] if existing is not None else []
    new: list[pa.Table] = []
    flagged: list[tuple[float, str]] = []
    order = {printable(p): i for i, p in enumerate(todo)}

    def save() -> int:
        if new:
            merged = pa.concat_tables(new)
            merged = merged.take(pa.array(np.argsort([order[p] for p in merged.column("path").to_pylist()],
                                                     kind="stable"), type=pa.int64()))
            new[:] = [merged]
        return write_output(out, old + new, schema, identity)

    if ray:
        info: dict = {}
        # Read tasks and actors may run on other machines, in other working folders: absolute paths there, the
        # paths as listed here in the rows.
        full = [os.path.abspath(p) for p in todo]
        listed = {printable(f): printable(p) for f, p in zip(full, todo)}
        absolute = lambda p: p and os.path.abspath(os.path.expanduser(p))  # noqa: E731
        tables = (_as_listed(t, listed) for t in _ray_tables(
            str(model_path), full, options, address=ray, workers=workers, weights=absolute(weights),
            cache_dir=absolute(cache_dir), model_sha256=sha, preprocess=scorer.backbone.preprocess,
            takes_pixels=scorer.takes_pixels, batch_size=batch_size, info=info))
    else:
        tables = (scorer.score_files(todo[i:i + CHUNK_IMAGES], use_cache=use_cache, progress=progress)
                  for i in range(0, len(todo), CHUNK_IMAGES))
    last_save, unsaved = time.perf_counter(), 0
    try:
        with progress_bar(len(todo), "scoring", enabled=progress and bool(ray)) as advance:
            for table in tables:
                table = table.cast(schema)
                new.append(table)
                _tally(table, task, summary, flagged)
                advance(table.num_rows)
                unsaved += table.num_rows
                if unsaved >= checkpoint_rows or (unsaved and time.perf_counter() - last_save >= checkpoint_seconds):
                    save()
                    last_save, unsaved = time.perf_counter(), 0
    except BaseException:
        if unsaved:  # what was scored is kept: the next run resumes after it
            save()
        raise
    if ray:
        summary.workers = info.get("workers", 1)
    summary.n_rows = save() if (unsaved or existing is None) else existing.num_rows + sum(t.num_rows for t in new)
    summary.flagged = [line for _, line in sorted(flagged, key=lambda f: f[0])]
    summary.seconds = time.perf_counter() - started
    return summary


__all__ = ["run_batch", "BatchSummary", "BatchError", "Scorer", "batch_schema", "rows_table", "ANOMALY_COLUMNS"]
