import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: one thread each (their subprocesses too), or OpenMP threads of
    # both workers wait on each other.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

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
def tiny_resnet_clip(tmp_path_factory):
    """A tiny random open_clip CLIP with a ModifiedResNet image tower (for heads that need a ViT one to refuse)."""
    from fewvision.backbones import create_backbone

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    path = tmp_path_factory.mktemp("configs") / "tiny-resnet-clip.json"
    path.write_text(json.dumps(config))
    return create_backbone(f"openclip:{path}")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny, untrained Stable Diffusion pipeline folder (for heads that run one: gcpl, comple)."""
    from diffusion_helpers import tiny_toy_pipeline, toy_images

    root = tmp_path_factory.mktemp("tiny-sd")
    return tiny_toy_pipeline(root / "pipeline", toy_images(root / "images"), steps=0)


@pytest.fixture(scope="session")
def textile_root() -> Path:
    from fewvision.io.datasets import textile_root

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


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared CPU, OpenMP
    threads waiting on each other cost far more than they give."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def textile_split():
    """Few-shot split of the textile images: (class names, 4 train paths per class, their labels, 3 test paths per
    class)."""
    from fewvision.io.datasets import textile

    items = textile().items
    names = ["nominal", "local", "global"]
    train = [i for c in names for i in [x for x in items if x.label == c][:4]]
    test = [i for c in names for i in [x for x in items if x.label == c][100:103]]
    return names, [i.path for i in train], [names.index(i.label) for i in train], [i.path for i in test]



def pytest_collection_modifyitems(config, items):
    """Files holding slow tests first: `make test` hands whole files to two workers (--dist loadfile), and a long
    file handed out last keeps one worker busy while the other idles."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each file keeps its order


COLOURS = {"red": (220, 50, 50), "blue": (50, 50, 220), "green": (50, 200, 50), "yellow": (220, 220, 50)}


@pytest.fixture(scope="session")
def colour_task(tmp_path_factory, tiny_clip):
    """A task the tiny random CLIP gets wrong zero-shot and can learn (for heads that tune it): four classes of noisy
    flat colour (64 px), 1 support image and 15 test images per class. (support, test images, test labels)"""
    import numpy as np
    from PIL import Image

    from fewvision.heads.support import Support
    from fewvision.io.images import load_image

    root, rng = tmp_path_factory.mktemp("colours"), np.random.default_rng(0)
    paths, labels, test, truth = [], [], [], []
    for k, rgb in enumerate(COLOURS.values()):
        for i in range(16):
            pixels = np.clip(np.array(rgb, float) + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{k}-{i}.png")
            (paths if i < 1 else test).append(str(root / f"{k}-{i}.png"))
            (labels if i < 1 else truth).append(k)
    support = Support.from_files(tiny_clip, paths, labels, list(COLOURS))
    return support, [load_image(p) for p in test], np.array(truth)
