"""Loading a user encoder from ``pkg.mod:factory`` for ``fine-infer export --module``."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from fine_infer.errors import ConfigError


def load_factory(ref: str, search_path: str | Path | None = None):
    """Call ``factory()`` named by ``pkg.mod:factory``; it must return ``(module, {name: example tensor})``.

    ``search_path`` (default: the current directory) is put first on ``sys.path`` so local modules import."""
    if ":" not in ref:
        raise ConfigError(f"--module takes 'package.module:factory', got {ref!r}")
    mod_name, _, attr = ref.partition(":")
    path = str(Path(search_path or ".").resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {mod_name!r} for --module: {exc}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ConfigError(f"{mod_name} has no callable {attr!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)
            and isinstance(result[1], dict)):
        raise ConfigError(f"{ref}() must return (nn.Module, dict of named example tensors)")
    return result


def parse_dynamic_axes(specs: list[str] | None) -> dict[str, dict[int, str]]:
    """``["ids:1", "mask:1", "feats:2=frames"]`` → ``{"ids": {1: "sequence"}, ...}``.

    The axis name defaults to ``sequence`` for dim 1 and ``axis<DIM>`` otherwise; inputs sharing a name share a size."""
    out: dict[str, dict[int, str]] = {}
    for s in specs or []:
        name, sep, rest = s.partition(":")
        dim_s, _, axis = rest.partition("=")
        if not sep or not name or not dim_s.isdigit():
            raise ConfigError(f"--dynamic-axis takes NAME:DIM or NAME:DIM=AXIS, got {s!r}")
        dim = int(dim_s)
        out.setdefault(name, {})[dim] = axis or ("sequence" if dim == 1 else f"axis{dim}")
    return out
