"""A generated fashion catalogue: procedural garment images with attributes and captions (no downloads).

Every item is drawn from a seed with numpy and Pillow only (no torch: the runtime and the demo use this module on
machines without PyTorch). An item is one of eight categories (a silhouette per category), filled with one of
twelve named colours and one of four patterns, at a jittered position, scale and tilt on a light background.
Captions and FashionIQ-style relative captions use only words of
:data:`fine_infer.tokenization.BUILTIN_WORDS`, so the tiny tokenizers read them with no unknown token.

- :func:`generate` → :class:`CatalogueItem` list; :func:`render` draws one garment and returns its silhouette mask.
- :func:`held_out_split` → disjoint training and held-out items (training and evaluation of the tiny models).
- :func:`relative_caption` and :func:`composed_pairs` for composed (image + text) retrieval.
- :func:`save_catalogue` writes PNGs and ``catalogue.json``.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from fine_infer._atomic import atomic_write_bytes
from fine_infer.errors import InputError
from fine_infer.labels import CATEGORIES, COLOURS, PATTERNS


# Reference sRGB of each named colour. Every pixel of a garment is a positive multiple of its colour plus a grey
# offset (shading, tints towards white, darker shades, neutral trims), so the hue of any region is the named hue.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 45),
    "orange": (245, 135, 25),
    "yellow": (245, 210, 40),
    "green": (45, 150, 70),
    "blue": (40, 85, 200),
    "purple": (125, 60, 170),
    "pink": (240, 140, 185),
    "brown": (120, 72, 38),
    "black": (30, 30, 30),
    "white": (250, 250, 250),
    "grey": (135, 135, 135),
    "beige": (222, 200, 160),
}

# Light, slightly tinted studio backgrounds; each is kept at least ~10 levels from white so a white garment shows.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (236, 232, 224), (222, 230, 236), (232, 232, 232), (238, 226, 226), (226, 234, 224), (240, 236, 218),
)

# Caption words per pattern: adjective ("a red striped dress") and noun ("a red dress with stripes").
_PATTERN_ADJ = {"stripes": "striped", "dots": "dotted", "checks": "checked"}
_SS = 2  # supersampling factor: draw at 2× and box-downsample, for anti-aliased edges


@dataclass(frozen=True)
class CatalogueItem:
    """One generated catalogue entry: an RGB image and the attributes it was drawn with."""

    id: int
    image: Image.Image
    category: str
    colour: str
    pattern: str
    caption: str

    def metadata(self) -> dict[str, object]:
        """The item's attributes and caption as a JSON-able dict (no image)."""
        return {"id": self.id, "category": self.category, "colour": self.colour, "pattern": self.pattern,
                "caption": self.caption}


# ----------------------------------------------------------------------------------------------------------------
# Silhouettes, in unit coordinates (x right, y down, inside [0.05, 0.95]²)
# ----------------------------------------------------------------------------------------------------------------
Point = tuple[float, float]


@dataclass(frozen=True)
class _Shape:
    body: tuple[tuple[Point, ...], ...]  # filled with colour + pattern
    trims: tuple[tuple[tuple[Point, ...], str], ...] = ()  # (polygon, role) drawn on top without pattern
    lines: tuple[tuple[Point, ...], ...] = ()  # seams and details, in the outline colour
    dots: tuple[Point, ...] = ()  # buttons, in the outline colour
    under: tuple[tuple[Point, ...], ...] = ()  # thick strokes drawn behind the body (a bag's handle)


def _mirror(points: Sequence[Point]) -> tuple[Point, ...]:
    return tuple((1.0 - x, y) for x, y in points)


