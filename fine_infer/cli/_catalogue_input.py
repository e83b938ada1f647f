"""What ``fine-infer index`` reads: a folder of images, a ``.jsonl`` catalogue or a ``.txt`` file of texts, as items.

Every item knows where it came from (``file:line`` or the image's path, for one-line errors), its id, what to embed
(text and/or image) and the metadata stored with it. Reading checks everything that can be checked without running
the model (JSON, keys, ids, empty texts, missing image files), so a bad line 90,000 fails the command before any
embedding; what only the model's preprocessing can tell (a corrupt image, a text over the token limit) is found by
:mod:`fine_infer.cli.search` as it embeds.

Ids: a ``.jsonl`` line's ``"id"`` (an int; every line has one or none does). Otherwise ids are sequential from
``start`` (0, or one past the largest id of the index being extended) over the non-blank lines of a ``.jsonl`` or
``.txt`` file (blank lines take no id), or over a folder's images in sorted path order. A bad item skipped with
``--skip-bad`` leaves its id unused, so an item's id never depends on which others were readable.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fine_infer import _strict_json
from fine_infer.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
INT64 = (-(1 << 63), (1 << 63) - 1)
MAX_LINE_BYTES = 1 << 20  # one catalogue line; a longer one is a bad item, read past without holding it
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass
class Item:
    """One catalogue entry: ``where`` names it in errors (``cat.jsonl:7``, ``shoes/a.png``)."""

    where: str
    id: int
    order: int  # its line number, or its place in the folder: bad items are listed in file order
    text: str | None = None
    image: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Bad:
    """An item that cannot be indexed: ``where`` it is (as :attr:`Item.where`) and the ``problem``, a phrase."""

    order: int
    where: str
    problem: str

    def line(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class Catalogue:
    """The items read, the bad ones, and the kind: ``images``, ``jsonl`` or ``txt``."""

    kind: str
    items: list[Item]
    bad: list[Bad]


def kind_of(source: Path) -> str:
    """``images`` for a folder, ``jsonl`` / ``txt`` by suffix; anything else is an error naming what is accepted."""
    if source.is_dir():
        return "images"
    if not source.exists():
        raise InputError(f"{source} does not exist; give a folder of images, a .jsonl catalogue or a .txt of texts")
    if not source.is_file():  # a device, a pipe or a socket (or a link to one) would never end or never start
        raise InputError(f"{source} is not a regular file (a device, pipe or socket); give a .jsonl or .txt file")
    suffix = source.suffix.lower()
    if suffix in (".jsonl", ".txt"):
        return suffix[1:]
    raise InputError(f"{source} is neither a folder of images nor a .jsonl or .txt catalogue (one item a line)")


def read_images(folder: Path, start: int) -> Catalogue:
    """A folder's images (recursively, sorted); metadata ``{"path": <path relative to the folder>}``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    items = []
    for i, p in enumerate(files):
        rel = p.relative_to(folder).as_posix()
        items.append(Item(rel, start + i, i, image=p, metadata={"path": rel}))
    return Catalogue("images", items, [])


def json_type(value: Any) -> str:
    """``value``'s JSON type as a phrase (``an object``, ``a string``, ``null``...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """(line number, text, "") for each line of ``path`` (newline and a leading BOM removed), or (line number,
    None, why) for one that is not UTF-8 or longer than :data:`MAX_LINE_BYTES`. Read a line at a time."""
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass  # the rest of the over-long line, dropped as it is read
                yield n, None, f"longer than {MAX_LINE_BYTES >> 20} MiB"
                continue
            try:
                line = raw.removesuffix(b"\n").decode("utf-8").rstrip("\r")
            except UnicodeDecodeError:
                yield n, None, "not UTF-8 text"
                continue
            yield n, (line.lstrip("\ufeff") if n == 1 else line), ""


def read_txt(path: Path, start: int) -> Catalogue:
    """One text a non-blank line; metadata ``{"text": ...}``."""
    items, bad = [], []
    for n, line, why in _lines(path):
        where = f"{path.name}:{n}"
        if line is None:
            bad.append(Bad(n, where, why))
        elif line.strip():
            items.append(Item(where, start + len(items) + len(bad), n, text=line, metadata={"text": line}))
    return Catalogue("txt", items, bad)


def _check_id(value: Any) -> str:
    """Why ``value`` is not a usable id, or ""."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return f'"id" must be an integer, got {json.dumps(value)}'
    if not INT64[0] <= value <= INT64[1]:
        return f'"id" {value} does not fit in int64'
    if value == -1:
        return '"id" may not be -1: it marks "no result" in search output'
    return ""


