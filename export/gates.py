"""The export gates' shared core: fresh random inputs, the PyTorch reference outputs for them, and the comparison of
any runner's outputs with those references through :func:`fine_infer.compare.compare`.

- :func:`check_parity`: the fp32 gate (ONNX Runtime vs PyTorch, every batch size must pass);
- :func:`compare_runs`: a candidate (a variant on ONNX Runtime, a CPU path of the runtime) against the fp32 PyTorch
  references, decided on every sampled row pooled per output;
- :func:`default_tolerance` and :data:`VARIANT_TOLERANCES`: what "close enough" is for each.

``fine-infer validate`` (:mod:`fine_infer.tools.validate`) re-runs these on a finished bundle with the runtime's
runners. ONNX Runtime is called directly here (the export stage sits below the runtime).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fine_infer.bundle.variants import ort_session_kwargs
from fine_infer.compare import Tolerance, compare
from fine_infer.specs import GraphSpec

# (batch, sequence length or None, generator) -> named inputs
InputSampler = Callable[[int, "int | None", torch.Generator], dict[str, torch.Tensor]]
# named numpy inputs -> outputs (by name, or a list in spec order)
RunFn = Callable[[dict[str, np.ndarray]], "dict[str, np.ndarray] | Sequence[np.ndarray]"]

DEFAULT_BATCHES = (1, 3, 8)

VARIANT_TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(atol=None, min_cosine=0.999, min_topk=0.9, k=10),
    "int8": Tolerance(atol=None, min_cosine=0.99, min_topk=0.9, k=10),
    "cpu-opt": Tolerance(atol=1e-4, min_topk=0.9, k=10),
    "bf16": Tolerance(atol=None, min_cosine=0.999, min_topk=0.9, k=10),  # OpenVINO's bf16 inference precision
}


def default_tolerance(atol: float | None = None) -> Tolerance:
    """fp32 parity: max abs error ≤ ``atol`` (default 1e-4) and top-10 agreement ≥ 0.9 on a random gallery."""
    return Tolerance(atol=1e-4 if atol is None else atol, min_topk=0.9, k=10)


def fresh_seed() -> int:
    """A fresh random seed for a gate (recorded with its result so a failure can be reproduced)."""
    return int.from_bytes(os.urandom(4), "little")


@dataclass(frozen=True)
class GraphJob:
    """One graph to export or gate: the module whose forward takes the spec's inputs positionally, how to sample
    inputs for it, the longest sequence to sample, and which outputs are logits (compared by arg-max)."""

    spec: GraphSpec
    module: torch.nn.Module
    sampler: InputSampler
    max_seq_len: int | None = None
    output_kinds: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """Inputs at one batch size and the fp32 PyTorch outputs for them (numpy, outputs in spec order)."""

    batch: int
    sequence: int | None
    feeds: dict[str, np.ndarray]
    references: list[np.ndarray]


def sequence_length_for(spec: GraphSpec, batch: int, max_len: int | None) -> int | None:
    """The sequence length sampled at ``batch``: varied with the batch so the dynamic sequence axis is exercised, not
    just the batch (None for graphs without one)."""
    dynamic_non_batch = any(isinstance(d, str) and d != "batch" for t in spec.inputs for d in t.shape)
    if max_len is None or not dynamic_non_batch:
        return None
    return {1: max_len, 3: max(2, max_len // 2 + 1)}.get(batch, max(2, max_len - 1))


def sample_references(job: GraphJob, batch_sizes: Sequence[int], seed: int) -> list[Sample]:
    """Fresh inputs from ``seed`` at each batch size and ``job.module``'s outputs for them."""
    gen = torch.Generator().manual_seed(seed)
    module = job.module.eval()
    out = []
    for batch in batch_sizes:
        seq = sequence_length_for(job.spec, batch, job.max_seq_len)
        feeds = job.sampler(batch, seq, gen)
        with torch.no_grad():
            ref = module(*[feeds[t.name] for t in job.spec.inputs])
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        if seq is not None:  # what was drawn (a user module's sampler scales the example's own length)
            seq = int(feeds[job.spec.inputs[-1].name].shape[1])
        out.append(Sample(batch, seq, {k: v.numpy() for k, v in feeds.items()},
                          [r.detach().float().numpy() for r in refs]))
    return out


