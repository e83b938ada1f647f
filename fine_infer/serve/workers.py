"""Several server processes on one listening socket (``fine-infer serve --workers N``).

One server process is held to about one core by its event loop and the GIL: for a small model most of a request's
cost is Python (HTTP, JSON, tokenizing, batching), so on a box with more cores a second process serves more. The
parent binds the socket and listens; each worker is a fork that loads the bundle itself (nothing heavy is created
before the fork: no ONNX Runtime session, no thread pool), warms up and calibrates, and only then accepts, so every
connection reaches a worker that is ready. The kernel hands each new connection to one of the workers.

The parent forwards SIGTERM/SIGINT to the workers, each drains as a lone server does, and the parent exits 0 when
every worker did. A worker that dies on its own stops the others: a half-alive server is worse than a restarted one.
``/v1/info`` and ``/metrics`` describe the worker that answered (``"worker": [i, N]``).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Callable

BACKLOG = 2048  # connections the kernel queues for the workers to accept


def serve_in_workers(workers: int, sock: socket.socket, serve_one: Callable[[int], int]) -> int:
    """Fork ``workers`` processes that each run ``serve_one(index)`` (it loads, prepares and serves on ``sock``, and
    returns an exit code); wait for all. Returns 0 when every worker exited 0, else the first failure's code."""
    if not hasattr(os, "fork"):
        from fine_infer.errors import ConfigError

        raise ConfigError("--workers above 1 needs a POSIX system (fork); use --workers 1 here")
    sock.listen(BACKLOG)  # connections queue from now on, answered once a worker is ready
    children: dict[int, int] = {}
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker: default signal handling, its own server, never back into the parent's code
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = serve_one(i)
            except BaseException as exc:  # noqa: BLE001 - a worker reports in one line, as the CLI does
                print(f"fine-infer serve: worker {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = i
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    result = 0
    try:
        while children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            i = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            if code != 0 and result == 0:
                result = code if code > 0 else 1
            if not stopping and i is not None:  # a worker ended on its own: stop the rest
                print(f"fine-infer serve: worker {i} exited ({code}); stopping the others", file=sys.stderr)
                stopping = True
                result = result or 1
                for other in children:
                    _signal(other, signal.SIGTERM)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    return result


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
