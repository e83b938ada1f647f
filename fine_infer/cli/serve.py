"""``serve``: a bundle (and an index) over HTTP with cross-request batching (:mod:`fine_infer.serve`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Mapping

from fine_infer.cli._args import AddCommand, add_backend_args, api_key_from_env, positive

if TYPE_CHECKING:
    from fine_infer.batching import BatchSettings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a bundle over HTTP: /v1/embed, /v1/search (with --index), /v1/classify, /healthz, /readyz, /metrics.

    Listens on 127.0.0.1:8080 by default; any other address needs an API key (--api-key-env). Concurrent requests
    are batched per graph, with each graph's batch size calibrated at start-up unless given.
    """
    import fine_infer
    from fine_infer.batching import BatchSettings
    from fine_infer.serve import Limits, check_bind, create_app, run

    # Before loading anything, a refused bind, a bad setting or a bad bench file fails fast.
    api_key = api_key_from_env(args.api_key_env)
    check_bind(args.host, api_key)
    batching = BatchSettings(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                             adaptive_delay=not args.fixed_delay, lanes=args.lanes)
    bench = None
    if args.bench_json:
        from fine_infer.tools.bench import load_json

        bench = load_json(args.bench_json)
    session = fine_infer.load(args.bundle, backend=args.backend, variant=args.variant, threads=args.threads,
                              public_key=args.public_key)
    if bench is not None:
        batching = with_bench_sizes(batching, bench, session, f"bench:{args.bench_json}")
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
    app = create_app(session, index, batching=batching, limits=limits, api_key=api_key)
    print(f"fine-infer serve: {args.bundle} ({session.manifest.arch or session.manifest.source}, {session.backend})"
          + (f", index {args.index} ({len(index)} items)" if index is not None else "")
          + f" on http://{args.host}:{args.port}" + (" (API key required)" if api_key else ""), file=sys.stderr)
    run(app, args.host, args.port, api_key=api_key, log_level=args.log_level, access_log=args.access_log,
        graceful_s=args.graceful_timeout)
    return 0


def with_bench_sizes(batching: BatchSettings, result: Mapping[str, Any], session: Any, source: str) -> BatchSettings:
    """``batching`` with each graph's batch size taken from a parsed ``fine-infer bench`` result (its rows for the
    session's backend, :func:`~fine_infer.batching.bench_batch_sizes`), recorded as ``source``. A graph the result
    has no rows for keeps the fixed ``max_batch_size`` when one is set, else it is calibrated; search batching stays
    as the fixed size set it (off with ``--max-batch-size 1``)."""
    from fine_infer.batching import bench_batch_sizes

    graphs = session.manifest.graphs
    sizes = {g: n for g, n in bench_batch_sizes(result, session.backend).items() if g in graphs}
    if isinstance(batching.max_batch_size, int):
        sizes = {g: sizes.get(g, batching.max_batch_size) for g in graphs}
    return dataclasses.replace(batching, max_batch_size=sizes, size_source=source,
                               search_max_queries=batching.search_batch_limit)


def register(add: AddCommand) -> None:
    """Register ``serve``."""
    s = add("serve", cmd_serve, "serve a bundle (and an index) over HTTP with cross-request batching")
    s.add_argument("bundle")
    s.add_argument("--index", help="index file for /v1/search")
    s.add_argument("--mmap", action="store_true", help="memory-map the index (large galleries)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --api-key-env)")
    s.add_argument("--port", type=int, default=8080)
    add_backend_args(s)
    s.add_argument("--public-key", metavar="PUB.pem",
                   help="serve only if the bundle's signature verifies with this key (see `fine-infer sign`)")
    s.add_argument("--threads", type=positive("--threads"), help="intra-op threads of ONNX Runtime")
    s.add_argument("--max-batch-size", type=positive("--max-batch-size"),
                   help="rows per model run for every graph (default: measured per graph at start-up)")
    s.add_argument("--lanes", type=positive("--lanes"),
                   help="batches of a graph in the model at once, each on (--threads, else the cores) / lanes "
                        "threads (ONNX Runtime; default: measured with the batch size, else 1)")
    s.add_argument("--max-delay-ms", type=float, default=2.0, help="how long a request may wait for batch-mates")
    s.add_argument("--fixed-delay", action="store_true",
                   help="always wait --max-delay-ms for batch-mates (default: only when several requests are queued)")
    s.add_argument("--bench-json", help="take each graph's batch size from a `fine-infer bench --json` result")
    s.add_argument("--api-key-env", metavar="VAR", help="require the API key held in environment variable VAR")
    s.add_argument("--max-body-bytes", type=positive("--max-body-bytes"))
    s.add_argument("--max-image-pixels", type=positive("--max-image-pixels"))
    s.add_argument("--max-text-tokens", type=positive("--max-text-tokens"),
                   help="default: the model's maximum text length")
    s.add_argument("--max-batch-items", type=positive("--max-batch-items"), help="images/texts per request")
    s.add_argument("--max-k", type=positive("--max-k"))
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests on SIGTERM")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true")
