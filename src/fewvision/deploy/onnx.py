"""ONNX export of a fitted model, and prediction with onnxruntime that writes what ``predict`` writes.

One graph per model: preprocessed pixels ``[N, 3, H, W]`` in, and out

* classification: the encoder, the L2 normalisation and the head's logits, then the softmax - the head's raw
  class probabilities ``[N, C]``, exactly what ``ClassifierHead.predict_proba`` returns;
* anomaly (PatchCore, PaDiM): the encoder's patch features rounded through float16 as the feature cache stores
  them, the head with its memory bank or Gaussians as constants, and :func:`fewvision.anomaly.postprocess.finish` -
  the finished anomaly maps ``[N, H, W]`` and image scores ``[N]``.

The graph is traced from the same modules that score in Python, and everything around it is shared too: the
model's metadata (task, classes, calibration, conformal thresholds, anomaly threshold, map geometry) and the
backbone's preprocessing recipe (:mod:`fewvision.backbones.preprocess`) go into the ONNX file's metadata under
``fewvision``; the runner builds the preprocessing from that recipe and hands the graph's outputs to the task
functions that turn probabilities and scores into rows. So an exported model writes the columns ``predict``
writes, and the export itself is refused if onnxruntime's scores differ from fewvision's on test images.

Not exportable: heads that adapt the encoder or call out (LoRA, SLAC/TLAC, ``--good``), test-time adaptation,
anomaly heads other than PatchCore and PaDiM, and the ``texture`` backbone (torch's exporter has no complex FFT).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.atomic import atomic_path
from ..modelfile import FewVisionModel, ModelFileError

FORMAT = "fewvision-onnx"
FORMAT_VERSION = 1
ONNX_SUFFIX = ".onnx"
METADATA_KEY = "fewvision"
# The largest difference an export may show on its check images: |onnxruntime - fewvision| / max(1, |fewvision|),
# i.e. 1e-4 absolute for probabilities and scores below 1, relative above (Mahalanobis distances reach the tens).
PARITY_TOLERANCE = 1e-4
ANOMALY_METHODS = ("patchcore", "padim")
NOT_EXPORTABLE = {"lora": "it adapts the encoder's weights", "contrastive": "it adapts the encoder's weights",
                  "slac": "it asks an LMM", "tlac": "it asks an LMM", "gcpl": "it runs a diffusion pipeline",
                  "comple": "it runs a diffusion pipeline",
                  "with-good": "it runs an anomaly model on the side (fit --good)"}


class ExportError(ModelFileError):
    """A model that cannot be exported, or an exported file that cannot be used; one line."""


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ONNX_SUFFIX


# --- the graphs -----------------------------------------------------------------------------------------------
class ClassifierGraph(torch.nn.Module):
    """Pixels -> the head's raw class probabilities, as ``predict_proba`` computes them."""

    def __init__(self, backbone, head, kind: str):
        super().__init__()
        self.backbone, self.head, self.kind = backbone, head, kind

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from ..features.encode import PRE_PROJECTION

        if self.kind == PRE_PROJECTION:
            features = self.backbone.encode_pre_projection(pixels)
        else:  # Backbone.encode_images without its inference_mode
            features = F.normalize(self.backbone.forward_images(pixels).float(), dim=-1)
        return torch.softmax(self.head.logits(features).double(), dim=-1).float()


class AnomalyGraph(torch.nn.Module):
    """Pixels -> (finished maps, image scores), as ``tasks.anomaly`` scores an uncached image."""

    def __init__(self, backbone, head, size: tuple[int, int], sigma: float):
        super().__init__()
        self.backbone, self.head, self.size, self.sigma = backbone, head, size, sigma
        self.layers = getattr(head, "feature_layers_", None)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ..anomaly.postprocess import finish
        from ..tasks.anomaly import PATCH_CACHE_DTYPE

        assert PATCH_CACHE_DTYPE == np.float16
        maps = self.backbone.patch_features(pixels, self.layers) if self.layers else \
            self.backbone.patch_features(pixels)
        maps = maps.half().float()  # the feature cache's rounding, which every Python score goes through
        raw, scores = self.head.score(maps, self.backbone)
        return finish(self.head, raw, scores, self.size, self.sigma)


