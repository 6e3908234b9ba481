"""Backbone specs made to work offline by ``fewvision models import`` (or by installing a packed model): the cache's
``imported.json`` maps a spec to the spec that loads its unpacked files and to its id."""

from __future__ import annotations

import json

from ..io.atomic import atomic_path
from ..io.paths import weights_dir

IMPORTED = "imported.json"  # spec -> {offline spec, id} of the bundles imported into a cache


def imported_backbones(cache_dir: str | None = None) -> dict[str, dict[str, str]]:
    try:
        known = json.loads((weights_dir(cache_dir) / IMPORTED).read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def register_backbone(spec: str, offline_spec: str, backbone_id: str, cache_dir: str | None = None) -> None:
    """From now on ``create_backbone(spec)`` with this cache loads ``offline_spec`` (and checks its id)."""
    known = imported_backbones(cache_dir)
    known[spec] = {"spec": offline_spec, "id": backbone_id}
    with atomic_path(weights_dir(cache_dir) / IMPORTED) as tmp:
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
