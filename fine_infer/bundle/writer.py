"""Writing bundles: a new bundle assembled beside its destination and renamed into place (:class:`BundleWriter`), and
every later rewrite of a manifest (:func:`update_manifest`, :func:`commit_manifest`): tune, validate and engine
builds call these; nothing else writes a manifest.

No writer writes, hashes or deletes outside its bundle: every name goes through :mod:`fine_infer.bundle.paths`, and a
manifest naming a file outside is refused before anything is written. Each also removes the temps a killed writer
left (:func:`fine_infer._atomic.remove_stale_temps`): ``.NAME.<pid>.….partial`` / ``.old`` folders beside the
destination, ``.NAME.<pid>.….tmp`` files inside the bundle, of processes that no longer run."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from fine_infer._atomic import (DIR_MODE, atomic_write_bytes, fsync_dir, in_flight, remove_stale_temps,
                                remove_stale_temps_in, temp_name)
from fine_infer.bundle.manifest import MANIFEST, SIGNATURE, Manifest
from fine_infer.bundle.paths import bundle_path, walk_files
from fine_infer.bundle.reader import Bundle, read_manifest, sha256_file
from fine_infer.errors import BundleError

PARTIAL, OLD = ".partial", ".old"

#: callables run on every bundle a :class:`BundleWriter` commits, on its complete temp folder just before it is
#: renamed into place (:func:`on_commit`); one that raises fails the commit and leaves nothing.
_ON_COMMIT: contextvars.ContextVar[tuple[Callable[[Path], None], ...]] = contextvars.ContextVar("on_commit", default=())


@contextlib.contextmanager
def on_commit(hook: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, every :meth:`BundleWriter.commit` calls ``hook(folder)`` on the sealed bundle before renaming
    it into place (how ``fine-infer export --sign-key`` signs a bundle that is not in place yet)."""
    token = _ON_COMMIT.set((*_ON_COMMIT.get(), hook))
    try:
        yield
    finally:
        _ON_COMMIT.reset(token)


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    manifest.check_names()
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode() + b"\n")


def commit_manifest(path: str | Path, manifest: Manifest, added: Sequence[str] = (),
                    stale: Iterable[str] = ()) -> None:
    """Hash the ``added`` files into ``manifest``, rewrite the bundle's ``manifest.json`` atomically, then delete the
    ``stale`` files it no longer lists. Files are replaced under new names and the old ones deleted only after the
    manifest has moved on, so a failure at any point leaves a bundle whose manifest lists valid files.

    Every name (listed, added, stale) must be a file inside the bundle: anything else is refused before a byte is
    written or deleted."""
    folder = Path(path)
    stale = list(stale)
    added_paths = {name: bundle_path(folder, name, "added") for name in added}
    stale_paths = {name: bundle_path(folder, name, "stale") for name in stale if name}
    manifest.check_names()
    remove_stale_temps_in(folder)
    for name, p in added_paths.items():
        manifest.files[name] = sha256_file(p)
    _write_manifest(folder, manifest)
    for name, p in stale_paths.items():
        if name not in manifest.files and name != MANIFEST:
            p.unlink(missing_ok=True)


def update_manifest(path: str | Path, mutate: Callable[[Manifest], Iterable[str]], added: Sequence[str] = ()) -> Manifest:
    """Re-read ``path``'s manifest, apply ``mutate`` (which returns the file names it stopped listing), hash the
    ``added`` files into it, rewrite it atomically, then delete the files it no longer lists.

    Only ``manifest.json`` changes besides the added and dropped files, so every other sha256 stays valid (a signed
    bundle's signature does not: sign it again). Not safe against two processes updating the same bundle at once (the
    later write wins)."""
    manifest = read_manifest(path)
    dropped = [n for n in mutate(manifest) if n]
    for name in dropped:
        manifest.files.pop(name, None)
    commit_manifest(path, manifest, added, stale=dropped)
    return manifest


def check_destination(dest: str | Path, force: bool = False) -> None:
    """Raise :class:`BundleError` unless a bundle may be written to ``dest``: it must not exist (or, with ``force``,
    be a bundle or an empty folder). Exporters call it before the minutes of work that precede writing."""
    dest = Path(dest)
    if dest.exists() and not force:
        raise BundleError(f"{dest} already exists; choose another --out or pass --force to replace it")
    if dest.exists() and (not dest.is_dir() or (not (dest / MANIFEST).is_file() and any(dest.iterdir()))):
        raise BundleError(f"{dest} exists and is not a bundle; refusing to replace it even with --force")


class BundleWriter:
    """Assembles a bundle in a temp folder beside ``dest`` and moves it into place on :meth:`commit`.

    Use as a context manager: an exception inside the block removes the temp folder and leaves ``dest`` as it was.
    The temp folder is ``.NAME.<pid>.<host>.<rand>.partial``; those of writers that were killed are removed here.
    """

    def __init__(self, dest: str | Path, force: bool = False) -> None:
        self.dest = Path(dest)
        check_destination(self.dest, force)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self.tmp = self._stack.enter_context(in_flight(self.dest.parent / temp_name(self.dest.name, PARTIAL)))
        # A dead writer's .old folder is garbage once the destination exists; without one it is the last complete
        # bundle (a kill between commit's two renames), left for the user to move back.
        remove_stale_temps(self.dest, (PARTIAL, OLD) if self.dest.exists() else (PARTIAL,))
        os.mkdir(self.tmp, DIR_MODE)
        self._committed = False
        self._manifest: Manifest | None = None

    def path(self, name: str) -> Path:
        """Where to write bundle file ``name`` inside the temp folder (a name outside it is refused)."""
        return bundle_path(self.tmp, name, "BundleWriter.path")

    def seal(self, manifest: Manifest, rehash: bool = True) -> Bundle:
        """Hash every file (``rehash``) and write the manifest in the temp folder: a complete, verifiable bundle
        at :attr:`tmp` that is not in place yet (gates that need a loadable bundle run on it before :meth:`commit`).
        A symlink or special file in the temp folder is refused."""
        if rehash:
            manifest.files = {name: sha256_file(self.tmp / name) for name in walk_files(self.tmp)
                              if name not in (MANIFEST, SIGNATURE)}
        _write_manifest(self.tmp, manifest)
        self._manifest = manifest
        return Bundle(self.tmp, manifest)

    def commit(self, manifest: Manifest | None = None) -> Bundle:
        """Seal with ``manifest`` (unless :meth:`seal` already ran), run the :func:`on_commit` hooks, fsync, and
        rename the folder into place."""
        if manifest is not None:
            self.seal(manifest)
        elif self._manifest is None:
            raise BundleError("BundleWriter.commit needs a manifest (or a prior seal)")
        manifest = self._manifest
        for hook in _ON_COMMIT.get():
            hook(self.tmp)
        for name in walk_files(self.tmp):
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if self.dest.exists():
            with in_flight(self.dest.parent / temp_name(self.dest.name, OLD)) as old:
                os.replace(self.dest, old)
                os.replace(self.tmp, self.dest)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        fsync_dir(self.dest.parent)
        self._committed = True
        self._stack.close()
        return Bundle(self.dest, manifest)

    def abort(self) -> None:
        """Remove the temp folder (idempotent)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._stack.close()

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()
