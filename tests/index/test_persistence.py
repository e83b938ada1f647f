"""save / load: round trips (RAM and memory-mapped), damaged files, and a crash in the middle of a save."""

import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import unit

from fine_infer.errors import IndexFileError
from fine_infer.index import Index
from fine_infer.index import _format


def _build(dtype="float32", rescore=False, n=300, dim=24):
    index = Index(dim, dtype, rescore=rescore)
    index.add(unit(n, dim, 0), np.arange(n) * 2 + 1, metadata=[{"i": i} if i % 3 else None for i in range(n)])
    index.attrs["bundle"] = "/somewhere/bundle"
    return index


@pytest.mark.parametrize("rescore", [False, True])
@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip(tmp_path, dtype, rescore, mmap):
    index = _build(dtype, rescore)
    index.remove([5, 7])  # leaves a partial last panel with moved slots
    path = tmp_path / "g.fidx"
    index.save(path)
    loaded = Index.load(path, mmap=mmap)
    assert (len(loaded), loaded.dim, loaded.dtype, loaded.rescore) == (len(index), index.dim, dtype,
                                                                        rescore and dtype != "float32")
    assert loaded.memory_mapped == mmap
    assert (loaded.ids() == index.ids()).all()
    assert loaded.attrs == {"bundle": "/somewhere/bundle"}
    assert loaded.get_metadata(3) == {"i": 1} and loaded.get_metadata(1) is None
    q = unit(8, 24, 1)
    for exact in ([None, False] if rescore and dtype != "float32" else [None]):
        s1, i1 = index.search(q, 10, exact=exact)
        s2, i2 = loaded.search(q, 10, exact=exact)
        assert (i1 == i2).all() and np.array_equal(s1, s2)
    # Saving again gives the same bytes (deterministic format).
    loaded.save(tmp_path / "again.fidx")
    assert (tmp_path / "again.fidx").read_bytes() == path.read_bytes()
    # A mutation copies a memory-mapped index into RAM first; the file is untouched.
    before = path.read_bytes()
    loaded.add(unit(1, 24, 2), [10_001])
    loaded.remove([1])
    assert not loaded.memory_mapped and len(loaded) == len(index)
    assert path.read_bytes() == before


def test_empty_index_round_trip(tmp_path, dtype):
    Index(5, dtype).save(tmp_path / "e.fidx")
    for mmap in (False, True):
        loaded = Index.load(tmp_path / "e.fidx", mmap=mmap)
        assert len(loaded) == 0 and (loaded.search(unit(1, 5, 0), 2)[1] == -1).all()


def test_save_replaces_atomically_and_keeps_permissions(tmp_path):
    path = tmp_path / "g.fidx"
    _build().save(path)
    _build(n=10).save(path)
    assert len(Index.load(path)) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["g.fidx"]  # no temp file left behind


def _sections(path):
    return _format.read(path).sections


@pytest.mark.parametrize("mmap", [False, True])
def test_every_flipped_byte_region_is_detected(tmp_path, mmap):
    path = tmp_path / "g.fidx"
    _build("int8", rescore=True).save(path)
    good = path.read_bytes()
    secs = _sections(path)
    # One spot in the fixed header, the section table, the header digest, each section, and a padding gap.
    header_size = 48 + 64 * len(secs) + 32
    spots = {"magic": 0, "version": 8, "count": 24, "table": 60, "digest": header_size - 10}
    spots.update({name: off + ln // 2 for name, (off, ln) in secs.items() if ln})
    gaps = [off - 1 for name, (off, ln) in secs.items() if good[off - 1] == 0 and off > 200]
    spots["padding"] = gaps[0]
    for what, pos in spots.items():
        bad = bytearray(good)
        bad[pos] ^= 0x40
        path.write_bytes(bytes(bad))
        with pytest.raises(IndexFileError) as err:
            Index.load(path, mmap=mmap)
        msg = str(err.value)
        assert str(path) in msg
        if what in secs:
            assert f"section {what!r} checksum mismatch" in msg
        print(what, "->", msg)


@pytest.mark.parametrize("mmap", [False, True])
def test_truncation_anywhere_is_detected(tmp_path, mmap):
    path = tmp_path / "g.fidx"
    _build("float16").save(path)
    good = path.read_bytes()
    for cut in [0, 5, 40, 100, len(good) // 3, len(good) // 2, len(good) - 1]:
        path.write_bytes(good[:cut])
        with pytest.raises(IndexFileError, match="truncated"):
            Index.load(path, mmap=mmap)
    path.write_bytes(good + b"\0")
    with pytest.raises(IndexFileError, match="unexpected bytes after"):
        Index.load(path, mmap=mmap)


def test_other_bad_files(tmp_path):
    path = tmp_path / "x.fidx"
    with pytest.raises(IndexFileError, match="no such index file"):
        Index.load(path)
    path.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(IndexFileError, match="not a fine-infer index file"):
        Index.load(path)
    _build().save(path)
    data = bytearray(path.read_bytes())
    data[8] = 9  # a future format version: named as such, not as a checksum error
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="format version 9"):
        Index.load(path)


def test_mmap_without_verification_skips_the_streaming_pass(tmp_path):
    path = tmp_path / "g.fidx"
    _build().save(path)
    off, ln = _sections(path)["vectors"]
    data = bytearray(path.read_bytes())
    data[off + ln // 2] ^= 1  # damage only the big section
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="'vectors' checksum"):
        Index.load(path, mmap=True)
    assert len(Index.load(path, mmap=True, verify=False)) == 300  # trusted: opened without reading the vectors


_SAVER = """
import sys, numpy as np
from fine_infer.index import Index
path, n = sys.argv[1], int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((n, 64)).astype(np.float32)
index = Index(64)
index.add(x, np.arange(n), metadata=[{"i": i} if i % 1000 == 999 else None for i in range(n)])
index.attrs["generation"] = 0
gen = 0
while True:
    index.attrs["generation"] = gen
    index.save(path)
    print("saved", gen, flush=True)
    gen += 1
"""


def test_a_crash_in_the_middle_of_save_leaves_the_previous_file(tmp_path):
    """A child saves a ~77 MB index in a loop; SIGKILL it at random moments: the file always loads, complete, and
    holds the last finished save (or the one being finished, if the kill landed between rename and print)."""
    path = tmp_path / "g.fidx"
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    rng = random.Random(1234)
    mid_save = 0
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, str(script), str(path), "300000"], stdout=subprocess.PIPE,
                                 text=True)
        try:
            # Wait for one complete save (lines before it may come from an editable install's rebuild check).
            while not (line := child.stdout.readline()).startswith("saved"):
                assert line, "the saving child exited early"
            time.sleep(rng.uniform(0.0, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        saved = [int(x.split()[1]) for x in [line, *child.stdout.read().splitlines()] if x.startswith("saved")]
        child.stdout.close()
        mid_save += any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        index = Index.load(path)  # a reader never looks at what a kill left behind, and removes it
        assert len(index) == 300_000 and index.get_metadata(299_999) == {"i": 299_999}
        assert index.attrs["generation"] in (saved[-1], saved[-1] + 1)
        assert not list(tmp_path.glob(".*.tmp"))
    print(f"{mid_save} of 4 kills landed inside a save")
