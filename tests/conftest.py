import json
import os
from pathlib import Path

import pytest

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own cache root, and the hub is never contacted."""
    root = tmp_path_factory.mktemp("fewvision-cache")
    old = {k: os.environ.get(k) for k in ("FEWVISION_CACHE_DIR", "HF_HUB_OFFLINE")}
    os.environ["FEWVISION_CACHE_DIR"] = str(root)
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_config):
    from fewvision.backbones import create_backbone

    return create_backbone(f"openclip:{tiny_clip_config}")


@pytest.fixture(scope="session")
def textile_root() -> Path:
    from fewvision.datasets import textile_root

    return textile_root()


@pytest.fixture(scope="session")
def textile_subset(tmp_path_factory, textile_root) -> Path:
    """A folder-per-class copy of 12 textile images per class (small enough for end-to-end CLI tests)."""
    import shutil

    root = tmp_path_factory.mktemp("textile-small")
    for cls in ("nominal", "local", "global"):
        (root / cls).mkdir()
        for p in sorted((textile_root / cls).glob("*.jpg"))[:12]:
            shutil.copy(p, root / cls / p.name)
    return root
