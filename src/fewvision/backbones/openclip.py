"""open_clip models: ``openclip:MODEL[/TAG]`` (hub weights), ``openclip:MODEL@PATH`` (local weights).

MODEL is an open_clip architecture name or a path to an open_clip model-config JSON, so custom and tiny
architectures load the same way. A config JSON with neither tag nor path, or any MODEL with ``@random``, gets a
seeded random initialisation (for tests and speed benchmarks); a named architecture with no tag takes its first
listed tag.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..io.paths import weights_dir
from .base import Backbone, BackboneError, digest_state_dict, make_id
from .weights import file_digest, hub_file

RANDOM_INIT_SEED = 0


def parse_openclip_spec(rest: str) -> tuple[str, str | None, str | None]:
    """'MODEL[/TAG]' or 'MODEL@PATH' -> (model, tag, path). A config path may itself contain '/'."""
    if "@" in rest:
        model, path = rest.split("@", 1)
        return model, None, path
    if rest.endswith(".json") or Path(rest).is_file():
        return rest, None, None
    if "/" in rest:
        model, tag = rest.rsplit("/", 1)
        return model, tag, None
    return rest, None, None


def _register_config(model: str) -> str:
    """A config JSON path -> its registered model name (the file stem)."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise BackboneError(f"{path}: open_clip model config not found")
        try:
            json.loads(path.read_text())
        except ValueError as err:
            raise BackboneError(f"{path}: not a valid model-config JSON ({err})") from None
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model '{model}'; see 'fewvision models list' or pass a model-config JSON path"
        )
    return model


