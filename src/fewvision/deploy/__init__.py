"""Deployment: one archive for an offline machine (:mod:`.pack`), ONNX export and onnxruntime inference
(:mod:`.onnx`)."""
