"""``serve``: a bundle (and an index) over HTTP with cross-request batching (:mod:`fine_infer.serve`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Mapping

from fine_infer.errors import ConfigError
from fine_infer.cli._args import AddCommand, add_backend_args, add_bundle_arg, api_key_from_env, positive

if TYPE_CHECKING:
    from fine_infer.batching import BatchSettings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a bundle over HTTP: /v1/embed, /v1/search (with --index), /v1/classify, /healthz, /readyz, /metrics.

    Listens on 127.0.0.1:8080 by default; any other address needs an API key (--api-key-env). Concurrent requests
    are batched per graph, with each graph's batch size calibrated at start-up unless given.
    """
    from fine_infer.batching import BatchSettings
    from fine_infer.serve import Limits, bind_socket, check_bind

    # Before loading anything, a refused bind, a busy port, a bad setting or a bad bench file fails fast.
    if args.kernels and args.backend != "torch":
        raise ConfigError("--kernels runs the fused Triton kernels in the torch backend: add --backend torch")
    api_key = api_key_from_env(args.api_key_env)
    check_bind(args.host, api_key)
    limits = Limits(**{f: getattr(args, f) for f in _limit_fields()})
    sock = bind_socket(args.host, args.port)
    batching = BatchSettings(max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
                             adaptive_delay=not args.fixed_delay, lanes=args.lanes)
    bench = None
    if args.bench_json:
        from fine_infer.tools.bench import load_json

        bench = load_json(args.bench_json)
    if args.workers == 1:
        return _serve(args, sock, api_key, limits, batching, bench)
    from fine_infer.serve.workers import serve_in_workers

    return serve_in_workers(args.workers, sock,
                            lambda i: _serve(args, sock, api_key, limits, batching, bench, worker=(i, args.workers)))


