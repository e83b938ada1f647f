"""The layout is the architecture: imports go one way through the layers of ARCHITECTURE.md, with no cycles.

Every ``import`` of the package's own modules is read from the source (imports inside functions included) and
checked against the layer table below, which is the one in ARCHITECTURE.md. A module may import its own package
and any lower layer, never a higher one or a sibling package of its own layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> the import name it is installed as
FOLDERS = {"fine_infer": "fine_infer", "kernels": "fine_infer.kernels", "export": "fine_infer.export"}
# (layer rank, package or module prefix); a module belongs to the longest prefix that matches
LAYERS = [
    (0, "fine_infer.errors"), (0, "fine_infer.specs"), (0, "fine_infer.compare"), (0, "fine_infer.preprocess"),
    (0, "fine_infer.tokenization"), (0, "fine_infer.textclean"), (0, "fine_infer.labels"), (0, "fine_infer._atomic"),
    (0, "fine_infer._cpu"), (0, "fine_infer._strict_json"),
    (0, "fine_infer._native"), (0, "fine_infer._bare_import"),
    (1, "fine_infer.bundle"),
    (2, "fine_infer.kernels"),
    (3, "fine_infer.models"),
    (4, "fine_infer.export"),
    (5, "fine_infer.runtime"),
    (6, "fine_infer.batching"), (6, "fine_infer.index"),
    (7, "fine_infer"),  # the public facade (load, Session, Index)
    (8, "fine_infer.serve"),
    (9, "fine_infer.tools"),
    (10, "fine_infer.cli"),
]
PRIMITIVES = 0


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, name in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            mods[".".join((name, *parts))] = path
    return mods


MODULES = _modules()
NATIVE = "fine_infer._native"  # built from cpp/ (pybind11); it imports nothing of the package


def _layer(module: str) -> tuple[int, str]:
    best = max((p for p in LAYERS if module == p[1] or module.startswith(p[1] + ".")), key=lambda p: len(p[1]))
    return best


def _imports(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports (resolving relative imports; ``from a import b`` counts ``a.b``
    when ``b`` is a module, else ``a``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in (*MODULES, NATIVE) else base for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in MODULES and n != NATIVE:  # `import fine_infer.x.y` of a non-module attribute: its module
                n = n.rpartition(".")[0]
            if n and n != module:
                out.add(n)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}
GRAPH[NATIVE] = set()
MODULES[NATIVE] = ROOT / "cpp" / "bindings.cpp"


def test_every_import_goes_down_the_layers():
    bad = []
    for m, deps in GRAPH.items():
        rank, home = _layer(m)
        for d in deps:
            d_rank, d_home = _layer(d)
            if d.startswith(m + ".") and MODULES[m].name == "__init__.py":
                continue  # a package re-exporting its own modules
            if d_rank > rank or (d_rank == rank and d_home != home and rank != PRIMITIVES):
                bad.append(f"{m} ({home}) imports {d} ({d_home})")
    assert not bad, "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    # Tarjan's strongly connected components over the module graph; a package __init__ importing its own modules
    # (re-exports) and a module importing its package's __init__ are not cycles of design.
    def edges(m):
        return [d for d in GRAPH[m] if not (d.startswith(m + ".") or m.startswith(d + "."))]

    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_native_module_has_one_door():
    users = sorted(m for m, deps in GRAPH.items() if NATIVE in deps)
    assert users == ["fine_infer.index._native_search"], users


def test_nothing_imports_the_cli():
    users = sorted(m for m, deps in GRAPH.items() if any(d.startswith("fine_infer.cli") for d in deps)
                   and not m.startswith("fine_infer.cli"))
    assert users == [], users


def test_the_onnxruntime_path_imports_no_torch():
    # What `fine_infer.load(bundle)` on ONNX Runtime imports at module level must not pull torch in (the runtime
    # extra has none): checked in a fresh interpreter.
    import subprocess
    import sys

    code = ("import sys, fine_infer; from fine_infer.runtime import onnxruntime_runner, session, factory, choice; "
            "import fine_infer.bundle, fine_infer.index, fine_infer.batching; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
