"""Index.save is a consistent snapshot while other threads add: every file written loads, and every id in it has
the metadata it was added with (issue "Trust nothing from outside", finding 4)."""

import threading

import numpy as np
from conftest import unit

from fine_infer.index import Index

DEADLINE_S = 60.0
MAX_ROWS = 20_000  # the adder stops here: unbounded, it grew the index (and each save) until CI ran out of memory


def test_saves_racing_adds_write_consistent_snapshots(tmp_path):
    dim = 8
    index = Index(dim)
    stop = threading.Event()
    errors: list[BaseException] = []

    def adder():
        i = 0
        try:
            while not stop.is_set() and i < MAX_ROWS:  # many small adds: the metadata dict grows under the saves
                ids = np.arange(i, i + 4)
                index.add(unit(4, dim, i), ids, metadata=[{"n": int(j)} for j in ids])
                i += 4
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=adder)
    t.start()
    paths = []
    raced = 0
    try:
        for j in range(60):
            adding = t.is_alive()
            p = tmp_path / f"s{j % 6}.fidx"
            index.save(p)  # raised "dictionary changed size during iteration" before the fix
            loaded = Index.load(p)
            ids = loaded.ids().tolist()
            missing = [i for i in ids if loaded.get_metadata(i) != {"n": i}]
            assert not missing, f"{len(missing)} of {len(ids)} ids saved without their metadata"
            paths.append(p)
            raced += adding
    finally:
        stop.set()
        t.join(DEADLINE_S)
    assert not t.is_alive() and not errors, errors
    assert len(index) > 0
    assert raced >= 2, f"only {raced} saves overlapped the adds: the race was not exercised"
