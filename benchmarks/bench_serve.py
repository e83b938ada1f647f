"""Serving benchmarks (pytest-benchmark): what batching buys, and what the HTTP layer costs.

    pytest benchmarks/bench_serve.py -s              # the summary is printed at the end

1. In process, 32 threads: the dynamic batcher vs unbatched concurrent ``session.run`` calls, for a tiny text
   encoder (ids + mask, batching should pay) and a ViT-S-like compute-bound encoder (it must not lose).
2. Over HTTP, 32 concurrent clients: ``fine-infer serve`` (a subprocess) with its calibrated batch size vs
   ``--max-batch-size 1``; and the same queries made in this process on Session + Index directly, to show what the
   HTTP layer costs. The load generator shares the 2-core CPU with the server: the figures are a floor.
3. Text search over HTTP (``POST /v1/search``, a 10k-item index): the batched server, the ``--max-batch-size 1``
   server and 32 threads of this process calling ``Session`` + ``Index`` directly, rounds interleaved.

Every comparison interleaves its sides round by round and reports medians, with the load average (other jobs
share this machine's two cores).
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
from fine_infer.tools import bench  # noqa: E402
from fine_infer.export import export_module, parse_dynamic_axes  # noqa: E402
from fine_infer.batching import BatchSettings, DynamicBatcher  # noqa: E402

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
    """A tiny text encoder (ids + mask, d 256), overhead-bound like the zoo's tiny text towers: per item it gets
    cheaper as the batch grows (figures: benchmarks/RESULTS.md, Serving)."""
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


def _load_avg():
    return tuple(round(x, 2) for x in os.getloadavg())


def _jiffies(pid="self"):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (OSError, IndexError, ValueError):
        return 0


class _OtherJobs:
    """CPU used by other processes while a test runs, in cores: the machine's busy time (/proc/stat) less this
    process's and its servers'. (The load average counts this suite's own 32 client threads too.)"""

    def __init__(self):
        self.pids = []
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), 0
        self.own0 = self._own()

    @staticmethod
    def _busy():
        try:
            v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except (OSError, ValueError):
            return 0
        return sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait

    def _own(self):
        return _jiffies() + sum(_jiffies(p) for p in self.pids)

    def add(self, pid):
        self.own0 += _jiffies(pid)  # a server started after the first reading: count its CPU from now on
        self.pids.append(pid)

    def cores(self):
        hz = os.sysconf("SC_CLK_TCK")
        dt = time.monotonic() - self.t0
        return round(max(0.0, (self._busy() - self.busy0) - (self._own() - self.own0)) / hz / max(dt, 1e-9), 2)


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


def _batched_vs_unbatched(benchmark, session, graph, make_feeds, per_client, rounds, name, budget_s=5.0,
                          single_thread=None):
    """Rounds of 32 threads through the calibrated batcher (benchmarked), each preceded by the same load as
    unbatched concurrent calls (``max_batch_size=1``: a direct ``session.run`` per request). Interleaving the two
    keeps a noisy neighbour on the shared CPU from favouring either."""
    feeds = make_feeds()
    load_avg = [_load_avg()]
    others = _OtherJobs()
    batched = DynamicBatcher(session, BatchSettings(max_delay_ms=2))
    cal = batched.calibrate(graph, budget_s=budget_s)
    direct = DynamicBatcher(session, BatchSettings(max_batch_size=1))
    unbatched_s = []
    # For reference only: the same unbatched calls on a session loaded with one intra-op thread (32 concurrent
    # single-threaded runs), the other way to keep two cores busy.
    single = DynamicBatcher(single_thread, BatchSettings(max_batch_size=1)) if single_thread is not None else None
    single_s = []

    def call_with(b):
        return lambda i, j: b.run(graph, feeds[(i * 7 + j) % len(feeds)], timeout=120)

    def setup():
        load_avg.append(_load_avg())
        unbatched_s.append(_closed_loop(call_with(direct), per_client=per_client))
        if single is not None:
            single_s.append(_closed_loop(call_with(single), per_client=per_client))

    benchmark.pedantic(lambda: _closed_loop(call_with(batched), per_client=per_client), setup=setup, rounds=rounds,
                       iterations=1)
    batched.close()
    n = CLIENTS * per_client
    b_rps, u_rps = n / benchmark.stats.stats.median, n / statistics.median(unbatched_s)
    benchmark.extra_info.update({"calibration": cal.to_dict(), "batched_req_per_s": b_rps,
                                 "unbatched_req_per_s": u_rps, "ratio": b_rps / u_rps})
    _summary[f"{name}: per-item ms by batch size"] = {k: round(v, 3) for k, v in cal.per_item_ms.items()}
    _summary[f"{name}: lanes x threads=1, per-item ms by batch size"] = {k: round(v, 3)
                                                                      for k, v in cal.lane_per_item_ms.items()}
    _summary[f"{name}: calibrated lanes, max_batch_size"] = (cal.lanes, cal.max_batch_size)
    _summary[f"{name}: unbatched req/s (32 threads)"] = u_rps
    _summary[f"{name}: batched req/s (32 threads)"] = b_rps
    _summary[f"{name}: batched / unbatched"] = b_rps / u_rps
    _summary[f"{name}: rounds (unbatched, batched req/s)"] = tuple(
        (round(n / u), round(n / b)) for u, b in zip(unbatched_s, benchmark.stats.stats.data))
    _summary[f"{name}: load average"] = tuple(load_avg + [_load_avg()])
    _summary[f"{name}: other jobs' CPU (cores)"] = others.cores()
    if single_s:
        _summary[f"{name}: unbatched req/s, threads=1 session (reference)"] = n / statistics.median(single_s)
        _summary[f"{name}: batched / unbatched threads=1"] = b_rps * statistics.median(single_s) / n


