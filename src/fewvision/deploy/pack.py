"""One file for a machine with no hub and no cache: a model (``.fvz``) or a bare backbone (a bundle ``.tar``).

An archive is an uncompressed tar: ``manifest.json`` first (format, what it holds, the backbone's spec, the spec
that loads it from the unpacked folder, its id, and the size and sha256 of every other member), then the model file
and the files its backbone reads (weights, model config), each under the name the manifest gives it. No pickle:
the model file is safetensors, the weights are whatever the backbone reads anyway (safetensors where published).

Opening an archive streams every member through sha256 and compares it with the manifest, so a tampered, damaged
or truncated file is refused with one line naming the member (the manifest itself is not signed: someone who can
rewrite both a file and the manifest is not caught here). The members are unpacked once, into a folder of the
cache named by the manifest's digest (temp folder, then rename), and reused by later runs - which still check
the archive's bytes. The backbone is then created from the unpacked files with downloads off, and its id must be
the one stored, so an archive cannot run other weights than the model was fitted on.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..io.atomic import atomic_path
from ..io.paths import cache_dir as cache_root
from ..modelfile import PACK_SUFFIX, ModelFileError

FORMAT = "fewvision-pack"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_MEMBER = "model.fvm"
KINDS = ("model", "backbone")
_BLOCK = 1 << 22
MAX_MANIFEST_BYTES = 1 << 24


class PackError(ModelFileError):
    """An archive that cannot be used; the message names the file and what failed."""


@dataclass
class Unpacked:
    """An archive's checked members in the cache, and its manifest: the backbone's files under ``folder``, the
    model file (packed models) at ``model_file``."""

    folder: Path
    manifest: dict[str, Any]
    model_file: Path | None = None

    @property
    def spec(self) -> str:
        """The spec that loads the backbone from the unpacked files."""
        return self.manifest["backbone"]["offline_spec"].replace("{root}", str(self.folder))


def _sha256(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # the same files give the same archive
    return info


def write_archive(out: str | os.PathLike, manifest: dict[str, Any], files: dict[str, Path]) -> Path:
    """Write ``manifest`` (with every file's size and sha256 added) and ``files`` (archive name -> local path)."""
    from .. import __version__

    out = Path(out)
    listed = {}
    for name, path in files.items():
        _check_name(out, name)
        if not Path(path).is_file():
            raise PackError(f"{path}: the backbone needs this file, but it is not there")
        digest, size = _sha256(Path(path))
        listed[name] = {"sha256": digest, "size": size}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "fewvision_version": __version__, **manifest,
                "files": listed}
    blob = json.dumps(manifest, indent=1, sort_keys=True).encode()
    with atomic_path(out) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(MANIFEST, len(blob)), io.BytesIO(blob))
        for name, path in files.items():
            with open(path, "rb") as fh:
                tar.addfile(_member(name, listed[name]["size"]), fh)
    return out


def _check_name(archive: Path, name: str) -> None:
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name or ":" in name:
        raise PackError(f"{archive}: member name '{name}' is not a plain relative path")


