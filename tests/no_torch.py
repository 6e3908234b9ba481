"""Imported first by a subprocess that plays the light install: everything only the "full" extra brings (torch and
the libraries built on it, scikit-learn, scipy, matplotlib, the service's web stack, the ONNX exporter) cannot be
imported, so a command that reaches for any of them fails as it would on a line PC."""

import sys

FULL_ONLY = {"torch", "torchvision", "open_clip", "timm", "transformers", "diffusers", "peft", "huggingface_hub",
             "sklearn", "scipy", "matplotlib", "fastapi", "starlette", "uvicorn", "onnx", "onnxscript", "psycopg",
             "pyarrow"}
ALLOWED = set(filter(None, __import__("os").environ.get("FEWVISION_TEST_ALLOW", "").split(",")))


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FULL_ONLY - ALLOWED:
            raise ModuleNotFoundError(f"No module named '{name}' (not on the light install)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
