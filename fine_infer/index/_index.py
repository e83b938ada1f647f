"""``fine_infer.Index``: exact inner-product top-k over user ids, with metadata and a checksummed file format.

Data convention (stated once, as FAISS does): vectors and queries are row-major ``(n, dim)`` floating-point arrays,
scores are inner products (cosine similarity for the unit-norm embeddings fine-infer produces), ids are the user's
int64s. Search is exact over what is stored: float32 storage gives exact float32 scores; float16 and int8 storage
give the scores of the stored (rounded) vectors, or exact float32 results with ``rescore=True`` (float32 copies are
kept and candidates re-scored, with a proven error bound deciding how many candidates are enough).
"""

from __future__ import annotations

import copy
import json
import numbers
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fine_infer import _strict_json
from fine_infer._cpu import cpu_cores
from fine_infer.errors import BackendUnavailableError, ConfigError, InputError
from fine_infer.index import _format, _native_search
from fine_infer.index._checks import RWLock, as_ids, as_matrix, as_metadata, check_k
from fine_infer.index._storage import DTYPES, FLOAT16_MAX, PanelStore, abs_colmax, panels_for

#: The largest dim an index accepts (a guard against a transposed array creating a 1M-d index).
MAX_DIM = 1 << 16
MAX_THREADS = 1024  # the native core takes an int; more threads than this is a mistake, not a machine
DEVICES = ("auto", "cpu", "cuda")
#: ``device="auto"`` uses CUDA from this many vectors up: below it a device round trip costs more than it saves.
GPU_MIN_VECTORS = 16_384


# --- argument checks --------------------------------------------------------------------------------------------------


# --- the index ------------------------------------------------------------------------------------------------------