def read_jsonl(path: Path, start: int, wants: str, taken: set[int]) -> Catalogue:
    """One JSON object a line (blank lines skipped). ``wants``: ``text``, ``image`` or ``both`` — the keys every
    line must have. ``"image"`` is a path relative to the .jsonl's folder. Every key but ``"id"`` is kept as
    metadata. ``taken``: ids already in the index being extended."""
    objects: list[tuple[int, str, dict[str, Any], int]] = []  # (line, where, object, its implicit id)
    bad: list[Bad] = []
    nonblank = 0
    for n, line, why in _lines(path):
        where = f"{path.name}:{n}"
        if line is not None and not line.strip():
            continue
        nonblank += 1
        if line is None:
            bad.append(Bad(n, where, why))
            continue
        try:
            obj = _strict_json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(Bad(n, where, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except ValueError as exc:  # NaN, 1e999, a 5000-digit number, nesting deeper than the limit
            bad.append(Bad(n, where, f"not valid JSON here ({exc})"))
            continue
        if not isinstance(obj, dict):
            bad.append(Bad(n, where, f"{json_type(obj)}, not a JSON object like {{\"text\": \"...\"}}"))
            continue
        objects.append((n, where, obj, start + nonblank - 1))
    with_id = [w for _, w, o, _ in objects if "id" in o]
    items: list[Item] = []
    seen: dict[int, str] = {}
    for n, where, obj, implicit in objects:
        problem = ""
        if with_id and "id" not in obj:
            problem = f'no "id", while {with_id[0]} has one: give every line an id, or none'
        elif "id" in obj:
            problem = _check_id(obj["id"])
        item_id = obj["id"] if "id" in obj else implicit
        if not problem and item_id in seen:
            problem = f"id {item_id} is already used by {seen[item_id]}"
        if not problem and item_id in taken:
            problem = f"id {item_id} is already in the index (--add extends it with new ids)"
        if not problem:
            problem = _content_problem(obj, wants)
        if problem:
            bad.append(Bad(n, where, problem))
            continue
        seen[item_id] = where
        image = (path.parent / obj["image"]) if wants in ("image", "both") else None
        if image is not None:  # later errors (a corrupt file) name the line and the image
            where = f"{where} ({obj['image']})"
        items.append(Item(where, int(item_id), n, text=obj.get("text") if wants in ("text", "both") else None,
                          image=image, metadata={k: v for k, v in obj.items() if k != "id"}))
    return Catalogue("jsonl", items, bad)


def _content_problem(obj: dict[str, Any], wants: str) -> str:
    """Why the line ``obj`` cannot be embedded as ``wants`` (``text``, ``image``, ``both``), or ""."""
    keys = ", ".join(obj) or "none"
    if wants in ("text", "both"):
        if "text" not in obj:
            return f'no "text" key (its keys: {keys})'
        if not isinstance(obj["text"], str):
            return f'"text" is {json_type(obj["text"])}, not a string'
        if not obj["text"].strip():
            return '"text" is empty'
    if wants in ("image", "both"):
        if "image" not in obj:
            return f'no "image" key (a path relative to the .jsonl; its keys: {keys})'
        if not isinstance(obj["image"], str) or not obj["image"]:
            return '"image" must be a path (a string, relative to the .jsonl file)'
    return ""


def first_bad(bad: list[Bad]) -> InputError:
    """The one-line error for the first bad item in file order, with the fix."""
    first = min(bad, key=lambda b: b.order)
    more = f" ({len(bad) - 1} more bad item(s) found)" if len(bad) > 1 else ""
    return InputError(f"{first.line()}{more}; fix it, or pass --skip-bad to index the rest and list what was skipped")
