"""Argument groups and helpers shared by the command modules (after Polygraphy's ``tools/args``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Callable

from fine_infer.errors import ConfigError

#: ``add(name, fn, help) -> parser``: how a command module registers a command (see :func:`fine_infer.cli.build_parser`)
AddCommand = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def add_bundle_arg(sp: argparse.ArgumentParser, help: str = "bundle folder (written by fine-infer export)",
                   **kwargs: Any) -> None:
    """The positional BUNDLE argument most commands take."""
    sp.add_argument("bundle", help=help, **kwargs)


def add_backend_args(sp: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--variant``, shared by every command that runs a bundle."""
    from fine_infer.runtime import BACKENDS

    sp.add_argument("--backend", default="auto", choices=list(BACKENDS), help="what runs the graphs")
    sp.add_argument("--variant", help="graph variant written at export: fp16, int8, cpu-opt (default the fp32 graph); "
                                      "with --backend openvino the precision: fp32 or bf16")


def load_session(bundle: str | Path, args: argparse.Namespace, **kwargs: Any):
    """``fine_infer.load`` with the command's --backend/--variant."""
    import fine_infer

    return fine_infer.load(bundle, backend=args.backend, variant=args.variant, **kwargs)


def print_json(obj: Any) -> None:
    """Indented JSON on stdout (numpy scalars as floats, other objects as strings)."""
    print(json.dumps(obj, indent=2, default=lambda o: float(o) if hasattr(o, "__float__") else str(o)))


def positive(name: str) -> Callable[[str], int]:
    """An argparse ``type`` for a positive integer option, erroring with the option's name."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes a positive integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} takes a positive integer, got {s!r}")
        return v

    return parse


def api_key_from_env(var: str | None) -> str | None:
    """The API key held in environment variable ``var`` (None when no variable is named)."""
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise ConfigError(f"--api-key-env {var}: the environment variable {var} is unset or empty")
    return key
