"""``fine-infer bench``: latency and throughput per graph, backend and batch size, or of a running server.

    result = bench_bundle("bundle/")               # every graph × backend × batch size
    print(format_table(result)); save_json(result, "bench.json"); plot(result, "bench.png")
    lines, regressions = compare(result, load_json("old.json"), max_regression=0.10)
    result = bench_server("http://127.0.0.1:8080", concurrency=(1, 8, 32))

Each cell gets warm-up runs, then timed runs until both a minimum count and a minimum time are reached (bounded by
a maximum count and time); it reports p50/p90/p99 latency, ms per item and items/s. The result records the machine
(CPU/GPU model, cores, thread settings) and library versions, so two results can be compared fairly. Backends that
cannot run here (no PyTorch, a user-module bundle, the Triton kernels without a CUDA GPU, TensorRT) are skipped
with the reason recorded.

On the CPU every deployable path gets a row (:data:`fine_infer.tune.CPU_PATHS`): ``onnxruntime`` (fp32),
``onnxruntime/int8``, ``onnxruntime/cpu-opt``, ``openvino`` (f32) and ``openvino/bf16``, beside ``torch`` (eager);
a path the bundle lacks (no ``--int8`` at export) or the machine cannot run (no OpenVINO, no bf16) is skipped with
the reason. Each CPU path row carries its precision gate's status, and the result names the path
``backend="auto"`` picks (``result["auto"]``), marked ``*`` in the table.
"""

from __future__ import annotations

import base64
import datetime as _dt
import http.client
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from fine_infer.errors import ConfigError, FineInferError

RESULT_KIND = "fine-infer-bench"
RESULT_VERSION = 1
BACKENDS = ("torch", "onnxruntime", "onnxruntime/int8", "onnxruntime/cpu-opt", "openvino", "openvino/bf16",
            "torch+kernels", "tensorrt")
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
DEFAULT_CONCURRENCY = (1, 8, 32)
QUERY_TEXT = "a red striped dress with long sleeves"


