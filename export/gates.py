"""The export gates' shared core: fresh random inputs, the PyTorch reference outputs for them, and the comparison of
any runner's outputs with those references through :func:`fine_infer.compare.compare`.

- :func:`check_parity`: the fp32 gate (ONNX Runtime vs PyTorch, every batch size must pass);
- :func:`compare_runs`: a candidate (a variant on ONNX Runtime, a CPU path of the runtime) against the fp32 PyTorch
  references, decided on every sampled row pooled per output;
- :func:`default_tolerance` and :data:`VARIANT_TOLERANCES`: what "close enough" is for each;
- :func:`write_references` / :func:`read_references`: the fixed inputs and fp32 PyTorch outputs an export records in
  the bundle (``references.npz``), so a bundle whose PyTorch source is not in it can still be gated later.

``fine-infer validate`` (:mod:`fine_infer.tools.validate`) re-runs these on a finished bundle with the runtime's
runners. ONNX Runtime is called directly here (the export stage sits below the runtime). Nothing here imports torch
at module level: gating a bundle on its recorded references needs numpy and a backend only.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from fine_infer.bundle.paths import bundle_path
from fine_infer.bundle.variants import ort_session_kwargs
from fine_infer.compare import Tolerance, compare
from fine_infer.errors import BundleError
from fine_infer.specs import GraphSpec

if TYPE_CHECKING:
    import torch

# (batch, sequence length or None, generator) -> named inputs
InputSampler = Callable[[int, "int | None", "torch.Generator"], "dict[str, torch.Tensor]"]
# named numpy inputs -> outputs (by name, or a list in spec order)
RunFn = Callable[[dict[str, np.ndarray]], "dict[str, np.ndarray] | Sequence[np.ndarray]"]

DEFAULT_BATCHES = (1, 3, 8)

VARIANT_TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(atol=None, min_cosine=0.999, min_topk=0.9, k=10),
    "int8": Tolerance(atol=None, min_cosine=0.99, min_topk=0.9, k=10),
    # calibrated static int8 (export --int8-static), gated on held-out real inputs: ONNX Runtime QDQ and the NNCF
    # OpenVINO IR (whose CPU path is openvino/int8, hence the "int8" key for its runtime gate)
    "int8-static": Tolerance(atol=None, min_cosine=0.99, min_topk=0.9, k=10),
    "openvino-int8": Tolerance(atol=None, min_cosine=0.99, min_topk=0.9, k=10),
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
    inputs for it, the longest sequence to sample, and which outputs are logits (compared by arg-max). A graph gated
    on recorded references (:func:`read_references`) has neither module nor sampler."""

    spec: GraphSpec
    module: "torch.nn.Module | None"
    sampler: InputSampler | None
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
    import torch

    if job.module is None or job.sampler is None:
        raise ValueError(f"graph {job.spec.name!r} has no PyTorch module to sample references from")
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
    module: "torch.nn.Module",
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


REFERENCES_FILE = "references.npz"
REFERENCES_KEY = "references"  # manifest.validation[REFERENCES_KEY]: the file, its seed and what it holds
MAX_REFERENCES_BYTES = 256 << 20  # all arrays of a references file, decompressed (a real one: a few MB)
REFERENCE_SEED = 0
REFERENCE_BUDGET = 4 << 20  # bytes of recorded inputs for the whole bundle; big image towers record fewer rows
_BATCH_PLANS = ((1, 3, 8), (1, 2, 4), (1, 2), (1,))


def _nbytes(feeds: dict[str, Any]) -> int:
    return sum(int(np.asarray(v).nbytes) for v in feeds.values())


def reference_batches(job: GraphJob, budget: int, batch_sizes: Sequence[int] = DEFAULT_BATCHES) -> tuple[int, ...]:
    """The batch sizes to record for ``job`` within ``budget`` bytes of inputs: ``batch_sizes`` when they fit, else
    fewer rows (1, 2, 4 ... 1); the bytes of one row are measured on a sample at the longest sequence."""
    import torch

    seq = sequence_length_for(job.spec, 1, job.max_seq_len)
    row = max(1, _nbytes(job.sampler(1, seq, torch.Generator().manual_seed(REFERENCE_SEED))))
    for plan in (tuple(batch_sizes), *_BATCH_PLANS):
        if sum(plan) * row <= budget:
            return plan
    return (1,)