def _check_exportable(model: FewVisionModel, backbone) -> str:
    """The feature kind the graph starts from; ExportError naming what stands in the way."""
    from ..tasks.fewshot import feature_kind

    method = model.head.method
    if method in NOT_EXPORTABLE:
        raise ExportError(f"method '{method}' cannot be exported to ONNX: {NOT_EXPORTABLE[method]}")
    if backbone.spec.split(":", 1)[0] == "texture":
        raise ExportError("the texture backbone cannot be exported to ONNX: torch's exporter has no complex FFT, "
                          "which its filters use; export a model on an open_clip or timm backbone")
    if not hasattr(backbone, "preprocess_recipe"):
        raise ExportError(f"backbone '{backbone.spec}' cannot be exported yet (open_clip and timm backbones can)")
    if model.task == "anomaly":
        if method not in ANOMALY_METHODS:
            raise ExportError(f"anomaly method '{method}' cannot be exported to ONNX (PatchCore and PaDiM can)")
        return "patch"
    kind = feature_kind(model.head)
    if kind not in ("global", "preproj"):
        raise ExportError(f"method '{method}' predicts from images with test-time steps and cannot be exported")
    return kind


ONNX_MAX_BYTES = 2 * 1024**3  # protobuf's limit for one ONNX file with its weights inside


def _check_size(model_path, model: FewVisionModel, backbone) -> None:
    """Refuse, before minutes of tracing, a graph whose constants cannot fit in one ONNX file."""
    tensors, _ = model.head.state()
    head = sum(t.numel() * t.element_size() for t in tensors.values())
    encoder = sum(p.numel() * p.element_size() for m in _modules(backbone) for p in m.state_dict().values())
    if head + encoder > 0.95 * ONNX_MAX_BYTES:
        raise ExportError(f"{model_path}: the graph would hold {(head + encoder) / 1e9:.1f} GB of constants "
                          f"({head / 1e9:.1f} GB from the {model.head.method} head), more than one ONNX file holds "
                          "(2 GB); fit a smaller model (e.g. PaDiM with --param n_features=100, PatchCore with a "
                          "lower coreset_ratio) to export it")


def _modules(backbone) -> list[torch.nn.Module]:
    return [m for m in (getattr(backbone, "model", None),) if isinstance(m, torch.nn.Module)]


def _manifest(model: FewVisionModel, backbone, batch: int | None) -> dict[str, Any]:
    from .. import __version__
    from ..tasks.anomaly import _settings

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fewvision_version": __version__,
                "task": model.task, "method": model.head.method, "class_names": model.class_names,
                "decision": model.decision, "info": model.info,
                "backbone": {"spec": model.backbone_spec, "id": model.backbone_id,
                             "preprocess": backbone.preprocess_recipe,
                             "preprocess_repr": repr(backbone.preprocess)},
                "input_size": list(backbone.input_size), "batch": batch}
    if model.task == "anomaly":
        size, sigma = _settings(model, backbone)
        manifest["map"] = {"size": list(size), "sigma": sigma, "image_score": model.head.image_score}
    return manifest