def ort_cpu_runner(path: str | Path, variant: str | None = None) -> RunFn:
    """ONNX Runtime's CPU provider on one ONNX file, with the session options ``variant`` needs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    session = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"],
                                   **ort_session_kwargs(variant))
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def _outputs(spec: GraphSpec, got: Any) -> list[np.ndarray]:
    if isinstance(got, dict):
        return [np.asarray(got[t.name], dtype=np.float32) for t in spec.outputs]
    return [np.asarray(g, dtype=np.float32) for g in got]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@dataclass(frozen=True)
class ParityResult:
    """Per graph: one comparison per (batch, output); ``passed`` when all pass."""

    graph: str
    seed: int
    rows: list[dict]
    passed: bool
    reason: str

    def to_dict(self) -> dict:
        return {"graph": self.graph, "seed": self.seed, "passed": self.passed, "reason": self.reason, "checks": self.rows}


def check_parity(
    module: torch.nn.Module,
    spec: GraphSpec,
    onnx_path: str | Path,
    sampler: InputSampler,
    tolerance: Tolerance,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    max_seq_len: int | None = None,
    output_kinds: dict[str, str] | None = None,
    seed: int | None = None,
) -> ParityResult:
    """Run PyTorch and ONNX Runtime on the same fresh inputs; compare every output with :func:`compare`.

    ``seed`` defaults to a fresh random one, recorded in the result so a failure can be reproduced."""
    seed = fresh_seed() if seed is None else seed
    job = GraphJob(spec, module, sampler, max_seq_len, dict(output_kinds or {}))
    run = ort_cpu_runner(onnx_path)
    rows: list[dict] = []
    reasons: list[str] = []
    for s in sample_references(job, batch_sizes, seed):
        for t, r, g in zip(spec.outputs, s.references, _outputs(spec, run(s.feeds))):
            kind = job.output_kinds.get(t.name, "embedding")
            c = compare(r, g, tolerance, kind=kind, seed=seed + s.batch)
            rows.append({"batch": s.batch, "sequence": s.sequence, "output": t.name, **c.to_dict()})
            if not c.passed:
                reasons.append(f"{spec.name}.{t.name} at batch {s.batch}: {c.reason}")
    return ParityResult(spec.name, seed, rows, not reasons, "; ".join(reasons))


def compare_runs(
    run: RunFn,
    job: GraphJob,
    samples: Sequence[Sample],
    tolerance: Tolerance,
    seed: int,
    *,
    label: str = "",
    max_batch: int | None = None,
) -> tuple[list[dict], str]:
    """Compare ``run``'s outputs with the fp32 PyTorch references of ``samples`` (those up to ``max_batch`` rows).

    Returns (rows: one per batch and output, plus a ``batch="all"`` row per output over every sampled row, which is
    what the gate decides on; the reasons it failed or ""). Pooling every row (12 queries at batches 1, 3, 8 instead of
    one at batch 1, whose top-10 includes 9 near-tied random gallery vectors) keeps a single near-tie swap among tiny
    random-weight embeddings from deciding the gate; cosine is per row either way. A run that raises fails the gate
    in one line. ``label`` names the candidate in the reasons (``int8 on onnxruntime``)."""
    spec = job.spec
    where = f" ({label})" if label else ""
    rows: list[dict] = []
    pooled: dict[str, tuple[list, list]] = {t.name: ([], []) for t in spec.outputs}
    used = [s for s in samples if max_batch is None or s.batch <= max_batch]
    for s in used:
        try:
            got = _outputs(spec, run(s.feeds))
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run this graph fails its gate
            return rows, f"{spec.name}{where} does not run at batch {s.batch}: {_first_line(exc)}"
        for t, r, g in zip(spec.outputs, s.references, got):
            c = compare(r, g, tolerance, kind=job.output_kinds.get(t.name, "embedding"), seed=seed + s.batch)
            rows.append({"batch": s.batch, "sequence": s.sequence, "output": t.name, **c.to_dict()})
            pooled[t.name][0].append(r.reshape(r.shape[0], -1))
            pooled[t.name][1].append(g.reshape(g.shape[0], -1))
    reasons = []
    for t in spec.outputs:
        c = compare(np.concatenate(pooled[t.name][0]), np.concatenate(pooled[t.name][1]), tolerance,
                    kind=job.output_kinds.get(t.name, "embedding"), seed=seed)
        rows.append({"batch": "all", "sequence": None, "output": t.name, **c.to_dict()})
        if not c.passed:
            reasons.append(f"{spec.name}.{t.name}{where}: {c.reason}")
    return rows, "; ".join(reasons)


def summarize(rows: list[dict]) -> dict:
    """Worst-case figures over a list of comparison rows (for the one-line report)."""
    if not rows:
        return {}
    return {
        "max_abs": max(r["max_abs"] for r in rows),
        "max_rel": max(r["max_rel"] for r in rows),
        "min_cosine": min(r["min_cosine"] for r in rows),
        "mean_cosine": float(np.mean([r["mean_cosine"] for r in rows])),
        "topk_agreement": min(r["topk_agreement"] for r in rows),
    }
