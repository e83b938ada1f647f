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

    def __init__(self, version: str, parse_errors: list[dict] | None = None, inputs: list[tuple] | None = None,
                 reject_cache: bool = False, serialized_cache: bytes | None = b"timing-cache-bytes"):
        self.__version__ = version
        self.calls: dict = {"flags": [], "cleared": [], "profiles": {}, "cache_in": None, "device": None,
                            "hardware_level": None, "caches_set": []}
        self._parse_errors = parse_errors or []
        self._inputs = inputs or []
        self.current_device = None  # set by the fake torch.cuda.device scope (conftest.fake_trt)
        self._reject_cache = reject_cache  # set_timing_cache returns False for a non-empty cache (another GPU's)
        self._serialized_cache = serialized_cache  # what the built cache serialises to (None: nothing, as seen)
        trt = self

        class Enum:
            def __init__(self, **members):
                for k, v in members.items():
                    setattr(self, k, v)

        self.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=5)
        # TF32 and VERSION_COMPATIBLE exist in 10.x and 11.x (the values are TensorRT's own business)
        common = {"TF32": 6, "VERSION_COMPATIBLE": 13}
        self.BuilderFlag = Enum(FP16=0, **common) if int(version.split(".")[0]) < 11 else Enum(**common)
        self.HardwareCompatibilityLevel = Enum(NONE=0, AMPERE_PLUS=1, SAME_COMPUTE_CAPABILITY=2)
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
            def __init__(self, data=b""):
                self.data = data

            def serialize(self):
                return trt._serialized_cache

        class Config:
            def __init__(self):
                self._level = None

            def set_memory_pool_limit(self, pool, size):
                trt.calls["workspace"] = size

            def set_flag(self, flag):
                trt.calls["flags"].append(flag)

            def clear_flag(self, flag):
                trt.calls["cleared"].append(flag)

            @property
            def hardware_compatibility_level(self):
                return self._level

            @hardware_compatibility_level.setter
            def hardware_compatibility_level(self, level):
                trt.calls["hardware_level"] = self._level = level

            def add_optimization_profile(self, p):
                pass

            def create_timing_cache(self, data):
                if data == b"damaged":
                    raise RuntimeError("timing cache: bad header")
                if data:
                    trt.calls["cache_in"] = data
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                trt.calls["ignore_mismatch"] = ignore_mismatch
                ok = not (trt._reject_cache and cache.data)
                if ok:
                    trt.calls["caches_set"].append(cache.data)
                return ok

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                trt.calls["device"] = trt.current_device  # TensorRT builds on the current CUDA device

            def create_network(self, flags=0):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"fake-engine-bytes"

        self.Builder, self.OnnxParser = Builder, Parser


