"""The engines that run an exported graph on the CPU, and the rule that picks one.

* ``onnxruntime`` (always installed): the CPU execution provider.
* ``openvino`` (``pip install fewvision[openvino]``): Intel's runtime, which reads the ONNX file directly; fp32, or
  bf16 (``INFERENCE_PRECISION_HINT``) on CPUs with bf16 instructions (AVX-512 BF16 or AMX).

``--engine auto`` picks, in this order: the reduced-precision run a pack recorded after passing its accuracy gate
(``fewvision pack --precision``), when its engine is installed and this CPU can run it; else, of the fp32 engines
whose scores passed the 1e-4 parity check when the model was packed, the one that was fastest there and is
installed here; else onnxruntime fp32 (the engine every export is checked on, and the one an exported .onnx runs
on). A reduced precision is only ever used where it was measured on the user's images; the speed is measured on
the packing machine, so a line PC of another make may rank the engines otherwise (``--engine`` overrides).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

ENGINES = ("onnxruntime", "openvino")
CHOICES = ("auto", *ENGINES, "torch")
PRECISIONS = ("fp32", "bf16", "int8")


class EngineError(ValueError):
    """An engine that is missing or cannot run a graph here; one line."""


def installed(module: str) -> bool:
    """Whether ``module`` (an engine, torch, scipy ...) can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses the name: not importable either
        return False


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin reports bf16 support on this CPU (False without OpenVINO)."""
    if not installed("openvino"):
        return False
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


class OnnxRuntimeEngine:
    name = "onnxruntime"

    def __init__(self, graph: Path, *, precision: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        self.precision = precision
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(f"{graph}: onnxruntime cannot load it ({' '.join(str(err).split())[:300]})") from None

    def metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"pixels": pixels})


class OpenVinoEngine:
    name = "openvino"

    def __init__(self, graph: Path, *, precision: str = "fp32", threads: int | None = None):
        if not installed("openvino"):
            raise EngineError("the openvino engine is not installed: pip install 'fewvision[openvino]'")
        import openvino as ov

        if precision not in ("fp32", "bf16", "int8"):
            raise EngineError(f"OpenVINO runs fp32, bf16 or an int8 graph, not {precision}")
        if precision == "bf16" and not cpu_has_bf16():
            raise EngineError("this CPU has no bf16 instructions for OpenVINO; run the model with fp32")
        self.precision = precision
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        except RuntimeError as err:
            raise EngineError(f"{graph}: OpenVINO cannot compile it ({' '.join(str(err).split())[:300]})") from None
        self.request = self.compiled.create_infer_request()

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: pixels})
        return [self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))]


def create_engine(engine: str, graph: Path, *, precision: str = "fp32", threads: int | None = None):
    if engine == "onnxruntime":
        if precision == "bf16":
            raise EngineError("onnxruntime's CPU provider has no bf16 kernels; use --engine openvino")
        return OnnxRuntimeEngine(graph, precision=precision, threads=threads)
    if engine == "openvino":
        return OpenVinoEngine(graph, precision=precision, threads=threads)
    raise EngineError(f"unknown engine {engine!r} (choose from {', '.join(CHOICES)})")


def choose(requested: str, recorded: dict[str, Any] | None = None, *, graphs: tuple[str, ...] = ("fp32",),
           measured: dict[str, Any] | None = None) -> tuple[str, str]:
    """(engine, precision) for ``--engine requested`` (see the module's doc for ``auto``). ``recorded``: the pack's
    gated run ({"engine", "precision", ...}) or None; ``graphs``: the precisions of the graphs at hand;
    ``measured``: the fp32 engines that passed the parity check when the model was packed, with their speed there
    ({name: {"images_per_s": ...}}); None for an exported .onnx (checked on onnxruntime)."""
    if requested not in CHOICES or requested == "torch":
        raise EngineError(f"unknown engine {requested!r} (choose from {', '.join(ENGINES)})")
    if recorded and recorded.get("precision") in graphs + ("bf16",) and \
            requested in ("auto", recorded["engine"]) and installed(recorded["engine"]) and \
            (recorded["precision"] != "bf16" or cpu_has_bf16()):
        return recorded["engine"], recorded["precision"]
    if requested == "auto":
        usable = {name: entry.get("images_per_s", 0) for name, entry in (measured or {}).items() if installed(name)}
        return (max(usable, key=usable.get) if usable else "onnxruntime"), "fp32"
    if not installed(requested):
        raise EngineError(f"the {requested} engine is not installed: pip install 'fewvision[{requested}]'")
    return requested, "fp32"