def _check_images(backbone, n: int = 2) -> torch.Tensor:
    """Preprocessed test images with texture and edges (seeded), for the export's own parity check."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((300, 260), Image.NEAREST)
        noise = rng.integers(-20, 21, (260, 300, 3))
        images.append(Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)))
    return torch.stack([backbone.preprocess(im) for im in images])


def export_onnx(model_path: str | os.PathLike, out: str | os.PathLike, *, cache_dir: str | None = None,
                weights: str | None = None, opset: int = 18) -> dict[str, Any]:
    """Export a model file (or packed model) to one ONNX file; the result's scores are checked against fewvision's
    on test images before the file is written. Returns the manifest with ``parity`` (the largest difference)."""
    import onnx

    from ..modelfile import load

    model = load(model_path, cache_dir)
    backbone = model.backbone(cache_dir=cache_dir, weights=weights)
    kind = _check_exportable(model, backbone)
    if model.task == "anomaly":
        from ..tasks.anomaly import _settings

        size, sigma = _settings(model, backbone)
        graph, outputs, batch = AnomalyGraph(backbone, model.head, size, sigma), ["maps", "scores"], 1
    else:
        graph, outputs, batch = ClassifierGraph(backbone, model.head, kind), ["probabilities"], None
    _check_size(model_path, model, backbone)
    pixels = _check_images(backbone)
    example = pixels[:1] if batch else pixels[:2]  # a batch of one would be specialised to size 1 by torch.export
    dynamic = None if batch else {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}
    with torch.no_grad():
        graph.eval()(example)  # builds lazily loaded weights now: created while tracing, they break the export
    out = Path(out)
    with atomic_path(out) as tmp:
        try:
            program = torch.onnx.export(graph.eval(), (example,), dynamo=True, input_names=["pixels"],
                                        output_names=outputs, dynamic_shapes=dynamic, opset_version=opset,
                                        external_data=False, optimize=True, verbose=False)
        except Exception as err:  # noqa: BLE001 - the exporter's errors are long; one line says what failed
            raise ExportError(f"{model_path}: torch's ONNX exporter failed on {model.head.method} with "
                              f"{backbone.spec} ({_cause(err)})") from None
        proto = program.model_proto
        manifest = _manifest(model, backbone, batch)
        proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(manifest, allow_nan=False))
        try:
            onnx.save_model(proto, str(tmp))
        except (ValueError, OSError) as err:
            raise ExportError(f"{out}: cannot write the ONNX file ({' '.join(str(err).split())[:200]})") from None
        exported = load_onnx(tmp)
        manifest["parity"] = _parity(graph, exported, pixels)
        if manifest["parity"] > PARITY_TOLERANCE:
            raise ExportError(f"{model_path}: onnxruntime differs from fewvision by {manifest['parity']:.3g} "
                              f"(relative, > {PARITY_TOLERANCE:g}) on the check images; not written")
    return manifest


def _cause(err: BaseException) -> str:
    """The innermost error of an exporter failure, in one short line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _parity(graph: torch.nn.Module, exported: "OnnxModel", pixels: torch.Tensor) -> float:
    with torch.inference_mode():
        expected = [graph(pixels[i : i + 1]) for i in range(len(pixels))]
    worst = 0.0
    for i, want in enumerate(expected):
        got = exported.run(pixels[i : i + 1].numpy())
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want):
            b = b.numpy()
            worst = max(worst, float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max()))
    return worst


# --- running an exported model ----------------------------------------------------------------------------------
@dataclass
class OnnxModel:
    """An exported model: the onnxruntime session, and what the task functions need from a model file."""

    path: Path
    session: Any
    manifest: dict[str, Any]
    _preprocess: Any = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def decision(self) -> dict[str, Any]:
        return self.manifest["decision"]

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def backbone_spec(self) -> str:
        return self.manifest["backbone"]["spec"]

    @property
    def preprocess(self):
        """The backbone's transform, built from the recipe the export stored (no weights needed)."""
        if self._preprocess is None:
            from ..backbones.preprocess import from_recipe

            transform = from_recipe(self.manifest["backbone"]["preprocess"])
            expected = self.manifest["backbone"].get("preprocess_repr")
            if expected is not None and repr(transform) != expected:
                raise ExportError(f"{self.path}: the installed open_clip / timm build this model's preprocessing "
                                  f"differently from the machine that exported it ({transform!r} here, {expected} "
                                  "there); install the versions it was exported with")
            self._preprocess = transform
        return self._preprocess

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for preprocessed pixels ``[N, 3, H, W]`` (fed one at a time to a batch-1 graph)."""
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.manifest.get("batch") == 1 and len(pixels) != 1:
            parts = [self.run(pixels[i : i + 1]) for i in range(len(pixels))]
            return [np.concatenate(p) for p in zip(*parts)] if parts else []
        return self.session.run(None, {"pixels": pixels})


def load_onnx(path: str | os.PathLike, threads: int | None = None) -> OnnxModel:
    """Open an exported model with onnxruntime (CPU); a file that is not a fewvision export is refused."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportError(f"{path}: onnxruntime cannot load it ({' '.join(str(err).split())[:300]})") from None
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        manifest = json.loads(raw) if raw else None
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: an ONNX file, but not one exported by 'fewvision export' (no fewvision metadata)")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path}: exported by a newer fewvision (format v{manifest['format_version']})")
    return OnnxModel(path, session, manifest)


