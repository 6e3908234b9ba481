"""Default backbones and methods, in one module with no heavy imports (the CLI reads them to build its help)."""

DEFAULT_CLIP_SPEC = "openclip:ViT-B-32/laion2b_s34b_b79k"
# The torchvision ImageNet weights PatchCore and PaDiM were published with (timm's untagged wide_resnet50_2 is another
# training recipe, racm_in1k).
DEFAULT_ANOMALY_BACKBONE = "timm:wide_resnet50_2.tv_in1k"
DEFAULT_ANOMALY_METHOD = "patchcore"
