"""ONNX export of a fitted model, and prediction with onnxruntime that writes what ``predict`` writes.

One graph per model: preprocessed pixels ``[N, 3, H, W]`` in, and out

* classification: the encoder, the L2 normalisation and the head's logits, then the softmax - the head's raw
  class probabilities ``[N, C]``, exactly what ``ClassifierHead.predict_proba`` returns;
* anomaly (PatchCore, PaDiM): the encoder's patch features rounded through float16 as the feature cache stores
  them, the head with its memory bank or Gaussians as constants, and :func:`fewvision.anomaly.postprocess.finish` -
  the finished anomaly maps ``[N, H, W]`` and image scores ``[N]``; AnomalyDINO (without masking): the head's own
  encoding of the pixels (it never reads the cache), its bank as a constant, and ``finish``.

The graph is traced from the same modules that score in Python, and everything around it is shared too: the
model's metadata (task, classes, calibration, conformal thresholds, anomaly threshold, map geometry) and the
backbone's preprocessing recipe (:mod:`fewvision.backbones.preprocess`) go into the ONNX file's metadata under
``fewvision``; the runner builds the preprocessing from that recipe and hands the graph's outputs to the task
functions that turn probabilities and scores into rows. So an exported model writes the columns ``predict``
writes, and the export itself is refused if onnxruntime's scores differ from fewvision's on test images.

Not exportable: heads that adapt the encoder or call out (LoRA, SLAC/TLAC, ``--good``), test-time adaptation,
anomaly heads other than PatchCore, PaDiM and AnomalyDINO (and AnomalyDINO with its per-image PCA foreground mask),
and the ``texture`` backbone (torch's exporter has no complex FFT).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..io.atomic import atomic_path
from ..modelfile import FewVisionModel, ModelFileError
from ..runtime import measure
from ..runtime.engines import installed
from ..runtime.measure import apart
from ..runtime.model import FORMAT, FORMAT_VERSION, METADATA_KEY, RuntimeModel, open_model
from ..runtime.model import predict as runtime_predict
from ..runtime.model import score_files as runtime_score_files
from ..runtime.preprocess import Preprocess, PreprocessError, steps_of

# The largest difference an export may show on its check images: |onnxruntime - fewvision| / max(1, |fewvision|),
# i.e. 1e-4 absolute for probabilities and scores below 1, relative above (Mahalanobis distances reach the tens).
PARITY_TOLERANCE = 1e-4
ANOMALY_METHODS = ("patchcore", "padim", "anomalydino")
NOT_EXPORTABLE = {"lora": "it adapts the encoder's weights",
                  "bottleneck-adapter": "it adds adapters inside the encoder's blocks",
                  "deep-prompt": "it adds prompt tokens inside the encoder's blocks",
                  "contrastive": "it adapts the encoder's weights",
                  "slac": "it asks an LMM", "tlac": "it asks an LMM", "gcpl": "it runs a diffusion pipeline",
                  "comple": "it runs a diffusion pipeline",
                  "with-good": "it runs an anomaly model on the side (fit --good)"}


class ExportError(ModelFileError):
    """A model that cannot be exported, or an exported file that cannot be used; one line."""


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

        if self.head.inputs != "patches":  # AnomalyDINO: the head encodes the images itself (no feature cache)
            raw, scores = self.head.score(pixels, self.backbone)
            return finish(self.head, raw, scores, self.size, self.sigma)
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
            raise ExportError(f"anomaly method '{method}' cannot be exported to ONNX (PatchCore, PaDiM and "
                              "AnomalyDINO can)")
        if method == "anomalydino" and model.head.masking:
            raise ExportError("anomalydino with masking cannot be exported to ONNX: its foreground mask is a "
                              "principal component fitted per image (scikit-learn)")
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
                             "preprocess_repr": repr(backbone.preprocess), "steps": _steps(backbone)},
                "input_size": list(backbone.input_size), "batch": batch}
    if model.task == "anomaly":
        size, sigma = _settings(model, backbone)
        manifest["map"] = {"size": list(size), "sigma": sigma, "image_score": model.head.image_score}
    return manifest


def _steps(backbone) -> list[dict[str, Any]] | None:
    """The preprocessing as steps the light runtime replays (:mod:`fewvision.runtime.preprocess`), when replaying
    them gives the backbone's own transform's pixels exactly on the check images (at several sizes and aspect
    ratios); None otherwise (such an export then needs open_clip / timm to preprocess)."""
    try:
        replay = Preprocess(steps_of(backbone.preprocess))
    except PreprocessError:
        return None
    for image in _check_pil_images(6):
        if not np.array_equal(replay(image), backbone.preprocess(image).numpy()):
            return None
    return replay.steps


def _check_pil_images(n: int = 2) -> list:
    """Test images with texture and edges (seeded), in several sizes and aspect ratios."""
    from PIL import Image

    sizes = [(300, 260), (260, 300), (640, 480), (97, 123), (371, 257), (255, 399)]  # even and odd crop margins
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((width, height), Image.NEAREST)
        noise = rng.integers(-20, 21, (height, width, 3))
        images.append(Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255).astype(np.uint8)))
    return images


def _check_images(backbone, n: int = 2) -> torch.Tensor:
    """Preprocessed test images (seeded), for the export's own parity check."""
    return torch.stack([backbone.preprocess(im) for im in _check_pil_images(n)])


