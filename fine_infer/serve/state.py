"""What a server serves: the session and its batcher, the index and its search batcher, the limits, readiness.

One :class:`ServeState` per app (``app.state.serve``). It builds the batchers from one
:class:`~fine_infer.batching.BatchSettings`; :meth:`ServeState.prepare` warms every graph up and calibrates its batch
size (the app runs it in a background thread after start-up), and :meth:`ServeState.close` drains the batchers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import anyio

from fine_infer.batching import BatchSettings, DynamicBatcher
from fine_infer.errors import ConfigError
from fine_infer.serve.limits import Limits
from fine_infer.serve.metrics import Metrics
from fine_infer.serve.search import SearchBatcher

log = logging.getLogger("fine_infer.serve")


class ServeState:
    """What the app serves: the session, its batcher, the index, the limits, and readiness."""

    def __init__(self, session: Any, index: Any | None = None, *, batching: BatchSettings | None = None,
                 limits: Limits | None = None, api_key: str | None = None, allow_index_mismatch: bool = False,
                 kernel_cache: str | None = None, worker: tuple[int, int] | None = None) -> None:
        self.session = session
        self.worker = worker  # (index, count) among `serve --workers` processes; None: the only one
        # Where compiled Triton kernels and their tuning are kept across restarts (None: Triton's own default).
        self.kernel_cache = kernel_cache
        #: what the kernel warm-up compiled and tuned before /readyz (None: no fused kernel runs in this server)
        self.kernel_report: dict[str, Any] | None = None
        self.index = index
        self.batching = batching if batching is not None else BatchSettings()
        # Searches of a large gallery are batched across requests too, unless batching is off (max_batch_size 1).
        self.searcher = None if index is None else SearchBatcher(index, self.batching.search_batch_limit)
        self.limits = limits or Limits()
        session.max_text_chars = self.limits.max_text_chars  # one bound on every path, the batcher's tokenize too
        self.api_key = api_key.encode() if api_key else None
        self.metrics = Metrics(self)
        self.batcher = DynamicBatcher(session, self.batching, on_batch=self.metrics.observe_batch)
        self.ready = False
        self.error: str | None = None
        self.draining = False
        self.cancelled = 0  # requests cancelled unanswered (the graceful shutdown ran out of time)
        self.drained = False  # set by close(): the batchers drained and no request was cancelled
        self.cpu_limiter = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))
        self._check_index(allow_index_mismatch)

    def _check_index(self, allow_mismatch: bool) -> None:
        """Refuse an index built by another bundle: another dimension always; another bundle identity (what
        ``fine-infer index`` records: ``attrs["bundle_identity"]``, :meth:`Manifest.identity`), or, for an index
        that records only the bundle's path (``attrs["bundle"]``), another path, unless ``allow_mismatch``: its hits
        would be meaningless."""
        if self.index is None:
            return
        dim = self.session.manifest.embed_dim
        idim = getattr(self.index, "dim", None)
        if dim and idim and int(idim) != int(dim):
            raise ConfigError(f"the index holds {idim}-d vectors but the bundle embeds to {dim}-d; "
                              "index the gallery with this bundle")
        attrs = getattr(self.index, "attrs", None) or {}
        built_by, identity = attrs.get("bundle"), attrs.get("bundle_identity")
        here = str(Path(self.session.bundle.path).resolve())
        problem = None
        if identity:
            mine = self.session.manifest.identity()
            if identity != mine:
                problem = (f"the index was built by another bundle ({built_by or 'path not recorded'}, identity "
                           f"{str(identity)[:12]}…; this bundle's is {mine[:12]}…)")
        elif built_by and str(built_by) != here:
            problem = (f"the index was built by the bundle at {built_by}, not {here} (it records no bundle identity "
                       "to compare: re-index to record one)")
        if problem is None:
            return
        if not allow_mismatch:
            raise ConfigError(f"{problem}: its hits would be meaningless; index the gallery with this bundle, or "
                              "pass --allow-index-mismatch if the two are known to embed alike")
        log.warning("serving despite a mismatch (--allow-index-mismatch): %s", problem)

    def prepare(self) -> None:
        """Warm every graph up and calibrate its batch size (unless fixed); where fused Triton kernels run, compile and
        tune every kernel at every batch size the batcher can form (first calls otherwise take minutes); then mark
        the server ready."""
        try:
            with self._kernel_shapes() as shapes:
                for name in self.session.manifest.graphs:
                    self.batcher.warm_up(name)  # first runs allocate: not a client's cost
            cal = self.batcher.calibrate_all()
            for g, c in cal.items():
                log.info("graph %s: max_batch_size %d, %d lane(s) (%s) %s", g, c.max_batch_size, c.lanes, c.source,
                         {b: round(v, 3) for b, v in c.per_item_ms.items()})
            if shapes is not None:
                self._warm_kernels(shapes)
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported by /readyz rather than killing the server
            log.exception("preparing the bundle failed")
            self.error = f"{type(exc).__name__}: {exc}"

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/info`` reports."""
        m = self.session.manifest
        return {
            "arch": m.arch or m.source,
            "preset": m.preset,
            "backend": self.session.backend,
            "providers": self.session.providers,
            "embed_dim": m.embed_dim,
            "graphs": {n: {"task": g.spec.task, "max_batch_size": self.batcher.max_batch_size(n),
                           "lanes": self.batcher.lanes(n),
                           "calibration": c.to_dict() if (c := self.batcher.calibrations.get(n)) else None}
                       for n, g in m.graphs.items()},
            "tasks": sorted({g.spec.task for g in m.graphs.values()}),
            "max_text_tokens": self.limits.text_token_limit(m.text.max_length if m.text else None),
            "index": None if self.index is None else {"items": len(self.index)},
            "limits": self.limits.to_dict(),
            "kernels": None if self.kernel_report is None else {
                k: self.kernel_report.get(k) for k in ("seconds", "cache_dir", "tuned", "skipped")},
            "worker": list(self.worker) if self.worker else None,
            "ready": self.ready,
        }

    def close(self) -> None:
        """Drain the batcher (in-flight requests are answered first)."""
        self.draining = True
        self.batcher.close(drain=True)
        if self.searcher is not None:
            self.searcher.close()
        self.drained = self.cancelled == 0

    def _uses_kernels(self) -> bool:
        """Whether this server runs fused Triton kernels: the torch backend with ``kernels``, or an index searched on
        CUDA (its top-k kernel). Nothing is imported for a server that does not."""
        path = getattr(self.session, "path", None)
        if path is not None and getattr(path, "kernels", False):
            return True
        return self.index is not None and getattr(self.index, "device", "cpu") == "cuda"

    def _kernel_shapes(self) -> contextlib.AbstractContextManager:
        """Records the kernel calls of the warm-up runs (None when no kernel runs here)."""
        if not self._uses_kernels():
            return contextlib.nullcontext(None)
        from fine_infer import kernels

        kernels.configure_cache(self.kernel_cache)  # before the first kernel compiles
        return kernels.record_shapes()

    def _warm_kernels(self, shapes: Any) -> None:
        """Compile and tune every recorded kernel call at each batch size the batcher can form (and each k bucket of
        a search on CUDA), so no client waits for a compile; the tuning lands in the kept cache folder."""
        from fine_infer import kernels

        graphs = self.session.manifest.graphs
        largest = max((self.batcher.max_batch_size(g) or 1 for g in graphs), default=1)
        max_k = self.limits.max_k if self.index is not None else None
        device = getattr(self.session, "device", None)
        self.kernel_report = kernels.warm_up(shapes, batch_sizes=range(1, largest + 1), max_k=max_k,
                                             device=device if device and device != "cpu" else None)
        log.info("kernels warmed up in %.1f s (cache %s): %s", self.kernel_report.get("seconds", 0.0),
                 self.kernel_report.get("cache_dir"), self.kernel_report.get("skipped") or self.kernel_report["tuned"])
