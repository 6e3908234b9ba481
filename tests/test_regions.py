"""Defect regions (issue 26 item 5): the connected parts of a map above the threshold, placed in the image."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image
from torchvision import transforms

from fewvision.io.geometry import image_coordinates
from fewvision.io.regions import defect_regions, label_regions
from fewvision.tasks.rows import anomaly_rows, region_rule


def test_labels_are_scipys_on_random_masks():
    rng = np.random.default_rng(0)
    shapes = set()
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        ours, n = label_regions(mask)
        reference, n_reference = ndi.label(mask)  # 4-connected, numbered in raster order
        assert n == n_reference
        np.testing.assert_array_equal(ours, reference)
        shapes.add(n > 1)
    assert shapes == {True, False}  # masks with one region or none and with several were both drawn


def test_a_u_shape_is_one_region_and_diagonal_pixels_are_two():
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool)  # its arms meet only in the last row
    assert label_regions(u)[1] == 1
    assert label_regions(np.eye(2, dtype=bool))[1] == 2


def _coordinates(preprocess, width, height, size):
    return image_coordinates(preprocess, width, height, size)


def test_boxes_follow_the_resize_and_the_centre_crop_into_image_pixels():
    # A 640 x 480 image, resized to 64 x 48 then centre-cropped to 48 x 48: one map pixel is 10 x 10 image
    # pixels and map column 0 starts at image x = (64 - 48) / 2 * 10 = 80.
    preprocess = transforms.Compose([transforms.Resize(48), transforms.CenterCrop(48), transforms.ToTensor()])
    xs, ys = _coordinates(preprocess, 640, 480, (48, 48))
    heat = np.zeros((48, 48), np.float32)
    heat[10:20, 20:30] = 2.0  # 100 map pixels: image x 280..380, y 100..200
    heat[40:42, 5:8] = 3.0  # 6 map pixels: image x 130..160, y 400..420, hotter but smaller
    regions = defect_regions(heat, 1.0, xs, ys, 640, 480)
    assert [r["area_px"] for r in regions] == pytest.approx([10000, 600], rel=0.01)  # largest first
    big, small = regions
    ramp_step = 640 / 255  # the coordinate ramps place a map pixel to 1/255 of the image
    for got, want in ((big, (280, 100, 100, 100)), (small, (130, 400, 30, 20))):
        assert np.abs(np.array([got["x"], got["y"], got["width"], got["height"]]) - want).max() <= ramp_step + 1, got
    assert big["area_pct"] == pytest.approx(100 * 10000 / (640 * 480), rel=0.01)
    assert (big["peak"], small["peak"]) == (2.0, 3.0)
    assert [r["area_px"] for r in defect_regions(heat, 1.0, xs, ys, 640, 480, min_area=1000)] == \
        pytest.approx([10000], rel=0.01)
    assert defect_regions(heat, 3.0, xs, ys, 640, 480) == []  # strictly above the threshold


def test_rows_carry_the_regions_of_the_map_threshold(tmp_path):
    """Regions come from the map threshold (``region_rule``: calibrated on the good images' map maxima), which may
    differ from the image threshold the verdict uses; a map wholly above it is the whole image."""
    path = tmp_path / "part.png"
    Image.new("RGB", (640, 480), "gray").save(path)
    preprocess = transforms.Compose([transforms.Resize((48, 64)), transforms.ToTensor()])
    heat = np.zeros((1, 48, 64), np.float32)
    heat[0, 5:10, 30:40] = 5.0  # 5 x 10 map pixels = 50 x 100 image pixels at x 300, y 50
    row = anomaly_rows([str(path)], heat, np.array([5.0]), preprocess, (48, 64), 1.0, 0.0, (1.0, 0.0))[0]
    assert (row["n_regions"], row["largest_region_px"]) == (1, pytest.approx(5000, rel=0.01))
    assert row["largest_region_pct"] == pytest.approx(100 * 5000 / (640 * 480), rel=0.01)
    assert abs(row["regions"][0]["x"] - 300) <= 2 and abs(row["regions"][0]["y"] - 50) <= 2
    assert row["verdict"] == "ng"
    dropped = anomaly_rows([str(path)], heat, np.array([5.0]), preprocess, (48, 64), 1.0, 0.0, (1.0, 6000))[0]
    assert (dropped["n_regions"], dropped["regions"], dropped["verdict"]) == (0, [], "ng")  # the verdict stays
    unthresholded = anomaly_rows([str(path)], heat, np.array([5.0]), preprocess, (48, 64), None, 0.0)[0]
    assert "regions" not in unthresholded and unthresholded["x"] is not None
    passed = anomaly_rows([str(path)], heat, np.array([5.0]), preprocess, (48, 64), 9.0, 0.0, (1.0, 0.0))[0]
    assert (passed["verdict"], passed["n_regions"]) == ("ok", 1)  # the image threshold decides, not the map's
    whole = anomaly_rows([str(path)], heat + 2.0, np.array([5.0]), preprocess, (48, 64), 1.0, 0.0, (1.0, 0.0))[0]
    assert [(r["x"], r["y"], r["width"], r["height"]) for r in whole["regions"]] == [(0, 0, 640, 480)]
    assert whole["largest_region_pct"] == pytest.approx(100.0, rel=0.01)
    assert region_rule({"threshold": 3.0, "region_threshold": 2.0, "min_region_area": 50}) == (2.0, 50.0)
    assert region_rule({"threshold": 3.0}) == (3.0, 0.0)  # a model fitted before regions had their threshold
