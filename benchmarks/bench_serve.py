"""Serving benchmarks (pytest-benchmark): what batching buys, and what the HTTP layer costs.

    pytest benchmarks/bench_serve.py -s              # the summary is printed at the end

1. In process, 32 threads: the dynamic batcher vs unbatched concurrent ``session.run`` calls, for a tiny text
   encoder (ids + mask, batching should pay) and a ViT-S-like compute-bound encoder (it must not lose).
2. Over HTTP, 32 concurrent clients: ``fine-infer serve`` (a subprocess) with its calibrated batch size vs
   ``--max-batch-size 1``; and the same queries made in this process on Session + Index directly, to show what the
   HTTP layer costs. The load generator shares the 2-core CPU with the server: the figures are a floor.
"""

import os
import signal
import statistics
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

import fine_infer  # noqa: E402
from fine_infer import bench  # noqa: E402
from fine_infer.export import export_module, parse_dynamic_axes  # noqa: E402
from fine_infer.runtime.batcher import DynamicBatcher  # noqa: E402

CLIENTS = 32
PER_CLIENT = 200  # in-process requests per thread (bounded)
HTTP_REQUESTS = 1500
HTTP_MAX_S = 20.0
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
_summary: dict[str, float] = {}


class _ViTLike(torch.nn.Module):
    """ViT-S/16-shaped blocks (d 384, 6 heads, FF 1536, 197 tokens), 4 of them: a compute-bound encoder."""

    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(384, 6, 1536, batch_first=True, norm_first=True, dropout=0.0)
        self.blocks = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)

    def forward(self, tokens):
        return torch.nn.functional.normalize(self.blocks(tokens).mean(1), dim=-1)


@pytest.fixture(scope="module")
def text_session(tmp_path_factory):
    """A tiny text encoder (ids + mask, d 256): ~0.2 ms/item at batch 1 and ~0.08 at batch 32 on this CPU, the
    profile of the zoo's tiny text towers."""
    sys.path.insert(0, str(FIXTURES))
    from user_encoder import TinyTextEncoder

    torch.manual_seed(0)
    model = TinyTextEncoder(vocab=1000, dim=256, heads=4).eval()
    example = {"ids": torch.randint(1, 1000, (2, 12)), "mask": torch.ones(2, 12, dtype=torch.int64)}
    out = tmp_path_factory.mktemp("bs") / "text"
    export_module(model, example, out, dynamic_axes=parse_dynamic_axes(["ids:1", "mask:1"]), batch_sizes=(2,))
    return fine_infer.load(out)


