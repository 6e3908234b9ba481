"""open_clip models: ``openclip:MODEL[/TAG]`` (hub weights), ``openclip:MODEL@PATH`` (local weights).

MODEL is an open_clip architecture name or a path to an open_clip model-config JSON, so custom and tiny
architectures load the same way. A config JSON with neither tag nor path, or any MODEL with ``@random``, gets a
seeded random initialisation (for tests and speed benchmarks); a named architecture with no tag takes its first
listed tag.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__
from ..io.atomic import atomic_path
from ..io.paths import weights_dir
from .base import Backbone, BackboneError, digest_state_dict, hub_folder_name, make_id
from .preprocess import as_json, from_recipe
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


def read_config(path: Path) -> str:
    """The text of an open_clip model-config JSON, checked to be JSON."""
    if not path.is_file():
        raise BackboneError(f"{path}: open_clip model config not found")
    text = path.read_text()
    try:
        json.loads(text)
    except ValueError as err:
        raise BackboneError(f"{path}: not a valid model-config JSON ({err})") from None
    return text


def _register_config(model: str) -> str:
    """A config JSON path -> its registered model name (the file stem)."""
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        read_config(path)
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip model '{model}'; see 'fewvision models list' or pass a model-config JSON path"
        )
    return model


def local_weight_file(spec: str, path: str) -> Path:
    """The weight file of ``MODEL@PATH``: the file, or the first .safetensors / .bin / .pt file of a directory."""
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
    return weight_file  # not resolved: a hub cache's link keeps the file's name, which the weights digest covers


# --- what open_clip told an earlier run about a spec (its id and preprocessing), kept in the weights cache -------
DESCRIPTIONS = "openclip-backbones.json"
DESCRIPTION_VERSION = 1  # bump when the remembered fields change


def file_stamp(path: Path | None) -> list | None:
    """(resolved path, size, modification time) of a weight file: a file that changed is described again."""
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def description_key(model: str, config_text: str | None, tag: str | None, path: str | None,
                    weight_file: Path | None) -> str:
    """Everything the id and preprocessing of a spec follow from, short of open_clip's own tables: the architecture
    (name, or the config file's path and content), the tag, the weight file, and the library versions."""
    blob = json.dumps({
        "v": DESCRIPTION_VERSION, "features": FEATURE_VERSION, "model": model,
        "config": hashlib.sha256(config_text.encode()).hexdigest() if config_text is not None else None,
        "tag": tag, "path": "random" if path == "random" else None, "weights": file_stamp(weight_file),
        "versions": [__version__, *(_version(p) for p in ("open_clip_torch", "torch", "torchvision", "timm"))],
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def known_descriptions(cache: Path) -> dict[str, dict]:
    try:
        known = json.loads((cache / DESCRIPTIONS).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def remember_description(cache: Path, key: str, description: dict) -> None:
    known = known_descriptions(cache)
    known[key] = description
    try:
        with atomic_path(cache / DESCRIPTIONS) as tmp:
            tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
    except OSError:
        pass  # only a speed-up: a read-only cache describes the spec again next time


# Bump when fewvision changes how it computes features from the same weights: the version is part of the backbone
# id, so caches and model files of the old computation are not mixed with the new.
FEATURE_VERSION = 2
_TAG_PREPROCESS = {"mean": "mean", "std": "std", "interpolation": "interpolation", "resize_mode": "resize_mode"}


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript archive, the format of OpenAI's original CLIP checkpoints (``ViT-B-32.pt``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def tag_of_hub_file(path: Path, model_name: str) -> dict | None:
    """The pretrained-tag config whose hub repository a weight file was downloaded from (a copied fewvision or
    Hugging Face cache keeps the ``models--ORG--REPO`` folder), or None."""
    import open_clip

    folder = hub_folder_name(path)
    if folder is None:
        return None
    repo = folder[len("models--"):].replace("--", "/")
    for tag in open_clip.list_pretrained_tags_by_model(model_name):
        cfg = open_clip.get_pretrained_cfg(model_name, tag)
        if cfg.get("hf_hub") and hub_repo_and_file(cfg)[0] == repo:
            return cfg
    return None


def preprocess_for(model_name: str, tag_cfg: dict | None):
    """open_clip's inference transform for ``model_name``, built without the model: the defaults, the tower's image
    size and the tag's mean / std / interpolation / resize mode - what ``create_model_and_transforms`` gives
    (tested against it)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    size = vision.get("image_size", 224)
    if not isinstance(vision.get("layers"), (list, tuple)) and isinstance(size, int):
        size = (size, size)  # ViT and timm towers keep a (h, w) pair, the ModifiedResNet an int
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), {"size": size})
    if tag_cfg:
        cfg = merge_preprocess_dict(cfg, {k: tag_cfg[v] for k, v in _TAG_PREPROCESS.items() if tag_cfg.get(v)})
    return from_recipe({"kind": "openclip", "cfg": cfg}), cfg


class OpenClipBackbone(Backbone):
    """An open_clip model whose weights are loaded on first use: the id, the preprocessing and cached features need
    no model, so a run whose features and prompt embeddings are all cached never builds the encoder.

    Working out the id and the preprocessing needs open_clip (its configs, tags and transforms), whose import
    alone pulls in timm, torchvision and parts of transformers (seconds). What it gives is kept in the weights cache
    (``openclip-backbones.json``), keyed by the spec's config, weight file (path, size, modification time) and the
    versions of fewvision, open_clip, torch, torchvision and timm, so a later run with the same inputs imports none
    of them until it has to build the model, its tokenizer or its transform."""

    has_text = True

    def __init__(self, spec: str, cache_dir: str | None = None, download: bool = True, device: str = "cpu"):
        self.spec = spec
        model_arg, tag, path = parse_openclip_spec(spec.split(":", 1)[1])
        self._device = torch.device(device)
        self._model = self._tokenizer = self._transform = None
        self._lock = threading.Lock()
        self._registered = False
        config = Path(model_arg).expanduser()
        self._config_file = config.resolve() if config.suffix == ".json" else None
        config_text = read_config(config) if self._config_file is not None else None
        weight_file = local_weight_file(spec, path) if path not in (None, "random") else None
        cache = weights_dir(cache_dir)
        key = description_key(str(self._config_file or model_arg), config_text, tag, path, weight_file)
        # Remembered descriptions save importing open_clip; once it is imported, describing costs no import and
        # follows open_clip's tables as they are now (what tests that add a tag rely on).
        known = None if "open_clip" in sys.modules else known_descriptions(cache).get(key)
        if known is not None and known.get("hub"):  # a pretrained tag: find its file as a cold run would
            weight_file = hub_file(spec, known["hub"][0], known["hub"][1], cache=cache, download=download)
        if known is None or known.get("stamp") != file_stamp(weight_file):
            known = self._describe(model_arg, tag, path, weight_file, cache, download)
            remember_description(cache, key, known)
        self.model_name, self.tag, self.quick_gelu = known["model_name"], known["tag"], known["quick_gelu"]
        self.weight_file = Path(known["weight_file"]) if known["weight_file"] is not None else None
        self._preprocess_cfg = known["preprocess"]
        self._id = known["id"]

    def _describe(self, model_arg: str, tag: str | None, path: str | None, weight_file: Path | None, cache: Path,
                  download: bool) -> dict:
        """What the id and the preprocessing take, worked out with open_clip (a run with nothing remembered)."""
        import open_clip

        model_name = _register_config(model_arg)
        self._registered = True
        is_config_file = self._config_file is not None
        if path is None and tag is None and not is_config_file:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if tags:
                tag = tags[0]
        if path == "random":  # explicit seeded random initialisation of a named architecture
            is_config_file = True
        tag_cfg: dict | None = None
        hub = None
        if weight_file is not None:
            # A file from a tag's hub repository gets that tag's activation and preprocessing, as the tag would.
            tag_cfg = tag_of_hub_file(weight_file, model_name)
        elif tag is not None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, tag)
            if not tag_cfg:
                raise BackboneError(
                    f"'{tag}' is not a pretrained tag of open_clip model '{model_name}'; "
                    f"known tags: {', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none'}"
                )
            hub = pretrained_source(self.spec, tag_cfg)
            weight_file = hub_file(self.spec, hub[0], hub[1], cache=cache, download=download)

        # QuickGELU: OpenAI's checkpoints were trained with it; running them with plain GELU gives wrong features.
        self.quick_gelu = bool((tag_cfg or {}).get("quick_gelu")
                               or (open_clip.get_model_config(model_name) or {}).get("quick_gelu")
                               or (weight_file is not None and is_torchscript_archive(weight_file)))
        self._transform, preprocess_cfg = preprocess_for(model_name, tag_cfg)
        self.model_name, self.tag, self.weight_file = model_name, tag, weight_file
        if weight_file is not None:
            weights = file_digest(weight_file)
        else:  # a seeded random initialisation: identified by its values, which needs the model built
            weights = digest_state_dict(self.model)
        architecture = open_clip.get_model_config(model_name) if is_config_file else model_name
        backbone_id = make_id("openclip", {"model": architecture, "weights": weights,
                                           "activation": "quick_gelu" if self.quick_gelu else "gelu",
                                           "features": FEATURE_VERSION}, repr(self._transform))
        return {"model_name": model_name, "tag": tag, "quick_gelu": self.quick_gelu, "hub": hub,
                "weight_file": str(weight_file) if weight_file is not None else None,
                "stamp": file_stamp(weight_file), "preprocess": as_json(preprocess_cfg), "id": backbone_id}

    def _open_clip(self):
        """open_clip, with this backbone's config file registered (the model and its tokenizer are built by name)."""
        import open_clip

        if not self._registered:
            _register_config(str(self._config_file) if self._config_file is not None else self.model_name)
            self._registered = True
        return open_clip

    @property
    def preprocess(self):
        """open_clip's transform, built on first use (a run whose features are all cached never needs it)."""
        if self._transform is None:
            self._transform = from_recipe(self.preprocess_recipe)
        return self._transform

    @property
    def preprocess_recipe(self) -> dict:
        return {"kind": "openclip", "cfg": as_json(self._preprocess_cfg)}

    def portable(self) -> tuple[dict[str, Path], str]:
        """The config JSON (for a config-file architecture) and the weight file; a file from a tag's hub repository
        keeps its ``models--ORG--REPO`` folder, which gives it the tag's activation and preprocessing there."""
        files: dict[str, Path] = {}
        model = self.model_name
        if self._config_file is not None:
            files[f"backbone/{self._config_file.name}"] = self._config_file
            model = f"{{root}}/backbone/{self._config_file.name}"
        if self.weight_file is None:
            return files, f"openclip:{model}" if self._config_file is not None else f"openclip:{model}@random"
        hub = hub_folder_name(self.weight_file)
        name = f"backbone/{hub}/{self.weight_file.name}" if hub else f"backbone/{self.weight_file.name}"
        files[name] = self.weight_file
        return files, f"openclip:{model}@{{root}}/{name}"

    @property
    def model(self):
        """The open_clip model, built (and its weights read) on first use."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._build()
        return self._model

    def _build(self):
        open_clip = self._open_clip()
        if self.weight_file is None:
            torch.manual_seed(RANDOM_INIT_SEED)
        # Built on first use, which is often inside an encoder's inference_mode: weights made there would be
        # inference tensors, which training heads (CoOp, LoRA) and the ONNX exporter cannot use.
        with torch.inference_mode(False):
            return self._create(open_clip)

    def _create(self, open_clip):
        model = open_clip.create_model(
            self.model_name,
            pretrained=str(self.weight_file) if self.weight_file is not None else None,
            device=self._device,
            force_quick_gelu=self.quick_gelu,
        )
        return model.eval()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self._open_clip().get_tokenizer(self.model_name)
        return self._tokenizer

    @property
    def input_size(self) -> tuple[int, int]:
        size = self._preprocess_cfg["size"]
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


def pretrained_source(spec: str, cfg: dict) -> tuple[str, list[str]]:
    """The hub repository of a pretrained tag's checkpoint and the file names to look for there, in order."""
    if not cfg.get("hf_hub"):
        raise BackboneError(f"'{spec}' is only published at a URL, not on the model hub; download it and use @PATH")
    repo_id, filename = hub_repo_and_file(cfg)
    names = [n for n in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin") if n]
    if filename.endswith(".bin"):
        names.insert(0, filename.replace(".bin", ".safetensors"))
    return repo_id, list(dict.fromkeys(names))


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
