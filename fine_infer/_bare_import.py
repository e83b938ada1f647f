"""Keep the repository's ``kernels/`` and ``export/`` folders from answering a bare ``import kernels``/``import export``.

The two folders are installed as ``fine_infer.kernels`` and ``fine_infer.export`` (ARCHITECTURE.md). Whenever the
repository root is on ``sys.path`` — Python started there (``sys.path[0]`` is the current folder), or the editable
install, whose ``.pth`` lists the package's source roots — a bare ``import kernels`` would find the folder and shadow
the PyPI package ``kernels`` that transformers 5 imports. The folders' ``__init__`` modules call :func:`step_aside`
when imported under a bare name: the import is handed to the module of that name found elsewhere on ``sys.path``,
or fails as if the folder were not there.
"""

from __future__ import annotations

import importlib
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (the folder's half-imported ``__init__``) by the module ``name`` resolves to
    without the folder's parent on ``sys.path``; raise :class:`ModuleNotFoundError` when there is none.

    Python returns whatever ``sys.modules[name]`` holds once the ``__init__`` has run, so the caller's import gets
    the other module."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.curdir) != root]
    ours = sys.modules.pop(name, None)
    try:
        other = importlib.import_module(name)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {root}{os.sep}{name} is fine_infer.{name}; import it by that name)",
            name=name,
        ) from None
    finally:
        sys.path[:] = saved + [p for p in sys.path if p not in saved]
        if name not in sys.modules and ours is not None:
            sys.modules[name] = ours  # the import machinery removes it again as the error propagates
    sys.modules[name] = other
