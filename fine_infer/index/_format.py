"""The index file format: a versioned binary header with a sha256 per section, written atomically.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"FINEIDX\\x1a"
    8       4     format version (1)
    12      4     header size in bytes (48 + 64 * sections + 32)
    16      4     dim
    20      4     dtype code: 0 float32, 1 float16, 2 int8
    24      8     count (vectors stored)
    32      4     panel width (16)
    36      4     flags: bit 0 = float32 copies stored (exact re-scoring)
    40      4     number of sections
    44      4     reserved (0)
    48      64*s  section table: name (16 bytes, NUL-padded ASCII), offset u64, length u64, sha256 (32 bytes)
    ...     32    sha256 of the header bytes before it

Sections start on 64-byte boundaries (so memory-mapped arrays are aligned); the gaps are zero bytes and are checked,
the file ends exactly where the last section does: every byte is covered by a checksum or a check, so a flipped byte
or a truncation anywhere is reported. Sections: ``vectors`` (the panels of the first ``ceil(count/16)`` panels, in the
storage dtype), ``scales`` (int8: float32 per dimension), ``colmax`` (float32 per dimension, a bound of |value|),
``float32`` (optional row-major count x dim copies), ``ids`` (int64), ``meta`` (UTF-8 JSON: attrs, metadata per id).

The writer streams each section through sha256 into a temp file, seeks back to write the header, fsyncs and renames
(:func:`fine_infer._atomic.atomic_writer`): a crash at any moment leaves the previous file as it was. A kill leaves
the temp file (as large as the index) beside it: every later write and read of that path removes the temps of
writers that no longer run (:func:`fine_infer._atomic.remove_stale_temps`).

``load(mmap=True)`` memory-maps ``vectors`` and ``float32``. Their checksums are verified by streaming the file
through sha256 in 16 MB reads (constant memory; the mapped pages are not touched), unless ``verify=False``, which
skips that pass for a fast start on a trusted file. The small sections are always read and verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np

from fine_infer import _strict_json
from fine_infer._atomic import atomic_writer, remove_stale_temps
from fine_infer.errors import IndexFileError

MAGIC = b"FINEIDX\x1a"
VERSION = 1
ALIGN = 64
CHUNK = 16 << 20
DTYPE_CODES = {"float32": 0, "float16": 1, "int8": 2}
FLAG_FLOAT32 = 1

_FIXED = struct.Struct("<8sIIIIQIIII")  # magic .. reserved: 48 bytes
_ENTRY = struct.Struct("<16sQQ32s")  # 64 bytes
_DIGEST = 32
_MAX_SECTIONS = 16
assert _FIXED.size == 48 and _ENTRY.size == 64


@dataclass
class IndexFile:
    """What a file holds; arrays may be memory-mapped (read-only)."""

    dim: int
    dtype: str
    count: int
    panel: int
    panels: np.ndarray  # (ceil(count / panel), dim, panel)
    ids: np.ndarray  # int64 (count,)
    meta: dict[str, Any]
    scales: np.ndarray | None = None
    colmax: np.ndarray | None = None
    rows: np.ndarray | None = None  # float32 copies (count, dim)
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)


def _header_size(nsections: int) -> int:
    return _FIXED.size + _ENTRY.size * nsections + _DIGEST


def _le(a: np.ndarray) -> np.ndarray:
    """C-contiguous and little-endian (files are little-endian on every host)."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _chunks(a: np.ndarray) -> Iterable[memoryview]:
    """Write an array in ~16 MB slices without copying it (a memmap is read a slice at a time)."""
    a = _le(a)
    if a.ndim == 0 or a.size == 0:
        yield memoryview(a.tobytes())
        return
    per_row = max(1, a.nbytes // max(1, a.shape[0]))
    step = max(1, CHUNK // per_row)
    for i in range(0, a.shape[0], step):
        yield memoryview(np.ascontiguousarray(a[i : i + step])).cast("B")


def write(path: str | Path, *, dim: int, dtype: str, count: int, panel: int, sections: list[tuple[str, Any]],
          float32_copies: bool) -> None:
    """Write an index file atomically. ``sections``: (name, ndarray or bytes) in file order."""
    sweep(path)
    n = len(sections)
    hsize = _header_size(n)
    table: list[tuple[str, int, int, bytes]] = []
    with atomic_writer(path) as f:
        f.write(b"\0" * hsize)
        pos = hsize
        for name, data in sections:
            pad = -pos % ALIGN
            f.write(b"\0" * pad)
            pos += pad
            h = hashlib.sha256()
            length = 0
            for chunk in ([memoryview(data)] if isinstance(data, (bytes, bytearray)) else _chunks(data)):
                f.write(chunk)
                h.update(chunk)
                length += chunk.nbytes
            table.append((name, pos, length, h.digest()))
            pos += length
        head = _FIXED.pack(MAGIC, VERSION, hsize, dim, DTYPE_CODES[dtype], count, panel,
                           FLAG_FLOAT32 if float32_copies else 0, n, 0)
        head += b"".join(_ENTRY.pack(name.encode("ascii"), off, ln, dg) for name, off, ln, dg in table)
        head += hashlib.sha256(head).digest()
        assert len(head) == hsize
        f.seek(0)
        f.write(head)


def sweep(path: str | Path) -> None:
    """Remove the temp files of ``path`` that killed writers left behind; one that cannot be removed (a read-only
    folder) stays, and the read or write goes on."""
    with contextlib.suppress(OSError):
        remove_stale_temps(path)


def fail(path: Path, problem: str) -> IndexFileError:
    return IndexFileError(f"{path}: {problem}")


def _hash_range(f: BinaryIO, offset: int, length: int) -> bytes:
    h = hashlib.sha256()
    f.seek(offset)
    buf = bytearray(min(CHUNK, max(length, 1)))
    view = memoryview(buf)
    left = length
    while left > 0:
        got = f.readinto(view[: min(left, len(buf))])
        if not got:
            break
        h.update(view[:got])
        left -= got
    return h.digest()


def read(path: str | Path, *, mmap: bool = False, verify: bool = True) -> IndexFile:
    """Read and check an index file; raise :class:`IndexFileError` naming the problem."""
    path = Path(path)
    sweep(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise fail(path, "no such index file") from None
    except OSError as exc:
        raise fail(path, f"cannot open the index file ({exc.strerror or exc})") from None
    with f:
        fixed = f.read(_FIXED.size)
        if len(fixed) >= len(MAGIC) and fixed[: len(MAGIC)] != MAGIC:
            raise fail(path, "not a fine-infer index file (wrong magic bytes)")
        if len(fixed) < _FIXED.size:
            raise fail(path, f"truncated: {size} bytes, shorter than the {_FIXED.size}-byte header")
        magic, version, hsize, dim, dcode, count, panel, flags, nsec, _ = _FIXED.unpack(fixed)
        if version != VERSION:
            raise fail(path, f"index format version {version}; this fine-infer reads version {VERSION} "
                              "(re-create the index, or use the fine-infer version that wrote it)")
        if not 0 < nsec <= _MAX_SECTIONS or hsize != _header_size(nsec):
            raise fail(path, "corrupt header (section count / header size)")
        if size < hsize:
            raise fail(path, f"truncated: {size} bytes, shorter than its {hsize}-byte header")
        rest = f.read(hsize - _FIXED.size)
        head = fixed + rest
        if hashlib.sha256(head[:-_DIGEST]).digest() != head[-_DIGEST:]:
            raise fail(path, "header checksum mismatch: the file was altered or is corrupt")
        dtypes = {v: k for k, v in DTYPE_CODES.items()}
        if dcode not in dtypes or dim < 1 or panel < 1:
            raise fail(path, f"corrupt header (dtype code {dcode}, dim {dim}, panel {panel})")
        dtype = dtypes[dcode]
        table: dict[str, tuple[int, int, bytes]] = {}
        end = hsize
        for j in range(nsec):
            raw, off, ln, dg = _ENTRY.unpack_from(head, _FIXED.size + j * _ENTRY.size)
            name = raw.rstrip(b"\0").decode("ascii", "replace")
            if off < end or off % ALIGN or off - end >= ALIGN:
                raise fail(path, f"corrupt section table (section {name!r} at offset {off})")
            table[name] = (off, ln, dg)
            end = off + ln
        if size < end:
            raise fail(path, f"truncated: {size} bytes, the sections end at byte {end}")
        if size > end:
            raise fail(path, f"{size - end} unexpected bytes after the last section (corrupt or appended to)")

        npanels = -(-count // panel)
        esize = np.dtype(dtype).itemsize
        expected = {"vectors": npanels * dim * panel * esize, "ids": count * 8, "colmax": dim * 4}
        if dtype == "int8":
            expected["scales"] = dim * 4
        if flags & FLAG_FLOAT32:
            expected["float32"] = count * dim * 4
        for name, ln in expected.items():
            if name not in table:
                raise fail(path, f"section {name!r} is missing")
            if table[name][1] != ln:
                raise fail(path, f"section {name!r} is {table[name][1]} bytes; {count} vectors of dim {dim} "
                                  f"({dtype}) need {ln}")
        if "meta" not in table:
            raise fail(path, "section 'meta' is missing")

        # Gaps between sections must be zeros (they are not under any checksum).
        prev = hsize
        for name, (off, ln, _) in sorted(table.items(), key=lambda kv: kv[1][0]):
            if off > prev:
                f.seek(prev)
                if f.read(off - prev).strip(b"\0"):
                    raise fail(path, f"non-zero padding before section {name!r}: the file was altered")
            prev = off + ln

        def small(name: str) -> bytes:
            off, ln, dg = table[name]
            f.seek(off)
            data = f.read(ln)
            if len(data) != ln or hashlib.sha256(data).digest() != dg:
                raise fail(path, f"section {name!r} checksum mismatch: the file was altered or is corrupt")
            return data

        def big(name: str, dt: str, shape: tuple[int, ...]) -> np.ndarray:
            off, ln, dg = table[name]
            if mmap:
                if verify and _hash_range(f, off, ln) != dg:
                    raise fail(path, f"section {name!r} checksum mismatch: the file was altered or is corrupt")
                if ln == 0:
                    return np.zeros(shape, np.dtype(dt).newbyteorder("<"))
                # the open file, not the path: a save renaming a new file over the path meanwhile must not mix the two
                return np.memmap(f, dtype=np.dtype(dt).newbyteorder("<"), mode="r", offset=off, shape=shape)
            arr = np.empty(shape, np.dtype(dt).newbyteorder("<"))
            view = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")
            f.seek(off)
            h = hashlib.sha256()
            done = 0
            while done < ln:  # read in slices, hashing as we go: one pass, no second copy
                got = f.readinto(view[done : min(ln, done + CHUNK)])
                if not got:
                    break
                h.update(view[done : done + got])
                done += got
            if done != ln or h.digest() != dg:
                raise fail(path, f"section {name!r} checksum mismatch: the file was altered or is corrupt")
            return arr

        ids = np.frombuffer(small("ids"), "<i8").astype(np.int64)
        colmax = np.frombuffer(small("colmax"), "<f4").astype(np.float32)
        scales = np.frombuffer(small("scales"), "<f4").astype(np.float32) if dtype == "int8" else None
        try:
            # {"attrs": ..., "metadata": {id: one item's metadata}}: two levels above what Index.add accepts
            meta = _strict_json.loads(small("meta").decode("utf-8"), _strict_json.MAX_DEPTH + 2)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError) as exc:
            raise fail(path, f"section 'meta' is not valid JSON ({exc})") from None
        panels = big("vectors", dtype, (npanels, dim, panel))
        rows = big("float32", "float32", (count, dim)) if flags & FLAG_FLOAT32 else None
    return IndexFile(dim=dim, dtype=dtype, count=count, panel=panel, panels=panels, ids=ids, meta=meta,
                     scales=scales, colmax=colmax, rows=rows,
                     sections={k: (v[0], v[1]) for k, v in table.items()})
