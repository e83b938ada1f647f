"""Helpers for the deployment tests (imported by conftest.py and the tests; a unique module name, not conftest).

Every registered arch is exercised (``fine_infer.models.list_archs()``, which must hold the five archs of the model
zoo, ``ZOO_ARCHS``).
"""

from __future__ import annotations

from pathlib import Path

ZOO_ARCHS = ["attributes", "fashion-fine", "maaf", "raf", "triplet"]  # the five archs of the model zoo
VARIANTS = ("fp16", "int8", "cpu-opt")


def build_tiny(arch: str):
    """``create(arch, "tiny")`` with random weights."""
    from fine_infer.models import create

    return create(arch, "tiny")


def arch_params() -> list[str]:
    """Every registered arch (a broken one fails its tests instead of being skipped)."""
    from fine_infer.models import list_archs

    archs = list_archs()
    assert set(ZOO_ARCHS) <= set(archs), f"the registry lacks archs of the model zoo: {set(ZOO_ARCHS) - set(archs)}"
    return archs


def export_with_variants(model, out: Path, variants=VARIANTS):
    """A tiny bundle of ``model`` exported with ``variants``, each written and gated by the export."""
    from fine_infer.export import export_model

    return export_model(model, out, variants=list(variants), force=True)


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


