"""One file for the line PC: ``fewvision pack`` / ``models export|import``, loaded with no hub and no cache."""

import csv
import shutil
import tarfile

import open_clip
import pytest
import torch
from cli_helpers import run_cli
from safetensors.torch import save_file
from service_helpers import Server, http, textile_bytes

import fewvision.backbones.openclip as oc
from fewvision.backbones import create_backbone
from fewvision.deploy.pack import PackError, load_packed, open_pack
from fewvision.io.paths import weights_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_rows(a, b, columns, tolerance=1e-6):
    """Same files, labels and verdicts; numbers within ``tolerance`` (the two runs may use other kernels)."""
    assert [r["path"] for r in a] == [r["path"] for r in b] and a
    for ra, rb in zip(a, b):
        for c in columns:
            try:
                assert float(ra[c]) == pytest.approx(float(rb[c]), abs=tolerance), c
            except ValueError:
                assert ra[c] == rb[c], c


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A machine with nothing cached and no hub: an empty cache root, HF_HUB_OFFLINE=1, no HF cache."""
    def go(name="line-pc"):
        root = tmp_path / name
        monkeypatch.setenv("FEWVISION_CACHE_DIR", str(root / "cache"))
        monkeypatch.setenv("HF_HOME", str(root / "hf"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return root
    return go


@pytest.fixture
def tiny_tag(monkeypatch, tmp_path, tiny_clip_config):
    """A pretrained tag 'testopenai' of the tiny CLIP (QuickGELU, like OpenAI's) with its weights in the hub cache:
    ``openclip:CONFIG/testopenai`` resolves to it as a published tag would."""
    name = oc._register_config(str(tiny_clip_config))
    random_init = create_backbone(f"openclip:{tiny_clip_config}")
    cfg = open_clip.pretrained._pcfg(hf_hub="test-org/tiny-pack/", quick_gelu=True)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {"testopenai": cfg})
    repo = weights_dir() / "models--test-org--tiny-pack"
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in random_init.model.state_dict().items()}  # not the seeded init: the file must be read
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "open_clip_model.safetensors"))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("1" * 40)
    return f"openclip:{tiny_clip_config}/testopenai"


def test_a_packed_clip_model_predicts_offline_exactly_as_the_model_file(monkeypatch, capsys, tmp_path, tiny_tag,
                                                                        textile_subset, offline):
    model, packed = tmp_path / "m.fvm", tmp_path / "line.fvz"
    code, _, err = run_cli(monkeypatch, capsys, "fit", textile_subset, "--method", "tip", "--backbone", tiny_tag,
                           "--shots", "4", "-o", model)
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "pack", model, "-o", packed)
    assert code == 0, err
    assert "loads offline" in out
    code, _, err = run_cli(monkeypatch, capsys, "predict", model, textile_subset, "-o", tmp_path / "fvm.csv",
                           "--no-cache")
    assert code == 0, err

    # The line PC: the archive alone (the hub-cache folder and the config file are gone too).
    shutil.rmtree(weights_dir() / "models--test-org--tiny-pack")
    offline()
    # On torch from the archive's files: the model file's numbers; on its ONNX graph (the default where the pack
    # carries one): within the export's parity bound.
    for engine, tolerance in (("torch", 1e-6), ("onnxruntime", 1e-4)):
        code, _, err = run_cli(monkeypatch, capsys, "predict", packed, textile_subset, "-o", tmp_path / "fvz.csv",
                               "--engine", engine)
        assert code == 0, err
        a, b = read_csv(tmp_path / "fvm.csv"), read_csv(tmp_path / "fvz.csv")
        assert_same_rows(a, b, [c for c in a[0] if c.startswith("p_") or c in ("label", "top_label")], tolerance)
    backbone = load_packed(packed).backbone()
    assert backbone.quick_gelu  # the tag's activation came with the hub folder name
    code, out, _ = run_cli(monkeypatch, capsys, "info", packed)
    assert code == 0 and "packed" in out and "tip" in out
    assert "fp32 (--engine auto on this machine)" in out  # the pack carries its graph: auto runs it, not torch


def test_a_packed_timm_anomaly_model_scores_offline_as_the_model_file(monkeypatch, capsys, tmp_path, offline):
    import timm

    from fewvision.io.datasets import textile_root

    weights = tmp_path / "weights" / "model.safetensors"
    weights.parent.mkdir()
    torch.manual_seed(1)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    good = tmp_path / "good"
    good.mkdir()
    for p in sorted((textile_root() / "nominal").glob("*.jpg"))[:10]:
        shutil.copy(p, good / p.name)
    test = sorted((textile_root() / "local").glob("*.jpg"))[:4] + sorted((textile_root() / "nominal").glob("*.jpg"))[10:13]
    model, packed = tmp_path / "a.fvm", tmp_path / "a.fvz"
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "fit", good, "--backbone", f"timm:resnet18@{weights}",
                           "-o", model)
    assert code == 0, err
    assert run_cli(monkeypatch, capsys, "pack", model, "-o", packed)[0] == 0
    code, _, err = run_cli(monkeypatch, capsys, "anomaly", "predict", model, *test, "-o", tmp_path / "fvm.csv",
                           "--no-cache")
    assert code == 0, err
    weights.rename(tmp_path / "moved.safetensors")  # the original weights are gone on the line PC
    offline()
    for engine, tolerance in (("torch", 1e-6), ("onnxruntime", 1e-4)):
        code, _, err = run_cli(monkeypatch, capsys, "anomaly", "predict", packed, *test, "-o", tmp_path / "fvz.csv",
                               "--engine", engine)
        assert code == 0, err
        a, b = read_csv(tmp_path / "fvm.csv"), read_csv(tmp_path / "fvz.csv")
        assert_same_rows(a, b, ["score", "threshold", "verdict", "x", "y"], tolerance)
    assert {r["verdict"] for r in a} <= {"ok", "ng"}


@pytest.fixture
def texture_pack(tmp_path):
    from fewvision.deploy.pack import pack_model
    from fewvision.modelfile import save_model
    from fewvision.tasks.fewshot import fit

    save_model(tmp_path / "t.fvm", fit("textile", "prototype", backbone="texture", shots=2))
    pack_model(tmp_path / "t.fvm", tmp_path / "t.fvz")
    return tmp_path / "t.fvz"


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


def test_a_tampered_truncated_or_foreign_archive_is_refused_naming_what_failed(monkeypatch, capsys, tmp_path,
                                                                                texture_pack, textile_subset):
    data = texture_pack.read_bytes()
    name, offset, size = next(m for m in _members(texture_pack) if m[0] == "model.fvm")
    tampered = tmp_path / "tampered.fvz"
    flipped = bytearray(data)
    flipped[offset + size // 2] ^= 0x01
    tampered.write_bytes(bytes(flipped))
    with pytest.raises(PackError, match="'model.fvm' fails its sha256 check"):
        open_pack(tampered)

    truncated = tmp_path / "truncated.fvz"
    truncated.write_bytes(data[: offset + size // 2])
    code, _, err = run_cli(monkeypatch, capsys, "predict", truncated, textile_subset)
    assert code == 2
    assert err.count("\n") == 1 and "truncated" in err and str(truncated) in err

    foreign = tmp_path / "foreign.fvz"
    with tarfile.open(foreign, "w") as tar:
        tar.add(texture_pack, arcname="model.fvm")
    with pytest.raises(PackError, match="does not start with manifest.json"):
        open_pack(foreign)
    not_tar = tmp_path / "not.fvz"
    not_tar.write_bytes(b"hello")
    with pytest.raises(PackError, match="not.fvz"):
        open_pack(not_tar)


def test_a_damaged_archive_is_refused_even_after_a_good_copy_was_unpacked(tmp_path, texture_pack):
    open_pack(texture_pack)  # unpacked into the cache
    name, offset, size = next(m for m in _members(texture_pack) if m[0] == "model.fvm")
    data = bytearray(texture_pack.read_bytes())
    data[offset] ^= 0x80
    texture_pack.write_bytes(bytes(data))
    with pytest.raises(PackError, match="sha256"):
        load_packed(texture_pack)


def test_a_bare_backbone_bundle_makes_its_spec_work_offline(monkeypatch, capsys, tmp_path, tiny_clip_config,
                                                            offline):
    weights = tmp_path / "tiny.safetensors"
    random_init = create_backbone(f"openclip:{tiny_clip_config}")
    save_file({k: (v + 0.02) if v.is_floating_point() else v for k, v in random_init.model.state_dict().items()},
              str(weights))
    spec = f"openclip:{tiny_clip_config}@{weights}"
    connected = create_backbone(spec)
    pixels = torch.rand(2, 3, 64, 64)
    expected = connected.encode_images(pixels)
    bundle = tmp_path / "tiny.tar"
    code, out, err = run_cli(monkeypatch, capsys, "models", "export", spec, "-o", bundle)
    assert code == 0, err
    weights.rename(tmp_path / "elsewhere.safetensors")
    offline()
    with pytest.raises(Exception, match="not found"):
        create_backbone(spec)  # before the import: the weights are not on this machine
    code, out, err = run_cli(monkeypatch, capsys, "models", "import", bundle)
    assert code == 0, err
    assert connected.id in out
    imported = create_backbone(spec)
    assert imported.id == connected.id and imported.spec == spec
    assert torch.allclose(imported.encode_images(pixels), expected, atol=1e-6)
    code, _, err = run_cli(monkeypatch, capsys, "models", "import", tmp_path / "missing.tar")
    assert code == 2 and "no such file" in err


@pytest.fixture
def clip_pack(tmp_path, tiny_clip_config):
    """A prototype model on the tiny CLIP from a local config and weight file, packed; then both files deleted."""
    from fewvision.deploy.pack import pack_model
    from fewvision.modelfile import save_model
    from fewvision.tasks.fewshot import fit

    local = tmp_path / "local"
    local.mkdir()
    config = shutil.copy(tiny_clip_config, local / "tiny-served.json")
    init = create_backbone(f"openclip:{config}")
    save_file({k: v.contiguous() for k, v in init.model.state_dict().items()}, str(local / "w.safetensors"))
    save_model(tmp_path / "c.fvm", fit("textile", "prototype", backbone=f"openclip:{config}@{local / 'w.safetensors'}",
                                       shots=2))
    pack_model(tmp_path / "c.fvm", tmp_path / "c.fvz")
    shutil.rmtree(local)
    return tmp_path / "c.fvz"


def test_serve_installs_a_packed_model_and_predicts_with_no_hub(tmp_path, monkeypatch, clip_pack):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    server = Server(tmp_path / "data", extra=["--model", str(clip_pack), "--project", "line3"])
    server.data_dir.mkdir(parents=True)
    token = server.token("--name", "tests")
    server.start()
    try:
        h = {"Authorization": f"Bearer {token}"}
        projects = http("GET", f"{server.url}/v1/projects", headers=h).json()
        project = next(p for p in projects if p["name"] == "line3")
        assert project["active_version"] == 1 and project["method"] == "prototype"
        name, data = textile_bytes("local", 0, 1)[0]
        r = http("POST", f"{server.url}/v1/projects/{project['id']}/predict", files={"file": (name, data)}, headers=h,
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["label"] in ("nominal", "local", "global")
    finally:
        server.stop()
    # Started again with the same file: the same version, not a new one.
    server = Server(tmp_path / "data", extra=["--model", str(clip_pack), "--project", "line3"]).start()
    try:
        models = http("GET", f"{server.url}/v1/projects/{project['id']}/models", headers=h).json()
        assert [m["version"] for m in models] == [1]
    finally:
        server.stop()


def test_batch_takes_a_packed_model(monkeypatch, capsys, tmp_path, clip_pack, textile_subset, offline):
    import pyarrow.parquet as pq

    offline()
    code, _, err = run_cli(monkeypatch, capsys, "batch", clip_pack, textile_subset, "-o", tmp_path / "r.parquet")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "predict", clip_pack, textile_subset, "-o", tmp_path / "r.csv")
    assert code == 0, err
    batch = {r["path"]: r for r in pq.read_table(tmp_path / "r.parquet").to_pylist()}
    rows = read_csv(tmp_path / "r.csv")
    assert len(batch) == len(rows) == 36
    assert all(batch[r["path"]]["label"] == r["label"] for r in rows)


def test_refitted_models_share_one_unpacked_backbone_and_a_damaged_copy_is_unpacked_again(tmp_path, tiny_clip_config,
                                                                                          textile_subset):
    from fewvision.deploy import pack as pack_module
    from fewvision.deploy.pack import pack_model
    from fewvision.io.paths import cache_dir
    from fewvision.modelfile import save_model
    from fewvision.tasks.fewshot import fit

    weights = tmp_path / "shared.safetensors"
    init = create_backbone(f"openclip:{tiny_clip_config}")
    save_file({k: v.contiguous() for k, v in init.model.state_dict().items()}, str(weights))
    spec = f"openclip:{tiny_clip_config}@{weights}"
    for shots in (2, 3):
        save_model(tmp_path / f"m{shots}.fvm", fit(textile_subset, "prototype", backbone=spec, shots=shots))
        pack_model(tmp_path / f"m{shots}.fvm", tmp_path / f"m{shots}.fvz")
    folders = [p for p in (cache_dir() / "packs" / "backbones").iterdir() if not p.name.startswith(".")]
    unpacked = open_pack(tmp_path / "m2.fvz")
    assert unpacked.folder in folders and open_pack(tmp_path / "m3.fvz").folder == unpacked.folder
    assert not [p for p in (cache_dir() / "packs" / "backbones").iterdir() if p.name.startswith(f".{unpacked.folder.name}")]
    weight_copy = unpacked.folder / "backbone" / "shared.safetensors"
    weight_copy.write_bytes(weight_copy.read_bytes()[:100])  # a cache cleaner, a full disk
    pack_module._OPENED.clear()  # another process
    again = open_pack(tmp_path / "m2.fvz")
    assert (again.folder / "backbone" / "shared.safetensors").stat().st_size == weights.stat().st_size
    assert load_packed(tmp_path / "m2.fvz").backbone().id == create_backbone(spec).id


def test_a_failed_repack_keeps_the_archive_that_was_there(tmp_path, monkeypatch, texture_pack):
    from fewvision.deploy import pack as pack_module

    before = texture_pack.read_bytes()
    monkeypatch.setattr(pack_module, "check_loads_offline", lambda bb: (_ for _ in ()).throw(PackError("no")))
    with pytest.raises(PackError):
        pack_module.pack_model(tmp_path / "t.fvm", texture_pack)
    assert texture_pack.read_bytes() == before
    assert not list(tmp_path.glob(".t.fvz.*"))


def test_a_transformers_model_folder_travels_in_a_bundle(monkeypatch, capsys, tmp_path, offline):
    from test_blip import _save_tiny_blip

    folder = _save_tiny_blip(tmp_path / "blip")
    spec = f"hf:{folder}"
    connected = create_backbone(spec)
    pixels = torch.rand(1, 3, 32, 32)
    expected = connected.encode_images(pixels)
    text = connected.encode_text(["a photo of a stain"])
    assert run_cli(monkeypatch, capsys, "models", "export", spec, "-o", tmp_path / "blip.tar")[0] == 0
    shutil.rmtree(folder)
    offline()
    code, _, err = run_cli(monkeypatch, capsys, "models", "import", tmp_path / "blip.tar")
    assert code == 0, err
    imported = create_backbone(spec)
    assert imported.id == connected.id
    assert torch.allclose(imported.encode_images(pixels), expected, atol=1e-6)
    assert torch.allclose(imported.encode_text(["a photo of a stain"]), text, atol=1e-6)  # the tokenizer came too
