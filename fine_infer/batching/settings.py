"""The batching settings: one frozen object, checked here, handed whole to the batcher and the server.

    settings = BatchSettings(max_batch_size=16, max_delay_ms=5)
    batcher = DynamicBatcher(session, settings)
    app = create_app(session, index, batching=settings)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from fine_infer.errors import ConfigError

DEFAULT_MAX_DELAY_MS = 2.0
DEFAULT_CALIBRATION_BUDGET_S = 5.0
# Queries merged into one index search. A search's cost is mostly one read of the gallery, shared by all the batch's
# queries, so the bound only keeps one batch's scores matrix and its wait small (benchmarks/RESULTS.md, Search).
DEFAULT_SEARCH_MAX_QUERIES = 64


def check_positive(name: str, n: object) -> int:
    """``n`` as an int, or a :class:`ConfigError` naming ``name`` when it is not a positive integer."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{name} must be a positive integer, got {n!r}")
    return int(n)


@dataclass(frozen=True)
class BatchSettings:
    """How concurrent requests are batched (:class:`~fine_infer.batching.DynamicBatcher`, ``fine-infer serve``).

    - ``max_batch_size``: rows per model run; an int for every graph, a mapping per graph (graphs left out are
      calibrated), or None to calibrate each graph by measurement before its first batch. Per lane.
    - ``size_source``: where a mapping's sizes came from, recorded as each graph's calibration ``source``
      (``"fixed"``, or ``"bench:<file>"`` for sizes picked from a ``fine-infer bench --json`` result).
    - ``max_delay_ms``: how long the oldest queued request may wait for batch-mates; with ``adaptive_delay`` only when
      some are to be expected (several requests queued, or the previous batch merged several).
    - ``lanes``: batches of a graph in the model at once, each on its share of the threads (ONNX Runtime); None:
      measured with the batch size, else 1.
    - ``calibration_budget_s``: seconds of timing per graph calibrated.
    - ``search_max_queries``: queries merged into one index search by the server; ``max_batch_size`` 1 (batching
      off) turns search batching off too (:attr:`search_batch_limit`).
    """

    max_batch_size: int | Mapping[str, int] | None = None
    max_delay_ms: float = DEFAULT_MAX_DELAY_MS
    adaptive_delay: bool = True
    lanes: int | None = None
    calibration_budget_s: float = DEFAULT_CALIBRATION_BUDGET_S
    search_max_queries: int = DEFAULT_SEARCH_MAX_QUERIES
    size_source: str = "fixed"

    def __post_init__(self) -> None:
        n = self.max_batch_size
        if isinstance(n, Mapping):
            # A read-only copy: the settings are shared by the batcher and the server, and never change.
            sizes = {str(g): check_positive("max_batch_size", v) for g, v in n.items()}
            object.__setattr__(self, "max_batch_size", MappingProxyType(sizes))
        elif n is not None:
            check_positive("max_batch_size", n)
        if not isinstance(self.max_delay_ms, (int, float)) or self.max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.lanes is not None:
            check_positive("lanes", self.lanes)
        if not isinstance(self.calibration_budget_s, (int, float)) or self.calibration_budget_s < 0:
            raise ConfigError(f"calibration_budget_s must be >= 0, got {self.calibration_budget_s}")
        check_positive("search_max_queries", self.search_max_queries)

    @property
    def max_delay_s(self) -> float:
        """``max_delay_ms`` in seconds."""
        return self.max_delay_ms / 1e3

    @property
    def search_batch_limit(self) -> int:
        """Queries per index search: ``search_max_queries``, or 1 when batching is off (``max_batch_size`` 1)."""
        return 1 if self.max_batch_size == 1 else self.search_max_queries
