"""A model scored from its ONNX graph, without torch: an exported ``.onnx`` or a packed ``.fvz`` that carries one.

The graph takes preprocessed pixels and gives what the torch path's head gives (class probabilities; or finished
anomaly maps and image scores); the graph's metadata holds the rest of the model (classes, calibration, conformal
thresholds, anomaly threshold, map geometry, the preprocessing steps). Pixels come from
:class:`fewvision.runtime.preprocess.Preprocess`, rows from :mod:`fewvision.tasks.rows` and metrics from
:mod:`fewvision.tasks.evaluation` - the same functions the torch path uses - so the columns and decisions are the
torch path's. Which engine runs the graph is :mod:`fewvision.runtime.engines`'s rule.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..io.images import hash_files, iter_image_files
from ..modelfile import GRAPH_PREFIX, MODEL_SUFFIX, PACK_SUFFIX, ModelFileError, open_pack
from ..progress import expect, progress_bar
from ..tasks.evaluation import AnomalyEvaluation, evaluate_classes, evaluate_maps
from ..tasks.rows import AnomalyPredictions, Evaluation, Predictions, Recorder, Scored, anomaly_rows, \
    region_rule, pixel_chunks, predictions
from .engines import CHOICES, EngineError, choose, create_engine, installed
from ..io.tiles import StitchedView, TileCutter, Tiling, geometry_of
from ..tasks.tiled import tiled_predictions
from .preprocess import Preprocess

FORMAT = "fewvision-onnx"
FORMAT_VERSION = 1
METADATA_KEY = "fewvision"
FP32_GRAPH = f"{GRAPH_PREFIX}fp32.onnx"
INT8_GRAPH = f"{GRAPH_PREFIX}int8.onnx"
FULL_EXTRA = "pip install 'fewvision[full]'"
CHUNK_IMAGES = 32


class RuntimeModelError(ModelFileError):
    """A model that cannot be scored without torch; one line."""


@dataclass
class RuntimeModel:
    """An exported graph on an engine, and what the row and metric functions need from a model."""

    path: Path  # the file the user named (.onnx or .fvz)
    manifest: dict[str, Any]  # the export's metadata
    engine: Any
    packed: dict[str, Any] | None = None  # a .fvz: its pack manifest
    _preprocess: Any = field(default=None, repr=False)

    task = property(lambda self: self.manifest["task"])
    decision = property(lambda self: self.manifest["decision"])
    info = property(lambda self: self.manifest.get("info", {}))
    method = property(lambda self: self.manifest["method"])
    backbone_spec = property(lambda self: self.manifest["backbone"]["spec"])
    backbone_id = property(lambda self: self.manifest["backbone"]["id"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def map_size(self) -> tuple[int, int]:
        size = self.manifest["map"]["size"]
        return int(size[0]), int(size[1])

    @property
    def engine_name(self) -> str:
        return f"{self.engine.name} {self.engine.precision}"

    @property
    def preprocess(self):
        """The backbone's preprocessing as recorded steps (Pillow + numpy); files exported before steps were
        recorded rebuild it from the recipe with open_clip / timm, which needs the full install."""
        if self._preprocess is None:
            steps = self.manifest["backbone"].get("steps")
            if steps is not None:
                self._preprocess = Preprocess(steps)
            else:
                try:
                    from ..backbones.preprocess import from_recipe
                except ImportError:
                    raise RuntimeModelError(f"{self.path}: exported before its preprocessing was recorded as steps; "
                                        f"export it again, or {FULL_EXTRA}") from None
                transform = from_recipe(self.manifest["backbone"]["preprocess"])
                expected = self.manifest["backbone"].get("preprocess_repr")
                if expected is not None and repr(transform) != expected:
                    raise RuntimeModelError(f"{self.path}: the installed open_clip / timm build this model's "
                                        f"preprocessing differently from the machine that exported it ({transform!r} "
                                        f"here, {expected} there); install the versions it was exported with")
                self._preprocess = lambda image: transform(image).numpy()
        return self._preprocess

    @property
    def geometry(self):
        """What places this model's maps on its images (:func:`fewvision.io.tiles.geometry_of`)."""
        return geometry_of(self.decision, self.preprocess, self.map_size)

    def tile_cutter(self, tiling: Tiling) -> TileCutter:
        steps = self.manifest["backbone"].get("steps")
        if steps is None:
            raise RuntimeModelError(f"{self.path}: a tiled model exported before its preprocessing was recorded as "
                                    "steps; export it again")
        return TileCutter(tiling, steps)

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for preprocessed pixels ``[N, 3, H, W]`` (fed one at a time to a batch-1 graph)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.manifest.get("batch") == 1 and len(pixels) != 1:
            parts = [self.run(pixels[i : i + 1]) for i in range(len(pixels))]
            return [np.concatenate(p) for p in zip(*parts)] if parts else []
        return self.engine.run(pixels)