def export_onnx(model_path: str | os.PathLike, out: str | os.PathLike, *, cache_dir: str | None = None,
                weights: str | None = None, opset: int = 18,
                engines: Sequence[str] = ()) -> dict[str, Any]:
    """Export a model file (or packed model) to one ONNX file; the result's scores are checked against fewvision's
    on test images before the file is written. Returns the manifest with ``parity`` (onnxruntime's largest
    difference) and ``engines``: for each installed engine of ``engines``, its parity and its images/s here."""
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
        manifest["parity"] = _parity(graph, lambda batches: [exported.run(b) for b in batches], pixels)
        if manifest["parity"] > PARITY_TOLERANCE:
            raise ExportError(f"{model_path}: onnxruntime differs from fewvision by {manifest['parity']:.3g} "
                              f"(relative, > {PARITY_TOLERANCE:g}) on the check images; not written")
        # Every engine asked for is checked the same way and timed (pack: every installed one; auto picks among
        # those that pass); engines other than onnxruntime in a fresh interpreter (runtime.measure).
        manifest["engines"] = {}
        for engine in engines:
            if engine == "onnxruntime":
                manifest["engines"][engine] = {"parity": manifest["parity"],
                                               "images_per_s": measure.speed(str(tmp), engine)}
            elif installed(engine):
                timed = {}

                def run(batches, e=engine):
                    got, timed["images_per_s"] = apart(measure.outputs_and_speed, str(tmp), e, batches)
                    return got

                manifest["engines"][engine] = {"parity": _parity(graph, run, pixels), **timed}
    return manifest


