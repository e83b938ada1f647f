"""Dynamic batching across concurrent callers of one :class:`~fine_infer.runtime.Session`.

- :mod:`~fine_infer.batching.settings`: :class:`BatchSettings`, the one settings object (checked there).
- :mod:`~fine_infer.batching.queue`: the worker-loop core (a queue, worker thread(s) taking batches, answers to
  blocking, ``Future`` and asyncio callers); the server's search batcher runs on it too.
- :mod:`~fine_infer.batching.batcher`: :class:`DynamicBatcher`, per-graph batches of model runs, lanes.
- :mod:`~fine_infer.batching.merging`: feeds merged, padded and split back per request.
- :mod:`~fine_infer.batching.calibration`: timing a graph's batch sizes and lanes (:class:`Calibration`).
- :mod:`~fine_infer.batching.plan`: choosing the plan from per-item costs (:func:`pick_batch_size`,
  :func:`pick_plan`, and :func:`bench_batch_sizes` for a parsed ``fine-infer bench`` result).
"""

from fine_infer.batching.batcher import DynamicBatcher
from fine_infer.batching.calibration import Calibration
from fine_infer.batching.plan import bench_batch_sizes, pick_batch_size, pick_plan
from fine_infer.batching.settings import BatchSettings

__all__ = ["BatchSettings", "Calibration", "DynamicBatcher", "bench_batch_sizes", "pick_batch_size", "pick_plan"]
