"""Timing a bundle in this process: every graph × path × batch size on synthetic inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from fine_infer.bundle import read_bundle, read_manifest
from fine_infer.errors import ConfigError, FineInferError
from fine_infer.runtime.choice import gate_status
from fine_infer.runtime.feeds import example_feeds
from fine_infer.runtime.paths import CPU_PATHS, PATHS, ExecPath, path_unavailable
from fine_infer.tools.bench.machine import machine_info
from fine_infer.tools.bench.timing import Budget, Progress, latency_stats, time_cell

RESULT_KIND = "fine-infer-bench"
RESULT_VERSION = 1
#: bench rows: every path fine-infer can run a bundle on
BACKENDS = tuple(p.label for p in PATHS)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)


def open_backend(
    bundle: str | Path, backend: str, threads: int | None = None, capabilities: Iterable[str] | None = None
) -> tuple[Any | None, str | None]:
    """A session for ``backend`` (a bench row name), or ``(None, reason)`` when it cannot run here.

    ``capabilities`` stands in for the CPU's OpenVINO ``OPTIMIZATION_CAPABILITIES`` (whether bf16 is offered)."""
    import fine_infer

    try:
        if backend == "onnxruntime":
            return fine_infer.load(bundle, backend="onnxruntime", threads=threads, verify=False), None
        if backend in {p.label for p in CPU_PATHS}:
            path = ExecPath.parse(backend, CPU_PATHS)
            why = path_unavailable(read_manifest(bundle), path, capabilities)
            if why:
                return None, why
            return fine_infer.load(bundle, backend=path.backend, variant=path.variant, threads=threads,
                                   verify=False), None
        if backend == "torch":
            return fine_infer.load(bundle, backend="torch", verify=False), None
        if backend == "torch+kernels":
            import torch

            if not torch.cuda.is_available():
                return None, ("the Triton kernels run on a CUDA GPU; without one they fall back to the PyTorch "
                              "reference, which is the 'torch' row")
            return fine_infer.load(bundle, backend="torch", device="cuda", kernels=True, verify=False), None
        if backend == "tensorrt":
            import importlib.util

            if importlib.util.find_spec("tensorrt") is None:
                return None, "TensorRT is not installed (it needs NVIDIA's package index and a GPU)"
            return fine_infer.load(bundle, backend="tensorrt", verify=False), None
    except (FineInferError, ImportError) as exc:
        return None, str(exc)
    raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")


def bench_bundle(
    bundle: str | Path,
    *,
    backends: Sequence[str] = BACKENDS,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    graphs: Sequence[str] | None = None,
    budget: Budget = Budget(),
    threads: int | None = None,
    seq_len: int | None = None,
    progress: bool = True,
    capabilities: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Time every graph × backend × batch size of a bundle on synthetic inputs; the result as a JSON-able dict.

    ``capabilities`` stands in for the CPU's OpenVINO ``OPTIMIZATION_CAPABILITIES`` (see :func:`open_backend`)."""
    for b in batch_sizes:
        if not isinstance(b, int) or b < 1:
            raise ConfigError(f"batch sizes must be positive integers, got {b!r}")
    bundle_obj = read_bundle(bundle)  # verify checksums once; the sessions below skip it
    m = bundle_obj.manifest
    names = list(graphs or m.graphs)
    for g in names:
        bundle_obj.graph(g)
    result: dict[str, Any] = {"kind": RESULT_KIND, "version": RESULT_VERSION, "mode": "runtime",
                              "bundle": str(bundle), "arch": m.arch or m.source, "preset": m.preset,
                              "rows": [], "skipped": []}
    sessions: list[tuple[str, Any]] = []
    cpu_labels = {p.label for p in CPU_PATHS}
    for backend in dict.fromkeys(backends):
        session, reason = open_backend(bundle, backend, threads, capabilities)
        if session is None:
            result["skipped"].append({"backend": backend, "reason": reason})
        else:
            sessions.append((backend, session))
    result["auto"] = _auto_pick(bundle, threads)
    bar = Progress(len(sessions) * len(names) * len(batch_sizes), progress, "bench")
    vocab = next((s.tokenizer.get_vocab_size(with_added_tokens=True) for _, s in sessions if s.tokenizer), None)
    try:
        # Backends innermost: the cells compared with each other are timed minutes apart at most, not a whole
        # run apart, so a change in background load falls on them alike.
        for g in names:
            spec = m.graphs[g].spec
            for b in batch_sizes:
                feeds = example_feeds(spec, b, m.text, vocab, seq_len)
                for backend, session in sessions:
                    bar.update(f"{g} {backend} batch {b}")
                    try:
                        times = time_cell(lambda: session.run(g, feeds), budget)
                    except Exception as exc:  # noqa: BLE001 - e.g. the torch backend cannot run this graph
                        result["skipped"].append({"backend": backend, "graph": g, "batch": b,
                                                  "reason": f"{type(exc).__name__}: {exc}"})
                        continue
                    row = {"mode": "runtime", "graph": g, "task": spec.task, "backend": backend,
                           "provider": session.providers.get(g, ""), "batch": b, **latency_stats(times, b)}
                    if backend in cpu_labels:
                        row["gate"] = gate_status(m, ExecPath.parse(backend, CPU_PATHS))[0]
                    result["rows"].append(row)
    finally:
        bar.close()
    order = {backend: i for i, (backend, _) in enumerate(sessions)}
    result["rows"].sort(key=lambda r: (order[r["backend"]], names.index(r["graph"]), batch_sizes.index(r["batch"])))
    result["machine"] = machine_info()
    for backend, session in sessions:
        if backend == "onnxruntime" and session.providers:
            ort_session = session.runner(next(iter(session.providers))).session
            n = ort_session.get_session_options().intra_op_num_threads
            result["machine"]["threads"]["onnxruntime_intra_op"] = n or "default (one per physical core)"
        if session.backend == "openvino" and session.providers:
            info = session.runner(next(iter(session.providers))).info()
            result["machine"]["threads"][f"{backend}"] = (f"{info['threads']} threads, {info['streams']} stream(s), "
                                                          f"{info['hint']} hint")
    return result


def _auto_pick(bundle: str | Path, threads: int | None) -> dict[str, Any]:
    """What ``load(bundle, backend="auto")`` picks here and why (no graph is run)."""
    import fine_infer

    try:
        session = fine_infer.load(bundle, backend="auto", threads=threads, verify=False)
    except FineInferError as exc:
        return {"label": None, "reason": str(exc)}
    choice = session.choice
    return {"label": session.label, "reason": choice.reason, "speedup": choice.speedup}
