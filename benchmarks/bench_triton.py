"""``fine-infer serve`` vs NVIDIA Triton Inference Server serving the same bundle on one CPU box: text embedding with
the tiny Fashion-FINE (its shipped weights), 32 closed-loop clients.

    python benchmarks/bench_triton.py                                   # exports the bundle here; a few minutes
    python benchmarks/bench_triton.py --rounds 5 --seconds 8 --json out.json

Needs ``pip install --no-deps nvidia-pytriton`` (and, beside numpy 2, ``pip install --no-deps --target
.venv/triton-stub-packages "numpy<2"``: see :mod:`fine_infer.serve.triton_server`). Three sides, all running at
once (an idle server costs nothing), loaded one after another in a rotating order every round, each by ``--clients``
keep-alive HTTP clients for ``--seconds`` (the load generator of ``fine-infer bench``,
:func:`fine_infer.tools.bench.load_test`), sending one query text per request:

- ``serve``: ``fine-infer serve BUNDLE`` (calibrated batching; ``--serve-workers N`` adds ``--workers N``, the fair
  match for Triton's several stub processes): ``POST /v1/embed {"texts": [...]}``;
- ``triton raw``: the repository ``fine-infer triton-repo --backend python`` writes, its ensemble
  ``fashion_fine_text_raw`` (raw text BYTES → Python preprocessing → Python graph model on ONNX Runtime);
- ``triton graph``: that repository's graph model alone, ``fashion_fine_text``, sent the query's ``input_ids`` and
  ``attention_mask`` (what a client tokenizing for itself sends): raw vs graph is what the ensemble costs.

Reports medians over the rounds (req/s, p50, p99, and the servers' own CPU time per request: ``fine-infer serve``'s
process, Triton's server and its Python stubs, read from ``/proc``: a figure other jobs on the machine disturb far
less than req/s), the ratios, ``lscpu``'s model name and flags, the load average around every round and the server
versions; ``--json`` writes it all. The load generator shares the CPU with the servers: the req/s are floors, and
the same for every side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_test import Server, machine  # noqa: E402  (the fine-infer serve subprocess and lscpu, shared)

SIDES = ("serve", "triton raw", "triton graph")
TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``: all but idle and iowait)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / TICK


def cpu_seconds(pid: int | None = None, pgid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid``, or of every live process in group ``pgid``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if (pid is not None and int(stat.parent.name) == pid) or (pgid is not None and int(fields[2]) == pgid):
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def prepare(folder: Path, instances: int, preprocess_instances: int) -> tuple[Path, Path]:
    from fine_infer.export import export_arch
    from fine_infer.export.triton_repo import write_triton_repo

    bundle, repo = folder / "fashion-fine", folder / "repo"
    export_arch("fashion-fine", bundle, "tiny", pretrained=True, force=True)
    write_triton_repo(bundle, repo, backend="python", instances=instances,
                      preprocess_instances=preprocess_instances, force=True)
    return bundle, repo


def run(args: argparse.Namespace) -> dict[str, Any]:
    import fine_infer
    from fine_infer.serve.triton_server import TritonServer
    from fine_infer.tools import bench

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-triton-"))
    bundle, repo = prepare(work, args.instances, args.preprocess_instances)
    session = fine_infer.load(bundle)
    ids, mask = session.tokenize([bench.QUERY_TEXT])
    graph_body, graph_headers = bench.kserve_request({"input_ids": ids, "attention_mask": mask})
    raw_body, raw_headers = bench.kserve_request({"text": [bench.QUERY_TEXT]})
    result: dict[str, Any] = {"machine": machine(), "clients": args.clients, "seconds": args.seconds,
                              "serve_workers": args.serve_workers, "rounds": [],
                              "repository": {"backend": "python", "instances": args.instances,
                                             "preprocess_instances": args.preprocess_instances}}
    workers = ["--workers", str(args.serve_workers)] if args.serve_workers > 1 else []
    with TritonServer([repo]) as triton, Server(bundle, None, workers) as serve:
        triton.wait_ready(300)
        serve.wait_ready(300)
        result["triton"] = bench.triton_payloads(triton.http_url)[0]  # its name, version and extensions
        result["serve"] = json.loads(urllib.request.urlopen(f"{serve.url}/v1/info", timeout=10).read())  # its plan
        sides = {
            "serve": (serve.url, "/v1/embed", {"texts": [bench.QUERY_TEXT]}, None),
            "triton raw": (triton.http_url, "/v2/models/fashion_fine_text_raw/infer", raw_body, raw_headers),
            "triton graph": (triton.http_url, "/v2/models/fashion_fine_text/infer", graph_body, graph_headers),
        }
        for url, path, body, headers in sides.values():  # warm up every path (and check it answers)
            bench.load_test(url, path, body, args.clients, requests=20 * args.clients, max_time_s=5, headers=headers)
        for r in range(args.rounds):
            order = SIDES[r % 3:] + SIDES[: r % 3]
            row: dict[str, Any] = {"order": list(order), "load_before": os.getloadavg()[0]}
            for side in order:
                url, path, body, headers = sides[side]
                cpu = (lambda: cpu_seconds(pgid=serve.proc.pid)) if side == "serve" else (
                    lambda: cpu_seconds(pgid=triton.proc.pid))
                c0, own0, busy0, t0 = cpu(), cpu_seconds(pid=os.getpid()), busy_seconds(), time.perf_counter()
                row[side] = bench.load_test(url, path, body, args.clients, requests=10**9, max_time_s=args.seconds,
                                            headers=headers, warmup=1)
                answered = row[side]["runs"] + args.clients  # the timed requests and one warm-up per client
                row[side]["server_cpu_ms_per_request"] = 1e3 * (cpu() - c0) / answered
                row[side]["server_cores"] = (cpu() - c0) / (time.perf_counter() - t0)
                own = cpu_seconds(pid=os.getpid()) - own0
                row[side]["client_cpu_ms_per_request"] = 1e3 * own / answered
                row[side]["other_jobs_cores"] = max(0.0, busy_seconds() - busy0 - own - (cpu() - c0)) / (
                    time.perf_counter() - t0)  # every other process on the machine (the idle server's few ticks too)
            row["load_after"] = os.getloadavg()[0]
            result["rounds"].append(row)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{s} {row[s]['items_per_s']:.0f} req/s (others {row[s]['other_jobs_cores']:.2f} cores)"
                for s in SIDES), file=sys.stderr, flush=True)
    keys = ("items_per_s", "p50_ms", "p99_ms", "server_cpu_ms_per_request", "server_cores",
            "client_cpu_ms_per_request", "other_jobs_cores", "errors")
    med = {s: {k: statistics.median(row[s][k] for row in result["rounds"]) for k in keys} for s in SIDES}
    result["median"] = med
    result["serve_over_triton_raw"] = med["serve"]["items_per_s"] / med["triton raw"]["items_per_s"]
    result["triton_raw_over_graph"] = med["triton raw"]["items_per_s"] / med["triton graph"]["items_per_s"]
    result["load_average"] = [row["load_before"] for row in result["rounds"]] + [result["rounds"][-1]["load_after"]]
    return result


def table(result: dict[str, Any]) -> str:
    med = result["median"]
    lines = ["| side | req/s | p50 ms | p99 ms | server CPU ms / request | server cores busy | client CPU ms / request "
             "| other jobs (cores) | errors |", "|---|---|---|---|---|---|---|---|---|"]
    for s in SIDES:
        m = med[s]
        lines.append(f"| {s} | {m['items_per_s']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                     f"{m['server_cpu_ms_per_request']:.3f} | {m['server_cores']:.2f} | "
                     f"{m['client_cpu_ms_per_request']:.3f} | {m['other_jobs_cores']:.2f} | {m['errors']:.0f} |")
    lines += ["", f"serve / triton raw: {result['serve_over_triton_raw']:.2f}×; "
                  f"triton raw / triton graph: {result['triton_raw_over_graph']:.2f}×"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default %(default)s)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per side per round (default %(default)s)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default %(default)s)")
    p.add_argument("--instances", type=int, default=1, help="instances of the Triton graph model")
    p.add_argument("--preprocess-instances", type=int, default=1, help="instances of the Triton preprocessing model")
    p.add_argument("--serve-workers", type=int, default=1,
                   help="fine-infer serve --workers (server processes sharing the port; default %(default)s)")
    p.add_argument("--work", help="folder for the bundle and the repository (default: a temp folder)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    result = run(args)
    print(table(result))
    print(json.dumps({"model_name": result["machine"].get("model_name"), "median": result["median"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
