"""Text conventions of official pipelines, applied to raw strings before the tokenizer: a named cleaning and a
template. A bundle's :class:`~fine_infer.specs.TextPreprocess` records them (``clean``, ``clean_args``, ``template``)
and :func:`fine_infer.tokenization.encode` applies them, so an official checkpoint served by fine-infer meets the
token ids its own code produced, for raw query text, without that code's dependencies (ftfy, regex, transformers).

Cleanings, by the name a manifest gives them:

- ``pre_caption``: Fashion-FINE's (``dataset/utils.py`` of github.com/Seun9wan/Fashion-FINE, from ALBEF):
  lowercase; delete ``, . ' ! " ( ) * # : ; ~`` (not ``?``); ``-`` and ``/`` become spaces, ``<person>`` →
  ``person``, ``<br>`` → space; runs of two or more whitespace characters become one space; strip; then, with
  ``max_words`` (default None: the retrieval code passes none), keep the first ``max_words`` space-separated words.
- ``clip``: CLIP's ``basic_clean`` and ``whitespace_clean`` and its lowercasing (``clip/simple_tokenizer.py``):
  ``ftfy.fix_text``, ``html.unescape`` twice, strip, every run of whitespace (the ``regex`` module's
  ``\\s``, i.e. Unicode White_Space) → one space, strip, ``str.lower``. ``ftfy.fix_text`` is reproduced by
  :func:`fix_text_like_ftfy` (no ftfy at run time): every one of its default fixes except the repair of mojibake
  (text decoded with the wrong codec, a heuristic with ftfy's own tables), which leaves such text as it is.

A template is a string holding ``{text}`` once; the cleaned text takes its place (Fashion-FINE's evaluation embeds
``"the image description is " + pre_caption(text)``, template ``"the image description is {text}"``).
"""

from __future__ import annotations

import html
import re
import unicodedata
from html.entities import html5
from typing import Any, Callable, Sequence

from fine_infer.errors import ConfigError

TEXT_SLOT = "{text}"


# --- Fashion-FINE -------------------------------------------------------------------------------------------------
_PRE_CAPTION_DELETE = re.compile(r"[,.'!\"()*#:;~]")
_PRE_CAPTION_RUNS = re.compile(r"\s{2,}")  # Python's re, as the official code: str.isspace characters


def pre_caption(text: str, max_words: int | None = None) -> str:
    """Fashion-FINE's caption cleaning (see the module docstring)."""
    text = _PRE_CAPTION_DELETE.sub("", text.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person").replace("<br>", " ")
    text = _PRE_CAPTION_RUNS.sub(" ", text).rstrip("\n").strip(" ")
    if max_words is not None:
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
    return text


# --- ftfy.fix_text without ftfy ----------------------------------------------------------------------------------
def _html_entities() -> dict[str, str]:
    # HTML5's named entities with their semicolon, and the all-caps spelling of the lowercase ones where that is not
    # an entity itself (decoded to the upper-case character), as ftfy decodes them.
    out: dict[str, str] = {}
    for name, char in html5.items():
        if name.endswith(";"):
            out["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                out[upper] = char.upper()
    return out


_ENTITIES = _html_entities()
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")


def _entity(match: re.Match) -> str:
    text = match.group(0)
    if text in _ENTITIES:
        return _ENTITIES[text]
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out  # only a whole reference, semicolon consumed
    return text


def _cp1252(char: str) -> str:
    # Windows-1252 for a C1 control character; the five bytes it leaves undefined stay as they are.
    try:
        return char.encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:
        return char


_C1 = re.compile("[\x80-\x9f]")
# ftfy's table: NFKC of the Latin ligatures, except that ﬅ keeps its long s
_LIGATURES = {ord(k): v for k, v in zip(
    "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬅﬆ",
    ["IJ", "ij", "ʼn", "DŽ", "Dž", "dž", "LJ", "Lj", "lj", "NJ", "Nj", "nj", "DZ", "Dz", "dz", "ff", "fi", "fl",
     "ffi", "ffl", "ſt", "st"],
)}
_WIDTH = {0x3000: " ", **{i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                         if unicodedata.normalize("NFKC", chr(i)) != chr(i)}}
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_LINE_BREAKS = (("\r\n", "\n"), ("\r", "\n"), ("\u2028", "\n"), ("\u2029", "\n"), ("\u0085", "\n"))
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TERMINAL_ESCAPE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                          *range(0xFFF9, 0xFFFD)])