class OpenClipBackbone(Backbone):
    has_text = True

    def __init__(self, spec: str, cache_dir: str | None = None, download: bool = True, device: str = "cpu"):
        import open_clip

        self.spec = spec
        model_arg, tag, path = parse_openclip_spec(spec.split(":", 1)[1])
        model_name = _register_config(model_arg)
        is_config_file = model_name != model_arg
        cache = weights_dir(cache_dir)

        if path is None and tag is None and not is_config_file:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if tags:
                tag = tags[0]
        if path == "random":  # explicit seeded random initialisation of a named architecture
            path, is_config_file = None, True
        weight_file: Path | None = None
        quick_gelu = False
        preprocess_cfg: dict = {}
        if path is not None:
            weight_file = Path(path).expanduser()
            if weight_file.is_dir():
                candidates = sorted(weight_file.glob("*.safetensors")) + sorted(weight_file.glob("*.bin")) + sorted(
                    weight_file.glob("*.pt")
                )
                if not candidates:
                    raise BackboneError(f"{weight_file}: no .safetensors, .bin or .pt weight file in this directory")
                weight_file = candidates[0]
            if not weight_file.is_file():
                raise BackboneError(f"{weight_file}: weights file not found (from spec '{spec}')")
        elif tag is not None:
            cfg = open_clip.get_pretrained_cfg(model_name, tag)
            if not cfg:
                raise BackboneError(
                    f"'{tag}' is not a pretrained tag of open_clip model '{model_name}'; "
                    f"known tags: {', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'}"
                )
            weight_file = resolve_pretrained_file(spec, cfg, cache, download)
            quick_gelu = bool(cfg.get("quick_gelu", False))
            # The tag's own preprocessing, which open_clip applies only when given the tag, not a file path.
            keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                    "resize_mode": "image_resize_mode"}
            preprocess_cfg = {arg: cfg[key] for key, arg in keys.items() if cfg.get(key)}

        if weight_file is None:
            torch.manual_seed(RANDOM_INIT_SEED)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=str(weight_file) if weight_file is not None else None,
            device=device,
            force_quick_gelu=quick_gelu,
            **preprocess_cfg,
        )
        model.eval()
        self.model = model
        self._preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.tag = tag
        self.weight_file = weight_file
        weights = file_digest(weight_file) if weight_file is not None else digest_state_dict(model)
        self._id = make_id("openclip", f"{model_name}:{weights}", repr(preprocess))
        self._device = torch.device(device)

    @property
    def input_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def forward_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self._device))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            tokens = self.tokenizer(list(texts)).to(self._device)
            feats = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(feats, dim=-1)

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        if not hasattr(visual, "output_tokens"):
            raise BackboneError(f"backbone '{self.spec}': patch tokens are only available for ViT image towers")
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            with torch.inference_mode():
                _, tokens = visual(pixels.to(self._device))
        finally:
            visual.output_tokens = previous
        b, n, d = tokens.shape
        side = int(round(n**0.5))
        return tokens.float().transpose(1, 2).reshape(b, d, side, n // side)

    # --- the last visual projection (ProLIP trains it on cached pre-projection features) -------------------
    @property
    def projection_name(self) -> str:
        """State-dict name of the last visual projection: ViT ``visual.proj``, ResNet ``attnpool.c_proj.weight``."""
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        visual = self.model.visual
        if isinstance(visual, ModifiedResNet):
            return "visual.attnpool.c_proj.weight"
        if isinstance(visual, VisionTransformer) and visual.proj is not None:
            return "visual.proj"
        raise BackboneError(f"backbone '{self.spec}': its image tower has no separate last projection "
                            "(supported: open_clip ViT with 'proj', ModifiedResNet)")

    def visual_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the last visual projection as (W [width, D], b [D]) with embedding = pre-projection @ W + b."""
        name, visual = self.projection_name, self.model.visual
        if name == "visual.proj":
            weight = visual.proj.detach().float().clone()
            return weight, torch.zeros(weight.shape[1])
        c_proj = visual.attnpool.c_proj
        weight = c_proj.weight.detach().float().t().clone(memory_format=torch.contiguous_format)
        return weight, c_proj.bias.detach().float().clone()

    def encode_pre_projection(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed batch -> image features just before the last projection [B, width] (float32)."""
        name, visual = self.projection_name, self.model.visual
        with torch.inference_mode():
            x = pixels.to(self._device)
            if name == "visual.proj":
                pooled, _ = visual._pool(visual.transformer(visual._embeds(x)))
                return pooled.float()
            for stage in (visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = stage(x)
            return _attnpool_without_output_projection(visual.attnpool, x).float()


def resolve_pretrained_file(spec: str, cfg: dict, cache: Path, download: bool) -> Path:
    """The local path of a pretrained tag's checkpoint, from the cache or the hub."""
    if not cfg.get("hf_hub"):
        raise BackboneError(f"'{spec}' is only published at a URL, not on the model hub; download it and use @PATH")
    repo_id, filename = hub_repo_and_file(cfg)
    names = [n for n in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin") if n]
    if filename.endswith(".bin"):
        names.insert(0, filename.replace(".bin", ".safetensors"))
    return hub_file(spec, repo_id, list(dict.fromkeys(names)), cache=cache, download=download)


def hub_repo_and_file(cfg: dict) -> tuple[str, str]:
    """open_clip writes 'org/repo/file' or 'org/repo/' (default file name) in a tag's 'hf_hub' entry."""
    hub = cfg["hf_hub"]
    if hub.endswith("/"):
        return hub.rstrip("/"), ""
    repo_id, filename = hub.rsplit("/", 1)
    return repo_id, filename


def _attnpool_without_output_projection(pool, x: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d.forward with an identity output projection: the input of ``c_proj``.

    ``c_proj`` is applied inside ``multi_head_attention_forward`` (no module call to hook), so it is replaced by
    the identity there; multiplying by an identity matrix is exact.
    """
    import torch.nn.functional as F

    x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    width = x.shape[-1]
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=width, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=torch.eye(width, dtype=x.dtype, device=x.device),
        out_proj_bias=torch.zeros(width, dtype=x.dtype, device=x.device),
        use_separate_proj_weight=True, training=pool.training, need_weights=False,
    )
    return x[0]