def _read_manifest(path: Path, tar: tarfile.TarFile) -> tuple[dict[str, Any], bytes]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise PackError(f"{path}: not a fewvision archive (it does not start with {MANIFEST})")
    if first.size > MAX_MANIFEST_BYTES:
        raise PackError(f"{path}: {MANIFEST} is {first.size} bytes, more than a manifest needs")
    blob = tar.extractfile(first).read()
    try:
        manifest = json.loads(blob)
    except ValueError as err:
        raise PackError(f"{path}: {MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackError(f"{path}: not a fewvision archive (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PackError(f"{path}: archive format v{version} is newer than this fewvision reads (v{FORMAT_VERSION})")
    files, backbone = manifest.get("files"), manifest.get("backbone")
    if manifest.get("kind") not in KINDS or not isinstance(files, dict) or not isinstance(backbone, dict) \
            or not all(isinstance(backbone.get(k), str) for k in ("spec", "offline_spec", "id")):
        raise PackError(f"{path}: {MANIFEST} lacks the kind, the file list or the backbone's spec and id")
    for name, entry in files.items():
        _check_name(path, name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int)):
            raise PackError(f"{path}: {MANIFEST} has no size and sha256 for '{name}'")
    return manifest, blob


_OPENED: dict[tuple, Unpacked] = {}  # archives checked by this process: (path, size, mtime, cache) -> members


def _complete(folder: Path, files: dict[str, dict]) -> bool:
    """An unpacked backbone folder that is whole: marked complete and every file there with its size."""
    try:
        return (folder / ".complete").is_file() and all((folder / n).stat().st_size == e["size"]
                                                         for n, e in files.items())
    except OSError:
        return False


def open_pack(path: str | os.PathLike, cache_dir: str | None = None) -> Unpacked:
    """Check every member of an archive against its manifest and unpack what the cache lacks.

    The backbone's files go to ``packs/backbones/<digest of their entries>/``, shared by every archive with the same
    backbone (a refitted model does not bring a second copy of the weights); the model file to
    ``packs/models/<its sha256>.fvm``. An unpacked file whose size is off is unpacked again. Within one process an
    archive whose size and modification time have not changed is checked once."""
    path = Path(path)
    if not path.is_file():
        raise PackError(f"{path}: no such file")
    root = cache_root(cache_dir) / "packs"
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(root))
    if key in _OPENED:
        return _OPENED[key]
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as err:
        raise PackError(f"{path}: not a fewvision archive (not an uncompressed tar file: {err})") from None
    temp_dir = temp_model = None
    try:
        with tar:
            manifest, _ = _read_manifest(path, tar)
            files = manifest["files"]
            backbone_files = {n: e for n, e in files.items() if n != MODEL_MEMBER}
            digest = hashlib.sha256(json.dumps([manifest["backbone"]["offline_spec"], backbone_files],
                                               sort_keys=True).encode()).hexdigest()[:24]
            folder = root / "backbones" / digest
            targets: dict[str, Path] = {}
            if backbone_files and not _complete(folder, backbone_files):
                folder.parent.mkdir(parents=True, exist_ok=True)
                temp_dir = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{digest}."))
                targets.update({n: temp_dir / n for n in backbone_files})
            model_file = None
            if MODEL_MEMBER in files:
                model_file = root / "models" / f"{files[MODEL_MEMBER]['sha256']}.fvm"
                if not (model_file.is_file() and model_file.stat().st_size == files[MODEL_MEMBER]["size"]):
                    model_file.parent.mkdir(parents=True, exist_ok=True)
                    temp_model = model_file.with_name(f".{model_file.name}.{os.getpid()}.tmp")
                    targets[MODEL_MEMBER] = temp_model
            _check_members(path, tar, files, targets)
        if temp_dir is not None:
            (temp_dir / ".complete").write_text("")
            for p in [temp_dir, *temp_dir.rglob("*")]:  # mkdtemp's 0700 would lock out other users of the cache
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
            if folder.exists() and not _complete(folder, backbone_files):
                shutil.rmtree(folder, ignore_errors=True)  # a damaged earlier copy
            try:
                os.replace(temp_dir, folder)
            except OSError:  # unpacked meanwhile by another process: keep that one
                if not _complete(folder, backbone_files):
                    raise
            else:
                temp_dir = None
        if temp_model is not None:
            os.replace(temp_model, model_file)
            temp_model = None
        unpacked = Unpacked(folder, manifest, model_file)
        _OPENED[key] = unpacked
        return unpacked
    except (tarfile.TarError, EOFError) as err:
        raise PackError(f"{path}: truncated or damaged archive ({err})") from None
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        if temp_model is not None:
            temp_model.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_members(path: Path, tar: tarfile.TarFile, files: dict[str, dict], targets: dict[str, Path]) -> None:
    """Stream every member through sha256 against the manifest, writing those named in ``targets`` there."""
    seen: set[str] = set()
    while (member := tar.next()) is not None:  # after the manifest (iterating the TarFile would start over)
        name = member.name
        if name not in files:
            raise PackError(f"{path}: member '{name}' is not listed in the manifest")
        if name in seen or not member.isfile():
            raise PackError(f"{path}: member '{name}' is repeated or not a plain file")
        seen.add(name)
        h, size = hashlib.sha256(), 0
        source = tar.extractfile(member)
        target = None
        if name in targets:
            targets[name].parent.mkdir(parents=True, exist_ok=True)
            target = open(targets[name], "wb")
        try:
            for block in iter(lambda: source.read(_BLOCK), b""):
                h.update(block)
                size += len(block)
                if target is not None:
                    target.write(block)
        finally:
            if target is not None:
                target.close()
        expected = files[name]
        if size != expected["size"]:
            raise PackError(f"{path}: member '{name}' has {size} bytes, the manifest says {expected['size']} "
                            "(truncated or altered)")
        if h.hexdigest() != expected["sha256"]:
            raise PackError(f"{path}: member '{name}' fails its sha256 check (altered or damaged)")
    missing = sorted(set(files) - seen)
    if missing:
        raise PackError(f"{path}: truncated or incomplete archive: '{missing[0]}' is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# --- models ----------------------------------------------------------------------------------------------------
def is_pack(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == PACK_SUFFIX


def pack_model(model_path: str | os.PathLike, out: str | os.PathLike, *, cache_dir: str | None = None,
               weights: str | None = None) -> dict[str, Any]:
    """Write ``out`` (.fvz): the model file and everything its backbone reads, then prove it loads offline (the
    backbone created from the unpacked files alone has the model's id). Returns the manifest."""
    from ..modelfile import load

    model_path, out = Path(model_path), Path(out)
    if is_pack(model_path):
        raise PackError(f"{model_path}: already a packed model")
    model = load(model_path, cache_dir)
    backbone = model.backbone(cache_dir=cache_dir, weights=weights)
    files, offline_spec = backbone.portable()
    manifest = {"kind": "model", "task": model.task, "method": model.head.method, "model": MODEL_MEMBER,
                "backbone": {"spec": model.backbone_spec, "offline_spec": offline_spec, "id": model.backbone_id}}
    staged = out.with_name(f".{out.name}.{os.getpid()}.check")  # an older archive at ``out`` stays until this loads
    try:
        write_archive(staged, manifest, {MODEL_MEMBER: model_path, **files})
        check_loads_offline(load_packed(staged, cache_dir=cache_dir).backbone())
        manifest = open_pack(staged, cache_dir).manifest
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    return manifest


def check_loads_offline(backbone) -> None:
    """Encode one image with a backbone created from unpacked files: the weights are read, not just hashed."""
    from PIL import Image

    backbone.encode_images(backbone.preprocess(Image.new("RGB", (64, 64), (128, 96, 64)))[None])


def load_packed(path: str | os.PathLike, cache_dir: str | None = None):
    """The model of a ``.fvz``; its backbone is created (on first use) from the archive's files, never the hub."""
    from ..modelfile import load

    unpacked = open_pack(path, cache_dir)
    if unpacked.manifest["kind"] != "model":
        raise PackError(f"{path}: a backbone bundle, not a model (use 'fewvision models import {path}')")
    try:
        model = load(unpacked.model_file)
    except ModelFileError as err:  # name the archive the user gave, not the unpacked copy in the cache
        raise PackError(f"{path} (its {MODEL_MEMBER}, packed by fewvision "
                        f"{unpacked.manifest.get('fewvision_version', '?')}): "
                        f"{str(err).split(': ', 1)[-1]}") from None
    if model.backbone_id != unpacked.manifest["backbone"]["id"]:
        raise PackError(f"{path}: the model's backbone id differs from the one in {MANIFEST}")
    model.offline_spec = unpacked.spec
    model.packed = {"file": str(path), "model_file": str(unpacked.model_file), "files": len(unpacked.manifest["files"]),
                    "bytes": sum(f["size"] for f in unpacked.manifest["files"].values())}
    return model


# --- bare backbones ----------------------------------------------------------------------------------------------
IMPORTED = "imported.json"  # spec -> {offline spec, id} of the bundles imported into a cache


def export_backbone(spec: str, out: str | os.PathLike, *, cache_dir: str | None = None,
                    weights: str | None = None) -> dict[str, Any]:
    """Write a bundle of the files backbone ``spec`` reads; ``import_backbone`` makes the spec work offline."""
    from ..backbones import create_backbone

    backbone = create_backbone(spec, cache_dir=cache_dir, weights=weights)
    files, offline_spec = backbone.portable()
    # The spec the weights really answer to (with --weights: MODEL@PATH, not the hub name they replace).
    manifest = {"kind": "backbone", "backbone": {"spec": backbone.spec, "offline_spec": offline_spec,
                                                 "id": backbone.id}}
    write_archive(out, manifest, files)
    return open_pack(out, cache_dir).manifest


def import_backbone(path: str | os.PathLike, *, cache_dir: str | None = None) -> dict[str, Any]:
    """Check and unpack a bundle into the cache and register its spec there, so ``--backbone SPEC`` loads it with
    no hub; the backbone created from the unpacked files must have the bundle's id."""
    from ..backbones import create_backbone

    unpacked = open_pack(path, cache_dir)
    if unpacked.manifest["kind"] != "backbone":
        raise PackError(f"{path}: a packed model, not a backbone bundle (predict with it directly)")
    entry = unpacked.manifest["backbone"]
    backbone = create_backbone(unpacked.spec, cache_dir=cache_dir, download=False)
    if backbone.id != entry["id"]:
        raise PackError(f"{path}: the unpacked backbone has id {backbone.id}, the bundle says {entry['id']}")
    register_backbone(entry["spec"], unpacked.spec, entry["id"], cache_dir)
    return unpacked.manifest


def register_backbone(spec: str, offline_spec: str, backbone_id: str, cache_dir: str | None = None) -> None:
    """From now on ``create_backbone(spec)`` with this cache loads ``offline_spec`` (and checks its id)."""
    from ..io.paths import weights_dir

    known = imported_backbones(cache_dir)
    known[spec] = {"spec": offline_spec, "id": backbone_id}
    with atomic_path(weights_dir(cache_dir) / IMPORTED) as tmp:
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))


def imported_backbones(cache_dir: str | None = None) -> dict[str, dict[str, str]]:
    from ..io.paths import weights_dir

    try:
        known = json.loads((weights_dir(cache_dir) / IMPORTED).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