def test_inprocess_text_encoder(benchmark, text_session):
    def make():
        rng = np.random.default_rng(0)
        out = []
        for _ in range(64):
            n = int(rng.integers(4, 17))
            out.append({"ids": rng.integers(1, 1000, (1, n)), "mask": np.ones((1, n), np.int64)})
        return out

    single = fine_infer.load(text_session.bundle.path, threads=1)
    _batched_vs_unbatched(benchmark, text_session, "model", make, PER_CLIENT, 5, "text encoder", single_thread=single)


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
    proc = subprocess.Popen([sys.executable, "-m", "fine_infer.cli", "serve", str(bundle), "--port", str(port),
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
    load_avg = [_load_avg()]
    others = _OtherJobs()
    for proc, _ in servers.values():
        others.add(proc.pid)
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
        load_avg.append(_load_avg())
        other_cores = others.cores()
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
    _summary[f"http {arch} {workload}: load average, other jobs' CPU (cores)"] = (tuple(load_avg), other_cores)
    _summary[f"http {arch} {workload} rounds (max-batch-size-1, batched req/s)"] = tuple(
        (round(u["items_per_s"]), round(b["items_per_s"])) for u, b in zip(runs["max-batch-size-1"], runs["batched"]))
    _summary[f"http {arch} {workload}: batched / max-batch-size-1 (32 clients)"] = ratio
    _summary[f"http {arch} {workload}: batched server's (lanes, max_batch_size) per graph"] = {
        g: (v.get("lanes", 1), v["max_batch_size"]) for g, v in info["graphs"].items()}
    benchmark.extra_info.update({"ratio": ratio, "server_batch_sizes": {g: v["max_batch_size"]
                                                                        for g, v in info["graphs"].items()}})


SEARCH_GALLERY = 10_000
SEARCH_ROUNDS = 5


def _gallery(dim, path):
    """A generated catalogue: 10k random unit vectors with a little metadata each, saved to ``path``."""
    from fine_infer.index import Index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((SEARCH_GALLERY, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    colours, kinds = ("red", "blue", "black", "white"), ("dress", "shirt", "bag", "coat", "skirt")
    index = Index(dim)
    index.add(x, np.arange(SEARCH_GALLERY) + 10_000, metadata=[
        {"sku": f"SKU-{i:05d}", "title": f"{colours[i % 4]} {kinds[i % 5]}", "price": round(10 + i % 90 * 1.5, 2)}
        for i in range(SEARCH_GALLERY)])
    index.save(path)
    return Index.load(path)


def test_http_search(benchmark, http_bundle, tmp_path):
    """Text search over HTTP (32 clients, ``POST /v1/search {"text", "k": 10}``, 10k-item index) against the same
    queries made in this process by 32 threads calling ``Session`` + ``Index`` directly (embed, search, read each
    hit's metadata: what the server answers). Three sides, their rounds interleaved: the in-process calls, the
    server with batching (calibrated), the server with ``--max-batch-size 1``. Medians over the rounds."""
    pytest.importorskip("fine_infer.index")
    arch, bundle = http_bundle
    session = fine_infer.load(bundle)
    tasks = {g.spec.task for g in session.manifest.graphs.values()}
    if "embed_text" not in tasks:
        pytest.skip(f"{arch} has no text-only graph")
    index = _gallery(session.manifest.embed_dim, tmp_path / "gallery.idx")
    text = bench.QUERY_TEXT

    def direct(i, j):
        q = session.embed_texts([text])
        scores, ids = index.search(q, 10)
        return [index.get_metadata(int(h)) for h in ids[0]]

    for _ in range(20):
        direct(0, 0)
    servers = {mode: _start_server(bundle, ["--index", str(tmp_path / "gallery.idx"), *extra]) for mode, extra in
               (("max-batch-size-1", ["--max-batch-size", "1"]), ("batched", []))}
    load_avg = [_load_avg()]
    others = _OtherJobs()
    for proc, _ in servers.values():
        others.add(proc.pid)
    in_process: list[float] = []
    runs: dict[str, list] = {m: [] for m in servers}
    try:
        body = {"text": text, "k": 10}
        sides = ["in-process", *servers]
        for r in range(SEARCH_ROUNDS):
            for side in sides if r % 2 == 0 else sides[::-1]:  # alternate the order too
                if side == "in-process":
                    in_process.append(CLIENTS * 100 / _closed_loop(direct, per_client=100))
                else:
                    runs[side].append(bench.load_test(servers[side][1], "/v1/search", body, CLIENTS,
                                                      requests=HTTP_REQUESTS, max_time_s=HTTP_MAX_S))
            load_avg.append(_load_avg())
        other_cores = others.cores()
        # The answers are the direct call's (ids, scores and metadata), checked once per server.
        import httpx

        q = session.embed_texts([text])
        want_s, want_i = index.search(q, 10)
        for mode, (_, url) in servers.items():
            hits = httpx.post(url + "/v1/search", json=body, timeout=30).json()["hits"]
            assert [h["id"] for h in hits] == [int(i) for i in want_i[0]]
            np.testing.assert_allclose([h["score"] for h in hits], want_s[0], atol=1e-5)
            assert [h["metadata"] for h in hits] == [index.get_metadata(int(i)) for i in want_i[0]]
    finally:
        for proc, _ in servers.values():
            _stop(proc)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the figures are the interleaved rounds above

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    tag = f"http search {arch} (10k index)"
    _summary[f"{tag}: load average during the rounds"] = tuple(load_avg)
    _summary[f"{tag}: other jobs' CPU (cores)"] = other_cores
    _summary[f"{tag}: in-process Session+Index, 32 threads, req/s"] = statistics.median(in_process)
    _summary[f"{tag}: in-process rounds"] = tuple(round(x) for x in in_process)
    for mode in servers:
        assert all(r["errors"] == 0 for r in runs[mode]), [r["error_statuses"] for r in runs[mode]]
        _summary[f"{tag} {mode} req/s (32 clients)"] = med(runs[mode], "items_per_s")
        _summary[f"{tag} {mode} rounds"] = tuple(round(r["items_per_s"]) for r in runs[mode])
        _summary[f"{tag} {mode} p50/p99 ms (32 clients)"] = (round(med(runs[mode], "p50_ms"), 2),
                                                            round(med(runs[mode], "p99_ms"), 2))
    b, u = med(runs["batched"], "items_per_s"), med(runs["max-batch-size-1"], "items_per_s")
    _summary[f"{tag}: batched / max-batch-size-1"] = b / u
    _summary[f"{tag}: HTTP batched / in-process"] = b / statistics.median(in_process)
    benchmark.extra_info.update({"in_process": in_process, "batched": runs["batched"],
                                 "max_batch_size_1": runs["max-batch-size-1"], "load_avg": load_avg})


def test_direct_session_calls(benchmark, http_bundle):
    """The same query without HTTP: decode + preprocess + tokenize + run (+ search when an index exists), in this
    process — sequential, and 32 threads through the batcher."""
    arch, bundle = http_bundle
    session = fine_infer.load(bundle)
    png = bench.sample_png()
    text = bench.QUERY_TEXT
    index = None
    try:
        from fine_infer.index import Index

        index = Index(session.manifest.embed_dim)
        g = session.embed_images([bench.sample_png(seed=i) for i in range(64)]) if session.manifest.image else None
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

    b = DynamicBatcher(session, BatchSettings(max_delay_ms=2))
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