def onnx_task(path: str | os.PathLike) -> str:
    return load_onnx(path).task


def _decoded(model: OnnxModel, paths: Sequence[str], chunk: int = 32):
    """(readable paths, preprocessed pixels) per chunk of files, and the skipped files (shared decoding loop)."""
    from ..tasks.anomaly import _pixel_chunks, _Recorder

    model.preprocess  # built (and checked against the exporting machine's) before any file, not per file
    rec = _Recorder()
    return _pixel_chunks(model, list(paths), chunk, rec), rec


def _opened(model: "OnnxModel | str | os.PathLike") -> "OnnxModel":
    return model if isinstance(model, OnnxModel) else load_onnx(model)


def predict_onnx(path: "OnnxModel | str | os.PathLike", inputs: Sequence[str | os.PathLike], *, abstain: bool = False,
                 unknown_threshold: float | None = None, progress: bool = False):
    """``tasks.fewshot.predict`` for an exported classification model: the same rows, from onnxruntime."""
    from ..features.encode import hash_files
    from ..io.images import iter_image_files
    from ..progress import expect, progress_bar
    from ..tasks.fewshot import Scored, predictions

    model = _opened(path)
    path = model.path
    if model.task != "classification":
        raise ExportError(f"{path}: an exported anomaly model; score images with 'fewvision anomaly predict'")
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    chunks, rec = _decoded(model, paths)
    ok, probas = [], []
    with progress_bar(len(paths), "scoring", enabled=progress) as advance:
        for names, pixels in chunks:
            probas.append(model.run(pixels.numpy())[0])
            ok += names
            advance(len(names))
    proba = np.concatenate(probas) if probas else np.zeros((0, len(model.class_names)), np.float32)
    shas, _ = hash_files(ok)
    return predictions(model, Scored(ok, shas, proba, rec.skipped, len(ok)), abstain=abstain,
                       unknown_threshold=unknown_threshold)


def score_onnx(path: "OnnxModel | str | os.PathLike", inputs: Sequence[str | os.PathLike], *, review_band: float = 0.0,
               keep_maps: bool = True, progress: bool = False):
    """``tasks.anomaly.score_files`` for an exported anomaly model: the same rows and maps, from onnxruntime."""
    from ..io.images import iter_image_files
    from ..progress import expect, progress_bar
    from ..tasks.anomaly import AnomalyPredictions, _rows

    model = _opened(path)
    path = model.path
    if model.task != "anomaly":
        raise ExportError(f"{path}: an exported classification model; classify images with 'fewvision predict'")
    if review_band < 0:
        raise ValueError(f"the review band must be >= 0, got {review_band}")
    paths = [str(p) for p in iter_image_files(inputs)]
    expect(len(paths))
    size = tuple(model.manifest["map"]["size"])
    threshold = model.decision.get("threshold")
    chunks, rec = _decoded(model, paths)
    rows, maps = [], []
    with progress_bar(len(paths), "scoring", enabled=progress) as advance:
        for names, pixels in chunks:
            m, s = model.run(pixels.numpy())
            rows += _rows(names, torch.from_numpy(m), torch.from_numpy(s), model, size, threshold, review_band)
            if keep_maps:
                maps.append(m.astype(np.float32, copy=False))
            advance(len(names))
    stacked = (np.concatenate(maps) if maps else np.zeros((0, *size), np.float32)) if keep_maps else None
    return AnomalyPredictions(rows, stacked, threshold, rec.skipped)


# --- int8 -------------------------------------------------------------------------------------------------------
DEFAULT_MAX_DROP = 0.01  # the accuracy (classification) or AUROC (anomaly) an int8 model may lose at most
CALIBRATION_IMAGES = 64


