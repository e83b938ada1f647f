"""Helpers for the deployment tests (imported by conftest.py and the tests; a unique module name, not conftest).

Every registered arch is exercised (``fine_infer.models.list_archs()``); an arch that cannot be built yet is an
explicit xfail with the reason, never a silent skip.
"""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path

import pytest

SPEC_ARCHS = ["attributes", "fashion-fine", "maaf", "raf", "triplet"]  # the five archs of SPEC.md §1
VARIANTS = ("fp16", "int8", "cpu-opt")
_BUILD_ERRORS: dict[str, str] = {}


def zoo_archs() -> list[str]:
    """The registry's archs; while the registry cannot import every family module, the five of the spec."""
    from fine_infer.models import list_archs

    try:
        return list_archs()
    except ImportError:
        return SPEC_ARCHS


def build_tiny(arch: str):
    """``create(arch, "tiny")``; if the registry cannot load (a family module is still being written), the arch's
    own module is imported and its registry entry built directly."""
    from fine_infer.models import create

    try:
        return create(arch, "tiny")
    except ImportError:
        from fine_infer.models import _registry

        importlib.import_module(f"fine_infer.models.{arch.replace('-', '_')}")
        entry = _registry._REGISTRY[arch]
        return entry.model_cls(entry.presets["tiny"]()).eval()


def _build_error(arch: str) -> str | None:
    if arch not in _BUILD_ERRORS:
        try:
            build_tiny(arch)
            _BUILD_ERRORS[arch] = ""
        except Exception as exc:  # noqa: BLE001 - any failure to build is reported as the xfail reason
            _BUILD_ERRORS[arch] = f"{arch} cannot be built yet: {type(exc).__name__}: {exc}"
    return _BUILD_ERRORS[arch] or None


def arch_params() -> list:
    """One pytest param per arch; unbuildable archs are xfail (not run) with the reason."""
    out = []
    for arch in zoo_archs():
        reason = _build_error(arch)
        out.append(pytest.param(arch, marks=pytest.mark.xfail(reason=reason, run=False)) if reason else arch)
    return out


def export_with_variants(model, out: Path, variants=VARIANTS):
    """A tiny bundle of ``model`` with ``variants`` written and gated by ``write_variants``.

    Uses ``export_model(..., variants=...)`` once the export is wired to it; until then the same steps by hand
    (fp32 parity is left to tests/export, the variant gates all run)."""
    from fine_infer.export import export_model

    if "variants" in inspect.signature(export_model).parameters:
        report = export_model(model, out, variants=list(variants), force=True)
        return report
    from fine_infer.bundle import BundleWriter, Manifest, tool_versions
    from fine_infer.export._bundle_export import ExportReport, GraphJob, _run_jobs, default_tolerance
    from fine_infer.export._variants import write_variants
    from fine_infer.models import config_to_dict

    text = model.text_preprocess
    graphs = model.graphs()
    jobs = [
        GraphJob(spec, model.graph_module(n).eval(), (lambda b, L, g, _n=n: model.example_inputs(_n, b, L, g)),
                 text.max_length if text else None,
                 {t.name: "logits" for t in spec.outputs} if spec.task == "classify" else {})
        for n, spec in graphs.items()
    ]
    report = ExportReport(str(out))
    with BundleWriter(out, force=True) as writer:
        entries = _run_jobs(jobs, writer, report, None, "dynamo", default_tolerance(None), (1, 3, 8), False)
        write_variants(writer.tmp, entries, jobs, list(variants), report=report)
        tok = model.build_tokenizer()
        if tok is not None:
            tok.save(os.fspath(writer.path("tokenizer.json")))
        writer.commit(Manifest(
            graphs=entries, files={}, arch=model.arch, preset="tiny", config=config_to_dict(model.config), source="zoo",
            embed_dim=model.embed_dim, image=model.image_preprocess, text=text,
            tokenizer="tokenizer.json" if tok is not None else None, class_labels=model.class_labels,
            versions=tool_versions(), validation={"passed": True, "graphs": report.graphs},
        ))
    return report


class FakeTensorRT:
    """Just enough of the ``tensorrt`` module's documented API to drive the builder on CPU.

    Records what the builder was asked to do (network flags, builder flags, profiles, timing cache) so the tests can
    check the 10.x / 11.x precision logic and the manifest bookkeeping; it builds nothing."""

    def __init__(self, version: str, parse_errors: list[dict] | None = None, inputs: list[tuple] | None = None):
        self.__version__ = version
        self.calls: dict = {"flags": [], "profiles": {}, "cache_in": None}
        self._parse_errors = parse_errors or []
        self._inputs = inputs or []
        trt = self

        class Enum:
            def __init__(self, **members):
                for k, v in members.items():
                    setattr(self, k, v)

        self.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=5)
        self.BuilderFlag = Enum(FP16=0) if int(version.split(".")[0]) < 11 else Enum()
        self.MemoryPoolType = Enum(WORKSPACE=0)
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                trt.calls["network_flags"] = flags
                self.num_inputs = len(trt._inputs)

            def get_input(self, i):
                return Tensor(*trt._inputs[i])

        class Error:
            def __init__(self, d):
                self.d = d

            def node(self):
                return self.d.get("node", 0)

            def node_name(self):
                return self.d["name"]

            def node_operator(self):
                return self.d["op"]

            def code(self):
                return "UNSUPPORTED_NODE"

            def desc(self):
                return self.d["message"]

        class Parser:
            def __init__(self, network, logger):
                self.num_errors = len(trt._parse_errors)

            def parse_from_file(self, path):
                return not trt._parse_errors

            def get_error(self, i):
                return Error(trt._parse_errors[i])

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                trt.calls["profiles"][name] = (lo, opt, hi)

        class Cache:
            def serialize(self):
                return b"timing-cache-bytes"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                trt.calls["workspace"] = size

            def set_flag(self, flag):
                trt.calls["flags"].append(flag)

            def add_optimization_profile(self, p):
                pass

            def create_timing_cache(self, data):
                trt.calls["cache_in"] = data
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                trt.calls["ignore_mismatch"] = ignore_mismatch

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags=0):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"fake-engine-bytes"

        self.Builder, self.OnnxParser = Builder, Parser