def _manifest_of(path: Path, graph: Path) -> dict[str, Any]:
    """The fewvision metadata of an ONNX file, read with the onnx protobuf reader onnxruntime ships."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        meta = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise RuntimeModelError(f"{path}: onnxruntime cannot load it ({' '.join(str(err).split())[:300]})") from None
    raw = meta.custom_metadata_map.get(METADATA_KEY)
    try:
        manifest = json.loads(raw) if raw else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RuntimeModelError(f"{path}: an ONNX file, but not one exported by 'fewvision export' (no fewvision "
                            "metadata)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise RuntimeModelError(f"{path}: exported by a newer fewvision (format v{manifest['format_version']})")
    return manifest


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def has_graph(path: str | os.PathLike, cache_dir: str | None = None) -> bool:
    """Whether a model file can be scored without torch (an .onnx, or a .fvz packed with its graph)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    if path.suffix.lower() != PACK_SUFFIX:
        return False
    return FP32_GRAPH in open_pack(path, cache_dir, backbone=False).manifest["files"]


def _sources(path: Path, cache_dir: str | None):
    """(graphs {precision: file}, the pack's gated precision, the fp32 engines measured at pack time, the pack's
    manifest) of an .onnx or a .fvz with its graph."""
    if not path.is_file():
        raise RuntimeModelError(f"{path}: no such file")
    if path.suffix.lower() == PACK_SUFFIX:
        unpacked = open_pack(path, cache_dir, backbone=False)
        packed = unpacked.manifest
        if packed["kind"] != "model":
            raise RuntimeModelError(f"{path}: a backbone bundle, not a model")
        if FP32_GRAPH not in unpacked.graphs:
            why = packed.get("graph_note") or "fewvision could not export it"
            raise RuntimeModelError(f"{path}: packed without an ONNX graph ({why}), so it needs torch: {FULL_EXTRA}")
        graphs = {"fp32": unpacked.graphs[FP32_GRAPH]}
        if INT8_GRAPH in unpacked.graphs:
            graphs["int8"] = unpacked.graphs[INT8_GRAPH]
        return graphs, packed.get("precision"), packed.get("graph", {}).get("engines"), packed
    if path.suffix.lower() == MODEL_SUFFIX:
        raise RuntimeModelError(f"{path}: scoring without torch takes a packed model (.fvz) or an exported .onnx; "
                                f"a .fvm needs torch: {FULL_EXTRA}")
    return {"fp32": path}, None, None, None  # an exported .onnx (or a temporary name for one): checked on onnxruntime


def manifest_of(path: str | os.PathLike, cache_dir: str | None = None) -> dict[str, Any]:
    """The export's metadata of an .onnx or a .fvz with its graph (from the pack's manifest: no graph loaded)."""
    path = Path(path)
    graphs, _, _, packed = _sources(path, cache_dir)
    return (packed or {}).get("graph", {}).get("manifest") or _manifest_of(path, graphs["fp32"])


