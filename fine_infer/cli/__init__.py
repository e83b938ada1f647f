"""The fine-infer command line: a thin layer over the Python API.

One entry point, :func:`main` (the ``fine-infer`` console script, or ``python -m fine_infer.cli``). Each command group
lives in a module of this package with a ``register(add)`` function; the modules import their heavy dependencies
only when a command runs, so one missing extra never takes the whole CLI down. Every command prints one clear line
and exits non-zero on a :class:`~fine_infer.errors.FineInferError` (``--debug`` shows the traceback); a missing
optional dependency names the extra that installs it. Nothing imports this package.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import sys
from typing import Callable, Sequence

from fine_infer.errors import FineInferError, first_line

# Command-group modules, in the order their commands are listed by --help.
COMMAND_MODULES = ("export", "search", "demo", "eval", "deploy", "serve", "bench", "tune", "sign")

# Top-level module of a missing dependency -> the pyproject extra that installs it.
_EXTRAS = {
    "torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
    "onnxruntime": "runtime", "tokenizers": "runtime", "PIL": "runtime",
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "pydantic": "serve", "multipart": "serve",
    "prometheus_client": "serve", "httpx": "serve", "matplotlib": "serve", "tqdm": "serve",
    "triton": "kernels", "openvino": "openvino", "tensorrt": "tensorrt", "tritonclient": "test",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except on on/off flags (their default is the flag's absence) and where there is
    none (None: the help text says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(prog="fine-infer", description="The fine-infer command line: export, validate, run, "
                                "index, search, serve and benchmark fashion retrieval models.")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        # every option's help shows its default (an option without help text is a bug: tests/test_cli_help.py)
        sp = sub.add_parser(name, help=help, description=fn.__doc__, formatter_class=_HelpFormatter)
        sp.set_defaults(fn=fn)
        return sp

    for name in COMMAND_MODULES:
        importlib.import_module(f"fine_infer.cli.{name}").register(add)
    return p


def _extra_for(exc: ImportError) -> str:
    """The extra that provides the module ``exc`` failed to import (``all`` when unknown)."""
    top = (getattr(exc, "name", None) or "").split(".")[0]
    return _EXTRAS.get(top, "all")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fine-infer`` console script."""
    try:
        try:
            return _main(argv)  # (--help and argparse errors leave by SystemExit)
        finally:
            sys.stdout.flush()  # a reader gone shows here, not in the interpreter's last flush
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # another pipe or socket of the command: not ours to hide
        # The reader went away (`fine-infer info B | head -1`): stop quietly, with the status of a process that
        # SIGPIPE ended, and point stdout at /dev/null so the interpreter's last flush does not fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error or hang-up on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout: assume it is stdout's
        return True


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except FineInferError as exc:
        if args.debug:
            raise
        # one line, whatever a library put in the message (the first line names the problem)
        print(f"fine-infer {args.command}: error: {first_line(exc, 2000)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        if args.debug:
            raise
        print(f"fine-infer {args.command}: error: missing dependency ({exc}); "
              f"install the extra it needs: pip install 'fine-infer[{_extra_for(exc)}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # main() decides whether it was stdout's reader going away
    except OSError as exc:  # a path the user gave that cannot be read or written: one line, not a traceback
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"fine-infer {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
