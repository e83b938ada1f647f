"""Image decoding and preprocessing with numpy and Pillow only (the runtime path imports no torch).

Inputs may be file paths, raw bytes, PIL images or uint8 arrays (H, W, 3) / (H, W). Every input is bounded
(bytes and pixels) before it is decoded in full, and every failure is an :class:`InputError` naming the input.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from fine_infer.errors import InputError
from fine_infer.specs import ImagePreprocess

ImageInput = Union[str, os.PathLike, bytes, bytearray, "Image.Image", np.ndarray]

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # about 6300×6300; larger images are refused before decoding (``max_pixels``)
_ADDRESS = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f..>" in PIL messages

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def _describe(x: Any, i: int) -> str:
    if isinstance(x, (str, os.PathLike)):
        return f"image {i} ({x})"
    return f"image {i}"


def _why(exc: BaseException) -> str:
    """An exception as one line for a message, without object addresses (they say nothing to a client)."""
    return _ADDRESS.sub(r"\1", f"{type(exc).__name__}: {exc}").splitlines()[0]


def _pil_allows(max_pixels: int) -> None:
    """Pillow refuses images over twice its own ``Image.MAX_IMAGE_PIXELS`` while opening them, before their size can
    be checked against ``max_pixels``: raise its bound when ``max_pixels`` is above it (never lower it), so the limit
    a caller sets is the one that applies. Every image is checked against ``max_pixels`` before it is decoded."""
    bound = Image.MAX_IMAGE_PIXELS
    if bound is not None and 2 * bound < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _open(data: bytes | str | os.PathLike) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit applies
        return Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)


def image_size(data: bytes | str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int] | None:
    """An encoded image's (width, height) read from its header alone (nothing is decoded), or None when it is not an
    image Pillow reads. ``max_pixels``: the largest image the caller accepts (Pillow's own bound is raised to it)."""
    _pil_allows(max_pixels)
    try:
        with _open(data) as img:
            return img.size
    except Image.DecompressionBombError:  # over twice Pillow's bound, itself at least max_pixels / 2
        return (Image.MAX_IMAGE_PIXELS or max_pixels) * 2 + 1, 1
    except Exception:  # noqa: BLE001 - not an image: decoding it names the problem
        return None


def _open_checked(data: bytes | str | os.PathLike, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    _pil_allows(max_pixels)
    try:
        img = _open(data)
    except Image.DecompressionBombError:
        raise InputError(f"{what} has more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; the limit is "
                         f"{max_pixels}") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not a readable image (not a format Pillow reads: PNG, JPEG, WebP, GIF, BMP, "
                         "...)") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} is not a readable image ({_why(exc)})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(f"{what} has {w}×{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what} is corrupt or truncated ({_why(exc)})") from None
    return img


def load_image(x: ImageInput, index: int = 0, alpha: str = "drop", *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode one input to an RGB PIL image, enforcing :data:`MAX_IMAGE_BYTES` and ``max_pixels`` (checked before
    anything is decoded; default :data:`MAX_IMAGE_PIXELS`).

    ``alpha``: what transparency becomes, ``"drop"`` (the stored RGB) or ``"white"`` (composited onto white)."""
    what = _describe(x, index)
    if isinstance(x, Image.Image):
        w, h = x.size
        if w * h > max_pixels:
            raise InputError(f"{what} has {w}×{h} pixels; the limit is {max_pixels}")
        img = x
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise InputError(f"{what} is a {x.dtype} array; pass uint8 pixels (H, W, 3) or (H, W)")
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (3, 4)) or min(x.shape[:2]) < 1:
            raise InputError(f"{what} has shape {x.shape}; expected (H, W, 3), (H, W, 4) or (H, W)")
        if x.shape[0] * x.shape[1] > max_pixels:
            raise InputError(f"{what} has {x.shape[0] * x.shape[1]} pixels; the limit is {max_pixels}")
        img = Image.fromarray(np.ascontiguousarray(x))
    elif isinstance(x, (bytes, bytearray)):
        if len(x) > MAX_IMAGE_BYTES:
            raise InputError(f"{what} is {len(x)} bytes; the limit is {MAX_IMAGE_BYTES}")
        if len(x) == 0:
            raise InputError(f"{what} is empty (0 bytes)")
        img = _open_checked(bytes(x), what, max_pixels)
    elif isinstance(x, (str, os.PathLike)):
        p = Path(x)
        if not p.is_file():
            raise InputError(f"{what} is not a regular file (a folder, device or pipe)" if p.exists() else
                             f"{what} does not exist")
        size = p.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise InputError(f"{what} is {size} bytes; the limit is {MAX_IMAGE_BYTES}")
        img = _open_checked(p, what, max_pixels)
    else:
        raise InputError(f"{what} is a {type(x).__name__}; pass a path, bytes, a PIL image or a uint8 array")
    if alpha == "white" and ("A" in img.getbands() or img.info.get("transparency") is not None):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    elif alpha not in ("drop", "white"):
        raise InputError(f"unknown alpha mode {alpha!r} in the bundle's preprocessing")
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
        if spec.crop_rounding == "floor":  # Hugging Face image processors
            left, top = (w - spec.crop) // 2, (h - spec.crop) // 2
        else:  # torchvision
            left, top = int(round((w - spec.crop) / 2.0)), int(round((h - spec.crop) / 2.0))
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
    return img


def to_tensor(img: Image.Image, spec: ImagePreprocess) -> np.ndarray:
    """An RGB image (already at the crop size) → normalised float32 (3, H, W)."""
    if spec.rescale == 1 / 255:
        arr = np.asarray(img, dtype=np.float32) / 255.0
    else:  # as Hugging Face rescales: in float64, then float32
        arr = (np.asarray(img, dtype=np.float64) * spec.rescale).astype(np.float32)
    arr = (arr - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_images(images: Sequence[ImageInput], spec: ImagePreprocess, *, max_pixels: int = MAX_IMAGE_PIXELS,
                      start: int = 0) -> np.ndarray:
    """Decode, resize, crop and normalise a batch: float32 (B, 3, crop, crop). ``max_pixels``: the largest image
    accepted (see :func:`load_image`); ``start``: the number of the first image in error messages."""
    if isinstance(images, (str, bytes, bytearray, os.PathLike, Image.Image)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3) and images.dtype == np.uint8
    ):
        images = [images]
    if len(images) == 0:
        raise InputError("no images given: pass at least one")
    return np.stack([to_tensor(resize_and_crop(load_image(x, i, spec.alpha, max_pixels=max_pixels), spec), spec)
                     for i, x in enumerate(images, start)])