def write_references(path: str | Path, jobs: Sequence[GraphJob], *, seed: int = REFERENCE_SEED,
                     budget: int = REFERENCE_BUDGET, batch_sizes: Sequence[int] = DEFAULT_BATCHES) -> dict[str, Any]:
    """Record, for every graph of ``jobs``, the inputs drawn from ``seed`` at ``batch_sizes`` (fewer rows where the
    inputs would pass ``budget`` bytes, shared between the graphs) and the fp32 PyTorch outputs for them, in one
    ``.npz`` at ``path``. Returns the manifest's ``validation["references"]`` block (file, seed, per graph the
    batches and sequence lengths recorded)."""
    arrays: dict[str, np.ndarray] = {}
    graphs: dict[str, Any] = {}
    share = budget // max(1, len(jobs))
    for job in jobs:
        name = job.spec.name
        samples = sample_references(job, reference_batches(job, share, batch_sizes), seed)
        for i, s in enumerate(samples):
            for t in job.spec.inputs:
                arrays[f"{name}/{i}/in/{t.name}"] = s.feeds[t.name]
            for t, r in zip(job.spec.outputs, s.references):
                arrays[f"{name}/{i}/out/{t.name}"] = r
        graphs[name] = {"batches": [s.batch for s in samples], "sequences": [s.sequence for s in samples],
                        "output_kinds": dict(job.output_kinds)}
    np.savez_compressed(os.fspath(path), **arrays)
    return {"file": Path(path).name, "seed": seed, "graphs": graphs}


def read_references(folder: str | Path, manifest) -> dict[str, tuple[GraphJob, list[Sample]]]:
    """The references a bundle recorded (:func:`write_references`), per graph: a job holding the graph's spec and
    output kinds (no module) and its samples; empty when the bundle recorded none (exported before they existed).
    The file's checksum is the reader's to verify (``read_bundle`` does); a file that does not hold what the
    manifest says is a :class:`BundleError`."""
    block = (manifest.validation or {}).get(REFERENCES_KEY) or {}
    if not block.get("file"):
        return {}
    if block["file"] not in manifest.files:  # only a checksummed file: this one is compared against
        raise BundleError(f"the references file {block['file']!r} is not among the bundle's checksummed files; "
                          "re-export the bundle")
    path = bundle_path(folder, block["file"], "validation.references.file")
    out: dict[str, tuple[GraphJob, list[Sample]]] = {}
    try:
        _check_npz_sizes(path)
        with np.load(os.fspath(path), allow_pickle=False) as data:
            for name, rec in block.get("graphs", {}).items():
                spec = manifest.graphs[name].spec
                job = GraphJob(spec, None, None, None, dict(rec.get("output_kinds") or {}))
                samples = [
                    Sample(int(b), q, {t.name: data[f"{name}/{i}/in/{t.name}"] for t in spec.inputs},
                           [data[f"{name}/{i}/out/{t.name}"].astype(np.float32) for t in spec.outputs])
                    for i, (b, q) in enumerate(zip(rec["batches"], rec["sequences"]))
                ]
                out[name] = (job, samples)
    except (OSError, KeyError, ValueError, TypeError, AttributeError, MemoryError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path} does not hold the references its manifest lists ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); re-export the bundle") from None
    return out


def _check_npz_sizes(path: Path) -> None:
    """Refuse a references file whose arrays decompress past :data:`MAX_REFERENCES_BYTES`, or whose array headers
    declare more data than their member holds (numpy allocates what the header says before reading)."""
    total = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            total += info.file_size
            if total > MAX_REFERENCES_BYTES:
                raise ValueError(f"its arrays hold more than {MAX_REFERENCES_BYTES} bytes")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0) else
                                   np.lib.format.read_array_header_2_0(f))
                if int(np.prod(shape, dtype=object)) * dtype.itemsize > info.file_size:
                    raise ValueError(f"{info.filename} declares shape {shape}, more than it holds")
