"""Temp files and folders a killed writer left behind (``.NAME.<pid>.<host>.<rand>.tmp|.partial``) are removed by the
next write of the same destination, but never one of a process that still runs."""

import json
import subprocess
import sys

import pytest

from fine_infer._atomic import atomic_write_bytes, atomic_writer, remove_stale_temps, remove_stale_temps_in, temp_name
from fine_infer.bundle import BundleWriter, GraphEntry, Manifest, read_manifest, update_manifest
from fine_infer.specs import GraphSpec, TensorSpec

SPEC = GraphSpec("g", "custom", (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 2)),))


@pytest.fixture(scope="module")
def dead_pid():
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    """The pid of a process that runs for the whole test."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


def _write(dest, force=False):
    with BundleWriter(dest, force=force) as w:
        w.path("g.onnx").write_bytes(b"model-bytes")
        return w.commit(Manifest(graphs={"g": GraphEntry(SPEC, "g.onnx", 20)}, files={}, source="test"))


def _partial(parent, name, pid, suffix=".partial"):
    d = parent / temp_name(name, suffix, pid)
    d.mkdir()
    (d / "image.onnx").write_bytes(b"x" * 1000)
    return d


def test_temp_names_carry_the_writer_pid(tmp_path):
    import os

    name = temp_name("index.fidx", ".tmp")
    assert name.startswith(f".index.fidx.{os.getpid()}.") and name.endswith(".tmp")
    assert temp_name("index.fidx", ".tmp") != name


@pytest.mark.parametrize("existing", [False, True])
def test_bundle_writer_removes_dead_writers_partial_folders_and_keeps_live_ones(tmp_path, dead_pid, live_pid, existing):
    if existing:
        _write(tmp_path / "b")
    dead = _partial(tmp_path, "b", dead_pid)
    dead_old = _partial(tmp_path, "b", dead_pid, ".old") if existing else None  # (see the test below)
    live = _partial(tmp_path, "b", live_pid)
    other = _partial(tmp_path, "other", dead_pid)  # another destination's: not this writer's business
    _write(tmp_path / "b", force=existing)
    assert not dead.exists() and not (dead_old and dead_old.exists())
    assert live.is_dir() and (live / "image.onnx").is_file()
    assert other.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", live.name, other.name])


def test_a_temp_of_this_pid_that_is_not_in_flight_is_stale(tmp_path):
    """A restarted container often runs its server under the same pid as the killed one."""
    import os

    stale = tmp_path / temp_name("idx.fidx", ".tmp", os.getpid())
    stale.write_bytes(b"x")
    with atomic_writer(tmp_path / "idx.fidx") as f:
        f.write(b"new")
        inflight = [p for p in tmp_path.iterdir() if p != stale]
        assert remove_stale_temps(tmp_path / "idx.fidx") == [stale]
        assert [p for p in tmp_path.iterdir()] == inflight  # this write's own temp is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx.fidx"]


def test_atomic_writer_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path, dead_pid, live_pid):
    path = tmp_path / "catalogue.fidx"
    atomic_write_bytes(path, b"old")
    dead = tmp_path / temp_name(path.name, ".tmp", dead_pid)
    dead.write_bytes(b"x" * 100)
    live = tmp_path / temp_name(path.name, ".tmp", live_pid)
    live.write_bytes(b"y")
    other = tmp_path / temp_name("other.fidx", ".tmp", dead_pid)
    other.write_bytes(b"z")
    unrelated = tmp_path / ".catalogue.fidx.notours.tmp"  # an old-style or foreign temp name: never guessed at
    unrelated.write_bytes(b"w")
    assert remove_stale_temps(path) == [dead]
    assert live.exists() and other.exists() and unrelated.exists() and path.read_bytes() == b"old"
    assert remove_stale_temps_in(tmp_path) == [other]
    assert live.exists() and unrelated.exists()


def test_manifest_rewrites_remove_dead_writers_temps_in_the_bundle(tmp_path, dead_pid, live_pid):
    _write(tmp_path / "b")
    b = tmp_path / "b"
    dead_manifest = b / temp_name("manifest.json", ".tmp", dead_pid)
    dead_manifest.write_text("{half")
    dead_tune = b / temp_name("tune.20250101-000000-abcd.json", ".tmp", dead_pid)
    dead_tune.write_text("{half")
    live = b / temp_name("manifest.json", ".tmp", live_pid)
    live.write_text("{writing")

    def mutate(m):
        m.validation["note"] = "x"
        return []

    update_manifest(b, mutate)
    assert not dead_manifest.exists() and not dead_tune.exists() and live.exists()
    assert read_manifest(b).validation["note"] == "x"
    assert json.loads((b / "manifest.json").read_text())["validation"]["note"] == "x"


def test_a_dead_writers_old_bundle_is_kept_while_the_destination_is_missing(tmp_path, dead_pid):
    """A kill between commit's two renames leaves the previous bundle only as .b.<pid>….old: never swept then."""
    old = _partial(tmp_path, "b", dead_pid, ".old")
    _write(tmp_path / "b")
    assert old.is_dir()
    _write(tmp_path / "b", force=True)  # now the destination exists: the .old folder is garbage
    assert not old.exists()