def _cause(err: BaseException) -> str:
    """The innermost error of an exporter failure, in one short line."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"


def _parity(graph: torch.nn.Module, outputs_of: Callable[[list[np.ndarray]], list], pixels: torch.Tensor) -> float:
    """The largest relative difference between the torch module's outputs and ``outputs_of`` (an engine running
    the exported file) on each check image."""
    with torch.inference_mode():
        expected = [graph(pixels[i : i + 1]) for i in range(len(pixels))]
    got_all = outputs_of([pixels[i : i + 1].numpy() for i in range(len(pixels))])
    worst = 0.0
    for got, want in zip(got_all, expected):
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want):
            b = b.numpy()
            worst = max(worst, float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max()))
    return worst


# --- running an exported model: fewvision.runtime (no torch) ---------------------------------------------------
def load_onnx(path: str | os.PathLike, threads: int | None = None, engine: str = "onnxruntime",
              precision: str | None = None) -> RuntimeModel:
    """An exported model on onnxruntime (or ``engine``, ``precision``); a file that is not a fewvision export is
    refused."""
    try:
        return open_model(path, engine=engine, threads=threads, precision=precision)
    except ModelFileError as err:
        raise ExportError(str(err)) from None


def onnx_task(path: str | os.PathLike) -> str:
    return load_onnx(path).task


def _opened(model: "RuntimeModel | str | os.PathLike") -> RuntimeModel:
    return model if isinstance(model, RuntimeModel) else load_onnx(model)


def predict_onnx(path: "RuntimeModel | str | os.PathLike", inputs: Sequence[str | os.PathLike], *, abstain: bool = False,
                 unknown_threshold: float | None = None, progress: bool = False):
    """``tasks.fewshot.predict`` for an exported classification model: the same rows, from onnxruntime."""
    model = _opened(path)
    if model.task != "classification":
        raise ExportError(f"{model.path}: an exported anomaly model; score images with 'fewvision anomaly predict'")
    return runtime_predict(model, inputs, abstain=abstain, unknown_threshold=unknown_threshold, progress=progress)


def score_onnx(path: "RuntimeModel | str | os.PathLike", inputs: Sequence[str | os.PathLike], *, review_band: float = 0.0,
               keep_maps: bool = True, progress: bool = False):
    """``tasks.anomaly.score_files`` for an exported anomaly model: the same rows and maps, from onnxruntime."""
    model = _opened(path)
    if model.task != "anomaly":
        raise ExportError(f"{model.path}: an exported classification model; classify images with 'fewvision predict'")
    return runtime_score_files(model, inputs, review_band=review_band, keep_maps=keep_maps, progress=progress)


# --- reduced precision, behind an accuracy gate ---------------------------------------------------------------
DEFAULT_MAX_DROP = 0.01  # the accuracy (classification) or AUROC (anomaly) a reduced precision may lose at most
CALIBRATION_IMAGES = 64


def _labelled(dataset) -> tuple[list[str], list[str], Any]:
    from ..io.datasets import Dataset, load_dataset

    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    items = [it for it in ds.items if it.label is not None]
    return [it.path for it in items], [it.label for it in items], ds


def gate(reference: tuple[Path, str, str], reduced: tuple[Path, str, str], dataset, *,
         max_drop: float = DEFAULT_MAX_DROP, force: bool = False, what: str) -> dict[str, Any]:
    """Measure the graph ``reduced`` = (file, engine, precision) against ``reference`` (fp32) on the labelled
    dataset - accuracy of a classifier, image AUROC of an anomaly model; ExportError past ``max_drop`` unless
    ``force``. Engines other than onnxruntime are measured apart (:mod:`fewvision.runtime.measure`). Returns the
    record a pack keeps (metric, both values, images, limit, engine, precision)."""
    from ..io.datasets import DatasetError
    from ..tasks.evaluation import good_label_of

    paths, labels, ds = _labelled(dataset)
    if not paths:
        raise ExportError(f"{dataset}: no labelled images to measure {what} on")
    try:
        good = good_label_of(ds)
    except DatasetError:  # a classifier's dataset needs none
        good = None

    def measured(graph: tuple[Path, str, str]) -> tuple[float, str, int]:
        run = (lambda *a: measure.quality(*a)) if graph[1] == "onnxruntime" else \
            (lambda *a: apart(measure.quality, *a))
        try:
            return run(str(graph[0]), graph[1], graph[2], paths, labels, good)
        except ValueError as err:  # the measuring engine's one line (no bf16 here, a dataset of one kind ...)
            raise ExportError(f"{what}: {str(err).split(': ', 1)[-1] if str(graph[0]) in str(err) else err}") \
                from None

    before, metric, n = measured(reference)
    after, _, _ = measured(reduced)
    record = {"metric": metric, "fp32": before, "reduced": after, "images": n, "max_drop": max_drop,
              "engine": reduced[1], "precision": reduced[2]}
    if before - after > max_drop and not force:
        raise ExportError(f"{what} {metric} {after:.4f} against fp32 {before:.4f} on {n} image(s): a drop of "
                          f"{before - after:.4f} > {max_drop:g}; not written (--force writes it anyway)")
    return record


def quantize_int8(fp32_path: str | os.PathLike, out: str | os.PathLike, dataset, *,
                  max_drop: float = DEFAULT_MAX_DROP, force: bool = False) -> dict[str, Any]:
    """Static int8 quantisation (QDQ, per-channel weights, activation ranges calibrated on the dataset's own
    images) of the encoder of an exported model: its convolutions (a CNN), or its matrix products (MatMul / Gemm:
    a transformer, whose only convolution is the patch embedding). The head - distances to the memory bank,
    Mahalanobis terms, class logits - stays float. The accuracy or AUROC of both models on the labelled dataset is
    measured on onnxruntime and a model that loses more than ``max_drop`` is not written unless ``force``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from ..tasks.rows import Recorder, pixel_chunks

    fp32_path, out = Path(fp32_path), Path(out)
    fp32 = load_onnx(fp32_path)
    proto = onnx.load(str(fp32_path))
    ops = [n.op_type for n in proto.graph.node]
    op_types = ["Conv"] if ops.count("Conv") >= 3 else ["MatMul", "Gemm"]
    paths, labels, ds = _labelled(dataset)
    if not paths:
        raise ExportError(f"{dataset}: no labelled images for int8")
    rng = np.random.default_rng(0)
    calibration = [paths[i] for i in sorted(rng.permutation(len(paths))[:CALIBRATION_IMAGES])]

    class Reader(CalibrationDataReader):
        def __init__(self):
            chunks = pixel_chunks(fp32.preprocess, calibration, 8, Recorder())
            self.items = (p[i : i + 1] for _, p in chunks for i in range(len(p)))

        def get_next(self):
            pixels = next(self.items, None)
            return None if pixels is None else {"pixels": pixels}

    with atomic_path(out) as tmp:
        # The head's own matrix products (memory-bank distances, logits) stay float: only the encoder's nodes.
        nodes = _encoder_nodes(proto, op_types)
        if not nodes:
            raise ExportError(f"{fp32_path}: no encoder {'/'.join(op_types)} nodes found to quantise (exported "
                              "without the exporter's stack traces?)")
        quantize_static(str(fp32_path), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                        nodes_to_quantize=nodes,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        quantized = onnx.load(str(tmp))
        del quantized.metadata_props[:]
        manifest = dict(fp32.manifest)
        quantized.metadata_props.add(key=METADATA_KEY, value=json.dumps(manifest, allow_nan=False))
        onnx.save_model(quantized, str(tmp))
        record = gate((fp32_path, "onnxruntime", "fp32"), (tmp, "onnxruntime", "fp32"), ds, max_drop=max_drop,
                      force=force, what=f"{out}: int8")
        manifest["int8"] = {"calibration_images": len(calibration), "metric": record["metric"],
                            "fp32": record["fp32"], "int8": record["reduced"], "max_drop": max_drop,
                            "images": record["images"], "quantized": op_types, "nodes": len(nodes)}
        quantized.metadata_props[0].value = json.dumps(manifest, allow_nan=False)
        onnx.save_model(quantized, str(tmp))
    return manifest


def _encoder_nodes(proto, op_types: list[str]) -> list[str]:
    """The nodes of ``op_types`` that torch's exporter traced from the graph's ``self.backbone`` call (the first
    frame of each node's recorded stack trace is a line of ClassifierGraph / AnomalyGraph.forward)."""
    names = []
    for node in proto.graph.node:
        if node.op_type in op_types:
            trace = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.stack_trace"), "")
            lines = trace.splitlines()
            if len(lines) > 1 and "self.backbone." in lines[1]:
                names.append(node.name)
    return names
