"""DynamicBatcher: answers equal to direct calls under concurrency, padding, failure isolation, calibration.

Throughput is measured in ``benchmarks/bench_serve.py``, not here: these tests check behaviour only.
"""

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fine_infer
from fine_infer.errors import BundleError, ConfigError, InputError
from fine_infer.batching import BatchSettings, DynamicBatcher, bench_batch_sizes, pick_batch_size, pick_plan
from fine_infer._cpu import cpu_cores
from fine_infer.runtime.feeds import example_feeds, repeat_rows
from fine_infer.specs import GraphSpec, TensorSpec

WORDS = "red blue black dress shirt bag with stripes dots long short sleeve collar".split()
DEADLINE_S = 60  # every concurrent section is bounded in time


def _export_maaf(out):
    try:
        from fine_infer.export import export_arch

        export_arch("maaf", out, "tiny", force=True)
    except ImportError:  # the registry imports every zoo family; build maaf directly while one is missing
        import torch

        from fine_infer.export import export_model
        from fine_infer.models.maaf import MAAF, tiny_config

        torch.manual_seed(0)
        export_model(MAAF(tiny_config()).eval(), out, preset="tiny", force=True)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("batcher") / "maaf"
    _export_maaf(out)
    return fine_infer.load(out)


def _requests(session, n, seed=0):
    """Compose requests of 1-3 rows with texts of 1-12 words (so sequences differ and get padded)."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(n):
        rows = int(rng.integers(1, 4))
        texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 13)))) for _ in range(rows)]
        ids, mask = session.tokenize(texts)
        px = rng.standard_normal((rows, 3, 64, 64)).astype(np.float32)
        reqs.append({"pixels": px, "input_ids": ids, "attention_mask": mask})
    return reqs


class _Proxy:
    """A session stand-in that records batch sizes and feeds, and can poison or slow runs."""

    def __init__(self, inner, poison=None, delay_s=0.0):
        self.inner, self.poison, self.delay_s = inner, poison, delay_s
        self.manifest, self.bundle, self.backend = inner.manifest, inner.bundle, inner.backend
        self.tokenizer = inner.tokenizer
        self.calls = []
        self.lock = threading.Lock()

    def run(self, graph, feeds):
        with self.lock:
            self.calls.append((threading.get_ident(), {k: v.copy() for k, v in feeds.items()}))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.poison is not None and self.poison(feeds):
            raise RuntimeError("poisoned batch")
        return self.inner.run(graph, feeds)


def test_32_threads_get_their_own_rows_equal_to_direct_calls(session):
    reqs = _requests(session, 96)
    direct = [session.run("compose", r)["embedding"] for r in reqs]
    seen = []
    with DynamicBatcher(session, BatchSettings(max_batch_size=16, max_delay_ms=5),
                        on_batch=lambda g, rows, n, s: seen.append((rows, n))) as b:
        with ThreadPoolExecutor(32) as ex:
            outs = list(ex.map(lambda r: b.run("compose", r, timeout=DEADLINE_S)["embedding"], reqs))
    for d, o, r in zip(direct, outs, reqs):
        assert o.shape == (len(r["pixels"]), 32)
        np.testing.assert_allclose(o, d, atol=1e-5)
    assert sum(n for _, n in seen) == len(reqs)
    assert max(n for _, n in seen) > 1, "concurrent requests were never batched"
    assert max(rows for rows, _ in seen) <= 16  # a batch stops before the request that would overflow it


class _Spans(_Proxy):
    """A proxy that records when each run starts and ends (and in which thread)."""

    def __init__(self, inner, delay_s):
        super().__init__(inner, delay_s=delay_s)
        self.spans = []

    def run(self, graph, feeds):
        t0 = time.perf_counter()
        out = super().run(graph, feeds)
        with self.lock:
            self.spans.append((t0, time.perf_counter(), threading.get_ident()))
        return out


def test_one_batch_in_the_model_at_a_time_from_one_worker(session):
    reqs = _requests(session, 64, seed=5)
    proxy = _Spans(session, delay_s=0.003)
    with DynamicBatcher(proxy, BatchSettings(max_batch_size=8, max_delay_ms=2)) as b:
        with ThreadPoolExecutor(32) as ex:
            outs = list(ex.map(lambda r: b.run("compose", r, timeout=DEADLINE_S), reqs))
    for o, r in zip(outs, reqs):
        np.testing.assert_allclose(o["embedding"], session.run("compose", r)["embedding"], atol=1e-5)
    spans = sorted(proxy.spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "two batches ran in the model at once"
    assert len({t for _, _, t in spans}) == 1 and len(spans) < len(reqs)


def test_outputs_are_each_callers_own_rows(session):
    reqs = _requests(session, 24, seed=6)
    with DynamicBatcher(session, BatchSettings(max_batch_size=32, max_delay_ms=20, adaptive_delay=False)) as b:
        futs = [b.submit("compose", r) for r in reqs]
        outs = [f.result(DEADLINE_S)["embedding"] for f in futs]
    want = [o.copy() for o in outs]
    for o in outs[::2]:
        o[...] = 0.0  # a caller writing to its answer touches no one else's
    for i, (o, w, r) in enumerate(zip(outs, want, reqs)):
        assert o.shape == (len(r["pixels"]), 32)
        if i % 2:
            np.testing.assert_array_equal(o, w)


def test_a_timed_out_caller_and_a_cancelled_async_request_are_skipped(session):
    reqs = _requests(session, 4, seed=7)
    proxy = _Proxy(session, delay_s=0.3)
    with DynamicBatcher(proxy, BatchSettings(max_batch_size=2, max_delay_ms=0)) as b:
        first = b.submit("compose", reqs[0])  # in the model for 0.3 s
        time.sleep(0.05)
        second = b.submit("compose", reqs[1])  # queued behind it
        with pytest.raises(TimeoutError):
            b.run("compose", reqs[2], timeout=0.05)  # given up while queued: never runs

        async def cancelled():
            t = asyncio.ensure_future(b.run_async("compose", reqs[3]))
            await asyncio.sleep(0.01)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t

        asyncio.run(cancelled())
        first.result(DEADLINE_S), second.result(DEADLINE_S)
        time.sleep(0.7)
    ran = [c[1]["pixels"] for c in proxy.calls]
    for r in reqs[2:]:
        assert not any(x.shape == r["pixels"].shape and np.array_equal(x, r["pixels"]) for x in ran)


def test_sequences_are_padded_with_pad_id_and_mask_zero(session):
    proxy = _Proxy(session)
    ids_a, mask_a = session.tokenize(["red dress"])
    ids_b, mask_b = session.tokenize(["a long blue shirt with short sleeves and a collar"])
    assert ids_a.shape[1] < ids_b.shape[1]
    px = np.zeros((1, 3, 64, 64), np.float32)
    with DynamicBatcher(proxy, BatchSettings(max_batch_size=8, max_delay_ms=200, adaptive_delay=False)) as b:
        fa = b.submit("compose", {"pixels": px, "input_ids": ids_a, "attention_mask": mask_a})
        fb = b.submit("compose", {"pixels": px, "input_ids": ids_b, "attention_mask": mask_b})
        ea, eb = fa.result(DEADLINE_S)["embedding"], fb.result(DEADLINE_S)["embedding"]
    merged = [f for _, f in proxy.calls if len(f["pixels"]) == 2]
    assert merged, "the two requests did not share a batch"
    ids, mask = merged[0]["input_ids"], merged[0]["attention_mask"]
    width = ids_b.shape[1]
    pad = session.manifest.text.pad_id
    assert ids.shape == (2, width)
    assert (ids[0, ids_a.shape[1]:] == pad).all() and (mask[0, ids_a.shape[1]:] == 0).all()
    np.testing.assert_allclose(ea, session.run("compose", {"pixels": px, "input_ids": ids_a,
                                                           "attention_mask": mask_a})["embedding"], atol=1e-5)
    np.testing.assert_allclose(eb, session.run("compose", {"pixels": px, "input_ids": ids_b,
                                                           "attention_mask": mask_b})["embedding"], atol=1e-5)


def test_a_bad_request_fails_alone(session):
    reqs = _requests(session, 24, seed=1)
    bad = dict(reqs[5])
    bad["pixels"] = bad["pixels"].copy()
    bad["pixels"][0, 0, 0, 0] = np.nan
    wrong = {"pixels": reqs[6]["pixels"]}  # missing inputs
    with DynamicBatcher(session, BatchSettings(max_batch_size=8, max_delay_ms=20, adaptive_delay=False)) as b:
        futs = [b.submit("compose", r) for r in reqs[:5]] + [b.submit("compose", bad), b.submit("compose", wrong)]
        futs += [b.submit("compose", r) for r in reqs[7:]]
        with pytest.raises(InputError, match="NaN"):
            futs[5].result(DEADLINE_S)
        with pytest.raises(InputError, match="missing"):
            futs[6].result(DEADLINE_S)
        good = [f for i, f in enumerate(futs) if i not in (5, 6)]
        for f, r in zip(good, reqs[:5] + reqs[7:]):
            np.testing.assert_allclose(f.result(DEADLINE_S)["embedding"],
                                       session.run("compose", r)["embedding"], atol=1e-5)


def test_a_failing_batch_is_rerun_one_by_one(session):
    reqs = _requests(session, 12, seed=2)
    marker = 123.0
    reqs[3]["pixels"] = reqs[3]["pixels"].copy()
    reqs[3]["pixels"][0, 0, 0, 0] = marker  # a request the backend chokes on (finite, so it passes the checks)
    proxy = _Proxy(session, poison=lambda f: bool((f["pixels"][:, 0, 0, 0] == marker).any()), delay_s=0.002)
    with DynamicBatcher(proxy, BatchSettings(max_batch_size=32, max_delay_ms=50, adaptive_delay=False)) as b:
        futs = [b.submit("compose", r) for r in reqs]
        for i, (f, r) in enumerate(zip(futs, reqs)):
            if i == 3:
                with pytest.raises(RuntimeError, match="poisoned"):
                    f.result(DEADLINE_S)
            else:
                np.testing.assert_allclose(f.result(DEADLINE_S)["embedding"],
                                           session.run("compose", r)["embedding"], atol=1e-5)
    assert any(len(f["pixels"]) > 1 for _, f in proxy.calls), "the requests never shared a batch"


def test_a_lone_caller_does_not_wait_for_company(session):
    r = _requests(session, 1)[0]
    with DynamicBatcher(session, BatchSettings(max_batch_size=32, max_delay_ms=2000)) as b:
        b.run("compose", r, timeout=DEADLINE_S)  # starts the worker
        t0 = time.perf_counter()
        for _ in range(3):
            b.run("compose", r, timeout=DEADLINE_S)
        assert time.perf_counter() - t0 < 1.5  # three lone requests: none waited the 2 s delay


def test_max_batch_size_one_runs_inline_like_a_direct_call(session):
    proxy = _Proxy(session)
    r = _requests(session, 1)[0]
    with DynamicBatcher(proxy, BatchSettings(max_batch_size=1)) as b:
        out = b.submit("compose", r).result(0)  # already done: it ran in this thread
    assert proxy.calls[0][0] == threading.get_ident()
    np.testing.assert_array_equal(out["embedding"], session.run("compose", r)["embedding"])


def test_async_wrapper(session):
    reqs = _requests(session, 16, seed=3)

    async def main(b):
        return await asyncio.wait_for(asyncio.gather(*(b.run_async("compose", r) for r in reqs)), DEADLINE_S)

    with DynamicBatcher(session, BatchSettings(max_batch_size=8, max_delay_ms=5)) as b:
        outs = asyncio.run(main(b))
    for o, r in zip(outs, reqs):
        np.testing.assert_allclose(o["embedding"], session.run("compose", r)["embedding"], atol=1e-5)


def test_texts_are_tokenized_in_the_worker_and_a_bad_one_fails_alone(session):
    rng = np.random.default_rng(8)
    texts = [[" ".join(rng.choice(WORDS, int(rng.integers(1, 13)))) for _ in range(int(rng.integers(1, 4)))]
             for _ in range(20)]
    texts[7] = ["red dress", "   "]  # an empty text: its request fails, no other
    long_text = " ".join(["stripes"] * 200)
    pixels = [rng.standard_normal((len(t), 3, 64, 64)).astype(np.float32) for t in texts]

    async def main(b):
        calls = [b.run_async("compose", {"pixels": p}, texts=t) for p, t in zip(pixels, texts)]
        calls.append(b.run_async("compose", {"pixels": pixels[0][:1]}, texts=[long_text], truncate=True))
        calls.append(b.run_async("compose", {"pixels": pixels[0][:1]}, texts=[long_text]))
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), DEADLINE_S)

    seen = []
    with DynamicBatcher(session, BatchSettings(max_batch_size=32, max_delay_ms=20),
                        on_batch=lambda g, rows, n, s: seen.append(n)) as b:
        outs = asyncio.run(main(b))
    for i, (p, t, o) in enumerate(zip(pixels, texts, outs)):
        if i == 7:
            assert isinstance(o, InputError) and "empty" in str(o)
            continue
        ids, mask = session.tokenize(t)
        want = session.run("compose", {"pixels": p, "input_ids": ids, "attention_mask": mask})["embedding"]
        np.testing.assert_allclose(o["embedding"], want, atol=1e-5)
    ids, mask = session.tokenize([long_text], truncate=True)
    want = session.run("compose", {"pixels": pixels[0][:1], "input_ids": ids, "attention_mask": mask})["embedding"]
    np.testing.assert_allclose(outs[-2]["embedding"], want, atol=1e-5)
    assert isinstance(outs[-1], InputError) and "tokens" in str(outs[-1])  # too long without truncate
    assert max(seen) > 1


def test_close_drains_then_refuses(session):
    reqs = _requests(session, 6, seed=4)
    b = DynamicBatcher(session, BatchSettings(max_batch_size=32, max_delay_ms=300, adaptive_delay=False))
    futs = [b.submit("compose", r) for r in reqs]
    b.close(drain=True)
    assert all(f.done() and f.exception() is None for f in futs)
    with pytest.raises(RuntimeError, match="closed"):
        b.submit("compose", reqs[0]).result(1)


def test_calibration_measures_and_picks(session):
    b = DynamicBatcher(session)
    cal = b.calibrate("gallery", budget_s=3.0)
    assert set(cal.per_item_ms) <= {1, 2, 4, 8, 16, 32} and 1 in cal.per_item_ms
    assert (cal.lanes, cal.max_batch_size) == pick_plan(cal.per_item_ms, cal.lane_per_item_ms, cpu_cores())
    assert b.max_batch_size("gallery") == cal.max_batch_size and b.lanes("gallery") == cal.lanes
    if cpu_cores() >= 2:  # one single-threaded lane per core was timed too, lanes * batch <= 32
        assert cal.lane_per_item_ms and all(1 < k <= 32 // cpu_cores() for k in cal.lane_per_item_ms)
    assert cal.to_dict()["lanes"] == cal.lanes
    b.close()


def test_lanes_run_batches_side_by_side_with_answers_equal_to_direct_calls(session):
    reqs = _requests(session, 128, seed=8)
    direct = [session.run("compose", r)["embedding"] for r in reqs]
    spans = []

    def seen(graph, rows, n, seconds):
        end = time.perf_counter()
        spans.append((end - seconds, end, threading.get_ident()))

    with DynamicBatcher(session, BatchSettings(max_batch_size=8, max_delay_ms=5, lanes=2), on_batch=seen) as b:
        with ThreadPoolExecutor(32) as ex:
            outs = list(ex.map(lambda r: b.run("compose", r, timeout=DEADLINE_S)["embedding"], reqs))
        assert b.lanes("compose") == 2 and len(b._queues["compose"].threads) == 2
    for d, o in zip(direct, outs):
        np.testing.assert_allclose(o, d, atol=1e-5)  # a lane's runner has its own thread count: same numbers
    assert len({t for _, _, t in spans}) == 2, "both lanes' workers ran batches"
    spans.sort()
    assert any(b0 < a1 for (_, a1, _), (b0, _, _) in zip(spans, spans[1:])), "no two batches were ever in the model at once"
    lane_runner = session.runner("compose", threads=max(1, cpu_cores() // 2))
    assert lane_runner is not session.runner("compose")


def test_pick_plan_prefers_lanes_only_when_they_are_cheaper():
    one_lane = {1: 0.15, 2: 0.13, 4: 0.11, 8: 0.094, 16: 0.085, 32: 0.079}
    assert pick_plan(one_lane, {2: 0.093, 4: 0.084, 8: 0.076, 16: 0.071}, 2) == (2, 16)
    assert pick_plan(one_lane, {2: 0.2, 4: 0.15, 8: 0.1, 16: 0.09}, 2) == (1, 32)
    assert pick_plan(one_lane, {2: 0.2, 8: 0.0795, 16: 0.0790}, 2) == (1, 32)  # a tie: one lane (less memory)
    assert pick_plan({1: 17.0, 2: 16.0}, {2: 15.5}, 2) == (1, 1)  # nothing saves 15% over batch 1
    assert pick_plan(one_lane, {}, 2) == (1, pick_batch_size(one_lane))


def test_lanes_need_onnxruntime_and_a_positive_count(session):
    with pytest.raises(ConfigError, match="lanes must be a positive integer"):
        DynamicBatcher(session, BatchSettings(lanes=0))
    torch_session = fine_infer.load(session.bundle.path, backend="torch")
    with pytest.raises(ConfigError, match="lanes > 1 need the onnxruntime backend"):
        DynamicBatcher(torch_session, BatchSettings(lanes=2))
    with pytest.raises(ConfigError, match="own thread count needs backend 'onnxruntime'"):
        torch_session.runner("compose", threads=1)
    DynamicBatcher(torch_session, BatchSettings(lanes=1)).close()  # one lane is the session's own runner: any backend


def test_lanes_stay_within_the_sessions_thread_cap(session):
    capped = fine_infer.load(session.bundle.path, backend="onnxruntime", threads=1)
    with DynamicBatcher(capped) as b:
        cal = b.calibrate("gallery", budget_s=1.0)
    assert cal.lanes == 1 and not cal.lane_per_item_ms  # one thread in all: nothing to share between lanes
    two_threads = fine_infer.load(session.bundle.path, backend="onnxruntime", threads=2)
    with DynamicBatcher(two_threads, BatchSettings(lanes=2)) as b:
        assert b._lane_threads("gallery") == 1  # two lanes of one thread each, whatever the machine's cores


class _Timed:
    """A fake session whose run costs ``cost(batch)`` seconds (sleep): deterministic calibration targets."""

    def __init__(self, session, cost):
        self.inner, self.cost = session, cost
        self.manifest, self.bundle, self.backend, self.tokenizer = (session.manifest, session.bundle,
                                                                    session.backend, session.tokenizer)

    def run(self, graph, feeds):
        time.sleep(self.cost(len(next(iter(feeds.values())))))
        return {"embedding": np.zeros((len(next(iter(feeds.values()))), 32), np.float32)}


def test_calibration_picks_one_for_a_compute_bound_graph_and_more_for_an_overhead_bound_one(session):
    compute = DynamicBatcher(_Timed(session, lambda n: 0.002 * n * (1 + 0.2 * n)))  # dearer per item as it grows
    assert compute.calibrate("gallery").max_batch_size == 1
    overhead = DynamicBatcher(_Timed(session, lambda n: 0.004 + 0.0001 * n))  # fixed cost dominates
    assert overhead.calibrate("gallery").max_batch_size >= 16


def test_pick_batch_size_and_bench_results():
    assert pick_batch_size({1: 0.23, 2: 0.16, 8: 0.12, 16: 0.111, 32: 0.11}) == 16  # within 2% of the best
    assert pick_batch_size({1: 0.23, 2: 0.16, 8: 0.12, 16: 0.118, 32: 0.11}) == 32
    assert pick_batch_size({1: 30.0, 2: 33.0, 4: 36.0}) == 1
    assert pick_batch_size({1: 17.0, 2: 15.7, 4: 15.6, 8: 15.7}) == 1  # saves < 15% over batch 1: not worth it
    assert pick_batch_size({1: 0.134, 2: 0.148, 16: 0.111, 32: 0.106}) == 32
    assert pick_batch_size({}) == 1
    result = {"rows": [
        {"graph": "text", "backend": "onnxruntime", "batch": 1, "ms_per_item": 0.23},
        {"graph": "text", "backend": "onnxruntime", "batch": 8, "ms_per_item": 0.11},
        {"graph": "text", "backend": "torch", "batch": 1, "ms_per_item": 0.01},
        {"graph": "image", "backend": "onnxruntime", "batch": 1, "ms_per_item": 30.0},
        {"graph": "image", "backend": "onnxruntime", "batch": 8, "ms_per_item": 34.0},
    ]}
    assert bench_batch_sizes(result, "onnxruntime") == {"text": 8, "image": 1}
    with pytest.raises(ConfigError, match="rows"):
        bench_batch_sizes({"nope": 1}, "onnxruntime")


def test_bad_settings_are_config_errors(session):
    for bad in ({"max_batch_size": 0}, {"max_batch_size": {"compose": 0}}, {"max_batch_size": True}):
        with pytest.raises(ConfigError, match="max_batch_size must be a positive integer"):
            BatchSettings(**bad)
    with pytest.raises(ConfigError, match="max_delay_ms"):
        BatchSettings(max_delay_ms=-1)
    with pytest.raises(ConfigError, match="lanes must be a positive integer"):
        BatchSettings(lanes=True)
    with pytest.raises(ConfigError, match="search_max_queries"):
        BatchSettings(search_max_queries=0)
    with pytest.raises(BundleError, match="compose"):  # an unknown graph names the bundle's graphs
        DynamicBatcher(session, BatchSettings(max_batch_size={"nope": 4}))
    settings = BatchSettings(max_batch_size={"compose": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_delay_ms = 3.0
    with pytest.raises(TypeError):
        settings.max_batch_size["compose"] = 8  # a read-only copy: the batcher and the server share it
    assert BatchSettings(max_batch_size=1).search_batch_limit == 1 and BatchSettings().search_batch_limit == 64


def test_fixed_sizes_per_graph_are_recorded_with_their_source(session):
    with DynamicBatcher(session, BatchSettings(max_batch_size={"compose": 4}, size_source="bench:r.json")) as b:
        assert b.max_batch_size("compose") == 4 and b.max_batch_size("gallery") is None  # the other is calibrated
        assert b.calibrations["compose"].to_dict()["source"] == "bench:r.json"


def test_example_feeds_and_repeat_rows():
    spec = GraphSpec("text", "embed_text",
                     (TensorSpec("input_ids", "int64", ("batch", "sequence")),
                      TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                     (TensorSpec("embedding", "float32", ("batch", 8)),))
    f = example_feeds(spec, 3, seq_len=5)
    assert f["input_ids"].shape == (3, 5) and (f["attention_mask"] == 1).all()
    g = repeat_rows(f, 7)
    assert g["input_ids"].shape == (7, 5)
    np.testing.assert_array_equal(g["input_ids"][3:6], f["input_ids"])


def test_a_request_over_the_batch_size_runs_in_slices_and_stops_once_cancelled(session):
    rng = np.random.default_rng(11)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 13)))) for _ in range(8)]
    ids, mask = session.tokenize(texts)
    big = {"pixels": rng.standard_normal((8, 3, 64, 64)).astype(np.float32), "input_ids": ids,
           "attention_mask": mask}
    proxy = _Proxy(session, delay_s=0.2)
    with DynamicBatcher(proxy, BatchSettings(max_batch_size=2, max_delay_ms=0)) as b:
        out = b.run("compose", big, timeout=DEADLINE_S)
        assert [c[1]["pixels"].shape[0] for c in proxy.calls] == [2, 2, 2, 2]  # never more than the batch size
        np.testing.assert_allclose(out["embedding"], session.run("compose", big)["embedding"], atol=1e-5)

        proxy.calls.clear()

        async def cancelled_after_the_first_slice():
            t = asyncio.ensure_future(b.run_async("compose", big))
            await asyncio.sleep(0.1)  # inside the first 0.2 s slice
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t

        asyncio.run(cancelled_after_the_first_slice())
        time.sleep(1.0)  # what would be left of the request: 3 more slices, 0.6 s
    assert len(proxy.calls) == 1, [c[1]["pixels"].shape for c in proxy.calls]