def chosen_engine(path: str | os.PathLike, engine: str = "auto", cache_dir: str | None = None) -> tuple[str, str]:
    """(engine, precision) that :func:`open_model` would run ``path`` on here, without loading anything."""
    path = Path(path)
    graphs, recorded, measured, _ = _sources(path, cache_dir)
    try:
        return choose(engine, recorded, graphs=tuple(graphs), measured=measured)
    except EngineError as err:
        raise RuntimeModelError(f"{path}: {err}") from None


def open_model(path: str | os.PathLike, *, engine: str = "auto", cache_dir: str | None = None,
               threads: int | None = None, precision: str | None = None) -> RuntimeModel:
    """An ``.onnx`` or a ``.fvz`` with its graph, on the engine ``engine`` picks (see
    :func:`fewvision.runtime.engines.choose`); ``precision`` forces one (measuring it, as ``pack`` does)."""
    path = Path(path)
    graphs, recorded, measured, packed = _sources(path, cache_dir)
    manifest = (packed or {}).get("graph", {}).get("manifest") or _manifest_of(path, graphs["fp32"])
    try:
        if precision is None:
            name, precision = choose(engine, recorded, graphs=tuple(graphs), measured=measured)
        else:
            name = choose(engine)[0]
            if precision == "int8" and "int8" not in graphs:
                raise EngineError("no int8 graph in this file")
        graph = graphs["int8" if precision == "int8" else "fp32"]
        runner = create_engine(name, graph, precision=precision, threads=threads)
    except EngineError as err:
        raise RuntimeModelError(f"{path}: {err}") from None
    return RuntimeModel(path, manifest, runner, packed)


def scoring_model(path: str | os.PathLike, engine: str = "auto", *, cache_dir: str | None = None,
                  weights: str | None = None):
    """The model that scores a file: a :class:`RuntimeModel` (its ONNX graph, no torch) for an .onnx, or a .fvz
    packed with its graph, unless ``engine`` is torch; else the fitted model on torch
    (:class:`fewvision.modelfile.FewVisionModel`), or one line saying what to install."""
    from ..modelfile import load

    path = Path(path)
    if engine not in CHOICES:
        raise RuntimeModelError(f"--engine {engine}: choose from {', '.join(CHOICES)}")
    suffix = path.suffix.lower()
    if engine != "torch" and suffix != MODEL_SUFFIX and has_graph(path, cache_dir):
        if weights:
            raise RuntimeModelError(f"{path}: this model carries its weights; --weights does not apply")
        return open_model(path, engine=engine, cache_dir=cache_dir)
    if suffix == ".onnx":
        raise RuntimeModelError(f"{path}: an exported ONNX model runs on onnxruntime or OpenVINO, not torch")
    if engine not in ("auto", "torch"):
        raise RuntimeModelError(f"{path}: --engine {engine} runs an ONNX graph, and this model has none (a .fvm, a "
                                "pack of a model that cannot be exported, or one packed before packs carried "
                                "graphs); use --engine torch")
    if not installed("torch"):  # one clear line rather than an ImportError deep in a head
        raise RuntimeModelError(f"{path}: this model needs torch (a .fvm, or a pack without an ONNX graph): "
                                f"{FULL_EXTRA}, or pack it where torch is installed")
    return load(path, cache_dir)


# --- scoring ------------------------------------------------------------------------------------------------------
def _chunks(model: RuntimeModel, paths: Sequence[str], rec: Recorder):
    model.preprocess  # built (and checked) before any file, not per file
    return pixel_chunks(model.preprocess, list(paths), CHUNK_IMAGES, rec)


def score_classes(model: RuntimeModel, paths: Sequence[str], *, progress: bool = False) -> Scored:
    """Raw class probabilities of image files (see :class:`fewvision.tasks.rows.Scored`)."""
    rec = Recorder()
    ok, probas = [], []
    with progress_bar(len(paths), "scoring", enabled=progress) as advance:
        for names, pixels in _chunks(model, paths, rec):
            probas.append(model.run(pixels)[0])
            ok += names
            advance(len(names))
    proba = np.concatenate(probas) if probas else np.zeros((0, len(model.class_names)), np.float32)
    shas, _ = hash_files(ok)
    return Scored(ok, shas, proba, rec.skipped, len(ok))


