"""load_image over a corpus of odd but valid files, and a one-line reason for every unusable one."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewvision.io.images import BadImage, iter_image_files, load_image

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _rgb_pattern(w: int = 32, h: int = 24) -> Image.Image:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    arr[..., 2] = 128
    return Image.fromarray(arr, mode="RGB")


def _check_rgb(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with_claimed_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims width x height pixels (RGB, 8 bit); the data is a few bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )
    return path


def _assert_bad(path: Path, words: tuple[str, ...], **kwargs) -> BadImage:
    with pytest.raises(BadImage) as info:
        load_image(path, **kwargs)
    err = info.value
    msg = str(err)
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg
    assert msg.startswith(f"{path}: ")
    assert err.path == str(path)
    assert err.reason and "\n" not in err.reason
    assert any(w in err.reason.lower() for w in words), f"reason {err.reason!r} has none of {words}"
    assert isinstance(err, ValueError)  # callers may catch ValueError
    return err


# --------------------------------------------------------------------------------------------------------------
# good files
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix,kwargs",
    [
        (".jpg", {"quality": 95}),
        (".jpeg", {"quality": 95}),
        (".png", {}),
        (".bmp", {}),
        (".tif", {}),
        (".tiff", {"compression": "tiff_lzw"}),
        (".webp", {"lossless": True}),
    ],
)
def test_common_formats_load_as_rgb(tmp_path, suffix, kwargs):
    src = _rgb_pattern()
    path = tmp_path / f"img{suffix}"
    src.save(path, **kwargs)
    arr = _check_rgb(load_image(path), src.size).astype(int)
    tol = 12 if suffix in (".jpg", ".jpeg") else 0
    assert np.abs(arr - np.asarray(src, dtype=int)).max() <= tol


def test_upper_case_suffix_and_str_path(tmp_path):
    path = tmp_path / "IMG_0001.JPG"
    _rgb_pattern().save(path, format="JPEG")
    _check_rgb(load_image(str(path)), (32, 24))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_grayscale_l(tmp_path, suffix):
    arr = np.tile(np.linspace(0, 255, 30, dtype=np.uint8), (10, 1))
    path = tmp_path / f"gray{suffix}"
    Image.fromarray(arr, mode="L").save(path)
    out = _check_rgb(load_image(path), (30, 10)).astype(int)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    tol = 6 if suffix == ".jpg" else 0
    assert np.abs(out[..., 0] - arr).max() <= tol


def _uint16_ramp(w: int = 64, h: int = 8) -> np.ndarray:
    ramp = np.linspace(0, 65535, w).round().astype(np.uint16)
    return np.tile(ramp, (h, 1))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_grayscale_is_rescaled_not_clipped(tmp_path, suffix):
    src = _uint16_ramp()
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(src).save(path)  # mode I;16
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really a 16-bit (or 32-bit int) file, not 8-bit
    out = _check_rgb(load_image(path), (64, 8)).astype(int)
    g = out[..., 0]
    assert (g == out[..., 1]).all() and (g == out[..., 2]).all()
    # the full 16-bit range maps onto the full 8-bit range: clipping would leave almost everything at 255
    assert g.min() <= 2
    assert g.max() >= 253
    assert np.all(np.diff(g[0]) >= 0), "ramp must stay monotonic"
    expected = src.astype(float) / 65535.0 * 255.0
    assert np.abs(g - expected).max() <= 2
    # a mid-grey 16-bit value comes out mid-grey
    assert 110 <= g[0, 32] <= 145
    assert len(np.unique(g)) > 50


def test_16bit_tiff_low_values_are_not_saturated(tmp_path):
    # values well below 65535 must not come out as white (which is what clipping the raw value to 255 does)
    src = np.full((8, 8), 1000, dtype=np.uint16)
    src[:, 4:] = 30000
    path = tmp_path / "low16.tif"
    Image.fromarray(src).save(path)
    g = _check_rgb(load_image(path), (8, 8))[..., 0].astype(int)
    assert g.max() < 255
    assert g[0, 0] < g[0, 7]


def test_rgba_png_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((10, 10, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red-ish everywhere
    arr[..., 3] = 255
    arr[:5, :, 3] = 0  # top half fully transparent (its colour must not leak, nor become black)
    arr[:5, :, :3] = 0
    arr[5:, :5, 3] = 128  # half transparent block
    path = tmp_path / "rgba.png"
    Image.fromarray(arr, mode="RGBA").save(path)
    out = _check_rgb(load_image(path), (10, 10)).astype(int)
    assert (out[:5] == 255).all()
    assert tuple(out[9, 9]) == (200, 0, 0)
    r, g, b = out[9, 0]
    assert 220 <= r <= 235 and 120 <= g <= 135 and 120 <= b <= 135  # blended with white


def test_la_png_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((4, 4, 2), dtype=np.uint8)
    arr[..., 1] = 255
    arr[0, 0, 1] = 0
    path = tmp_path / "la.png"
    Image.fromarray(arr, mode="LA").save(path)
    out = _check_rgb(load_image(path), (4, 4))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[1, 1]) == (0, 0, 0)


def test_palette_png_with_transparency(tmp_path):
    im = Image.new("P", (6, 6), 0)
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    im.putpalette(palette)
    im.paste(1, (0, 0, 3, 6))  # left half red
    im.paste(2, (3, 3, 6, 6))  # bottom right blue; top right stays index 0 = transparent black
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    out = _check_rgb(load_image(path), (6, 6))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[5, 5]) == (0, 0, 255)
    assert tuple(out[0, 5]) == (255, 255, 255)  # transparent -> white, not black


def test_palette_png_without_transparency(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    path = tmp_path / "pal_opaque.png"
    im.save(path)
    out = _check_rgb(load_image(path), (4, 4))
    assert tuple(out[2, 2]) == (10, 200, 30)


def test_cmyk_jpeg(tmp_path):
    im = Image.new("CMYK", (16, 16), (0, 0, 0, 0))  # white
    im.paste((255, 0, 0, 0), (0, 0, 8, 16))  # left half cyan
    path = tmp_path / "cmyk.jpg"
    im.save(path, quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = _check_rgb(load_image(path), (16, 16)).astype(int)
    r, g, b = out[8, 2]
    assert r < 40 and g > 215 and b > 215  # cyan
    assert (out[8, 13] > 215).all()  # white


def test_exif_orientation_6_is_applied(tmp_path):
    w, h = 40, 20
    arr = np.full((h, w, 3), 255, dtype=np.uint8)
    arr[:6, :6] = (255, 0, 0)  # mark the stored top-left corner red
    im = Image.fromarray(arr, mode="RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif().get(0x0112) == 6
    out = _check_rgb(load_image(path), (20, 40)).astype(int)
    # a clockwise quarter turn moves the top-left corner to the top-right
    r, g, b = out[2, 17]
    assert r > 200 and g < 60 and b < 60, out[2, 17]
    for y, x in [(2, 2), (37, 2), (37, 17)]:  # the other corners stay white
        assert (out[y, x] > 200).all(), (y, x, out[y, x])


def test_one_bit_image(tmp_path):
    im = Image.new("1", (9, 7), 0)
    im.paste(1, (0, 0, 4, 7))
    for suffix in (".png", ".bmp", ".tif"):
        path = tmp_path / f"bw{suffix}"
        im.save(path)
        out = _check_rgb(load_image(path), (9, 7))
        assert set(np.unique(out).tolist()) == {0, 255}
        assert tuple(out[3, 1]) == (255, 255, 255)
        assert tuple(out[3, 7]) == (0, 0, 0)


def test_loaded_image_is_detached_from_file(tmp_path):
    path = tmp_path / "a.png"
    _rgb_pattern().save(path)
    im = load_image(path)
    path.unlink()  # fully decoded: no lazy read left
    assert im.getpixel((0, 0)) is not None
    assert np.asarray(im).shape == (24, 32, 3)


# --------------------------------------------------------------------------------------------------------------
# bad files
# --------------------------------------------------------------------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _assert_bad(path, ("empty",))


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_file(tmp_path, suffix):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), mode="RGB")
    full = tmp_path / f"full{suffix}"
    noisy.save(full)
    data = full.read_bytes()
    path = tmp_path / f"half{suffix}"
    path.write_bytes(data[: len(data) // 2])
    _assert_bad(path, ("truncated",))


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\njust some text\n")
    _assert_bad(path, ("not an image",))


def test_random_bytes_named_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_bad(path, ("not an image",))


def test_over_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    _rgb_pattern(40, 30).save(path)
    err = _assert_bad(path, ("over the limit",), max_pixels=1000)
    assert "40x30" in err.reason
    # at or under the limit it loads
    _check_rgb(load_image(path, max_pixels=1200), (40, 30))


def test_header_claims_over_our_limit(tmp_path):
    # 9000 x 8000 = 72M pixels: over fewvision's 64M limit, under PIL's own warning threshold
    path = _png_with_claimed_size(tmp_path / "claims_72mp.png", 9000, 8000)
    assert path.stat().st_size < 200
    err = _assert_bad(path, ("over the limit",))
    assert "9000x8000" in err.reason


@pytest.mark.parametrize("size", [(10_000, 9_500), (100_000, 100_000)])
def test_header_claims_decompression_bomb(tmp_path, size):
    # 95M pixels trips PIL's warning, 10G pixels PIL's hard error: both are reported, neither is decoded
    path = _png_with_claimed_size(tmp_path / f"bomb_{size[0]}.png", *size)
    _assert_bad(path, ("over the limit", "too many pixels"))


def test_directory_path(tmp_path):
    d = tmp_path / "photos.jpg"
    d.mkdir()
    (d / "inner.png").write_bytes(b"x")
    _assert_bad(d, ("directory",))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    _assert_bad(empty, ("directory",))


def test_missing_path(tmp_path):
    path = tmp_path / "nope" / "missing.png"
    _assert_bad(path, ("cannot read", "no such file"))


def test_bad_image_message_format():
    err = BadImage(Path("/x/y.png"), "empty file (0 bytes)")
    assert str(err) == "/x/y.png: empty file (0 bytes)"
    assert err.path == "/x/y.png" and err.reason == "empty file (0 bytes)"


# --------------------------------------------------------------------------------------------------------------
# iter_image_files
# --------------------------------------------------------------------------------------------------------------


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_iter_image_files_recurses_and_filters(tmp_path):
    root = tmp_path / "data"
    a = _touch(root / "b.png")
    b = _touch(root / "a.JPG")
    c = _touch(root / "sub" / "deeper" / "c.webp")
    d = _touch(root / "sub" / "d.tiff")
    for other in ("notes.txt", "sub/model.pt", "sub/.hidden.png", "sub/deeper/x.gif", "noext"):
        _touch(root / other)
    (root / "dir.png").mkdir()  # a directory named like an image: listed, so the batch reports it as a skip

    found = iter_image_files([root])
    assert all(isinstance(p, Path) for p in found)
    assert set(found) == {a, b, c, d, root / "dir.png"}
    assert found == sorted(found)  # sorted within a directory
    assert iter_image_files([str(root)]) == found


def test_iter_image_files_keeps_explicit_files_and_dedupes(tmp_path):
    root = tmp_path / "data"
    img = _touch(root / "x.png")
    other = _touch(tmp_path / "dump.bin")  # explicitly named: kept whatever its suffix, so it gets reported
    found = iter_image_files([other, root, img, root / "." / "x.png"])
    assert found == [other, img]
    assert iter_image_files([]) == []


def test_iter_image_files_missing_path(tmp_path):
    _touch(tmp_path / "ok.png")
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError) as info:
        iter_image_files([tmp_path / "ok.png", missing])
    assert str(missing) in str(info.value)
