"""A run whose features and prompt embeddings are cached imports only what it uses (issue 21, item 7).

open_clip's import alone pulls in timm, torchvision and transformers' generation code (seconds on a small machine);
a ``fewvision classify`` whose every feature, prompt embedding and backbone description is cached needs none of
them (nor scikit-learn, which only evaluation uses). The second run happens in a new process, as a user's would, and reports what it imported.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HEAVY = ("open_clip", "timm", "torchvision", "transformers")

# Runs the CLI in this process, then prints (last line) which modules of interest it imported.
PROBE = """
import json, sys
from fewvision.cli import main
sys.argv = ["fewvision", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
names = ("open_clip", "timm", "torchvision", "transformers", "sklearn", "torch", "fewvision.backbones.openclip")
print(json.dumps({"code": code, "imported": [m for m in names if m in sys.modules]}))
"""


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, tiny_clip_config):
    """A weights file saved from the tiny CLIP (seeded), as ``openclip:CONFIG@FILE`` reads it."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(tiny_clip_config)
    torch.manual_seed(3)
    model = open_clip.create_model(tiny_clip_config.stem)
    path = tmp_path_factory.mktemp("tiny-weights") / "tiny-clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_fully_cached_classify_imports_none_of_the_heavy_libraries(tmp_path, monkeypatch, capsys, textile_subset,
                                                                     tiny_clip_config, tiny_weights):
    from cli_helpers import run_cli

    cache = tmp_path / "cache"
    images = [textile_subset / c / sorted(os.listdir(textile_subset / c))[0] for c in ("nominal", "local", "global")]
    spec = f"openclip:{tiny_clip_config}@{tiny_weights}"

    def args(out):
        return ["classify", *map(str, images), "--classes", "nominal,local defect,global defect", "--backbone", spec,
                "--cache-dir", str(cache), "--out", str(out)]

    code, _, err = run_cli(monkeypatch, capsys, *args(tmp_path / "cold.csv"))  # fills the caches
    assert code == 0, err
    proc = subprocess.run([sys.executable, "-c", PROBE, *args(tmp_path / "warm.csv")], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    assert "fewvision.backbones.openclip" in report["imported"]  # the run did go through the open_clip backbone
    assert [m for m in HEAVY if m in report["imported"]] == []
    assert "sklearn" not in report["imported"]  # metrics are for eval, not classify (scipy and pandas come with it)
    cold, warm = read_rows(tmp_path / "cold.csv"), read_rows(tmp_path / "warm.csv")
    assert len(cold) == 3 and [r["path"] for r in warm] == [r["path"] for r in cold]
    assert [(r["label"], r["top_label"]) for r in warm] == [(r["label"], r["top_label"]) for r in cold]
    columns = [c for c in cold[0] if c.startswith("p_")]
    assert len(columns) == 3
    probabilities = lambda rows: np.array([[float(r[c]) for c in columns] for r in rows])  # noqa: E731
    np.testing.assert_allclose(probabilities(warm), probabilities(cold), rtol=0, atol=1.5e-6)


# Creates a backbone in a new process and says what it is and whether describing it took open_clip.
DESCRIBE = """
import json, sys
from fewvision.backbones import create_backbone
backbone = create_backbone(sys.argv[1], cache_dir=sys.argv[2])
described_by_open_clip = "open_clip" in sys.modules
print(json.dumps({"id": backbone.id, "quick_gelu": backbone.quick_gelu, "input_size": list(backbone.input_size),
                  "open_clip": described_by_open_clip, "preprocess": repr(backbone.preprocess)}))
"""


def describe_in_new_process(spec, cache):
    proc = subprocess.run([sys.executable, "-c", DESCRIBE, spec, cache], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_remembered_description_gives_the_same_id_and_follows_the_weights(tmp_path, tiny_clip_config,
                                                                            tiny_weights):
    import shutil

    from safetensors.torch import load_file, save_file

    from fewvision.backbones import create_backbone
    from fewvision.backbones.openclip import DESCRIPTIONS

    weights = tmp_path / "w" / tiny_weights.name
    weights.parent.mkdir()
    shutil.copy(tiny_weights, weights)
    cache = str(tmp_path / "cache")
    spec = f"openclip:{tiny_clip_config}@{weights}"
    cold = create_backbone(spec, cache_dir=cache)  # described by open_clip (imported here), and remembered
    assert (tmp_path / "cache" / "weights" / DESCRIPTIONS).is_file()
    warm = describe_in_new_process(spec, cache)
    assert not warm["open_clip"]  # described from the cache
    assert (warm["id"], warm["quick_gelu"], tuple(warm["input_size"])) == (cold.id, cold.quick_gelu, cold.input_size)
    assert warm["preprocess"] == repr(cold.preprocess)  # built on first use: the same transform
    tensors = load_file(str(weights))
    tensors["logit_scale"] = tensors["logit_scale"] + 1.0  # other weights in the same file
    save_file(tensors, str(weights))
    changed = describe_in_new_process(spec, cache)
    assert changed["open_clip"] and changed["id"] != cold.id
    assert changed["id"] == create_backbone(spec, cache_dir=cache).id