def _surrogate_pair(match: re.Match) -> str:
    high, low = match.group(0)
    return chr(0x10000 + (ord(high) - 0xD800) * 0x400 + (ord(low) - 0xDC00))


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = _ENTITY.sub(_entity, text)
        text = _C1.sub(lambda m: _cp1252(m.group(0)), text)
        text = text.translate(_LIGATURES).translate(_WIDTH)
        text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
        for old, new in _LINE_BREAKS:
            text = text.replace(old, new)
        if _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(_surrogate_pair, text))
        text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROL)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text_like_ftfy(text: str) -> str:
    """``ftfy.fix_text(text)`` with its default settings (ftfy 6), less the repair of mojibake.

    Line by line (each segment ends after a newline), until nothing changes: HTML entities decoded (once a line
    holds ``<``, that line and every later one are taken for HTML and left alone), C1 controls read as Windows-1252,
    Latin ligatures and full/half-width forms replaced, curly quotes straightened, line breaks made ``\\n``, surrogate
    pairs joined, terminal escapes and control characters (tab, newline, form feed and carriage return kept) removed,
    NFC."""
    out: list[str] = []
    unescape = True
    pos = 0
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        end = min(end, pos + 1_000_000)
        segment = text[pos:end]
        unescape = unescape and "<" not in segment
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


# --- CLIP ---------------------------------------------------------------------------------------------------------
# The `regex` module's \s (Unicode White_Space), which CLIP's whitespace_clean collapses; Python's re would also take
# \x1c-\x1f (str.isspace), which CLIP keeps (ftfy removes them first anyway).
_CLIP_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clip_clean(text: str) -> str:
    """CLIP's text cleaning and lowercasing (see the module docstring)."""
    text = html.unescape(html.unescape(fix_text_like_ftfy(text))).strip()
    return _CLIP_SPACE.sub(" ", text).strip().lower()


# --- applying a TextPreprocess's conventions ----------------------------------------------------------------------
CLEANINGS: dict[str, Callable[..., str]] = {"pre_caption": pre_caption, "clip": clip_clean}


def check_conventions(clean: str | None, clean_args: dict[str, Any], template: str | None) -> None:
    """A :class:`ConfigError` naming what is wrong with a cleaning name, its arguments or a template."""
    if clean is not None and clean not in CLEANINGS:
        raise ConfigError(f"unknown text cleaning {clean!r}; this fine-infer knows {', '.join(sorted(CLEANINGS))}")
    if clean_args and clean is None:
        raise ConfigError("clean_args given without a cleaning")
    if clean == "pre_caption" and set(clean_args) - {"max_words"}:
        raise ConfigError(f"pre_caption takes max_words only, not {', '.join(sorted(set(clean_args) - {'max_words'}))}")
    if clean == "clip" and clean_args:
        raise ConfigError("the clip cleaning takes no arguments")
    if template is not None and template.count(TEXT_SLOT) != 1:
        raise ConfigError(f"a text template must hold {TEXT_SLOT} exactly once, not {template!r}")


def apply_conventions(texts: Sequence[str], clean: str | None, clean_args: dict[str, Any],
                      template: str | None) -> list[str]:
    """``texts`` cleaned (``CLEANINGS[clean](text, **clean_args)``), then put in ``template``."""
    check_conventions(clean, clean_args, template)
    out = [CLEANINGS[clean](t, **clean_args) for t in texts] if clean else list(texts)
    return [template.replace(TEXT_SLOT, t) for t in out] if template else out


__all__ = ["CLEANINGS", "TEXT_SLOT", "apply_conventions", "check_conventions", "clip_clean", "fix_text_like_ftfy",
           "pre_caption"]
