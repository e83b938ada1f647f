"""The generated catalogue: determinism, the drawn colours, captions the tokenizers read, composed pairs, saving."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fine_infer.tools.catalogue import (
    CATEGORIES,
    COLOURS,
    PALETTE,
    PATTERNS,
    CatalogueItem,
    composed_pairs,
    file_name,
    generate,
    relative_caption,
    render,
    save_catalogue,
)
from fine_infer.errors import InputError
from fine_infer.tokenization import BUILTIN_WORDS, word_tokenizer, wordpiece_tokenizer

ACHROMATIC = {"black", "white", "grey"}


@pytest.fixture(scope="module")
def items() -> list[CatalogueItem]:
    return generate(120, seed=3)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _hsv(rgb: np.ndarray) -> tuple[float, float, float]:
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255.0))


def _hue_gap_degrees(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return 360.0 * min(d, 1.0 - d)


def _garment_pixels(image: Image.Image) -> np.ndarray:
    """Pixels of the garment estimated from the image alone: away from the (flat) background colour of the
    corner, eroded by one pixel so anti-aliased edges and the outline stroke drop out."""
    a = _pixels(image)
    fg = np.abs(a - a[0, 0]).max(axis=-1) > 6
    core = fg.copy()
    core[1:] &= fg[:-1]
    core[:-1] &= fg[1:]
    core[:, 1:] &= fg[:, :-1]
    core[:, :-1] &= fg[:, 1:]
    return a[core]


def test_items_and_their_attributes(items):
    assert [it.id for it in items] == list(range(120))
    for it in items:
        assert it.image.mode == "RGB" and it.image.size == (96, 96)
        assert it.category in CATEGORIES and it.colour in COLOURS and it.pattern in PATTERNS
    # 120 draws cover every value of every attribute
    assert {it.category for it in items} == set(CATEGORIES)
    assert {it.colour for it in items} == set(COLOURS)
    assert {it.pattern for it in items} == set(PATTERNS)
    assert generate(2, size=64)[0].image.size == (64, 64)
    assert generate(0) == []


def test_same_seed_same_pixels_other_seed_differs(items):
    again = generate(12, seed=3)
    for a, b in zip(items[:12], again):
        assert (a.category, a.colour, a.pattern, a.caption) == (b.category, b.colour, b.pattern, b.caption)
        assert a.image.tobytes() == b.image.tobytes()
    other = generate(12, seed=4)
    assert any(a.image.tobytes() != b.image.tobytes() for a, b in zip(items[:12], other))
    assert [(it.category, it.colour, it.pattern) for it in items[:12]] != [
        (it.category, it.colour, it.pattern) for it in other
    ]
    # items are independent of the catalogue size: a short catalogue is a prefix of a long one
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(generate(5, seed=3), items))


def test_items_are_light_backgrounds_with_a_garment_in_frame(items):
    for it in items[:40]:
        a = _pixels(it.image)
        border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
        assert (border.min(axis=0) >= 200).all(), it  # light background all round: the garment is in frame
        assert np.allclose(border, a[0, 0], atol=1)
        share = len(_garment_pixels(it.image)) / (96 * 96)
        assert 0.1 < share < 0.75, (it.caption, share)


def test_generated_garments_have_the_named_hue(items):
    """The mean colour of each generated garment (found from the image alone) has the hue of its named colour;
    black, white and grey garments are neutral."""
    for it in items:
        h, s, _ = _hsv(_garment_pixels(it.image).mean(axis=0))
        href, sref, _ = _hsv(np.array(PALETTE[it.colour]))
        if it.colour in ACHROMATIC:
            assert s < 0.03, (it.caption, s)
        else:
            assert _hue_gap_degrees(h, href) < 3.0, (it.caption, h * 360, href * 360)
            assert s > 0.15, (it.caption, s)


@pytest.mark.parametrize("colour", COLOURS)
def test_every_pattern_keeps_the_colour_inside_the_silhouette(colour):
    """With the silhouette mask of :func:`render`: the mean hue inside it is the named hue under every pattern,
    and a solid garment's mean colour is nearer its named colour than any other of the palette."""
    href, _, _ = _hsv(np.array(PALETTE[colour]))
    for k, pattern in enumerate(PATTERNS):
        category = CATEGORIES[(COLOURS.index(colour) + 3 * k) % len(CATEGORIES)]
        image, mask = render(category, colour, pattern, rng=k, size=96)
        assert mask.shape == (96, 96) and mask.sum() > 800
        mean = _pixels(image)[mask].mean(axis=0)
        h, s, _ = _hsv(mean)
        if colour in ACHROMATIC:
            assert s < 0.02, (category, pattern, mean)
        else:
            assert _hue_gap_degrees(h, href) < 2.0, (category, pattern, mean)
        if pattern == "solid":
            dist = {c: np.linalg.norm(mean - np.array(rgb)) for c, rgb in PALETTE.items()}
            assert min(dist, key=dist.get) == colour, (category, mean)


