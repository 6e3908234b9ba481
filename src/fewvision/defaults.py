"""Default backbones and methods, and a site's own defaults, in one module with no heavy imports (the CLI reads them
to build its help).

A site sets its default backbone once instead of typing ``--backbone`` on every command (an air-gapped line PC
runs ``texture`` or a local weights file): the environment variables ``FEWVISION_BACKBONE`` (classification) and
``FEWVISION_ANOMALY_BACKBONE`` (anomaly detection), or a YAML file at ``$FEWVISION_CONFIG`` (default
``~/.config/fewvision/config.yaml``, or under ``$XDG_CONFIG_HOME``) with the keys ``backbone`` and
``anomaly_backbone``. A ``--backbone`` on the command line wins over both; the environment wins over the file.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CLIP_SPEC = "openclip:ViT-B-32/laion2b_s34b_b79k"
# The torchvision ImageNet weights PatchCore and PaDiM were published with (timm's untagged wide_resnet50_2 is another
# training recipe, racm_in1k).
DEFAULT_ANOMALY_BACKBONE = "timm:wide_resnet50_2.tv_in1k"
DEFAULT_ANOMALY_METHOD = "patchcore"

_KEYS = {"classification": ("FEWVISION_BACKBONE", "backbone", DEFAULT_CLIP_SPEC),
         "anomaly": ("FEWVISION_ANOMALY_BACKBONE", "anomaly_backbone", DEFAULT_ANOMALY_BACKBONE)}


class ConfigError(ValueError):
    """The site configuration file cannot be used; the message names the file and the reason."""


def config_path() -> Path:
    env = os.environ.get("FEWVISION_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "fewvision" / "config.yaml"


def site_config() -> dict:
    """The site configuration file's settings ({} when there is none)."""
    path = config_path()
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the fewvision configuration ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the fewvision configuration must be a mapping (backbone: SPEC)")
    unknown = sorted(set(data) - {k for _, k, _ in _KEYS.values()})
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: backbone, anomaly_backbone")
    return data


def default_backbone(task: str = "classification") -> str:
    """The backbone a command uses without ``--backbone``: environment, else site file, else the built-in."""
    env, key, builtin = _KEYS[task]
    if os.environ.get(env):
        return os.environ[env].strip()
    value = site_config().get(key)
    return str(value).strip() if value else builtin
