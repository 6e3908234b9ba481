"""Scoring without torch: packed and exported models on onnxruntime or OpenVINO, fed by Pillow and numpy."""
