"""The fashion attribute label sets, shared by the attribute model and the generated catalogue.

A primitive module (it imports nothing of the package), so the torch models can name the labels without loading
the catalogue's image renderer, and the catalogue can draw them without torch. Every label is a word of
:data:`fine_infer.tokenization.BUILTIN_WORDS`, so captions made from them need no unknown token.
"""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = ("dress", "shirt", "t-shirt", "skirt", "trousers", "jacket", "shoe", "bag")
COLOURS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey", "beige",
)
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checks")

__all__ = ["CATEGORIES", "COLOURS", "PATTERNS"]