def _serve(args: argparse.Namespace, sock: Any, api_key: str | None, limits: Any, batching: Any, bench: Any,
           worker: tuple[int, int] | None = None) -> int:
    """Load the bundle (and index), build the app and serve on ``sock`` until stopped; the exit code. One of
    ``--workers`` prepares before it accepts (the listening socket is shared: a connection must find it ready) and
    gets the cores divided between the workers unless ``--threads`` says otherwise."""
    import fine_infer
    from fine_infer._cpu import cpu_cores
    from fine_infer.serve import create_app, run

    threads = args.threads or (max(1, cpu_cores() // worker[1]) if worker else None)
    session = fine_infer.load(args.bundle, backend=args.backend, variant=args.variant, threads=threads,
                              public_key=args.public_key, device=args.device, kernels=args.kernels)
    if bench is not None:
        batching = with_bench_sizes(batching, bench, session, f"bench:{args.bench_json}")
    index = None
    if args.index:
        from fine_infer.index import Index

        index = Index.load(args.index, mmap=args.mmap)
    app = create_app(session, index, batching=batching, limits=limits, api_key=api_key,
                     allow_index_mismatch=args.allow_index_mismatch, kernel_cache=args.kernel_cache,
                     prepare="now" if worker else "background", worker=worker)
    print(f"fine-infer serve: {args.bundle} ({session.manifest.arch or session.manifest.source}, {session.backend})"
          + (f", index {args.index} ({len(index)} items)" if index is not None else "")
          + f" on http://{args.host}:{args.port}" + (" (API key required)" if api_key else "")
          + (f", worker {worker[0] + 1} of {worker[1]} ready" if worker else ""), file=sys.stderr)
    clean = run(app, args.host, args.port, sock=sock, api_key=api_key, log_level=args.log_level,
                access_log=args.access_log, graceful_s=args.graceful_timeout)
    return 0 if clean else 1  # 0 after a drained SIGTERM too; 1 when requests were cut off


# Limits fields -> (metavar, help) of the `serve` option of the same name (`_s` dropped): one line each, the default
# shown from Limits itself.
_LIMIT_HELP = {
    "max_body_bytes": ("BYTES", "largest request body (413 beyond)"),
    "max_image_pixels": ("PIXELS", "largest image, from its header before decoding (413 beyond)"),
    "max_request_pixels": ("PIXELS", "decoded pixels of all images of one request together, from their headers "
                                     "(413 beyond): bounds the decoding one request can cost"),
    "max_text_tokens": ("TOKENS", "longest text in tokens (default: %(default)s = the model's maximum)"),
    "max_text_chars": ("CHARS", "longest text in characters, on every path (400 beyond)"),
    "max_batch_items": ("N", "images or texts in one request"),
    "max_k": ("K", "most hits one search may ask for"),
    "request_timeout_s": ("SECONDS", "longest a request may take, from its headers to its answer (504 beyond)"),
    "read_timeout_s": ("SECONDS", "longest a request's headers may take to arrive from its first byte, and its "
                                  "body after them (408 and the connection closed)"),
    "idle_timeout_s": ("SECONDS", "an open connection that sends nothing this long is closed"),
    "max_connections": ("N", "open connections at most: more are answered 503 with Retry-After and closed (the "
                             "open-file limit is raised to fit when the system allows)"),
    "max_queue": ("N", "/v1 requests in progress at most once their body is in (decoded, queued or run): more are "
                       "answered 429 with Retry-After"),
    "max_header_bytes": ("BYTES", "largest request head, request line and headers (431 beyond)"),
    "max_body_bytes_held": ("BYTES", ("request bodies held in memory at once, summed over every request being "
                                      "received or served: more are answered 503 with Retry-After")),
}


def _limit_fields() -> list[str]:
    from dataclasses import fields

    from fine_infer.serve.limits import Limits

    return [f.name for f in fields(Limits)]


def _positive_number(flag: str, kind: type) -> Any:
    def parse(s: str) -> int | float:
        try:
            v = kind(s)
        except ValueError:
            v = 0
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{flag} takes a positive {'integer' if kind is int else 'number'}, "
                                             f"got {s!r}")
        return v

    return parse


def _add_limit_args(s: argparse.ArgumentParser) -> None:
    """One option per :class:`~fine_infer.serve.Limits` field, its default that of the field."""
    from dataclasses import fields

    from fine_infer.serve.limits import Limits

    for f in fields(Limits):
        metavar, text = _LIMIT_HELP[f.name]
        flag = "--" + f.name.removesuffix("_s").replace("_", "-")
        kind = float if f.name.endswith("_s") else int
        default = f.default
        s.add_argument(flag, dest=f.name, type=_positive_number(flag, kind), default=default, metavar=metavar,
                       help=text if "%(default)" in text else text + " (default: %(default)s)")


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
    add_bundle_arg(s)
    s.add_argument("--index", help="index file for /v1/search")
    s.add_argument("--mmap", action="store_true", help="memory-map the index (large galleries)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --api-key-env)")
    s.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    add_backend_args(s)
    s.add_argument("--public-key", metavar="PUB.pem",
                   help="serve only if the bundle's signature verifies with this key (see `fine-infer sign`)")
    s.add_argument("--device", default="cpu",
                   help="where the torch backend runs: cpu, cuda or cuda:N (ONNX Runtime picks CUDA by itself)")
    s.add_argument("--kernels", action="store_true",
                   help="with --backend torch: run the fused Triton kernels (on CUDA), compiled and tuned for every "
                        "batch size before /readyz")
    s.add_argument("--kernel-cache", metavar="DIR",
                   help="keep compiled kernels and their tuning here across restarts (a volume), so a restarted "
                        "server is ready in seconds (default: $TRITON_CACHE_DIR, else ~/.triton/cache)")
    s.add_argument("--workers", type=positive("--workers"), default=1,
                   help="server processes sharing the port, each with its own copy of the model (one process is held "
                        "to about a core by Python: more serve more requests of a small model on a box with more "
                        "cores); each prepares before it accepts")
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
    _add_limit_args(s)
    s.add_argument("--allow-index-mismatch", action="store_true",
                   help="serve an --index that records another bundle than this one (refused otherwise: its hits "
                        "would be meaningless)")
    s.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to finish in-flight requests on SIGTERM")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level")
    s.add_argument("--access-log", action="store_true", help="log every request (off: errors and start/stop only)")
