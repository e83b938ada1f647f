"""The ``serve`` and ``bench`` commands of the ``fine-infer`` CLI (registered by :func:`add_commands`).

Thin layers over :mod:`fine_infer.serve` and :mod:`fine_infer.bench`; errors are :class:`FineInferError` subclasses
that the CLI prints as one line. Until ``fine_infer.cli`` registers them, ``python -m fine_infer.cli_serve serve ...``
runs them standalone.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from fine_infer.bench import BACKENDS as BENCH_BACKENDS
from fine_infer.cli import add_backend_args
from fine_infer.errors import ConfigError, FineInferError

AddFn = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _api_key(var: str | None) -> str | None:
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise ConfigError(f"--api-key-env {var}: the environment variable {var} is unset or empty")
    return key


def _positive(name: str) -> Callable[[str], int]:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a positive integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} takes a positive integer, got {s!r}")
        return v

    return parse


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a bundle over HTTP: /v1/embed, /v1/search (with --index), /v1/classify, /healthz, /readyz, /metrics.

    Listens on 127.0.0.1:8080 by default; any other address needs an API key (--api-key-env). Concurrent requests
    are batched per graph, with each graph's batch size calibrated at start-up unless given.
    """
    import fine_infer
    from fine_infer.serve import Limits, check_bind, create_app, run

    api_key = _api_key(args.api_key_env)
    check_bind(args.host, api_key)  # before loading anything: a refused bind should fail fast
    if args.max_delay_ms < 0:
        raise ConfigError(f"--max-delay-ms must be >= 0, got {args.max_delay_ms}")
    session = fine_infer.load(args.bundle, backend=args.backend, variant=args.variant, threads=args.threads)
    index = None
    if args.index:
        from fine_infer.index import Index

        index = Index.load(args.index, mmap=args.mmap)
    defaults = Limits()
    limits = Limits(
        max_body_bytes=args.max_body_bytes or defaults.max_body_bytes,
        max_image_pixels=args.max_image_pixels or defaults.max_image_pixels,
        max_text_tokens=args.max_text_tokens,
        max_batch_items=args.max_batch_items or defaults.max_batch_items,
        max_k=args.max_k or defaults.max_k,
    )
    app = create_app(session, index, max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                     bench_result=args.bench_json, limits=limits, api_key=api_key,
                     adaptive_delay=not args.fixed_delay, lanes=args.lanes)
    print(f"fine-infer serve: {args.bundle} ({session.manifest.arch or session.manifest.source}, {session.backend})"
          + (f", index {args.index} ({len(index)} items)" if index is not None else "")
          + f" on http://{args.host}:{args.port}" + (" (API key required)" if api_key else ""), file=sys.stderr)
    run(app, args.host, args.port, api_key=api_key, log_level=args.log_level, access_log=args.access_log,
        graceful_s=args.graceful_timeout)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency (p50/p90/p99) and throughput per graph, backend and batch size, or of a running server (--serve).

    Prints a table; --json and --plot write the result and a PNG; --compare OLD.json prints new/old ratios and
    exits 1 when a row's p50 latency regressed past --max-regression.
    """
    from fine_infer import bench

    old = bench.load_json(args.compare) if args.compare else None  # a bad file fails before minutes of timing
    progress = not args.no_progress
    if args.serve:
        if args.bundle:
            raise ConfigError("give a BUNDLE or --serve URL, not both")
        result = bench.bench_server(args.serve, concurrency=args.concurrency or bench.DEFAULT_CONCURRENCY,
                                    workloads=args.graphs, requests=args.requests, max_time_s=args.max_time,
                                    api_key=_api_key(args.api_key_env), progress=progress)
    else:
        if not args.bundle:
            raise ConfigError("give a BUNDLE to benchmark, or --serve URL to load-test a running server")
        if args.concurrency:
            raise ConfigError("--concurrency goes with --serve URL")
        budget = bench.QUICK if args.quick else bench.Budget()
        result = bench.bench_bundle(args.bundle, backends=args.backend or bench.BACKENDS,
                                    batch_sizes=args.batch_sizes or bench.DEFAULT_BATCHES, graphs=args.graphs,
                                    budget=budget, threads=args.threads, progress=progress)
    print(bench.format_table(result))
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


def add_commands(sub: argparse._SubParsersAction, add: AddFn) -> None:
    """Register ``serve`` and ``bench`` with the CLI's ``add(name, fn, help)`` helper."""
    del sub  # the helper already holds it; kept for the documented signature
    s = add("serve", cmd_serve, "serve a bundle (and an index) over HTTP with cross-request batching")
    s.add_argument("bundle")
    s.add_argument("--index", help="index file for /v1/search")
    s.add_argument("--mmap", action="store_true", help="memory-map the index (large galleries)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --api-key-env)")
    s.add_argument("--port", type=int, default=8080)
    add_backend_args(s)
    s.add_argument("--threads", type=_positive("--threads"), help="intra-op threads of ONNX Runtime")
    s.add_argument("--max-batch-size", type=_positive("--max-batch-size"),
                   help="rows per model run for every graph (default: measured per graph at start-up)")
    s.add_argument("--lanes", type=_positive("--lanes"),
                   help="batches of a graph in the model at once, each on (--threads, else the cores) / lanes "
                        "threads (ONNX Runtime; default: measured with the batch size, else 1)")
    s.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a request may wait for batch-mates")
    s.add_argument("--fixed-delay", action="store_true",
                   help="always wait --max-delay-ms for batch-mates (default: only when several requests are queued)")
    s.add_argument("--bench-json", help="take each graph's batch size from a `fine-infer bench --json` result")
    s.add_argument("--api-key-env", metavar="VAR", help="require the API key held in environment variable VAR")
    s.add_argument("--max-body-bytes", type=_positive("--max-body-bytes"))
    s.add_argument("--max-image-pixels", type=_positive("--max-image-pixels"))
    s.add_argument("--max-text-tokens", type=_positive("--max-text-tokens"),
                   help="default: the model's maximum text length")
    s.add_argument("--max-batch-items", type=_positive("--max-batch-items"), help="images/texts per request")
    s.add_argument("--max-k", type=_positive("--max-k"))
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests on SIGTERM")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true")

    b = add("bench", cmd_bench, "latency and throughput per backend and batch size (or of a running server)")
    b.add_argument("bundle", nargs="?")
    b.add_argument("--backend", nargs="+", choices=list(BENCH_BACKENDS),
                   help="backends to time (default: all; those that cannot run here are skipped with a reason)")
    b.add_argument("--batch-sizes", nargs="+", type=_positive("--batch-sizes"), help="default: 1 2 4 8 16 32")
    b.add_argument("--graphs", nargs="+", help="graphs (or with --serve, workloads) to time (default: all)")
    b.add_argument("--threads", type=_positive("--threads"), help="intra-op threads of ONNX Runtime")
    b.add_argument("--quick", action="store_true", help="fewer timed runs per cell (a smoke run, noisier)")
    b.add_argument("--json", help="write the result as JSON")
    b.add_argument("--plot", help="write a PNG: latency and throughput against batch size")
    b.add_argument("--compare", metavar="OLD.json", help="print new/old ratios; exit 1 on a regression")
    b.add_argument("--max-regression", type=float, default=0.10,
                   help="allowed p50 latency growth with --compare (0.10 = 10%%)")
    b.add_argument("--serve", metavar="URL", help="load-test a running `fine-infer serve` instead")
    b.add_argument("--concurrency", nargs="+", type=_positive("--concurrency"),
                   help="with --serve: concurrent clients (default: 1 8 32)")
    b.add_argument("--requests", type=_positive("--requests"), default=400, help="with --serve: requests per row")
    b.add_argument("--max-time", type=float, default=10.0, help="with --serve: seconds per row at most")
    b.add_argument("--api-key-env", metavar="VAR", help="with --serve: the API key's environment variable")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``serve``/``bench`` standalone (``python -m fine_infer.cli_serve``), with the CLI's error handling."""
    p = argparse.ArgumentParser(prog="fine-infer", description="fine-infer serve / bench")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=fn.__doc__)
        sp.set_defaults(fn=fn)
        return sp

    add_commands(sub, add)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except FineInferError as exc:
        if args.debug:
            raise
        print(f"fine-infer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if args.debug:
            raise
        print(f"fine-infer {args.command}: error: missing dependency ({exc}); "
              "install the extra it needs: pip install 'fine-infer[serve]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
