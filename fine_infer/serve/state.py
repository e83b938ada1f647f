"""What a server serves: the session and its batcher, the index and its search batcher, the limits, readiness.

One :class:`ServeState` per app (``app.state.serve``). It builds the batchers from one
:class:`~fine_infer.batching.BatchSettings`; :meth:`ServeState.prepare` warms every graph up and calibrates its batch
size (the app runs it in a background thread after start-up), and :meth:`ServeState.close` drains the batchers.
"""

from __future__ import annotations

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
                 limits: Limits | None = None, api_key: str | None = None, allow_index_mismatch: bool = False) -> None:
        self.session = session
        self.index = index
        self.batching = batching if batching is not None else BatchSettings()
        # Searches of a large gallery are batched across requests too, unless batching is off (max_batch_size 1).
        self.searcher = None if index is None else SearchBatcher(index, self.batching.search_batch_limit)
        self.limits = limits or Limits()
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
        """Warm every graph up and calibrate its batch size (unless fixed); then mark the server ready."""
        try:
            for name in self.session.manifest.graphs:
                self.batcher.warm_up(name)  # first runs allocate: not a client's cost
            cal = self.batcher.calibrate_all()
            for g, c in cal.items():
                log.info("graph %s: max_batch_size %d, %d lane(s) (%s) %s", g, c.max_batch_size, c.lanes, c.source,
                         {b: round(v, 3) for b, v in c.per_item_ms.items()})
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
            "ready": self.ready,
        }

    def close(self) -> None:
        """Drain the batcher (in-flight requests are answered first)."""
        self.draining = True
        self.batcher.close(drain=True)
        if self.searcher is not None:
            self.searcher.close()
        self.drained = self.cancelled == 0
