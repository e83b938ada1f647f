"""``bench``: latency and throughput of a bundle per backend and batch size, or of a running server
(:mod:`fine_infer.tools.bench`)."""

from __future__ import annotations

import argparse

from fine_infer.cli._args import AddCommand, add_bundle_arg, api_key_from_env, positive
from fine_infer.errors import ConfigError


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency (p50/p90/p99) and throughput per graph, backend and batch size, or of a running server (--serve for
    fine-infer serve, --triton for a Triton Inference Server's raw-input models over KServe v2).

    Prints a table; --json and --plot write the result and a PNG; --compare OLD.json prints new/old ratios and
    exits 1 when a row's p50 latency regressed past --max-regression.
    """
    from fine_infer.tools import bench

    old = bench.load_json(args.compare) if args.compare else None  # a bad file fails before minutes of timing
    progress = not args.no_progress
    if args.serve and args.triton:
        raise ConfigError("give --serve URL or --triton URL, not both (run bench once per server)")
    if args.serve or args.triton:
        if args.bundle:
            raise ConfigError(f"give a BUNDLE or {'--serve' if args.serve else '--triton'} URL, not both")
        load = dict(concurrency=args.concurrency or bench.DEFAULT_CONCURRENCY, workloads=args.graphs,
                    requests=args.requests, max_time_s=args.max_time, progress=progress)
        if args.serve:
            result = bench.bench_server(args.serve, api_key=api_key_from_env(args.api_key_env), **load)
        else:
            if args.api_key_env:
                raise ConfigError("--api-key-env goes with --serve (Triton takes no API key here)")
            result = bench.bench_triton(args.triton, **load)
    else:
        if not args.bundle:
            raise ConfigError("give a BUNDLE to benchmark, or --serve / --triton URL to load-test a running server")
        if args.concurrency:
            raise ConfigError("--concurrency goes with --serve URL or --triton URL")
        budget = bench.QUICK if args.quick else bench.Budget()
        result = bench.bench_bundle(args.bundle, backends=args.backend or bench.BACKENDS,
                                    batch_sizes=args.batch_sizes or bench.DEFAULT_BATCHES, graphs=args.graphs,
                                    budget=budget, threads=args.threads, progress=progress)
    print(bench.format_table(result))
    warning = bench.pick_warning(result) if result.get("mode") == "runtime" else ""
    if warning:
        import sys

        print(f"fine-infer bench: warning: {warning}", file=sys.stderr)
    if args.json:
        bench.save_json(result, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if old is not None:
        lines, regressions = bench.compare(result, old, args.max_regression)
        print(f"\ncompared with {args.compare}:")
        print("\n".join(lines))
        if regressions:
            return 1
    return 0


def register(add: AddCommand) -> None:
    """Register ``bench``."""
    from fine_infer.tools.bench import BACKENDS as BENCH_BACKENDS

    b = add("bench", cmd_bench, "latency and throughput per backend and batch size (or of a running server)")
    add_bundle_arg(b, "bundle folder to time in this process (or give --serve URL)", nargs="?")
    b.add_argument("--backend", nargs="+", choices=list(BENCH_BACKENDS),
                   help="backends to time (default: all; those that cannot run here are skipped with a reason)")
    b.add_argument("--batch-sizes", nargs="+", type=positive("--batch-sizes"), help="default: 1 2 4 8 16 32")
    b.add_argument("--graphs", nargs="+", help="graphs (or with --serve, workloads) to time (default: all)")
    b.add_argument("--threads", type=positive("--threads"), help="intra-op threads of ONNX Runtime")
    b.add_argument("--quick", action="store_true", help="fewer timed runs per cell (a smoke run, noisier)")
    b.add_argument("--json", help="write the result as JSON")
    b.add_argument("--plot", help="write a PNG: latency and throughput against batch size")
    b.add_argument("--compare", metavar="OLD.json", help="print new/old ratios; exit 1 on a regression")
    b.add_argument("--max-regression", type=float, default=0.10,
                   help="allowed p50 latency growth with --compare (0.10 = 10%%)")
    b.add_argument("--serve", metavar="URL", help="load-test a running `fine-infer serve` instead")
    b.add_argument("--triton", metavar="URL",
                   help="load-test a Triton Inference Server instead (KServe v2 HTTP, e.g. http://127.0.0.1:8000): "
                        "its models taking raw 'text' / 'image' BYTES, as `fine-infer triton-repo` writes them; "
                        "--graphs picks models by name")
    b.add_argument("--concurrency", nargs="+", type=positive("--concurrency"),
                   help="with --serve/--triton: concurrent clients (default: 1 8 32)")
    b.add_argument("--requests", type=positive("--requests"), default=400,
                   help="with --serve/--triton: requests per row")
    b.add_argument("--max-time", type=float, default=10.0, help="with --serve/--triton: seconds per row at most")
    b.add_argument("--api-key-env", metavar="VAR", help="with --serve: the API key's environment variable")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