def _labelled(dataset) -> tuple[list[str], list[str], Any]:
    from ..io.datasets import Dataset, load_dataset

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    items = [it for it in ds.items if it.label is not None]
    return [it.path for it in items], [it.label for it in items], ds


def _quality(model_path: Path, paths: list[str], labels: list[str], dataset) -> tuple[float, str, int]:
    """(accuracy or image AUROC, which of the two, images scored) of an exported model on labelled images."""
    if _opened(model_path).task == "anomaly":
        from sklearn.metrics import roc_auc_score

        from ..tasks.anomaly import good_label_of

        good = good_label_of(dataset)
        res = score_onnx(model_path, paths, keep_maps=False)
        truth = dict(zip(paths, labels))
        y = [truth[r["path"]] != good for r in res.rows]
        if len(set(y)) < 2:
            raise ExportError(f"{dataset.root or dataset.name}: --int8 needs good and defect images to measure the "
                              "AUROC change")
        return float(roc_auc_score(y, [r["score"] for r in res.rows])), "AUROC", len(res.rows)
    preds = predict_onnx(model_path, paths)
    truth = dict(zip(paths, labels))
    correct = [r["top_label"] == truth[r["path"]] for r in preds.rows]
    return float(np.mean(correct)) if correct else 0.0, "accuracy", len(correct)


def quantize_int8(fp32_path: str | os.PathLike, out: str | os.PathLike, dataset, *,
                  max_drop: float = DEFAULT_MAX_DROP, force: bool = False) -> dict[str, Any]:
    """Static int8 quantisation (QDQ, per-channel weights, activation ranges calibrated on the dataset's own
    images) of the encoder's convolutions of an exported model; the head - distances to the memory bank,
    Mahalanobis terms, class logits - stays float. The accuracy or AUROC of both models on the labelled dataset is
    measured and a model that loses more than ``max_drop`` is not written unless ``force``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32_path, out = Path(fp32_path), Path(out)
    fp32 = load_onnx(fp32_path)
    proto = onnx.load(str(fp32_path))
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv"]
    if len(convs) < 3:  # a ViT has one (its patch embedding): quantising it alone gains nothing
        raise ExportError(f"{fp32_path}: --int8 quantises a convolutional encoder's Conv layers; this graph has "
                          f"{len(convs)} (a transformer backbone?)")
    paths, labels, ds = _labelled(dataset)
    if not paths:
        raise ExportError(f"{dataset}: no labelled images for --int8")
    rng = np.random.default_rng(0)
    calibration = [paths[i] for i in sorted(rng.permutation(len(paths))[:CALIBRATION_IMAGES])]

    class Reader(CalibrationDataReader):
        def __init__(self):
            chunks, self.rec = _decoded(fp32, calibration, chunk=8)
            self.items = (p[i : i + 1].numpy() for _, p in chunks for i in range(len(p)))

        def get_next(self):
            pixels = next(self.items, None)
            return None if pixels is None else {"pixels": pixels}

    with atomic_path(out) as tmp:
        quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        quantized = onnx.load(str(tmp))
        before, what, n = _quality(fp32_path, paths, labels, ds)
        del quantized.metadata_props[:]
        manifest = dict(fp32.manifest)
        manifest["int8"] = {"calibration_images": len(calibration), "metric": what, "fp32": before,
                            "max_drop": max_drop, "images": n}
        quantized.metadata_props.add(key=METADATA_KEY, value=json.dumps(manifest, allow_nan=False))
        onnx.save_model(quantized, str(tmp))
        after, _, _ = _quality(tmp, paths, labels, ds)
        manifest["int8"]["int8"] = after
        quantized.metadata_props[0].value = json.dumps(manifest, allow_nan=False)
        onnx.save_model(quantized, str(tmp))
        if before - after > max_drop and not force:
            raise ExportError(f"{out}: int8 {what} {after:.4f} against fp32 {before:.4f} on {n} image(s): a drop of "
                              f"{before - after:.4f} > {max_drop:g}; not written (--force writes it anyway)")
    return manifest
