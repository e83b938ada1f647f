"""Index API inputs found by attacking it: values that would overflow float32 scores, self-containing metadata,
attrs a load could not read back, ids and thread counts of the wrong type, and a mapped load racing a save."""

import threading

import numpy as np
import pytest

from fine_infer.errors import ConfigError, InputError
from fine_infer.index import Index


def test_values_that_could_overflow_scores_are_refused_so_no_score_is_inf_or_nan(rng):
    ix = Index(2)
    with pytest.raises(InputError, match="could overflow float32 scores"):
        ix.add(np.array([[1e20, -1e20], [-1, 0]], np.float32), [100, 200])
    x = rng.standard_normal((50, 8)).astype(np.float32) * 1e6  # large but safe values rank exactly
    ix = Index(8)
    ix.add(x, np.arange(50))
    q = rng.standard_normal((3, 8)).astype(np.float32)
    scores, ids = ix.search(q, 5)
    want = (q.astype(np.float64) @ x.astype(np.float64).T)
    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(ids, np.argsort(-want, axis=1)[:, :5])
    with pytest.raises(InputError, match="could overflow"):
        ix.search(np.full((1, 8), 1e16, np.float32), 1)


def test_self_containing_metadata_and_attrs_are_errors_not_hangs():
    ix = Index(2)
    m = {}
    m["self"] = m
    result = {}

    def add():
        try:
            ix.add(np.ones((1, 2), np.float32), [1], metadata=[m])
        except InputError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=add, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive() and "not JSON-serialisable" in result.get("error", ""), result
    ix.attrs = m
    with pytest.raises(InputError, match="not JSON-serialisable"):
        ix.save("unused.fidx")


def test_attrs_that_a_load_could_not_read_back_are_refused_at_save(tmp_path):
    good = tmp_path / "i.fidx"
    ix = Index(2)
    ix.add(np.ones((1, 2), np.float32), [1])
    ix.save(good)
    before = good.read_bytes()
    for attrs in ([["a", 1], ["b"]], {1: "a", "1": "b"}):
        ix.attrs = attrs
        with pytest.raises(InputError, match="dict with string keys"):
            ix.save(good)
    assert good.read_bytes() == before  # the good file is kept


def test_ids_and_threads_of_the_wrong_type_are_one_line_errors(tmp_path):
    ix = Index(2)
    ix.add(np.ones((1, 2), np.float32), [3], metadata=[{"sku": "A"}])
    assert ix.get_metadata(3) == {"sku": "A"} and ix.get_metadata(np.int64(3)) == {"sku": "A"}
    for bad in (3.7, "x", True):
        with pytest.raises(InputError):
            ix.get_metadata(bad)
    ix.save(tmp_path / "i.fidx")
    for threads in (2**31, -5, "2", "x", 0):
        with pytest.raises(ConfigError, match="threads must be an integer"):
            Index(2, threads=threads)
        with pytest.raises(ConfigError, match="threads must be an integer"):
            Index.load(tmp_path / "i.fidx", threads=threads)


def test_a_mapped_load_sees_one_file_while_saves_replace_the_path(tmp_path):
    path = tmp_path / "r.fidx"
    eye = np.eye(4, dtype=np.float32)
    a, b = Index(4), Index(4)
    a.add(eye, [0, 1, 2, 3])
    b.add(-eye, [10, 11, 12, 13])
    a.save(path)
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            b.save(path)
            a.save(path)

    t = threading.Thread(target=flip, daemon=True)
    t.start()
    try:
        for _ in range(150):
            ix = Index.load(path, mmap=True)
            ids = ix.ids().tolist()
            sign = 1.0 if ids[0] == 0 else -1.0
            np.testing.assert_array_equal(ix.get_vectors(ids), sign * eye)  # never a's ids with b's vectors
    finally:
        stop.set()
        t.join(10)
