"""Exact top-k search: fine_infer.Index vs FAISS IndexFlatIP vs numpy, on the same random unit vectors, in one run.

    python benchmarks/bench_search.py                  # N = 100k and 1M, D = 256, k = 10, batch 1 and 64
    python benchmarks/bench_search.py --sizes 100000 --no-write

For each N and batch size: ms per batch (median and best of the repeats), queries/s, the ratio to FAISS, and how far
each is from its floor — the memory-bandwidth floor (N·D·bytes over the best measured read rate) and, for a batch,
the compute floor (2·Q·N·D flops over the machine's measured numpy sgemm rate); plus recall@10 of float16 and int8
storage against exact float32 (plain, and re-scored with ``rescore=True``). Writes the "## Search" section of
benchmarks/RESULTS.md (other sections are left as they are) with the machine and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

import fine_infer
from fine_infer.index import Index

D, K = 256, 10
BATCHES = (1, 64)
RESULTS = Path(__file__).with_name("RESULTS.md")


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    """n random unit vectors, float32, generated in slices (no float64 copy of a 1 GB gallery)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for lo in range(0, n, 1 << 16):
        x = rng.standard_normal((min(1 << 16, n - lo), dim), dtype=np.float32)
        out[lo : lo + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timeit(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """(median, best) seconds over ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def copy_bandwidth(nbytes: int = 1 << 30, threads: int | None = None) -> float:
    """Bytes moved per second (read + write, the STREAM "copy" convention) by ``threads`` threads each copying a
    slice of a 1 GiB float32 array with numpy (which releases the GIL); best of 5. 1 GiB: larger than the L3."""
    threads = threads or _threads()
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(len(src)), threads)
    bounds = [(p[0], p[-1] + 1) for p in parts]

    def run() -> None:
        ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in bounds]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    _, best = timeit(run, 5)
    return 2 * nbytes / best


def read_bandwidth(nbytes: int = 1 << 30, threads: int | None = None) -> float:
    """Bytes read per second by ``threads`` threads each summing a slice (np.sum releases the GIL); best of 5."""
    threads = threads or _threads()
    src = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(src, threads)

    def run() -> None:
        ts = [threading.Thread(target=np.sum, args=(p,)) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    _, best = timeit(run, 5)
    return nbytes / best


def sgemm_rate() -> float:
    """The machine's float32 GEMM rate with numpy (OpenBLAS, all threads) at the search's depth D: the best of two
    compute-bound shapes, (1024 x D) @ (D x 4096) and (4096 x D) @ (D x 4096). A search of Q queries over N vectors
    is at least 2·Q·N·D flops, so 2·Q·N·D / this rate is its compute floor."""
    best_rate = 0.0
    for m, n in ((1024, 4096), (4096, 4096)):
        a, b = unit(m, D, 1), unit(n, D, 2)
        _, best = timeit(lambda: a @ b.T, 5)
        best_rate = max(best_rate, 2 * m * n * D / best)
    return best_rate


def numpy_search(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain numpy way: one matmul, argpartition, then sort the k kept per row."""
    s = q @ g.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1)
    return np.take_along_axis(ps, order, 1), np.take_along_axis(part, order, 1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        flags = re.search(r"flags\s*:\s*(.*)", text).group(1)
    except (OSError, AttributeError):
        pass
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")
            if f" {f} " in f" {flags} "]
    import faiss

    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    return {
        "cpu": cpu, "cores": f"{os.cpu_count()} ({_threads()} usable)", "simd": " ".join(simd), "memory": mem,
        "python": platform.python_version(), "numpy": np.__version__, "faiss": faiss.__version__,
        "fine-infer": fine_infer.__version__, "kernels": Index(4).isa,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"), "load average at start": load,
    }


def run(sizes: list[int], reps1: int, reps64: int, settle: float) -> tuple[list[dict], list[dict], dict]:
    import faiss

    threads = _threads()
    print(f"measuring the machine ({threads} threads) ...", flush=True)
    env = measure_machine(threads)
    rows: list[dict] = []
    recalls: list[dict] = []
    queries = unit(max(BATCHES) * 4, D, 7)
    for n in sizes:
        print(f"N = {n}: building the gallery and the indexes ...", flush=True)
        g = unit(n, D, 11)
        ids = np.arange(n, dtype=np.int64)
        engines: dict[str, tuple[str, Callable[[np.ndarray], object]]] = {}
        flat = faiss.IndexFlatIP(D)
        flat.add(g)
        engines["FAISS IndexFlatIP"] = ("float32", lambda q, flat=flat: flat.search(q, K))
        engines["numpy matmul+argpartition"] = ("float32", lambda q, g=g: numpy_search(q, g, K))
        indexes: dict[str, Index] = {}
        for dtype in ("float32", "float16", "int8"):
            index = Index(D, dtype, rescore=dtype != "float32")
            index.add(g, ids)
            indexes[dtype] = index
            engines[f"fine_infer.Index {dtype}"] = (dtype, lambda q, ix=index: ix.search(q, K, exact=False))
        for dtype in ("float16", "int8"):
            engines[f"fine_infer.Index {dtype} + exact re-score"] = (
                dtype, lambda q, ix=indexes[dtype]: ix.search(q, K, exact=True))

        for batch in BATCHES:
            reps = reps1 if batch == 1 else reps64
            times: dict[str, list[float]] = {name: [] for name in engines}
            # Round-robin: every repeat times each engine once, so load from other processes on a shared machine
            # falls on all engines alike instead of on whichever happened to run during a busy spell.
            for rep in range(reps + 1):  # the first round is a warm-up
                for name, (dtype, fn) in engines.items():
                    # batch 1: a different query each call, as a server sees them
                    q = queries[rep % len(queries)][None, :] if batch == 1 else queries[:batch]
                    # OpenBLAS and OpenMP (numpy, FAISS) workers spin for a while after a call and would slow
                    # whichever engine runs next by up to 2x: let them go to sleep first.
                    time.sleep(settle)
                    t = time.perf_counter()
                    fn(q)
                    if rep:
                        times[name].append(time.perf_counter() - t)
            for name, (dtype, _) in engines.items():
                med, best = statistics.median(times[name]), min(times[name])
                rows.append(dict(n=n, batch=batch, engine=name, dtype=dtype, med=med, best=best))
                print(f"  batch {batch:>2}  {name:<42} {med * 1e3:9.2f} ms  (best {best * 1e3:8.2f})", flush=True)

        print("  recall@10 ...", flush=True)
        rq = unit(256, D, 13)
        _, truth = indexes["float32"].search(rq, K)
        _, fi = flat.search(rq, K)
        rec = {"n": n, "float32 vs FAISS": recall(truth, fi)}
        for dtype in ("float16", "int8"):
            rec[f"{dtype}"] = recall(indexes[dtype].search(rq, K, exact=False)[1], truth)
            rec[f"{dtype} + exact re-score"] = recall(indexes[dtype].search(rq, K, exact=True)[1], truth)
        recalls.append(rec)
        print("  " + ", ".join(f"{k}: {v:.4f}" for k, v in rec.items() if k != "n"), flush=True)
        del flat, indexes, engines, g
    # The floors use the machine's best figures (measured before and after): what it can do when not disturbed.
    after = measure_machine(threads)
    env = {k: max(v, after[k]) for k, v in env.items()}
    # A search only reads the gallery: its memory floor uses the best read rate measured here, the larger of the
    # summing threads' rate and a copy's (bytes copied per second, half its read + write traffic).
    env["floor_bw"] = max(env["read_bw"], env["copy_bw"] / 2)
    for r in rows:
        nbytes = r["n"] * D * np.dtype(r["dtype"]).itemsize
        floor_bw = nbytes / env["floor_bw"]
        floor = max(floor_bw, 2 * r["batch"] * r["n"] * D / env["sgemm"])
        faiss_t = next(x["med"] for x in rows if x["n"] == r["n"] and x["batch"] == r["batch"]
                       and x["engine"].startswith("FAISS"))
        r.update(ms=r["med"] * 1e3, best_ms=r["best"] * 1e3, qps=r["batch"] / r["med"], vs_faiss=faiss_t / r["med"],
                 floor_ms=floor * 1e3, x_floor=r["med"] / floor,
                 floor_kind="memory" if floor == floor_bw else "compute")
    return rows, recalls, env


def measure_machine(threads: int) -> dict[str, float]:
    """Copy and read bandwidth and the sgemm rate, printed."""
    env = {"copy_bw": copy_bandwidth(threads=threads), "read_bw": read_bandwidth(threads=threads),
           "sgemm": sgemm_rate(), "threads": threads}
    print(f"  copy {env['copy_bw'] / 1e9:.1f} GB/s (r+w), read {env['read_bw'] / 1e9:.1f} GB/s, "
          f"sgemm {env['sgemm'] / 1e9:.0f} GFLOP/s", flush=True)
    return env


def markdown(rows: list[dict], recalls: list[dict], env: dict, info: dict[str, str]) -> str:
    intro = (
        "`python benchmarks/bench_search.py` — exact inner-product top-k, random unit vectors, "
        f"D = {D}, k = {K}; one run, the same data for every engine. "
        "ms per batch: the median of the repeats (best in brackets). Engines are timed round-robin within each "
        "repeat, so load from other processes falls on all alike, each after a pause that lets the previous "
        "engine's BLAS / OpenMP threads stop spinning (otherwise they halve the speed of whatever runs next). "
        "A batch of 1 is a different single query each call. "
        "*vs FAISS*: FAISS time / this time (above 1 is faster). "
        "*× floor*: this time / the floor, the larger of the memory floor (N·D·bytes of the storage dtype over the "
        "best measured read rate: the read bandwidth, or the copy bandwidth counted as bytes copied per second) "
        "and, for a batch, the compute floor (2·Q·N·D flops over the measured numpy sgemm rate). "
        "Index searches are `exact=False` (the stored values' scores); the *exact re-score* rows re-score "
        "candidates against float32 copies (`Index(..., rescore=True)`) and return the float32 top-k."
    )
    machine_line = (
        f"Measured: copy bandwidth {env['copy_bw'] / 1e9:.1f} GB/s (read + write, {env['threads']} threads), "
        f"read bandwidth {env['read_bw'] / 1e9:.1f} GB/s (so the memory floors use {env['floor_bw'] / 1e9:.1f} "
        f"GB/s), numpy sgemm {env['sgemm'] / 1e9:.0f} GFLOP/s (each the best of a measurement before and after the "
        "run). The L3 is large here (480 MB reported): a 100k gallery (100 MB float32) and a 1M int8 one (256 MB) "
        "can be served from it, so their memory floors are not hard limits."
    )
    lines = ["## Search", "", intro, "",
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()) + ".", machine_line, "",
             "| N | batch | engine | storage | ms / batch (best) | queries/s | vs FAISS | floor ms | × floor |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        storage = "float32" if "FAISS" in r["engine"] or "numpy" in r["engine"] else r["engine"].split()[1]
        lines.append(f"| {r['n']:,} | {r['batch']} | {r['engine']} | {storage} | {r['ms']:.2f} ({r['best_ms']:.2f}) "
                     f"| {r['qps']:,.1f} | {r['vs_faiss']:.2f} | {r['floor_ms']:.1f} ({r['floor_kind']}) "
                     f"| {r['x_floor']:.2f} |")
    n_max = max(r["n"] for r in rows)
    lines += ["", f"At N = {n_max:,}:"]
    for batch in BATCHES:
        got = {r["engine"]: r for r in rows if r["n"] == n_max and r["batch"] == batch}
        ours = {dt: got[f"fine_infer.Index {dt}"] for dt in ("float32", "float16", "int8")}
        parts = [f"{dt} {r['vs_faiss']:.1f}× FAISS ({r['x_floor']:.2f}× its floor)" for dt, r in ours.items()]
        lines.append(f"- batch {batch}: " + ", ".join(parts) + ".")
    lines += ["", "Recall@10 against exact float32 (256 queries):", ""]
    keys = [k for k in recalls[0] if k != "n"]
    lines += ["| N | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for rec in recalls:
        lines.append(f"| {rec['n']:,} | " + " | ".join(f"{rec[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the "## Search" section of ``path`` (up to the next "## " heading), or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(r"^## Search\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--reps1", type=int, default=20, help="repeats at batch 1")
    ap.add_argument("--reps64", type=int, default=5, help="repeats at batch 64")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds to pause before each timed call (BLAS / OpenMP threads stop spinning)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = ap.parse_args()
    info = machine()
    rows, recalls, env = run(args.sizes, args.reps1, args.reps64, args.settle)
    text = markdown(rows, recalls, env, info)
    print()
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"wrote the '## Search' section of {RESULTS}")


if __name__ == "__main__":
    main()