def test_patterns_are_visible_inside_the_silhouette():
    """Solid garments are nearly flat inside; patterned ones alternate between two clearly different tones."""
    for category in ("dress", "shirt", "bag"):
        for pattern in PATTERNS:
            image, mask = render(category, "blue", pattern, rng=1)
            luma = _pixels(image)[mask] @ np.array([0.299, 0.587, 0.114])
            spread = np.percentile(luma, 95) - np.percentile(luma, 5)
            if pattern == "solid":
                assert spread < 40, (category, spread)
            else:
                assert spread > 80, (category, pattern, spread)


def test_captions_name_the_attributes(items):
    for it in items:
        words = it.caption.split()
        assert it.colour in words and it.category in words
        if it.pattern != "solid":
            assert {"striped", "dotted", "checked", "stripes", "dots", "checks"} & set(words)
    forms = {it.caption for it in items if (it.category, it.pattern) == ("dress", "stripes")}
    assert forms <= {f"a {c} striped dress" for c in COLOURS} | {f"a {c} dress with stripes" for c in COLOURS} | {
        "an orange striped dress", "an orange dress with stripes"}


def _all_texts(items) -> list[str]:
    return [it.caption for it in items] + [text for _, _, text in composed_pairs(items, seed=0)]


def test_captions_and_relative_captions_have_no_unknown_words(items):
    texts = _all_texts(items)
    builtin = set(BUILTIN_WORDS)
    assert all(w in builtin for t in texts for w in t.split())
    tok = word_tokenizer(32)
    unk = tok.token_to_id("<unk>")
    for enc, text in zip(tok.encode_batch(texts), texts):
        assert unk not in enc.ids and "<unk>" not in enc.tokens, text
    wp = wordpiece_tokenizer(32)
    assert all("[UNK]" not in enc.tokens for enc in wp.encode_batch(texts))


def _item(colour: str, pattern: str, category: str = "dress", id: int = 0) -> CatalogueItem:
    return CatalogueItem(id, Image.new("RGB", (8, 8)), category, colour, pattern, "")


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (("red", "stripes"), ("blue", "stripes"), "make it blue"),
        (("red", "stripes"), ("red", "dots"), "with dots instead of stripes"),
        (("red", "solid"), ("red", "checks"), "with checks"),
        (("red", "dots"), ("red", "solid"), "make it plain without dots"),
        (("red", "solid"), ("blue", "dots"), "make it blue and with dots"),
        (("red", "stripes"), ("blue", "dots"), "make it blue and with dots instead of stripes"),
        (("red", "stripes"), ("blue", "solid"), "make it plain blue without stripes"),
    ],
)
def test_relative_caption_templates(a, b, expected):
    assert relative_caption(_item(*a), _item(*b, id=1)) == expected


def test_relative_captions_mention_what_changes(items):
    pairs = composed_pairs(items, seed=0)
    assert len(pairs) >= 100
    by_id = {it.id: it for it in items}
    for ref, target, text in pairs:
        a, b = by_id[ref], by_id[target]
        assert a.category == b.category and (a.colour, a.pattern) != (b.colour, b.pattern)
        words = text.split()
        if a.colour != b.colour:
            assert b.colour in words, text
        else:
            assert not set(words) & set(COLOURS), text
        if a.pattern != b.pattern:
            assert (b.pattern in words) if b.pattern != "solid" else ("plain" in words and a.pattern in words), text
    assert composed_pairs(items, seed=0) == pairs
    assert composed_pairs(items, seed=1) != pairs


def test_relative_caption_refuses_what_it_cannot_describe():
    with pytest.raises(InputError, match="one category"):
        relative_caption(_item("red", "solid", "dress"), _item("blue", "solid", "skirt"))
    with pytest.raises(InputError, match="same colour and pattern"):
        relative_caption(_item("red", "dots"), _item("red", "dots", id=1))
    with pytest.raises(InputError, match="unknown attributes"):
        render("hat", "red", "solid")


def test_save_catalogue_writes_pngs_and_metadata(tmp_path, items):
    chosen = items[:6]
    path = save_catalogue(chosen, tmp_path / "cat")
    assert path == tmp_path / "cat" / "catalogue.json"
    doc = json.loads(path.read_text())
    assert [e["id"] for e in doc["items"]] == [it.id for it in chosen]
    for it, entry in zip(chosen, doc["items"]):
        assert entry["file"] == f"{it.id}-{it.category}-{it.colour}-{it.pattern}.png" == file_name(it)
        assert (entry["category"], entry["colour"], entry["pattern"], entry["caption"]) == (
            it.category, it.colour, it.pattern, it.caption)
        with Image.open(tmp_path / "cat" / entry["file"]) as img:
            assert img.mode == "RGB" and img.tobytes() == it.image.tobytes()
    assert sorted(p.name for p in (tmp_path / "cat").iterdir()) == sorted(
        ["catalogue.json", *(file_name(it) for it in chosen)])  # no temp files left behind


def test_module_imports_no_torch():
    code = "import sys, fine_infer.tools.catalogue as c; c.generate(2); assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
