"""A save killed half-way leaves its temp file (``.NAME.<pid>.<host>.<rand>.tmp``, as large as the index) beside
the index: the next save or load of that index removes it, when its writer is gone (issue "Trust nothing from
outside", finding 10). Another index's temp is its own business, and a temp that cannot be removed does not stop a
load."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import unit

from fine_infer._atomic import temp_name
from fine_infer.index import Index


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a writer that has exited (which writers count as gone: tests/bundle/test_stale_temps.py)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _index():
    index = Index(8)
    index.add(unit(40, 8, 0), np.arange(40), metadata=[{"i": i} for i in range(40)])
    return index


@pytest.mark.parametrize("then", ["save", "load"])
def test_a_dead_writers_temp_is_removed_by_the_next_save_or_load(tmp_path, dead_pid, then):
    path = tmp_path / "g.fidx"
    _index().save(path)
    dead = tmp_path / temp_name(path.name, ".tmp", dead_pid)
    dead.write_bytes(b"\0" * 4096)
    other = tmp_path / temp_name("other.fidx", ".tmp", dead_pid)  # another index's: its own save or load sweeps it
    other.write_bytes(b"\0")
    if then == "save":
        _index().save(path)
    else:
        assert len(Index.load(path)) == 40
    assert not dead.exists()
    assert other.exists() and path.exists()


def test_a_temp_that_cannot_be_removed_does_not_stop_a_load(tmp_path, dead_pid):
    """A read-only folder (for root, who writes anywhere: an immutable file) leaves the temp; the index loads."""
    path = tmp_path / "g.fidx"
    _index().save(path)
    dead = tmp_path / temp_name(path.name, ".tmp", dead_pid)
    dead.write_bytes(b"\0")
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(dead)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i does not work here")
        undo = ["chattr", "-i", str(dead)]
    else:
        tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
        undo = ["chmod", "700", str(tmp_path)]
    try:
        assert len(Index.load(path)) == 40 and dead.exists()
    finally:
        subprocess.run(undo, check=True)
