"""The parity gate: ONNX Runtime against PyTorch on fresh random inputs at several batch sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fine_infer.compare import Tolerance, compare
from fine_infer.runtime.onnxruntime_runner import OnnxRuntimeRunner
from fine_infer.specs import GraphSpec

# (batch, sequence length or None, generator) -> named inputs
InputSampler = Callable[[int, "int | None", torch.Generator], dict[str, torch.Tensor]]

DEFAULT_BATCHES = (1, 3, 8)


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


def _seq_for(spec: GraphSpec, batch: int, max_len: int | None) -> int | None:
    # Vary the sequence length with the batch so the dynamic sequence axis is exercised, not just the batch.
    dynamic_non_batch = any(isinstance(d, str) and d != "batch" for t in spec.inputs for d in t.shape)
    if max_len is None or not dynamic_non_batch:
        return None
    return {1: max_len, 3: max(2, max_len // 2 + 1)}.get(batch, max(2, max_len - 1))


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
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    runner = OnnxRuntimeRunner(spec, onnx_path, providers=["CPUExecutionProvider"])
    rows: list[dict] = []
    reasons: list[str] = []
    module = module.eval()
    for batch in batch_sizes:
        feeds = sampler(batch, _seq_for(spec, batch, max_seq_len), gen)
        with torch.no_grad():
            ref = module(*[feeds[t.name] for t in spec.inputs])
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = runner.run({k: v.numpy() for k, v in feeds.items()})
        for t, r in zip(spec.outputs, refs):
            kind = (output_kinds or {}).get(t.name, "embedding")
            c = compare(r.detach().float().numpy(), got[t.name], tolerance, kind=kind, seed=seed + batch)
            seq = feeds[spec.inputs[-1].name].shape[1] if _seq_for(spec, batch, max_seq_len) else None
            rows.append({"batch": batch, "sequence": seq, "output": t.name, **c.to_dict()})
            if not c.passed:
                reasons.append(f"{spec.name}.{t.name} at batch {batch}: {c.reason}")
    return ParityResult(spec.name, seed, rows, not reasons, "; ".join(reasons))


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