def predict(model: RuntimeModel, inputs: Sequence[str | os.PathLike], *, abstain: bool = False,
            unknown_threshold: float | None = None, progress: bool = False) -> Predictions:
    """``tasks.fewshot.predict`` for a classification graph: the same rows."""
    if model.task != "classification":
        raise RuntimeModelError(f"{model.path}: an anomaly model; score images with 'fewvision anomaly predict'")
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    return predictions(model, score_classes(model, paths, progress=progress), abstain=abstain,
                       unknown_threshold=unknown_threshold)


def _score_paths(model: RuntimeModel, paths: Sequence[str], *, review_band: float = 0.0, keep_maps: bool = True,
                 progress: bool = False) -> AnomalyPredictions:
    size = model.map_size
    threshold = model.decision.get("threshold")
    rec = Recorder()
    tiling = Tiling.of(model.decision)
    if tiling:
        with progress_bar(len(paths), "scoring", enabled=progress) as advance:
            rows, maps = tiled_predictions(model.tile_cutter(tiling), lambda pixels: model.run(pixels)[:2], paths,
                                           rec, view=StitchedView(tiling, size), threshold=threshold,
                                           review_band=review_band, regions=region_rule(model.decision),
                                           keep_maps=keep_maps, advance=advance)
        return AnomalyPredictions(rows, maps if keep_maps else None, threshold, rec.skipped)
    rows, maps = [], []
    with progress_bar(len(paths), "scoring", enabled=progress) as advance:
        for names, pixels in _chunks(model, paths, rec):
            m, s = model.run(pixels)
            rows += anomaly_rows(names, m, s, model.preprocess, size, threshold, review_band,
                                 region_rule(model.decision))
            if keep_maps:
                maps.append(m.astype(np.float32, copy=False))
            advance(len(names))
    stacked = (np.concatenate(maps) if maps else np.zeros((0, *size), np.float32)) if keep_maps else None
    return AnomalyPredictions(rows, stacked, threshold, rec.skipped)


def score_files(model: RuntimeModel, inputs: Sequence[str | os.PathLike], *, review_band: float = 0.0,
                keep_maps: bool = True, progress: bool = False) -> AnomalyPredictions:
    """``tasks.anomaly.score_files`` for an anomaly graph: the same rows and maps."""
    if model.task != "anomaly":
        raise RuntimeModelError(f"{model.path}: a classification model; classify images with 'fewvision predict'")
    if review_band < 0:
        raise ValueError(f"the review band must be >= 0, got {review_band}")
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    return _score_paths(model, paths, review_band=review_band, keep_maps=keep_maps, progress=progress)


def evaluate(model: RuntimeModel, dataset, *, abstain: bool = False, n_bootstrap: int = 1000,
             progress: bool = False) -> Evaluation:
    """``tasks.fewshot.evaluate_model`` for a classification graph."""
    from ..io.datasets import Dataset, load_dataset

    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    return evaluate_classes(model, data, lambda paths: score_classes(model, paths, progress=progress),
                            abstain=abstain, n_bootstrap=n_bootstrap)


def evaluate_anomaly(model: RuntimeModel, dataset, *, good_label: str | None = None, recall: float = 0.95,
                     n_bootstrap: int = 1000, seed: int = 0, progress: bool = False) -> AnomalyEvaluation:
    """``tasks.anomaly.evaluate_anomaly`` for an anomaly graph."""
    return evaluate_maps(model, dataset, lambda paths: _score_paths(model, paths, progress=progress),
                         model.geometry, good_label=good_label, recall=recall,
                         n_bootstrap=n_bootstrap, seed=seed)
