"""High-resolution images scored tile by tile (``anomaly fit --tile``): the grid, the stitching rule, the
calibration on whole held-out images, a small real defect found in a large mosaic where the resized image misses
it, and the same scores from the exported graph."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from anomaly_data import mosaics
from fewvision.deploy.onnx import export_onnx, score_onnx
from fewvision.io.geometry import image_coordinates
from fewvision.io.tiles import StitchedView, Tiling, TilingError, stitch
from fewvision.modelfile import load, save_model
from fewvision.tasks.anomaly import fit_anomaly, score_files

TOLERANCE = 1e-4  # torch vs onnxruntime, relative to the score


# --- the grid and the stitching ------------------------------------------------------------------------------------
def test_the_grid_starts_at_the_image_start_ends_at_its_end_and_overlaps_by_at_least_the_share():
    tiling = Tiling(256, 0.25)
    assert tiling.starts(2048) == (256, [0, 179, 358, 538, 717, 896, 1075, 1254, 1434, 1613, 1792])
    assert tiling.starts(256) == (256, [0])
    assert tiling.starts(200) == (200, [0])  # narrower than a tile: one tile as wide as the image
    for length in (257, 500, 1000, 2592):
        tile, starts = tiling.starts(length)
        steps = np.diff(starts)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert steps.max() <= tile * 0.75 + 0.5  # every neighbour overlaps by >= 25 % (rounding: half a pixel)
    boxes = Tiling(300, 0.0).boxes(700, 400)
    assert len(boxes) == 3 * 2 and boxes[0] == (0, 0, 300, 300) and boxes[-1] == (400, 100, 300, 300)
    with pytest.raises(TilingError, match="--tile-overlap"):
        Tiling(256, 1.0)


def test_each_tile_map_lands_on_its_box_and_overlaps_keep_the_largest():
    """Tile maps that hold the image's own x + 1000 y at each map pixel's centre, stitched back, give x + 1000 y at
    each stitched pixel's centre (bilinear sampling is exact on a linear function) away from the tiles' outer half
    map pixel, where a map is clamped. Then constant tiles on an overlapping grid: where they overlap, the larger."""
    width, height, side = 800, 400, 50  # 200 px tiles without overlap; a tile's map: 4 image pixels a map pixel
    tiling = Tiling(200, 0.0)
    boxes = tiling.boxes(width, height)
    assert [b[:2] for b in boxes] == [(x, y) for y in (0, 200) for x in (0, 200, 400, 600)]
    maps = []
    for x0, y0, w, h in boxes:
        centres_x = x0 + (np.arange(side) + 0.5) * (w / side) - 0.5
        centres_y = y0 + (np.arange(side) + 0.5) * (h / side) - 0.5
        maps.append(centres_x[None, :] + 1000 * centres_y[:, None])
    size = tiling.map_size(width, height, (side, side))
    assert size == (100, 200)  # scale 50 / 200 = 0.25 map pixels an image pixel
    stitched = stitch(np.array(maps), boxes, width, height, size)
    xs, ys = StitchedView(tiling, (side, side)).coordinates(width, height, size)
    inner = (np.abs((xs + 0.5) % 200 - 100) < 97.5) & (np.abs((ys + 0.5) % 200 - 100) < 97.5)
    assert inner.mean() > 0.9
    np.testing.assert_allclose(stitched[inner], (xs + 1000 * ys)[inner], rtol=0, atol=1e-3)

    width, height = 700, 460
    tiling = Tiling(200, 0.3)
    boxes = tiling.boxes(width, height)
    size = tiling.map_size(width, height, (side, side))
    constant = np.array([np.full((side, side), float(len(boxes) - i)) for i in range(len(boxes))])
    stitched = stitch(constant, boxes, width, height, size)
    xs, ys = StitchedView(tiling, (side, side)).coordinates(width, height, size)
    # the first tile (largest value) wins over its whole box, also where later tiles overlap it
    x0, y0, w, h = boxes[0]
    first = (xs >= x0 - 0.5) & (xs <= x0 + w - 0.5) & (ys >= y0 - 0.5) & (ys <= y0 + h - 0.5)
    assert first.any() and (stitched[first] == len(boxes)).all() and (stitched[~first] < len(boxes)).all()


def test_stitched_coordinates_are_exact_and_used_for_peaks():
    view = StitchedView(Tiling(256, 0.25), (224, 224))
    assert view.size_of(2048, 1536) == (768, 1024)  # at most half the image's pixels a side
    xs, ys = image_coordinates(view, 2048, 1536, (768, 1024))
    assert xs[0, 0] == 0.5 and xs[0, 1] == 2.5 and ys[1, 0] == 2.5 and xs[0, -1] == 2046.5


# --- a small real defect in a large image ----------------------------------------------------------------------------
SIDE = 768  # mosaics of 4 x 4 textile images (246 px each once their white edge is cut off)
TILE = 256


@pytest.fixture(scope="module")
def mosaic_sets(tmp_path_factory, textile_root):
    root = tmp_path_factory.mktemp("mosaics")
    good = sorted((textile_root / "nominal").glob("*.jpg"))
    local = sorted((textile_root / "local").glob("*.jpg"))
    rng = np.random.default_rng(0)
    mosaics(root / "fit", good[:400], 8, SIDE, rng)
    test_good = mosaics(root / "test" / "good", good[400:], 6, SIDE, rng)
    test_bad = mosaics(root / "test" / "local", good[400:], 6, SIDE, rng, defects=local)
    return root, test_good, test_bad


def test_tiled_patchcore_finds_16_to_32_px_defects_in_768_px_images_the_resized_image_hides(mosaic_sets):
    root, test_good, test_bad = mosaic_sets
    # tiles without overlap: 9 a mosaic instead of 16 (a quicker test; overlapping grids are tested above)
    tiled = fit_anomaly([root / "fit"], "patchcore", "texture", tile=TILE, tile_overlap=0.0, use_cache=False,
                        target_false_reject=0.2)
    d = tiled.decision
    assert d["tiling"] == {"size": TILE, "overlap": 0.0, "score": "tile_max"}  # PatchCore scores its tiles itself
    assert tiled.head.coreset_ratio == 0.01  # its tiled default (PatchCore-1%)
    # whole held-out images set the threshold (2 of 8), none of their tiles was fitted on
    assert d["calibration"] == "split conformal" and d["n_calibration"] == 2 and tiled.info["n_fit_images"] == 6
    whole = fit_anomaly([root / "fit"], "patchcore", "texture", use_cache=False, target_false_reject=0.2)
    test = [p for p, _ in test_good + test_bad]
    truth = [0] * len(test_good) + [1] * len(test_bad)
    aurocs = {}
    for name, model in (("tiled", tiled), ("whole", whole)):
        res = score_files(model, test, use_cache=False, keep_maps=(name == "tiled"))
        assert [r["path"] for r in res.rows] == [str(p) for p in test]
        aurocs[name] = roc_auc_score(truth, [r["score"] for r in res.rows])
        if name == "tiled":
            maps, rows = res.maps, res.rows
    # measured: tiled 1.0, the whole image resized to 256 px 0.47 (with the mosaics of seeds 1 and 2: 1.0 / 0.22,
    # 1.0 / 0.44)
    assert aurocs["tiled"] >= 0.9 and aurocs["whole"] <= 0.75, aurocs
    # maps in the stitched geometry; the peak of a defect image on its pasted defect
    assert maps[0].shape == (384, 384)
    hits = 0
    for (path, (x, y, size)), row in zip(test_bad, rows[len(test_good):]):
        hits += x - 8 <= row["x"] <= x + size + 8 and y - 8 <= row["y"] <= y + size + 8
    assert hits >= 5, hits  # measured 6 of 6 (seeds 1 and 2: 6, 6)

    # the model file keeps the tiling: reloaded, it tiles and scores the same
    save_model(root / "tiled.fvm", tiled)
    again = score_files(load(root / "tiled.fvm"), test[-2:], use_cache=False, keep_maps=False)
    assert [r["score"] for r in again.rows] == pytest.approx([r["score"] for r in rows[-2:]], rel=1e-6)


# --- the exported graph scores tiles the same ----------------------------------------------------------------------
def test_an_exported_tiled_model_gives_the_torch_scores_maps_and_regions(tmp_path, textile_root, tiny_clip_config):
    good = tmp_path / "good"
    good.mkdir()
    for i, p in enumerate(sorted((textile_root / "nominal").glob("*.jpg"))[:5]):
        Image.open(p).convert("RGB").crop((0, 0, 240, 200)).save(good / f"{i}.png")
    images = [p for p in sorted((textile_root / "local").glob("*.jpg"))[:3]]
    model = fit_anomaly([good], "padim", f"openclip:{tiny_clip_config}", tile=128, tile_overlap=0.5, use_cache=False,
                        holdout_fraction=0.4)
    assert model.decision["tiling"]["score"] == "map_max"
    save_model(tmp_path / "m.fvm", model)
    export_onnx(tmp_path / "m.fvm", tmp_path / "m.onnx")
    want = score_files(model, images, use_cache=False)
    got = score_onnx(tmp_path / "m.onnx", images)
    assert len(got.rows) == len(want.rows) == 3
    side = round(250 * min(0.5, model.decision["map_size"][0] / 128))  # 250 px images
    for g, w, gm, wm in zip(got.rows, want.rows, got.maps, want.maps):
        assert abs(g["score"] - w["score"]) <= TOLERANCE * max(1.0, abs(w["score"]))
        assert gm.shape == wm.shape == (side, side)
        np.testing.assert_allclose(gm, wm, rtol=0, atol=TOLERANCE * max(1.0, float(np.abs(wm).max())))
        # the graph's peak is a peak of torch's map too (a near-tie may pick another pixel on another CPU)
        xs, ys = StitchedView(Tiling(128, 0.5), model.decision["map_size"]).coordinates(250, 250, wm.shape)
        at = np.unravel_index(np.argmin(np.abs(xs - g["x"]) + np.abs(ys - g["y"])), wm.shape)
        assert wm[at] >= wm.max() - TOLERANCE * max(1.0, float(np.abs(wm).max()))
        assert g["n_regions"] == w["n_regions"]