class Index:
    """Exact top-k by inner product over vectors with int64 ids and optional JSON metadata::

        index = Index(256)                                  # or dtype="float16" / "int8"
        index.add(vectors, ids=[10, 11], metadata=[{"sku": "A"}, {"sku": "B"}])
        scores, ids = index.search(queries, k=5)            # (Q, 5) float32, (Q, 5) int64 (-1: no result)
        index.save("catalogue.fidx")
        index = Index.load("catalogue.fidx", mmap=True)     # vectors stay on disk, paged in as searched

    Args:
        dim: vector dimension.
        dtype: storage: ``"float32"`` (exact), ``"float16"`` (half the memory, ~3 decimal digits) or ``"int8"``
            (a quarter; symmetric, one scale per dimension, widened as the stored data grows).
        rescore: float16 / int8 only: also keep float32 copies (row-major, memory-mappable) and make searches exact
            by re-scoring the candidates of the compressed scan. Search still streams the compressed vectors; the
            copies are read only at the candidates' rows.
        threads: search threads (default: the CPUs this process may use).
        device: ``"cpu"``, ``"cuda"`` / ``"cuda:N"`` (torch on that device), or ``"auto"`` (CUDA when torch sees a
            device and the index holds at least ``GPU_MIN_VECTORS`` vectors).

    Thread-safe: searches run concurrently (without the GIL); ``add`` / ``remove`` wait for running searches.
    """

    def __init__(self, dim: int, dtype: str | np.dtype | type = "float32", *, rescore: bool = False,
                 threads: int | None = None, device: str = "auto") -> None:
        if isinstance(dim, bool) or not isinstance(dim, (numbers.Integral, np.integer)) or not 1 <= dim <= MAX_DIM:
            raise ConfigError(f"dim must be an integer in 1..{MAX_DIM}, got {dim!r}")
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
        if name not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self._init(int(dim), name, bool(rescore) and name != "float32", threads, device)

    @staticmethod
    def _check_threads(threads: Any) -> int | None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (numbers.Integral, np.integer))
                                    or not 1 <= threads <= MAX_THREADS):
            raise ConfigError(f"threads must be an integer in 1..{MAX_THREADS} or None, got {threads!r}")
        return None if threads is None else int(threads)

    def _init(self, dim: int, dtype: str, keep_float32: bool, threads: int | None, device: str) -> None:
        threads = self._check_threads(threads)
        self._store = PanelStore(dim, dtype, keep_float32)
        self._ids = np.zeros(0, np.int64)  # slot -> id (capacity-sized; the first n are live)
        self._slot_of: dict[int, int] | None = {}  # id -> slot; None until needed after a load (O(n) to build)
        self._meta: dict[int, dict[str, Any]] = {}
        #: JSON-able attributes saved with the index (e.g. the bundle it was built with).
        self.attrs: dict[str, Any] = {}
        self._lock = RWLock()
        self._version = 0  # bumped by every mutation (invalidates the device copy)
        self._gpu: Any = None
        self._cuda: bool | None = None
        self.threads = int(threads) if threads else cpu_cores()  # respects taskset / container CPU sets
        self.device = self._check_device(device)

    @staticmethod
    def _check_device(device: str) -> str:
        base = str(device).split(":", 1)[0]
        if base not in DEVICES:
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
        if base == "cuda":
            from fine_infer.index._gpu import require_cuda

            require_cuda(device)
        return str(device)

    # --- properties -------------------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._store.dim

    @property
    def dtype(self) -> str:
        """Storage dtype: ``"float32"``, ``"float16"`` or ``"int8"``."""
        return self._store.dtype.name

    @property
    def rescore(self) -> bool:
        """True when float32 copies are kept and searches of a float16 / int8 index are exact by default."""
        return self._store.rows is not None

    @property
    def memory_mapped(self) -> bool:
        """True while the vectors are memory-mapped from the file they were loaded from (until a mutation)."""
        return not self._store.writable()

    @property
    def isa(self) -> str:
        """The instruction set the CPU search kernels use here (``avx512``, ``avx2`` or ``generic``)."""
        return _native_search.active_isa()

    def __len__(self) -> int:
        return self._store.n

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, (numbers.Integral, np.integer)):
            return False
        with self._lock.read():
            return int(id) in self._slots_map()

    def __repr__(self) -> str:
        extra = ", rescore=True" if self.rescore else ""
        return f"Index(dim={self.dim}, dtype={self.dtype!r}{extra}, items={len(self)})"

    def ids(self) -> np.ndarray:
        """All ids (int64), in storage order."""
        with self._lock.read():
            return self._ids[: self._store.n].copy()

    def get_metadata(self, id: int) -> dict[str, Any] | None:
        """The metadata stored with ``id`` (a copy), or None if it has none. Unknown id: KeyError."""
        key = int(as_ids(id, 1, "id")[0])  # an integer: 3.7 or "x" is an InputError, never int()-converted
        with self._lock.read():
            meta = self._meta.get(key)
            if meta is None and key not in self._slots_map():
                raise KeyError(f"id {key} is not in the index")
        return copy.deepcopy(meta)

    def get_vectors(self, ids: Any) -> np.ndarray:
        """float32 (m, dim) vectors of ``ids``: the float32 copies if kept, else the stored values dequantised."""
        idv = as_ids(ids, None)
        with self._lock.read():
            slots = self._lookup(idv, missing_ok=False)
            return np.array(self._store.read(slots), dtype=np.float32)

    # --- mutation ---------------------------------------------------------------------------------------------------

    def add(self, vectors: Any, ids: Any, metadata: Sequence[dict[str, Any] | None] | None = None, *,
            upsert: bool = False) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n int64s), with optional ``metadata`` (one dict or None each).

        An id already in the index is an error, unless ``upsert=True``: then its vector and metadata are replaced
        (metadata None clears it). Everything is checked before anything changes: a refused call changes nothing."""
        x = as_matrix(vectors, self.dim, "vectors")
        if self.dtype == "float16" and x.size and abs_colmax(x).max() > FLOAT16_MAX:
            raise InputError(f"vectors hold values beyond the float16 range (±{FLOAT16_MAX:g}); "
                             "use dtype='float32' or 'int8' for such data")
        m = len(x)
        idv = as_ids(ids, m)
        metas = as_metadata(metadata, m)
        with self._lock.write():
            slot_of = self._slots_map()
            existing = np.fromiter((slot_of.get(i, -1) for i in idv.tolist()), np.int64, m) if slot_of \
                else np.full(m, -1, np.int64)
            hit = existing >= 0
            if hit.any() and not upsert:
                dup = idv[hit][:5].tolist()
                raise InputError(f"{int(hit.sum())} id(s) already in the index, e.g. {dup}; "
                                 "pass upsert=True to replace them")
            if m == 0:
                return
            store = self._store
            new = ~hit
            n0 = store.n
            n1 = n0 + int(new.sum())
            store.reserve(n1)  # also moves a memory-mapped index into RAM (one copy, with room to grow)
            if store.n == 0:
                store.colmax[:] = 0
            if store.scales is not None:
                store.grow_scales(x)
            if len(self._ids) < store.capacity:
                grown = np.zeros(store.capacity, np.int64)
                grown[:n0] = self._ids[:n0]
                self._ids = grown
            store.write_range(n0, x[new])
            store.n = n1
            if hit.any():
                store.write_at(existing[hit], x[hit])
            self._ids[n0:n1] = idv[new]
            slot_of.update(zip(idv[new].tolist(), range(n0, n1)))
            if metas is not None:
                for i, meta, replaced in zip(idv.tolist(), metas, hit.tolist()):
                    if meta is not None:
                        self._meta[i] = meta
                    elif replaced:
                        self._meta.pop(i, None)
            else:  # no metadata given: an upsert clears the old one; a plain add has none to store
                for i in idv[hit].tolist():
                    self._meta.pop(i, None)
            self._version += 1

    def remove(self, ids: Any, *, missing_ok: bool = False) -> int:
        """Remove ``ids`` and their metadata; returns how many were removed. Unknown ids are an error unless
        ``missing_ok``. The last vectors move into the freed slots (O(removed), no rebuild)."""
        idv = np.unique(as_ids(ids, None))
        with self._lock.write():
            slots = self._lookup(idv, missing_ok=missing_ok)
            slots = slots[slots >= 0]
            if slots.size == 0:
                return 0
            store = self._store
            if not store.writable():
                store.materialize()
            n = store.n
            n_new = n - slots.size
            gone = np.zeros(n, bool)
            gone[slots] = True
            holes = np.flatnonzero(gone[:n_new])  # freed slots below the new end ...
            movers = n_new + np.flatnonzero(~gone[n_new:])  # ... take the live vectors from above it
            slot_of = self._slots_map()
            for i in self._ids[slots].tolist():
                del slot_of[i]
                self._meta.pop(i, None)
            store.move(holes, movers)
            self._ids[holes] = self._ids[movers]
            for hole, i in zip(holes.tolist(), self._ids[holes].tolist()):
                slot_of[i] = hole
            store.truncate(n_new)
            self._ids[n_new:n] = 0
            self._version += 1
            return int(slots.size)

    def _slots_map(self) -> dict[int, int]:
        if self._slot_of is None:
            self._slot_of = dict(zip(self._ids[: self._store.n].tolist(), range(self._store.n)))
        return self._slot_of

    def _lookup(self, idv: np.ndarray, missing_ok: bool) -> np.ndarray:
        slot_of = self._slots_map()
        slots = np.fromiter((slot_of.get(i, -1) for i in idv.tolist()), np.int64, len(idv))
        if not missing_ok and (slots < 0).any():
            missing = idv[slots < 0][:5].tolist()
            raise KeyError(f"{int((slots < 0).sum())} id(s) not in the index, e.g. {missing}")
        return slots

    # --- search -----------------------------------------------------------------------------------------------------

    def search(self, queries: Any, k: int, *, exact: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best inner products per query: ``(scores float32 (Q, k), ids int64 (Q, k))``, best first.

        Where the index holds fewer than ``k`` vectors the rest of a row is ``-inf`` / ``-1``. Equal scores are
        ordered by storage slot. ``exact`` (float16 / int8): re-score candidates against the float32 copies so the
        result is the float32 top-k — default True when the index keeps copies (``rescore=True``)."""
        k = check_k(k)
        q = as_matrix(queries, self.dim, "queries")
        if exact is None:
            exact = self.rescore
        elif exact and self.dtype != "float32" and not self.rescore:
            raise ConfigError(f"exact search of a {self.dtype} index needs its float32 copies: create it with "
                              "Index(..., rescore=True)")
        with self._lock.read():
            if exact and self.dtype != "float32":
                scores, slots = self._search_exact(q, k)
            else:
                scores, slots = self._scan(q, k)
            ids = np.where(slots >= 0, self._ids[np.maximum(slots, 0)], -1) if len(self._ids) else slots
        return scores, ids

    def _scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k slots over the stored values, on the device chosen for this index."""
        store = self._store
        if self._use_gpu():
            return self._gpu_gallery().search(q, k)
        return _native_search.search(q, store.panels, store.n, k, store.scales, self.threads)

    def _search_exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scan the compressed vectors for kc candidates, re-score them in float32, and prove nothing was missed:
        a vector outside the candidates scores at most (kc-th approximate score + error bound), so when that is below
        the k-th exact score the top-k is exact. Queries that fail the test are retried with 4x the candidates."""
        store = self._store
        n, nq = store.n, len(q)
        kk = min(k, n)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        if kk == 0 or nq == 0:
            return out_s, out_i
        rows = store.rows[:n]
        bound = store.error_bound(q)
        todo = np.arange(nq)
        # First candidate count: enough that nearly every query passes the test at once (a retry rescans the
        # gallery). int8's error bound is ~10x float16's, so it needs deeper lists (measured on unit vectors).
        kc = min(n, max(4 * k, k + 64) if self.dtype == "int8" else max(2 * k, k + 16))
        while todo.size:
            qs = q[todo]
            cand_s, cand_i = self._scan(qs, kc)
            es, ei = _native_search.rescore(qs, rows, cand_i, kk, self.threads)
            if kc >= n:
                ok = np.ones(len(todo), bool)
            else:
                ok = cand_s[:, kc - 1].astype(np.float64) + bound[todo] < es[:, kk - 1]
            out_s[todo[ok], :kk] = es[ok]
            out_i[todo[ok], :kk] = ei[ok]
            todo = todo[~ok]
            kc = min(n, kc * 4)
        return out_s, out_i

    def _use_gpu(self) -> bool:
        if self.device == "cpu":
            return False
        if self.device == "auto":
            if self._store.n < GPU_MIN_VECTORS:
                return False
            if self._cuda is None:
                from fine_infer.index._gpu import cuda_available

                self._cuda = cuda_available()
            return self._cuda
        return True

    def _gpu_gallery(self) -> Any:
        from fine_infer.index._gpu import GpuGallery

        if self._gpu is None or self._gpu.version != self._version:
            store = self._store
            used = panels_for(store.n)
            # Row-major in the storage dtype (int8 stays int8 on the device; its scale folds into the query).
            stored = store.panels[:used].transpose(0, 2, 1).reshape(used * _native_search.PANEL, self.dim)[: store.n]
            device = "cuda" if self.device == "auto" else self.device
            self._gpu = GpuGallery(device, stored, store.scales, self._version)
        return self._gpu

    # --- persistence ------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` atomically (temp file, fsync, rename): a crash leaves the old file intact.

        The file is a consistent snapshot: ids, vectors and metadata are taken together under the lock (an ``add``
        from another thread lands wholly before or wholly after it). Only the snapshot holds the lock, not the disk
        write: in-RAM vectors are copied (a memory-mapped index's arrays are never changed in place, so they are
        written from the map), then the lock is released before writing, so a waiting ``add`` (which searches queue
        behind) waits for a copy, not for the disk."""
        with self._lock.read():
            try:
                if not isinstance(self.attrs, dict) or not all(isinstance(k, str) for k in self.attrs):
                    raise ValueError("it must be a dict with string keys")
                _strict_json.check_depth(self.attrs)
                meta_text = json.dumps({
                    "attrs": self.attrs,
                    "metadata": {str(i): m for i, m in self._meta.items()},
                }, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InputError(f"index.attrs is not JSON-serialisable: {exc}") from None
            store = self._store
            n = store.n
            snap = np.array if store.writable() else (lambda a: a)  # in RAM: copy; mapped: read-only already
            sections: list[tuple[str, Any]] = [
                ("ids", self._ids[:n].copy()),
                ("colmax", store.colmax.copy()),
            ]
            if store.scales is not None:
                sections.append(("scales", store.scales.copy()))
            sections.append(("meta", meta_text.encode("utf-8")))
            sections.append(("vectors", snap(store.panels[: panels_for(n)])))
            if store.rows is not None:
                sections.append(("float32", snap(store.rows[:n])))
            dim, dtype, copies = self.dim, self.dtype, store.rows is not None
        _format.write(path, dim=dim, dtype=dtype, count=n, panel=_native_search.PANEL, sections=sections,
                      float32_copies=copies)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False, *, verify: bool = True, threads: int | None = None,
             device: str = "auto") -> "Index":
        """Read an index written by :meth:`save`. A truncated, altered or unknown-version file raises
        :class:`~fine_infer.errors.IndexFileError` naming the problem.

        ``mmap=True`` maps the vectors (and float32 copies) from the file instead of reading them into RAM; the
        first ``add`` / ``remove`` copies them into RAM. Checksums are verified either way: with ``mmap`` by one
        streaming pass over the file (constant memory), skipped with ``verify=False`` for a trusted file. A mapped
        file must be replaced by rename (as :meth:`save` does), never truncated or rewritten in place: like any
        memory map, reading a page cut off from under it ends the process (SIGBUS)."""
        f = _format.read(path, mmap=mmap, verify=verify)
        if f.panel != _native_search.PANEL:
            raise _format.fail(Path(path), f"panel width {f.panel}; this build uses {_native_search.PANEL}")
        index = cls.__new__(cls)
        index._init(f.dim, f.dtype, f.rows is not None, threads, device)
        store = index._store
        store.panels = f.panels
        store.rows = f.rows
        store.n = f.count
        if f.scales is not None:
            store.scales = f.scales.copy()
        if f.colmax is not None:
            store.colmax = f.colmax.copy()
        index._ids = f.ids.copy()
        index._slot_of = None
        try:
            index.attrs = dict(f.meta.get("attrs") or {})
            index._meta = {int(i): m for i, m in (f.meta.get("metadata") or {}).items()}
            bad = next((i for i, m in index._meta.items() if m is not None and not isinstance(m, dict)), None)
            if bad is not None:
                raise ValueError(f"the metadata of id {bad} is not an object")
            # (nesting was bounded when the section was parsed: _format.read)
        except (TypeError, ValueError, AttributeError) as exc:
            raise _format.fail(Path(path), f"section 'meta' has an unexpected layout ({exc})") from None
        if len(np.unique(index._ids)) != f.count:
            raise _format.fail(Path(path), "duplicate ids in section 'ids'")
        if (index._ids[: f.count] == -1).any():
            raise _format.fail(Path(path), "id -1 in section 'ids' (it marks 'no result'): the file was not written "
                                           "by Index.save")
        return index

    # --- scale-out --------------------------------------------------------------------------------------------------

    def to_faiss(self) -> Any:
        """A FAISS ``IndexIDMap(IndexFlatIP)`` holding the same vectors (float32 copies, or dequantised) and ids."""
        try:
            import faiss
        except ImportError:
            raise BackendUnavailableError("Index.to_faiss needs FAISS: pip install faiss-cpu") from None
        with self._lock.read():
            x = np.ascontiguousarray(self._store.read(), dtype=np.float32)
            ids = self._ids[: self._store.n].copy()
        out = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
        if len(ids):
            out.add_with_ids(x, ids)
        return out

