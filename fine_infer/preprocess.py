"""Image decoding and preprocessing with numpy and Pillow only (the runtime path imports no torch).

Inputs may be file paths, raw bytes, PIL images or uint8 arrays (H, W, 3) / (H, W). Every input is bounded
(bytes and pixels) before it is decoded in full, and every failure is an :class:`InputError` naming the input.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from fine_infer.errors import InputError
from fine_infer.specs import ImagePreprocess

ImageInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray]

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # about 6300×6300; larger images are refused before decoding

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def _describe(x: Any, i: int) -> str:
    if isinstance(x, (str, os.PathLike)):
        return f"image {i} ({x})"
    return f"image {i}"


def _open_checked(data: bytes | str | os.PathLike, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit applies below
            img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{what} is too large to decode ({exc}); the limit is {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{what} is not a readable image ({type(exc).__name__}: {exc})") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{what} has {w}×{h} = {w * h} pixels; the limit is {MAX_IMAGE_PIXELS}")
    try:
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what} is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    return img


def load_image(x: ImageInput, index: int = 0) -> Image.Image:
    """Decode one input to an RGB PIL image, enforcing :data:`MAX_IMAGE_BYTES` and :data:`MAX_IMAGE_PIXELS`."""
    what = _describe(x, index)
    if isinstance(x, Image.Image):
        w, h = x.size
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(f"{what} has {w}×{h} pixels; the limit is {MAX_IMAGE_PIXELS}")
        img = x
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise InputError(f"{what} is a {x.dtype} array; pass uint8 pixels (H, W, 3) or (H, W)")
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (3, 4)) or min(x.shape[:2]) < 1:
            raise InputError(f"{what} has shape {x.shape}; expected (H, W, 3), (H, W, 4) or (H, W)")
        if x.shape[0] * x.shape[1] > MAX_IMAGE_PIXELS:
            raise InputError(f"{what} has {x.shape[0] * x.shape[1]} pixels; the limit is {MAX_IMAGE_PIXELS}")
        img = Image.fromarray(np.ascontiguousarray(x))
    elif isinstance(x, (bytes, bytearray)):
        if len(x) > MAX_IMAGE_BYTES:
            raise InputError(f"{what} is {len(x)} bytes; the limit is {MAX_IMAGE_BYTES}")
        if len(x) == 0:
            raise InputError(f"{what} is empty (0 bytes)")
        img = _open_checked(bytes(x), what)
    elif isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise InputError(f"{what} does not exist")
        size = p.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise InputError(f"{what} is {size} bytes; the limit is {MAX_IMAGE_BYTES}")
        img = _open_checked(p, what)
    else:
        raise InputError(f"{what} is a {type(x).__name__}; pass a path, bytes, a PIL image or a uint8 array")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def resize_and_crop(img: Image.Image, spec: ImagePreprocess) -> Image.Image:
    """Resize (exact, or shorter side) then centre-crop, as the spec says."""
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize == "exact":
        img = img.resize((spec.size, spec.size), resample)
    elif spec.resize == "shorter":
        w, h = img.size
        if w <= h:
            nw, nh = spec.size, max(1, int(spec.size * h / w))
        else:
            nw, nh = max(1, int(spec.size * w / h)), spec.size
        img = img.resize((nw, nh), resample)
    else:
        raise InputError(f"unknown resize mode {spec.resize!r} in the bundle's preprocessing")
    if spec.crop != img.size[0] or spec.crop != img.size[1]:
        w, h = img.size
        left = int(round((w - spec.crop) / 2.0))
        top = int(round((h - spec.crop) / 2.0))
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
    return img


def to_tensor(img: Image.Image, spec: ImagePreprocess) -> np.ndarray:
    """An RGB image (already at the crop size) → normalised float32 (3, H, W)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_images(images: Sequence[ImageInput], spec: ImagePreprocess) -> np.ndarray:
    """Decode, resize, crop and normalise a batch: float32 (B, 3, crop, crop)."""
    if isinstance(images, (str, bytes, bytearray, os.PathLike, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8
    ):
        images = [images]
    if len(images) == 0:
        raise InputError("no images given: pass at least one")
    return np.stack([to_tensor(resize_and_crop(load_image(x, i), spec), spec) for i, x in enumerate(images)])
