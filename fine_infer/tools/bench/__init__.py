"""``fine-infer bench``: latency and throughput per graph, backend and batch size, or of a running server.

    result = bench_bundle("bundle/")               # every graph × backend × batch size
    print(format_table(result)); save_json(result, "bench.json"); plot(result, "bench.png")
    lines, regressions = compare(result, load_json("old.json"), max_regression=0.10)
    result = bench_server("http://127.0.0.1:8080", concurrency=(1, 8, 32))
    result = bench_triton("http://127.0.0.1:8000")   # a Triton server's raw-input models (KServe v2)

Each cell gets warm-up runs, then timed runs until both a minimum count and a minimum time are reached (bounded by
a maximum count and time); it reports p50/p90/p99 latency, ms per item and items/s. The result records the machine
(CPU/GPU model, cores, thread settings) and library versions, so two results can be compared fairly. Backends that
cannot run here (no PyTorch, a user-module bundle, the Triton kernels without a CUDA GPU, TensorRT) are skipped
with the reason recorded.

On the CPU every deployable path gets a row (:data:`fine_infer.runtime.paths.CPU_PATHS`): ``onnxruntime`` (fp32),
``onnxruntime/int8``, ``onnxruntime/int8-static``, ``onnxruntime/cpu-opt``, ``openvino`` (f32), ``openvino/bf16`` and
``openvino/int8``, beside ``torch`` (eager);
a path the bundle lacks (no ``--int8`` at export) or the machine cannot run (no OpenVINO, no bf16) is skipped with
the reason. Each CPU path row carries its precision gate's status, and the result names the path
``backend="auto"`` picks (``result["auto"]``), marked ``*`` in the table; ``fine-infer bench`` warns on stderr when that
stored pick is not the fastest gated path it measured (:func:`pick_warning`).
"""

from fine_infer.tools.bench.load import (
    DEFAULT_CONCURRENCY,
    QUERY_TEXT,
    bench_server,
    bench_triton,
    kserve_outputs,
    kserve_request,
    load_test,
    sample_png,
    server_payloads,
    triton_payloads,
)
from fine_infer.tools.bench.machine import machine_info
from fine_infer.tools.bench.report import compare, format_table, load_json, pick_warning, plot, save_json
from fine_infer.tools.bench.runtime import BACKENDS, DEFAULT_BATCHES, RESULT_KIND, bench_bundle, open_backend
from fine_infer.tools.bench.timing import QUICK, Budget, interleaved_ms, latency_stats


__all__ = ["BACKENDS", "DEFAULT_BATCHES", "DEFAULT_CONCURRENCY", "QUERY_TEXT", "QUICK", "RESULT_KIND", "Budget",
           "bench_bundle", "bench_server", "bench_triton", "compare", "format_table", "interleaved_ms", "kserve_outputs",
           "kserve_request", "latency_stats", "load_json", "load_test", "machine_info", "open_backend", "pick_warning",
           "plot",
           "sample_png", "save_json", "server_payloads", "triton_payloads"]
