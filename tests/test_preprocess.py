"""Image decoding and preprocessing: every input form, bounds, and the numbers against an independent computation."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fine_infer.errors import InputError
from fine_infer.preprocess import MAX_IMAGE_PIXELS, load_image, preprocess_images
from fine_infer.specs import CLIP_MEAN, CLIP_STD, ImagePreprocess


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_form_gives_the_same_tensor(tmp_path, rng):
    arr = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    path.write_bytes(_png_bytes(arr))
    spec = ImagePreprocess(size=24, crop=20, resize="shorter", interpolation="bilinear")
    outs = [preprocess_images([x], spec) for x in (str(path), path, path.read_bytes(), Image.fromarray(arr), arr)]
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)
    assert outs[0].shape == (1, 3, 20, 20) and outs[0].dtype == np.float32


def test_shorter_side_resize_crop_and_normalise_match_a_manual_computation(rng):
    arr = rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)
    spec = ImagePreprocess(size=32, crop=32, resize="shorter", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD)
    got = preprocess_images([arr], spec)[0]
    resized = np.asarray(Image.fromarray(arr).resize((51, 32), Image.Resampling.BICUBIC), dtype=np.float64)
    left = int(round((51 - 32) / 2))
    crop = resized[:, left : left + 32] / 255.0
    want = ((crop - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_exact_resize_ignores_aspect_and_grey_or_rgba_become_rgb(rng):
    spec = ImagePreprocess(size=16, crop=16, resize="exact")
    grey = rng.integers(0, 256, (10, 40), dtype=np.uint8)
    rgba = rng.integers(0, 256, (10, 40, 4), dtype=np.uint8)
    out = preprocess_images([grey, rgba], spec)
    assert out.shape == (2, 3, 16, 16)
    # the channels of a grey image carry the same pixel values before normalisation
    raw0 = out[0, 0] * spec.std[0] + spec.mean[0]
    raw1 = out[0, 1] * spec.std[1] + spec.mean[1]
    np.testing.assert_allclose(raw0, raw1, atol=1e-6)


def test_corrupt_and_truncated_images_are_clear_errors(tmp_path, rng):
    good = _png_bytes(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="image 0 is not a readable image"):
        load_image(b"this is not an image")
    with pytest.raises(InputError, match="corrupt or truncated|not a readable"):
        load_image(good[: len(good) // 2])
    with pytest.raises(InputError, match="empty"):
        load_image(b"")
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(InputError, match="is not a regular file"):
        load_image(tmp_path / "folder.png")
    with pytest.raises(InputError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(InputError, match="int"):
        load_image(42)


def test_huge_image_header_is_refused_before_decoding():
    # A valid PNG header claiming 10000×10000 pixels (100 MP) with almost no data behind it.
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 2, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
    assert 10000 * 10000 > MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match="pixels"):
        load_image(png)


def test_the_pixel_limit_is_the_callers_whatever_pillows_bound(rng):
    """``max_pixels`` is the one limit: above the module default, and above Pillow's own bomb bound (lowered here so
    a small image crosses it), an image under it decodes; over it, the error names it."""
    from PIL import Image

    from fine_infer.preprocess import image_size

    arr = rng.integers(0, 256, (1000, 1100, 3), dtype=np.uint8)  # 1.1 M pixels
    data = _png_bytes(arr)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 200_000  # Pillow refuses over 2x this (400 k) on open, before any size check
    try:
        assert image_size(data, max_pixels=2_000_000) == (1100, 1000)
        np.testing.assert_array_equal(np.asarray(load_image(data, max_pixels=2_000_000)), arr)
        with pytest.raises(InputError, match="the limit is 1000000$"):
            load_image(data, max_pixels=1_000_000)
        spec = ImagePreprocess(size=32, crop=32)
        assert preprocess_images([data], spec, max_pixels=2_000_000).shape == (1, 3, 32, 32)
        with pytest.raises(InputError, match="image 5 has 1100×1000 = 1100000 pixels; the limit is 1000000"):
            preprocess_images([data], spec, max_pixels=1_000_000, start=5)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    assert MAX_IMAGE_PIXELS < 50_000_000
    big = _huge_png(8000, 6000)  # 48 M pixels, header only: over the module default, under the caller's limit
    assert image_size(big, max_pixels=50_000_000) == (8000, 6000)
    with pytest.raises(InputError, match="corrupt or truncated"):  # got past every pixel check to the decoder
        load_image(big, max_pixels=50_000_000)


def test_errors_carry_no_object_addresses():
    import re

    for data in (b"this is not an image", b"GIF89a\x00\x00", b"\x89PNG\r\n\x1a\n\x00\x00"):
        with pytest.raises(InputError) as err:
            load_image(data)
        assert not re.search(r"0x[0-9a-fA-F]{6,}", str(err.value)), str(err.value)


def _huge_png(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")