@pytest.fixture(scope="module")
def vit_session(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("bs") / "vit"
    export_module(_ViTLike().eval(), {"tokens": torch.randn(2, 197, 384)}, out, batch_sizes=(2,))
    return fine_infer.load(out)


def _closed_loop(call, clients=CLIENTS, per_client=PER_CLIENT):
    """``clients`` threads each making ``per_client`` calls back to back; the wall time in seconds."""
    barrier = threading.Barrier(clients + 1)
    errors = []

    def worker(i):
        barrier.wait()
        try:
            for j in range(per_client):
                call(i, j)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _batched_vs_unbatched(benchmark, session, graph, make_feeds, per_client, rounds, name, budget_s=5.0):
    """Rounds of 32 threads through the calibrated batcher (benchmarked), each preceded by the same load as
    unbatched concurrent calls (``max_batch_size=1``: a direct ``session.run`` per request). Interleaving the two
    keeps a noisy neighbour on the shared CPU from favouring either."""
    feeds = make_feeds()
    batched = DynamicBatcher(session, max_delay_ms=2)
    cal = batched.calibrate(graph, budget_s=budget_s)
    direct = DynamicBatcher(session, max_batch_size=1)
    unbatched_s = []

    def call_with(b):
        return lambda i, j: b.run(graph, feeds[(i * 7 + j) % len(feeds)], timeout=120)

    def setup():
        unbatched_s.append(_closed_loop(call_with(direct), per_client=per_client))

    benchmark.pedantic(lambda: _closed_loop(call_with(batched), per_client=per_client), setup=setup, rounds=rounds,
                       iterations=1)
    batched.close()
    n = CLIENTS * per_client
    b_rps, u_rps = n / benchmark.stats.stats.median, n / statistics.median(unbatched_s)
    benchmark.extra_info.update({"calibration": cal.to_dict(), "batched_req_per_s": b_rps,
                                 "unbatched_req_per_s": u_rps, "ratio": b_rps / u_rps})
    _summary[f"{name}: per-item ms by batch size"] = {k: round(v, 3) for k, v in cal.per_item_ms.items()}
    _summary[f"{name}: calibrated max_batch_size"] = cal.max_batch_size
    _summary[f"{name}: unbatched req/s (32 threads)"] = u_rps
    _summary[f"{name}: batched req/s (32 threads)"] = b_rps
    _summary[f"{name}: batched / unbatched"] = b_rps / u_rps


def test_inprocess_text_encoder(benchmark, text_session):
    def make():
        rng = np.random.default_rng(0)
        out = []
        for _ in range(64):
            n = int(rng.integers(4, 17))
            out.append({"ids": rng.integers(1, 1000, (1, n)), "mask": np.ones((1, n), np.int64)})
        return out

    _batched_vs_unbatched(benchmark, text_session, "model", make, PER_CLIENT, 5, "text encoder")


def test_inprocess_compute_bound(benchmark, vit_session):
    def make():
        return [{"tokens": np.random.default_rng(i).standard_normal((1, 197, 384)).astype(np.float32)}
                for i in range(4)]

    _batched_vs_unbatched(benchmark, vit_session, "model", make, 3, 3, "ViT-S-like", budget_s=15.0)


# --- over HTTP ---------------------------------------------------------------------------------------------------
def _serve_bundle(tmp_path_factory):
    """fashion-fine (text graph) when the zoo has it, else maaf (compose: image + text)."""
    from fine_infer.export import export_model
    from fine_infer.models import _registry

    import importlib

    for arch in ("fashion-fine", "maaf"):
        try:
            importlib.import_module("fine_infer.models." + arch.replace("-", "_"))
        except ImportError:
            continue
        entry = _registry._REGISTRY[arch]
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp("http") / arch
        export_model(entry.model_cls(entry.presets["tiny"]()).eval(), out, preset="tiny", force=True)
        return arch, out
    pytest.skip("neither fashion-fine nor maaf is in the zoo")


@pytest.fixture(scope="module")
def http_bundle(tmp_path_factory):
    return _serve_bundle(tmp_path_factory)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(bundle, extra):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "fine_infer.cli_serve", "serve", str(bundle), "--port", str(port),
                             "--log-level", "warning", *extra], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode())
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_http_throughput(benchmark, http_bundle):
    """Both servers run at once (an idle one costs nothing); their load rounds alternate, so a noisy neighbour on
    the shared CPU does not favour either. Medians over the rounds."""
    arch, bundle = http_bundle
    servers = {mode: _start_server(bundle, extra) for mode, extra in
               (("max-batch-size-1", ["--max-batch-size", "1"]), ("batched", []))}
    try:
        info = bench.bench_server(servers["batched"][1], concurrency=(1,), requests=10, progress=False)["server"]
        workload = "embed_text" if "embed_text" in info["tasks"] else "compose"
        path, body = bench.server_payloads(info)[workload]
        runs: dict[str, list] = {m: [] for m in servers}
        ones: dict[str, list] = {m: [] for m in servers}

        def load(mode):
            runs[mode].append(bench.load_test(servers[mode][1], path, body, CLIENTS, requests=HTTP_REQUESTS,
                                              max_time_s=HTTP_MAX_S))

        benchmark.pedantic(lambda: load("batched"), setup=lambda: load("max-batch-size-1"), rounds=3, iterations=1)
        for _ in range(2):
            for mode in servers:
                ones[mode].append(bench.load_test(servers[mode][1], path, body, 1, requests=300,
                                                  max_time_s=HTTP_MAX_S))
    finally:
        for proc, _ in servers.values():
            _stop(proc)

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    for mode in servers:
        assert all(r["errors"] == 0 for r in runs[mode])
        tag = f"http {arch} {workload} {mode}"
        _summary[f"{tag} req/s (32 clients)"] = med(runs[mode], "items_per_s")
        _summary[f"{tag} p50/p99 ms (32 clients)"] = (round(med(runs[mode], "p50_ms"), 2),
                                                      round(med(runs[mode], "p99_ms"), 2))
        _summary[f"{tag} p50/p99 ms (1 client)"] = (round(med(ones[mode], "p50_ms"), 3),
                                                    round(med(ones[mode], "p99_ms"), 3))
        _summary[f"{tag} req/s (1 client)"] = med(ones[mode], "items_per_s")
    ratio = med(runs["batched"], "items_per_s") / med(runs["max-batch-size-1"], "items_per_s")
    _summary[f"http {arch} {workload}: batched / max-batch-size-1 (32 clients)"] = ratio
    benchmark.extra_info.update({"ratio": ratio, "server_batch_sizes": {g: v["max_batch_size"]
                                                                        for g, v in info["graphs"].items()}})


def test_direct_session_calls(benchmark, http_bundle):
    """The same query without HTTP: decode + preprocess + tokenize + run (+ search when an index exists), in this
    process — sequential, and 32 threads through the batcher."""
    arch, bundle = http_bundle
    session = fine_infer.load(bundle)
    png = bench._sample_png()
    text = bench.QUERY_TEXT
    index = None
    try:
        from fine_infer.index import Index

        index = Index(session.manifest.embed_dim)
        g = session.embed_images([bench._sample_png(seed=i) for i in range(64)]) if session.manifest.image else None
        if g is not None:
            index.add(g, list(range(64)))
    except ImportError:
        pass
    tasks = {g.spec.task for g in session.manifest.graphs.values()}

    def query():
        if "embed_text" in tasks:
            q = session.embed_texts([text])
        else:
            q = session.compose([png], [text])
        if index is not None and len(index):
            index.search(q, 10)
        return q

    for _ in range(5):
        query()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        query()
    seq = n / (time.perf_counter() - t0)
    _summary[f"direct {arch} sequential req/s"] = seq
    _summary[f"direct {arch} sequential ms/query"] = 1e3 / seq

    b = DynamicBatcher(session, max_delay_ms=2)
    b.calibrate_all()
    if "embed_text" in tasks:
        graph = session.bundle.graph_for_task("embed_text").spec.name

        def call(i, j):
            ids, mask = session.tokenize([text])
            b.run(graph, {"input_ids": ids, "attention_mask": mask}, timeout=60)
    else:
        graph = session.bundle.graph_for_task("compose").spec.name

        def call(i, j):
            ids, mask = session.tokenize([text])
            b.run(graph, {"pixels": session.preprocess_images([png]), "input_ids": ids, "attention_mask": mask},
                  timeout=60)

    benchmark.pedantic(lambda: _closed_loop(call), rounds=1, iterations=1)
    _summary[f"direct {arch} batcher 32 threads req/s"] = CLIENTS * PER_CLIENT / benchmark.stats.stats.median
    b.close()


def test_print_summary():
    print("\nserving benchmark summary")
    for k, v in _summary.items():
        print(f"  {k:<62} {v if isinstance(v, (tuple, dict, int)) else round(v, 3)}")