def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 12) -> tuple[Point, ...]:
    return tuple((cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in np.linspace(a0, a1, n))


_COLLAR = ((0.40, 0.09), (0.50, 0.17), (0.43, 0.23), (0.36, 0.12))
_LAPEL = ((0.41, 0.08), (0.33, 0.21), (0.50, 0.50))

SHAPES: dict[str, _Shape] = {
    # sleeveless A-line dress with straps, a V neckline and a waist seam
    "dress": _Shape(
        body=((
            (0.38, 0.05), (0.43, 0.05), (0.50, 0.17), (0.57, 0.05), (0.62, 0.05), (0.66, 0.22), (0.60, 0.42),
            (0.81, 0.93), (0.66, 0.955), (0.50, 0.96), (0.34, 0.955), (0.19, 0.93), (0.40, 0.42), (0.34, 0.22),
        ),),
        lines=(((0.40, 0.42), (0.60, 0.42)),),
    ),
    # long sleeves, pointed collar, a button placket
    "shirt": _Shape(
        body=((
            (0.40, 0.09), (0.60, 0.09), (0.78, 0.15), (0.92, 0.82), (0.81, 0.85), (0.72, 0.38), (0.72, 0.92),
            (0.28, 0.92), (0.28, 0.38), (0.19, 0.85), (0.08, 0.82), (0.22, 0.15),
        ),),
        trims=((_COLLAR, "base"), (_mirror(_COLLAR), "base")),
        lines=(((0.50, 0.17), (0.50, 0.92)), ((0.905, 0.76), (0.80, 0.79)), ((0.095, 0.76), (0.20, 0.79))),
        dots=tuple((0.53, y) for y in (0.30, 0.44, 0.58, 0.72, 0.86)),
    ),
    # short sleeves and a round neck band
    "t-shirt": _Shape(
        body=((
            (0.38, 0.10), (0.44, 0.15), (0.50, 0.165), (0.56, 0.15), (0.62, 0.10), (0.80, 0.17), (0.94, 0.37),
            (0.81, 0.45), (0.75, 0.36), (0.75, 0.90), (0.25, 0.90), (0.25, 0.36), (0.19, 0.45), (0.06, 0.37),
            (0.20, 0.17),
        ),),
        lines=(((0.38, 0.10), (0.44, 0.15), (0.50, 0.165), (0.56, 0.15), (0.62, 0.10)),),
    ),
    # flared skirt: waistband and pleats, no bodice
    "skirt": _Shape(
        body=((
            (0.30, 0.20), (0.70, 0.20), (0.71, 0.29), (0.85, 0.80), (0.66, 0.83), (0.50, 0.84), (0.34, 0.83),
            (0.15, 0.80), (0.29, 0.29),
        ),),
        lines=(((0.29, 0.29), (0.71, 0.29)), ((0.42, 0.29), (0.37, 0.83)), ((0.58, 0.29), (0.63, 0.83))),
    ),
    # two legs with a crotch gap, waistband and fly
    "trousers": _Shape(
        body=((
            (0.30, 0.06), (0.70, 0.06), (0.73, 0.50), (0.76, 0.95), (0.56, 0.95), (0.50, 0.32), (0.44, 0.95),
            (0.24, 0.95), (0.27, 0.50),
        ),),
        lines=(((0.30, 0.13), (0.70, 0.13)), ((0.50, 0.13), (0.50, 0.30))),
    ),
    # wide, long-sleeved, open V front over a contrasting top, lapels, pockets, buttons
    "jacket": _Shape(
        body=((
            (0.36, 0.08), (0.64, 0.08), (0.82, 0.14), (0.95, 0.86), (0.83, 0.88), (0.76, 0.40), (0.77, 0.94),
            (0.23, 0.94), (0.24, 0.40), (0.17, 0.88), (0.05, 0.86), (0.18, 0.14),
        ),),
        trims=((((0.41, 0.08), (0.59, 0.08), (0.50, 0.50)), "inner"),),
        lines=(_LAPEL, _mirror(_LAPEL), ((0.50, 0.50), (0.50, 0.94)), ((0.29, 0.72), (0.42, 0.70)),
               ((0.58, 0.70), (0.71, 0.72))),
        dots=((0.47, 0.60), (0.47, 0.76)),
    ),
    # side view of a sneaker, toe to the right: upper, laces, contrasting sole
    "shoe": _Shape(
        body=((
            (0.10, 0.40), (0.16, 0.35), (0.34, 0.38), (0.40, 0.46), (0.52, 0.50), (0.70, 0.55), (0.86, 0.61),
            (0.93, 0.69), (0.93, 0.75), (0.08, 0.75), (0.07, 0.55),
        ),),
        trims=((((0.06, 0.73), (0.95, 0.73), (0.95, 0.79), (0.90, 0.83), (0.08, 0.83), (0.05, 0.79)), "sole"),),
        lines=(((0.43, 0.49), (0.46, 0.43)), ((0.49, 0.51), (0.52, 0.45)), ((0.55, 0.53), (0.58, 0.47)),
               ((0.76, 0.73), (0.79, 0.58))),
    ),
    # handbag: trapezoid body, flap, clasp and an arched handle
    "bag": _Shape(
        body=(((0.18, 0.42), (0.82, 0.42), (0.88, 0.90), (0.12, 0.90)),),
        trims=((((0.46, 0.56), (0.54, 0.56), (0.54, 0.64), (0.46, 0.64)), "metal"),),
        lines=(((0.18, 0.42), (0.22, 0.54), (0.50, 0.62), (0.78, 0.54), (0.82, 0.42)),),
        under=(_arc(0.50, 0.44, 0.19, 0.28, math.pi, 2 * math.pi, 16),),
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------
def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _rgb(values: np.ndarray) -> tuple[int, int, int]:
    r, g, b = (int(round(float(v))) for v in np.clip(values, 0, 255))
    return (r, g, b)


def render(
    category: str, colour: str, pattern: str, rng: np.random.Generator | int = 0, size: int = 96
) -> tuple[Image.Image, np.ndarray]:
    """Draw one garment; returns the RGB image (``size``×``size``) and a boolean mask of the pixels fully inside
    its silhouette (edges and outline excluded), e.g. to check the drawn colour.

    ``rng`` (a generator or a seed) sets the background, position, scale, tilt, shading and pattern phase."""
    if category not in SHAPES or colour not in PALETTE or pattern not in PATTERNS:
        raise InputError(
            f"unknown attributes ({category!r}, {colour!r}, {pattern!r}); categories: {', '.join(CATEGORIES)}; "
            f"colours: {', '.join(COLOURS)}; patterns: {', '.join(PATTERNS)}"
        )
    if size < 16:
        raise InputError(f"catalogue images need size >= 16, got {size}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    shape = SHAPES[category]
    W = size * _SS

    # Jitter: background, scale, position, tilt (kept small so the silhouette stays inside the frame).
    bg = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.float64)
    scale = rng.uniform(0.74, 0.88)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
    angle = math.radians(rng.uniform(-5.0, 5.0))
    cos, sin = math.cos(angle), math.sin(angle)

    def px(points: Sequence[Point]) -> list[tuple[float, float]]:
        out = []
        for x, y in points:
            x, y = (x - 0.5) * scale, (y - 0.5) * scale
            out.append(((cx + x * cos - y * sin) * W, (cy + x * sin + y * cos) * W))
        return out

    # Colours: a slightly brighter or darker version of the named colour (a positive scale keeps its hue).
    base = np.array(PALETTE[colour], dtype=np.float64) * rng.uniform(0.95, 1.0)
    light = _luma(base) < 140
    # Pattern ink: a near-white tint of the colour on dark colours, a dark shade of it on light ones.
    ink = base + 0.85 * (255.0 - base) if light else base * 0.4
    outline = base * 0.55
    neutral = np.full(3, 225.0 if _luma(base) < 110 else 55.0)  # trims that must contrast with the garment
    roles = {"base": base, "inner": neutral, "sole": neutral, "metal": np.full(3, 165.0)}

    canvas = Image.fromarray(np.broadcast_to(bg, (W, W, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    stroke = max(1, round(W * 0.012))
    for points in shape.under:
        draw.line(px(points), fill=_rgb(outline), width=max(2, round(W * 0.035)), joint="curve")

    mask_img = Image.new("L", (W, W), 0)
    mdraw = ImageDraw.Draw(mask_img)
    for poly in shape.body:
        mdraw.polygon(px(poly), fill=255)
    body = np.asarray(mask_img) > 127

    fill = _pattern_fill(pattern, base, ink, W, scale, rng)
    # Gentle side lighting: a factor in [~0.92, 1] across the garment (a scale, so the hue is kept).
    ramp = np.linspace(0.0, 1.0, W)[None, :, None]
    fill = fill * (1.0 - rng.uniform(0.03, 0.08) * (ramp if rng.integers(2) else 1.0 - ramp))
    pixels = np.asarray(canvas).astype(np.float64)
    pixels[body] = fill[body]
    canvas = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)

    for poly in shape.body:
        draw.polygon(px(poly), outline=_rgb(outline), width=stroke)
    for poly, role in shape.trims:
        draw.polygon(px(poly), fill=_rgb(roles[role]), outline=_rgb(outline), width=stroke)
    for points in shape.lines:
        draw.line(px(points), fill=_rgb(outline), width=stroke, joint="curve")
    r = W * 0.012
    for x, y in px(shape.dots):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_rgb(outline))

    image = canvas.reduce(_SS)
    # Inside = every sub-pixel inside the body, then one pixel of erosion to drop the outline stroke.
    inside = body.reshape(size, _SS, size, _SS).all(axis=(1, 3))
    inside = _erode(inside)
    return image, inside


def _pattern_fill(
    pattern: str, base: np.ndarray, ink: np.ndarray, W: int, scale: float, rng: np.random.Generator
) -> np.ndarray:
    """A (W, W, 3) float layer of ``base`` with the pattern in ``ink``; the silhouette mask cuts it out."""
    fill = np.empty((W, W, 3), dtype=np.float64)
    fill[:] = base
    period = W * scale * rng.uniform(0.09, 0.13)
    phase = rng.uniform(0, period, 2)
    yy, xx = np.mgrid[0:W, 0:W].astype(np.float64)
    yy, xx = yy + phase[0], xx + phase[1]
    if pattern == "stripes":
        coord = yy if rng.integers(3) else xx  # mostly horizontal, sometimes vertical
        fill[(coord % period) < 0.38 * period] = ink
    elif pattern == "dots":
        row = np.floor(yy / period)
        dx = ((xx + (row % 2) * period / 2) % period) - period / 2  # staggered rows, as polka dots are
        dy = (yy % period) - period / 2
        fill[dx * dx + dy * dy < (0.27 * period) ** 2] = ink
    elif pattern == "checks":
        # Gingham: bands of half-tint both ways, full ink where they cross.
        h = (yy % period) < 0.26 * period
        v = (xx % period) < 0.26 * period
        fill[h ^ v] = 0.5 * (base + ink)
        fill[h & v] = ink
    return fill


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:, :] &= mask[:-1, :]
    out[:-1, :] &= mask[1:, :]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Catalogue, captions, composed pairs
# ----------------------------------------------------------------------------------------------------------------
def caption(category: str, colour: str, pattern: str, form: int = 0) -> str:
    """A short caption such as "a red striped dress" (``form`` 0) or "a red dress with stripes" (``form`` 1).

    Trousers take no article ("blue checked trousers"); "an" precedes a vowel sound ("an orange bag")."""
    noun = category
    if pattern == "solid":
        phrase = f"{colour} {noun}"
    elif form == 0:
        phrase = f"{colour} {_PATTERN_ADJ[pattern]} {noun}"
    else:
        phrase = f"{colour} {noun} with {pattern}"
    if category == "trousers":
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def generate(n: int, seed: int = 0, size: int = 96, start: int = 0) -> list[CatalogueItem]:
    """``n`` catalogue items with ids ``start..start+n-1``, the same for the same ``seed`` and ``size``.

    Item ``i`` depends only on ``(seed, i)``, so ``generate(10)`` is the first ten items of ``generate(100)`` and
    ``generate(5, start=5)`` the last five of ``generate(10)``."""
    if n < 0:
        raise InputError(f"catalogue size must be >= 0, got {n}")
    if start < 0:
        raise InputError(f"catalogue start id must be >= 0, got {start}")
    items = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        form = int(rng.integers(2))
        image, _ = render(category, colour, pattern, rng, size)
        items.append(CatalogueItem(i, image, category, colour, pattern, caption(category, colour, pattern, form)))
    return items


# Held-out items start at this id, so a training split of any size (ids 0..n-1) never overlaps them.
HELD_OUT_START = 1_000_000


def held_out_split(
    n_train: int, n_test: int, seed: int = 0, size: int = 96
) -> tuple[list[CatalogueItem], list[CatalogueItem]]:
    """A training split (ids ``0..n_train-1``) and a held-out split (ids from :data:`HELD_OUT_START`) of one catalogue.

    The two never share an image (each item is drawn from its own ``(seed, id)`` stream); they share the attribute
    vocabulary, so held-out items repeat training combinations of category, colour and pattern with a new
    position, scale, tilt, background, shading and pattern phase. The held-out split does not depend on
    ``n_train``: evaluation numbers stay comparable when the training set grows."""
    if n_train > HELD_OUT_START:
        raise InputError(f"training split of {n_train} items would overlap the held-out ids from {HELD_OUT_START}")
    return generate(n_train, seed, size), generate(n_test, seed, size, start=HELD_OUT_START)


def attribute_key(item: CatalogueItem) -> tuple[str, str, str]:
    """``(category, colour, pattern)``: items with equal keys are the same product drawn with other jitter."""
    return (item.category, item.colour, item.pattern)


def relative_caption(a: CatalogueItem, b: CatalogueItem) -> str:
    """How to turn item ``a`` into item ``b`` (same category), in FashionIQ's style:
    "make it blue", "with dots instead of stripes", "make it blue and with dots", "make it plain without stripes".

    Items of different categories, or with the same colour and pattern, have no such caption (InputError)."""
    if a.category != b.category:
        raise InputError(f"relative captions need items of one category, got {a.category} and {b.category}")
    new_colour = a.colour != b.colour
    new_pattern = a.pattern != b.pattern
    if not (new_colour or new_pattern):
        raise InputError(f"items {a.id} and {b.id} have the same colour and pattern: nothing to describe")
    if not new_pattern:
        return f"make it {b.colour}"
    if b.pattern == "solid":  # removing the pattern: say which one goes
        return f"make it plain {b.colour} without {a.pattern}" if new_colour else f"make it plain without {a.pattern}"
    change = f"with {b.pattern}" if a.pattern == "solid" else f"with {b.pattern} instead of {a.pattern}"
    return f"make it {b.colour} and {change}" if new_colour else change


def composed_pairs(items: Sequence[CatalogueItem], seed: int = 0) -> list[tuple[int, int, str]]:
    """For each item (in order) that has one, a random target of the same category with another colour or pattern:
    ``(reference id, target id, relative caption)``. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[CatalogueItem]] = {}
    for it in items:
        by_category.setdefault(it.category, []).append(it)
    pairs = []
    for a in items:
        candidates = [b for b in by_category[a.category] if (b.colour, b.pattern) != (a.colour, a.pattern)]
        if candidates:
            b = candidates[rng.integers(len(candidates))]
            pairs.append((a.id, b.id, relative_caption(a, b)))
    return pairs


def file_name(item: CatalogueItem) -> str:
    """The PNG name of an item: ``<id>-<category>-<colour>-<pattern>.png``."""
    return f"{item.id}-{item.category}-{item.colour}-{item.pattern}.png"


def save_catalogue(items: Sequence[CatalogueItem], folder: str | Path) -> Path:
    """Write each item as ``<id>-<category>-<colour>-<pattern>.png`` and ``catalogue.json`` (the items' metadata
    with their file names) into ``folder`` (created if needed); returns the path of ``catalogue.json``.

    Files are written atomically, so an interrupted save never leaves a truncated image or JSON behind."""
    folder = Path(folder)
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        raise InputError("catalogue items must have distinct ids")
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for it in items:
        buf = io.BytesIO()
        it.image.save(buf, format="PNG")
        atomic_write_bytes(folder / file_name(it), buf.getvalue())
        entries.append({**it.metadata(), "file": file_name(it)})
    doc = {"format": "fine-infer-catalogue", "version": 1, "items": entries}
    path = folder / "catalogue.json"
    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
    return path


__all__ = [
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "CatalogueItem",
    "HELD_OUT_START",
    "PALETTE",
    "PATTERNS",
    "SHAPES",
    "attribute_key",
    "caption",
    "composed_pairs",
    "file_name",
    "generate",
    "held_out_split",
    "relative_caption",
    "render",
    "save_catalogue",
]
