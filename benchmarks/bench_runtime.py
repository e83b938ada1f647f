"""ONNX Runtime vs PyTorch eager, per zoo arch (tiny preset), graph and batch size (pytest-benchmark).

    pytest benchmarks/bench_runtime.py -s              # the table of ratios is printed at the end

Each arch is exported once to a temp bundle; every graph is timed on synthetic inputs at batch 1, 8 and 32 on both
backends. The ratio row says how many times faster ONNX Runtime is than eager PyTorch at the same cell.
"""

import importlib

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("torch")

import fine_infer  # noqa: E402
from fine_infer.runtime.feeds import example_feeds  # noqa: E402

ARCHS = ("fashion-fine", "maaf", "raf", "triplet", "attributes")
BATCHES = (1, 8, 32)
BACKENDS = ("onnxruntime", "torch")
_medians: dict[tuple, float] = {}
_mins: dict[tuple, float] = {}  # the fastest round: robust when other jobs share the CPU


def _export(arch, out):
    """The arch's tiny bundle; skip the arch when it is not in the zoo (yet)."""
    from fine_infer.export import export_model
    from fine_infer.models import _registry

    try:
        entry = _registry.get_arch(arch)
    except ImportError:  # the registry imports every family; load this one alone while another is missing
        try:
            importlib.import_module("fine_infer.models." + arch.replace("-", "_"))
        except ImportError:
            pytest.skip(f"arch {arch} is not in the zoo yet")
        entry = _registry._REGISTRY[arch]
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"arch {arch}: {exc}")
    import torch

    torch.manual_seed(0)
    export_model(entry.model_cls(entry.presets["tiny"]()).eval(), out, preset="tiny", force=True)
    return out


@pytest.fixture(scope="module", params=ARCHS)
def sessions(request, tmp_path_factory):
    bundle = _export(request.param, tmp_path_factory.mktemp("rt") / request.param)
    out = {"onnxruntime": fine_infer.load(bundle, backend="onnxruntime")}
    try:
        out["torch"] = fine_infer.load(bundle, backend="torch")
        out["torch"].runner(next(iter(out["torch"].manifest.graphs)))
    except Exception as exc:  # noqa: BLE001 - e.g. the registry cannot rebuild the model yet
        out["torch"] = exc
    return request.param, out


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_latency(benchmark, sessions, backend, batch):
    arch, by_backend = sessions
    session = by_backend[backend]
    if isinstance(session, Exception):
        pytest.skip(f"{backend} cannot run {arch} here: {session}")
    m = session.manifest
    vocab = session.tokenizer.get_vocab_size(with_added_tokens=True) if session.tokenizer else None
    benchmark.group = f"{arch} batch {batch}"
    for graph, g in m.graphs.items():
        feeds = example_feeds(g.spec, batch, m.text, vocab)
        for _ in range(2):
            session.run(graph, feeds)
    # One benchmark per (arch, backend, batch) covering every graph of the arch: the sum is what a query costs.
    graphs = [(graph, example_feeds(g.spec, batch, m.text, vocab)) for graph, g in m.graphs.items()]
    benchmark.pedantic(lambda: [session.run(gn, f) for gn, f in graphs], rounds=15, warmup_rounds=2, iterations=1)
    med, low = benchmark.stats.stats.median, benchmark.stats.stats.min
    _medians[(arch, backend, batch)] = med
    _mins[(arch, backend, batch)] = low
    other = _medians.get((arch, "onnxruntime", batch))
    if backend == "torch" and other:
        benchmark.extra_info["torch_over_onnxruntime"] = round(med / other, 2)


def test_print_ratios():
    """The summary: per arch and batch, median (and fastest) ms of each backend and torch/onnxruntime (>1: ONNX
    Runtime is faster). On a shared CPU the fastest-round ratio is the steadier one."""
    rows = sorted({(a, b) for a, _, b in _medians})
    print("\narch           batch   ort median ms  torch median ms  ratio   ort min ms  torch min ms  ratio(min)")
    nan = float("nan")
    for arch, batch in rows:
        o, t = _medians.get((arch, "onnxruntime", batch)), _medians.get((arch, "torch", batch))
        lo, lt = _mins.get((arch, "onnxruntime", batch)), _mins.get((arch, "torch", batch))
        ratio = f"{t / o:6.2f}×" if o and t else "     -"
        ratio_min = f"{lt / lo:9.2f}×" if lo and lt else "        -"
        print(f"{arch:<14} {batch:>5} {o * 1e3 if o else nan:>14.3f} {t * 1e3 if t else nan:>16.3f} {ratio} "
              f"{lo * 1e3 if lo else nan:>12.3f} {lt * 1e3 if lt else nan:>13.3f} {ratio_min}")
