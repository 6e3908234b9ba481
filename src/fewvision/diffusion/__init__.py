"""Stable Diffusion as a few-shot classifier: class tokens learned by textual inversion (GCPL / CoMPLe) and the
diffusion classifier that scores an image by how well each class prompt predicts its noise (Li et al. 2023)."""