def _median_ms(fn: Callable[[], object], repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms over ``repeats`` calls after ``warmup`` calls (used by the demo)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Budget:
    """How long one cell (graph × backend × batch) is timed: stop at ``max_runs`` or ``max_time_s`` (after at
    least 3 runs), or once both ``min_runs`` and ``min_time_s`` are reached."""

    warmup_runs: int = 3
    min_runs: int = 10
    min_time_s: float = 0.5
    max_runs: int = 200
    max_time_s: float = 5.0

    def done(self, runs: int, elapsed: float) -> bool:
        """Whether timing may stop after ``runs`` runs and ``elapsed`` seconds."""
        return (runs >= self.max_runs or (elapsed >= self.max_time_s and runs >= 3)
                or (runs >= self.min_runs and elapsed >= self.min_time_s))


QUICK = Budget(warmup_runs=2, min_runs=5, min_time_s=0.1, max_runs=50, max_time_s=1.0)


# --- machine -------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU and GPU model, core counts, thread settings and library versions of this machine."""
    from importlib import metadata

    from fine_infer.bundle import tool_versions
    from fine_infer.tune import cpu_signature

    signature = cpu_signature()
    versions = tool_versions()
    for pkg in ("openvino", "fastapi", "starlette", "uvicorn", "pydantic", "httptools", "uvloop"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    info: dict[str, Any] = {
        "cpu": signature["cpu"],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": signature["cores"],
        "gpu": None,
        "platform": platform.platform(),
        "threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "versions": versions,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if "torch" in sys.modules:  # never import torch just to describe the machine (the runtime extra has none)
        torch = sys.modules["torch"]
        info["threads"]["torch_intra_op"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def latency_stats(times_s: Sequence[float], batch: int) -> dict[str, float]:
    """p50/p90/p99/mean latency (ms), ms per item and items/s of runs of ``batch`` items each."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(t.mean())
    return {"runs": int(t.size), "p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)),
            "p99_ms": float(np.percentile(t, 99)), "mean_ms": mean, "ms_per_item": mean / batch,
            "items_per_s": batch * 1e3 / mean}


# --- progress ------------------------------------------------------------------------------------------------------
class _Progress:
    """tqdm on stderr when installed, else one rewritten stderr line; silent when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.enabled, self.total, self.n, self.desc = enabled, total, 0, desc
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str) -> None:
        """One more cell done; ``label`` names the next."""
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\r{self.desc} {self.n}/{self.total} {label:<40}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Remove the bar (or end the line)."""
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# --- runtime benchmark ---------------------------------------------------------------------------------------------
def open_backend(
    bundle: str | Path, backend: str, threads: int | None = None, capabilities: Iterable[str] | None = None
) -> tuple[Any | None, str | None]:
    """A session for ``backend`` (a bench row name), or ``(None, reason)`` when it cannot run here.

    ``capabilities`` stands in for the CPU's OpenVINO ``OPTIMIZATION_CAPABILITIES`` (whether bf16 is offered)."""
    import fine_infer
    from fine_infer.runtime import BACKENDS as RUNTIME_BACKENDS
    from fine_infer.tune import CPU_PATHS, CpuPath, path_unavailable

    try:
        if backend == "onnxruntime":
            return fine_infer.load(bundle, backend="onnxruntime", threads=threads, verify=False), None
        if backend in {p.label for p in CPU_PATHS}:
            from fine_infer.bundle import read_manifest

            path = CpuPath.parse(backend)
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
            if "tensorrt" not in RUNTIME_BACKENDS:
                return None, "this fine-infer has no TensorRT runner yet"
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
    from fine_infer.bundle import read_bundle
    from fine_infer.runtime.batcher import example_feeds
    from fine_infer.tune import CPU_PATHS, CpuPath, gate_status

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
    bar = _Progress(len(sessions) * len(names) * len(batch_sizes), progress, "bench")
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
                        times = _time_cell(lambda: session.run(g, feeds), budget)
                    except Exception as exc:  # noqa: BLE001 - e.g. the torch backend cannot run this graph
                        result["skipped"].append({"backend": backend, "graph": g, "batch": b,
                                                  "reason": f"{type(exc).__name__}: {exc}"})
                        continue
                    row = {"mode": "runtime", "graph": g, "task": spec.task, "backend": backend,
                           "provider": session.providers.get(g, ""), "batch": b, **latency_stats(times, b)}
                    if backend in cpu_labels:
                        row["gate"] = gate_status(m, CpuPath.parse(backend))[0]
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


def _time_cell(fn: Callable[[], object], budget: Budget) -> list[float]:
    for _ in range(budget.warmup_runs):
        fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while not budget.done(len(times), time.perf_counter() - t_start):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# --- server load test ----------------------------------------------------------------------------------------------
def _sample_png(size: int = 96, seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def server_payloads(info: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per workload name, ``(path, JSON body)`` of one single-item request the server's bundle can answer."""
    tasks = set(info.get("tasks", ()))
    image = base64.b64encode(_sample_png()).decode()
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    if "embed_text" in tasks:
        out["embed_text"] = ("/v1/embed", {"texts": [QUERY_TEXT]})
    if "embed_image" in tasks:
        out["embed_image"] = ("/v1/embed", {"images": [image]})
    if "compose" in tasks:
        out["compose"] = ("/v1/embed", {"images": [image], "texts": [QUERY_TEXT]})
    if "classify" in tasks:
        out["classify"] = ("/v1/classify", {"images": [image]})
    if info.get("index"):
        if "embed_text" in tasks:
            out["search_text"] = ("/v1/search", {"text": QUERY_TEXT, "k": 10})
        elif "compose" in tasks:
            out["search_compose"] = ("/v1/search", {"text": QUERY_TEXT, "image": image, "k": 10})
        elif "embed_image" in tasks:
            out["search_image"] = ("/v1/search", {"image": image, "k": 10})
    return out


class _Client:
    """One keep-alive HTTP/1.1 connection (http.client: far cheaper per request than a full-featured client,
    which matters when the load generator shares the CPU with the server)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise ConfigError(f"--serve takes an http(s):// URL, got {url!r}")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=timeout)
        self.prefix = u.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on the kept-alive connection: (status, body)."""
        self.conn.request(method, self.prefix + path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def load_test(
    url: str,
    path: str,
    body: dict[str, Any],
    concurrency: int,
    *,
    requests: int = 400,
    max_time_s: float = 10.0,
    warmup: int = 2,
    api_key: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """``concurrency`` clients in a closed loop sending ``body`` to ``path`` until ``requests`` are answered or
    ``max_time_s`` passes; latency percentiles, requests/s and the error count."""
    payload = json.dumps(body).encode()
    lock = threading.Lock()
    times: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    start = threading.Event()
    deadline = [0.0]

    def take() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.perf_counter() > deadline[0]:
                return False
            issued += 1
            return True

    def worker() -> None:
        client = _Client(url, api_key, timeout)
        try:
            for _ in range(warmup):
                client.request("POST", path, payload)
            start.wait()
            while take():
                t0 = time.perf_counter()
                try:
                    status, _ = client.request("POST", path, payload)
                except (OSError, http.client.HTTPException) as exc:
                    status = type(exc).__name__
                    client.close()
                    client = _Client(url, api_key, timeout)
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        times.append(dt)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    t_start = time.perf_counter()
    deadline[0] = t_start + max_time_s
    start.set()
    for t in threads:
        t.join(max_time_s + timeout + 5)
    wall = time.perf_counter() - t_start
    if not times:
        raise FineInferError(f"no request to {url}{path} succeeded (errors: {errors or 'none'})")
    stats = latency_stats(times, 1)
    stats["items_per_s"] = len(times) / wall  # closed loop: throughput is answered requests over wall time
    stats["ms_per_item"] = 1e3 / stats["items_per_s"]
    stats["errors"] = sum(errors.values())
    stats["error_statuses"] = errors
    return stats


def bench_server(
    url: str,
    *,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    workloads: Sequence[str] | None = None,
    requests: int = 400,
    max_time_s: float = 10.0,
    api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load-test a running ``fine-infer serve``: per workload and concurrency, latency percentiles and requests/s."""
    client = _Client(url, api_key, 10.0)
    try:
        status, raw = client.request("GET", "/v1/info")
    except OSError as exc:
        raise FineInferError(f"cannot reach {url}: {exc}") from None
    finally:
        client.close()
    if status != 200:
        raise FineInferError(f"{url}/v1/info answered {status}: {raw[:200]!r}")
    info = json.loads(raw)
    payloads = server_payloads(info)
    names = list(workloads or payloads)
    unknown = [w for w in names if w not in payloads]
    if unknown:
        raise ConfigError(f"workload(s) {', '.join(unknown)} not served here; this server offers {', '.join(payloads)}")
    result: dict[str, Any] = {"kind": RESULT_KIND, "version": RESULT_VERSION, "mode": "serve", "url": url,
                              "arch": info.get("arch"), "server": info, "rows": [], "skipped": []}
    bar = _Progress(len(names) * len(concurrency), progress, "load test")
    try:
        for w in names:
            path, body = payloads[w]
            for c in concurrency:
                bar.update(f"{w} × {c} clients")
                stats = load_test(url, path, body, c, requests=requests, max_time_s=max_time_s, api_key=api_key)
                result["rows"].append({"mode": "serve", "graph": w, "task": path, "backend": "http", "batch": c,
                                       "concurrency": c, **stats})
    finally:
        bar.close()
    result["machine"] = machine_info()
    return result


# --- output --------------------------------------------------------------------------------------------------------
def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the result rows, with the machine and the skipped backends."""
    serve = result.get("mode") == "serve"
    col = "clients" if serve else "batch"
    unit = "req/s" if serve else "items/s"
    auto = (result.get("auto") or {}).get("label")
    head = (f"{'graph':<14} {'backend':<21} {col:>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'ms/item':>9} "
            f"{unit:>10}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        name = r["backend"] + ("*" if r["backend"] == auto else "")
        lines.append(f"{r['graph']:<14} {name:<21} {r['batch']:>7} {r['p50_ms']:>9.3f} {r['p90_ms']:>9.3f} "
                     f"{r['p99_ms']:>9.3f} {r['ms_per_item']:>9.3f} {r['items_per_s']:>10.1f}"
                     + (f"  ({r['errors']} errors)" if r.get("errors") else "")
                     + (f"  gate {r['gate']}" if r.get("gate") not in (None, "passed") else ""))
    for s in result.get("skipped", []):
        where = " ".join(str(s[k]) for k in ("graph", "batch") if k in s)
        lines.append(f"skipped {s['backend']}{' ' + where if where else ''}: {s['reason']}")
    if auto:
        lines.append(f"* auto picks {auto} on this machine: {result['auto'].get('reason', '')}")
    mach = result.get("machine") or {}
    if mach:
        v = mach.get("versions", {})
        lines.append(f"machine: {mach.get('cpu')} ({mach.get('cpu_affinity')} cores), GPU {mach.get('gpu') or 'none'}; "
                     + ", ".join(f"{k} {v[k]}" for k in ("python", "onnxruntime", "openvino", "torch", "numpy")
                                 if k in v))
        if mach.get("threads"):
            lines.append("threads: " + ", ".join(f"{k} {t}" for k, t in mach["threads"].items()))
    return "\n".join(lines)


def save_json(result: dict[str, Any], path: str | Path) -> None:
    """Write a result as indented JSON."""
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a result written by :func:`save_json`; a file that is not one is a :class:`ConfigError`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read bench result {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != RESULT_KIND or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{path} is not a fine-infer bench result (write one with `fine-infer bench --json`)")
    return data


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("mode", "runtime"), r["graph"], r["backend"], int(r["batch"]))


def compare(new: dict[str, Any], old: dict[str, Any], max_regression: float = 0.10) -> tuple[list[str], list[dict]]:
    """Per row present in both: new/old p50 latency and throughput. A row regresses when its p50 latency grew by
    more than ``max_regression`` (0.10 = 10%). Returns printable lines and the regressed rows."""
    if max_regression < 0:
        raise ConfigError(f"max_regression must be >= 0, got {max_regression}")
    old_rows = {_key(r): r for r in old["rows"]}
    lines = [f"{'graph':<14} {'backend':<21} {'batch':>6} {'p50 old':>9} {'p50 new':>9} {'latency':>8} "
             f"{'throughput':>10}"]
    regressions: list[dict] = []
    seen = set()
    for r in new["rows"]:
        k = _key(r)
        o = old_rows.get(k)
        if o is None:
            lines.append(f"{r['graph']:<14} {r['backend']:<21} {r['batch']:>6}  (new row, not in the old result)")
            continue
        seen.add(k)
        lat = r["p50_ms"] / o["p50_ms"]
        tput = r["items_per_s"] / o["items_per_s"]
        bad = lat > 1 + max_regression
        if bad:
            regressions.append({"key": list(k), "latency_ratio": lat, "throughput_ratio": tput})
        lines.append(f"{r['graph']:<14} {r['backend']:<21} {r['batch']:>6} {o['p50_ms']:>9.3f} {r['p50_ms']:>9.3f} "
                     f"{lat:>7.2f}× {tput:>9.2f}×" + ("  REGRESSION" if bad else ""))
    for k in old_rows.keys() - seen:
        lines.append(f"{k[1]:<14} {k[2]:<21} {k[3]:>6}  (missing from the new result)")
    a, b = (new.get("machine") or {}).get("cpu"), (old.get("machine") or {}).get("cpu")
    if a and b and a != b:
        lines.append(f"note: different machines ({b} → {a}); ratios compare hardware too")
    lines.append(f"{len(regressions)} regression(s) past {max_regression:.0%} in p50 latency")
    return lines, regressions


def plot(result: dict[str, Any], path: str | Path) -> None:
    """A PNG: per graph, p50 latency (with the p90-p99 band) and throughput against batch size (or clients),
    one line per backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if not rows:
        raise ConfigError("nothing to plot: the result has no rows")
    graphs = list(dict.fromkeys(r["graph"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    serve = result.get("mode") == "serve"
    xlabel = "concurrent clients" if serve else "batch size"
    fig, axes = plt.subplots(len(graphs), 2, figsize=(11, 3.6 * len(graphs)), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for gi, g in enumerate(graphs):
        ax_l, ax_t = axes[gi]
        for bi, be in enumerate(backends):
            rs = sorted((r for r in rows if r["graph"] == g and r["backend"] == be), key=lambda r: r["batch"])
            if not rs:
                continue
            x = [r["batch"] for r in rs]
            c = colors[bi % len(colors)]
            ax_l.plot(x, [r["p50_ms"] for r in rs], "o-", color=c)
            ax_l.fill_between(x, [r["p90_ms"] for r in rs], [r["p99_ms"] for r in rs], color=c, alpha=0.15)
            ax_t.plot(x, [r["items_per_s"] for r in rs], "o-", color=c, label=be)
        for ax, ylabel, title in ((ax_l, "latency (ms, log)", "p50 latency, band p90–p99"),
                                  (ax_t, "requests/s" if serve else "items/s", "throughput")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["batch"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{g}: {title}")
            ax.grid(True, which="both", alpha=0.3)
        # One legend per row, on the throughput panel (same colours on both; its top left stays free as the
        # lines rise to the right): on the latency panel it hid the batch-1 points.
        ax_t.legend(fontsize=8, loc="upper left")
        ax_l.set_yscale("log")
        # Plain numbers on the log axis (1, 2, 5, 10, ...), not 2×10⁻¹.
        ax_l.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_l.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax_t.set_ylim(bottom=0)
    mach = result.get("machine") or {}
    fig.suptitle(f"fine-infer bench: {result.get('arch')} — {mach.get('cpu', '')} ({mach.get('cpu_affinity')} cores)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def iter_rows(result: dict[str, Any], **match: Any) -> Iterable[dict[str, Any]]:
    """Rows of a result whose fields equal ``match`` (e.g. ``graph="text", backend="onnxruntime"``)."""
    return (r for r in result["rows"] if all(r.get(k) == v for k, v in match.items()))
