"""TensorRT engines from a bundle's ONNX graphs, built on the device that will run them.

(Over ~450 lines: one builder, its record and the bundle bookkeeping, kept together so every TensorRT call can be read
against NVIDIA's documentation in one place.)

Written to NVIDIA's documented Python API (``tensorrt`` 10.x and 11.x); ``tensorrt`` is imported lazily and a
missing TensorRT or GPU is a one-line :class:`BackendUnavailableError`. The flow is Polygraphy's
``EngineFromNetwork(NetworkFromOnnxPath(...))`` made concrete:

1. builder → network → ``OnnxParser.parse_from_file``; every parser error is reported with its node name and op;
2. one optimisation profile covering every dynamic input: batch min/opt/max 1/4/16 and sequence 1/max/max by
   default (edge boxes serve small batches; text is padded to the bundle's max length), overridable;
3. a timing cache loaded before the build and saved after it, so rebuilding on the same device is fast;
4. precision. TensorRT 11 networks are always strongly typed: precision comes from the ONNX types, so fp16 is built
   from the fp16 graph (``--fp16`` at export). TensorRT 10 takes both: an fp16 graph is built strongly typed too
   (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, opt-in on 10.x), and ``fp16=True`` on an fp32 graph sets the
   weak-typing ``BuilderFlag.FP16`` (TensorRT then picks per layer; removed in 11.x).
   Docs: "Migrating from TensorRT 10.x to 11.x — Strongly Typed Networks Are Now Required" and "Removed Python APIs
   and Replacements" (BuilderFlag.FP16 → strong typing with an fp16 ONNX), docs.nvidia.com/deeplearning/tensorrt;
   the Builder page: STRONGLY_TYPED "deprecated in TensorRT 11.0 ... retained for API compatibility but is ignored".
   fp32 means IEEE fp32: ``BuilderFlag.TF32`` is on by default in TensorRT (10-bit mantissas in fp32 GEMMs and
   convolutions) and is cleared, so an "fp32" engine is what its record says (``tf32: false``);
5. compatibility (TensorRT's "Engine Compatibility" docs): by default a plan runs only on the exact TensorRT version
   and GPU architecture that built it. ``version_compatible=True`` (``BuilderFlag.VERSION_COMPATIBLE``, the lean
   runtime embedded) builds a plan that later TensorRT releases of the same major (and 10 → 11) also run — loading it
   needs ``engine_host_code_allowed`` (Triton: ``--backend-config=tensorrt,version-compatible=true``);
   ``hardware_compatibility="ampere+"`` (``HardwareCompatibilityLevel.AMPERE_PLUS``) one that runs on any Ampere or
   newer GPU, ``"same-cc"`` on any GPU of the building GPU's compute capability. Both can cost speed; both are recorded;
6. the timing cache: a cache TensorRT rejects (another GPU or TensorRT version) or cannot serialise is replaced by a
   fresh one with a warning, as Polygraphy does, and the record says what happened (``timing_cache_status``);
7. the engine, a ``<engine>.json`` sidecar (TensorRT version, GPU name, compute capability, profiles, precision,
   compatibility modes, source ONNX sha256) and the timing cache are added to the bundle under new names; the manifest
   records them (variant ``trt`` or ``trt-fp16`` of each graph; ``validation["tensorrt"]`` holds every engine's record
   and the timing cache's name) and is rewritten atomically, after which the files it no longer lists are deleted.

Everything is built on CUDA device ``device`` (the builder runs inside ``torch.cuda.device(device)``: TensorRT builds
for the current device). :func:`plan_runs_on` says whether a recorded plan runs on another TensorRT version (the
``triton-repo`` guard).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from fine_infer._atomic import atomic_write_bytes
from fine_infer.errors import BackendUnavailableError, ConfigError, ExportError
from fine_infer.specs import GraphSpec

DEFAULT_BATCH = (1, 4, 16)
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max


class EngineBuildError(ExportError):
    """TensorRT could not parse or build; ``node_errors`` lists every parser error (node, op, message)."""

    def __init__(self, message: str, node_errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.node_errors = node_errors or []


@dataclass
class EngineInfo:
    """What an engine was built from and for; saved as the engine's ``.json`` sidecar."""

    engine: str
    onnx: str
    onnx_sha256: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    precision: str  # "fp32" (IEEE: TF32 cleared) or "fp16"
    typing: str  # "strong" or "weak"
    profiles: dict[str, list[list[int]]] = field(default_factory=dict)
    timing_cache: str | None = None
    seconds: float = 0.0
    tf32: bool | None = False  # False: BuilderFlag.TF32 cleared; None: this TensorRT has no such flag
    version_compatible: bool = False  # BuilderFlag.VERSION_COMPATIBLE (lean runtime embedded)
    hardware_compatibility: str = "none"  # "none", "ampere+" or "same-cc"
    timing_cache_status: str = "none"  # "none", "new", "reused", or why a cache was replaced / not saved
    device: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def tensorrt_module():
    """``import tensorrt``, or a one-line :class:`BackendUnavailableError` saying why it cannot be used here."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed here: engines are built and run on the NVIDIA device itself "
            "(JetPack ships it; elsewhere pip install --extra-index-url https://pypi.nvidia.com "
            "'fine-infer[gpu-cu12]' (or gpu-cu13; README: Installing on a GPU))"
        ) from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {tensorrt.__version__} is too old: fine-infer supports 10 and 11")
    return tensorrt


HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


def _device_scope(index: int):
    """``torch.cuda.device(index)``: TensorRT builds (and its runtime deserialises) on the current CUDA device."""
    import torch

    return torch.cuda.device(index)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in str(text).strip().split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    if not parts:
        raise ConfigError(f"{text!r} is not a TensorRT version (expected e.g. 10.13.3 or 10.13.3.9)")
    return tuple(parts)


def plan_runs_on(record: dict[str, Any], tensorrt_version: str) -> str | None:
    """Why the plan of an engine record (its ``.json`` sidecar) will not run on ``tensorrt_version``; None if it will.

    TensorRT's rules ("Engine Compatibility", TensorRT 10 and 11 docs): a plan runs only on the TensorRT version that
    built it (major, minor, patch, build); a version-compatible plan also on later releases of the same major, and a
    TensorRT 10 one on TensorRT 11, never on an older runtime. Versions are compared on the parts both give
    (``10.13`` matches ``10.13.3.9``)."""
    built_text = str(record.get("tensorrt_version", "?"))
    target = _version(tensorrt_version)
    try:
        built = _version(built_text)
    except ConfigError:
        return "its build record (<engine>.json) does not say which TensorRT built it"
    n = min(len(built), len(target))
    if built[:n] == target[:n]:
        return None
    if not record.get("version_compatible"):
        return (f"built with TensorRT {built_text}, and a plan runs only on the TensorRT version that built it "
                f"(not {tensorrt_version}) unless it is built --version-compatible")
    if target[:n] < built[:n]:
        return f"built with TensorRT {built_text}: a version-compatible plan runs on that release and later ones only"
    if target[0] != built[0] and (built[0], target[0]) != (10, 11):
        return (f"built with TensorRT {built_text}: a version-compatible plan runs on later releases of TensorRT "
                f"{built[0]} (and TensorRT 10 plans on 11), not on {tensorrt_version}")
    return None


def cuda_device(index: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of CUDA device ``index``; one-line error without a GPU."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("TensorRT builds need PyTorch with CUDA to query the GPU") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no CUDA GPU here: TensorRT engines are built on the GPU that runs them")
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


def default_profiles(
    spec: GraphSpec,
    max_seq_len: int | None = None,
    *,
    batch: Sequence[int] = DEFAULT_BATCH,
    sequence: Sequence[int] | None = None,
    axes: dict[str, Sequence[int]] | None = None,
) -> dict[str, Shapes]:
    """min/opt/max shapes of every input of ``spec``: static dims as they are, dynamic ones from the axis ranges.

    ``batch`` defaults to 1/4/16 and ``sequence`` to 1/max/max (``max_seq_len``, e.g. the bundle's text length);
    ``axes`` gives ranges for other named axes. An axis without a range is a :class:`ConfigError`."""
    ranges: dict[str, tuple[int, int, int]] = {"batch": profile_range("batch", batch)}
    if sequence is not None:
        ranges["sequence"] = profile_range("sequence", sequence)
    elif max_seq_len:
        ranges["sequence"] = (1, int(max_seq_len), int(max_seq_len))
    for name, r in (axes or {}).items():
        ranges[name] = profile_range(name, r)
    out: dict[str, Shapes] = {}
    for t in spec.inputs:
        lo, opt, hi = [], [], []
        for d in t.shape:
            if isinstance(d, int):
                lo.append(d), opt.append(d), hi.append(d)
                continue
            if d not in ranges:
                hint = "--sequence MIN,OPT,MAX" if d == "sequence" else f"--axis {d}=MIN,OPT,MAX"
                raise ConfigError(f"input {t.name!r} of graph {spec.name!r} has dynamic axis {d!r} without a profile "
                                  f"range; pass {hint}")
            a, b, c = ranges[d]
            lo.append(a), opt.append(b), hi.append(c)
        out[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def profile_range(name: str, values: Sequence[int]) -> tuple[int, int, int]:
    """``values`` as an optimisation profile range (MIN, OPT, MAX), or a ConfigError naming ``name``."""
    vals = tuple(int(v) for v in values)
    if len(vals) != 3 or not 1 <= vals[0] <= vals[1] <= vals[2]:
        raise ConfigError(f"profile range for {name!r} must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, "
                          f"got {list(values)}")
    return vals  # type: ignore[return-value]


def onnx_is_fp16(path: str | Path) -> bool:
    """Whether ``path`` is an fp16 graph (fine-infer's fp16 variant, or any fp16 initializer)."""
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("fine_infer.variant") == "fp16":
        return True
    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def _parser_errors(parser) -> list[dict[str, Any]]:
    """Every ONNX parser error as {node, name, op, code, message} (``IParserError``; ``node_name`` and
    ``node_operator`` exist since TensorRT 9.1, hence the fallbacks)."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        get = lambda attr, default="": getattr(e, attr)() if hasattr(e, attr) else default  # noqa: E731
        out.append({"node": get("node", -1), "name": get("node_name"), "op": get("node_operator"),
                    "code": str(get("code")), "message": get("desc")})
    return out


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: dict[str, Shapes],
    *,
    fp16: bool = False,
    timing_cache_path: str | Path | None = None,
    workspace_mib: int | None = None,
    strongly_typed: bool | None = None,
    device: int = 0,
    version_compatible: bool = False,
    hardware_compatibility: str = "none",
) -> EngineInfo:
    """Build a TensorRT engine from ``onnx_path`` on CUDA device ``device`` and write it to ``engine_path``
    (+ ``.json`` sidecar).

    ``profiles``: min/opt/max shape per input (see :func:`default_profiles`); every dynamic input needs one.
    ``fp16``: build reduced precision — from an fp16 graph (strongly typed; the only way on TensorRT 11) or, on
    TensorRT 10, from an fp32 graph with the FP16 builder flag. ``strongly_typed`` forces the typing mode on 10.x.
    TF32 is always cleared. ``version_compatible`` / ``hardware_compatibility`` (``"none"``, ``"ampere+"``,
    ``"same-cc"``) build a plan other TensorRT releases / GPU architectures run (see the module docstring).
    ``timing_cache_path`` is read if it exists (a rejected cache is replaced by a fresh one, with a warning) and
    written after the build."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ConfigError(f"{onnx_path} does not exist")
    if hardware_compatibility not in HARDWARE_LEVELS:
        raise ConfigError(f"hardware_compatibility must be one of {', '.join(HARDWARE_LEVELS)}, "
                          f"not {hardware_compatibility!r}")
    trt = tensorrt_module()
    gpu, cc = cuda_device(device)
    from fine_infer.bundle import sha256_file

    version = str(trt.__version__)
    major = int(version.split(".")[0])
    fp16_graph = onnx_is_fp16(onnx_path)
    if major >= 11:
        # 11.x: strong typing always on; BuilderFlag.FP16 no longer exists. Precision must come from the graph.
        if fp16 and not fp16_graph:
            raise ConfigError(f"TensorRT {version} builds fp16 only from an fp16 graph (strongly typed networks): "
                              "export with --fp16 and build that variant")
        strong = True
    else:
        strong = fp16_graph if strongly_typed is None else strongly_typed
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0

    with _device_scope(device):  # the builder, its timing and the plan are for this device
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.fspath(onnx_path)):
            errors = _parser_errors(parser)
            first = errors[0] if errors else {"name": "", "op": "", "message": "unknown parser error"}
            where = f"node {first['name']} ({first['op']})" if first.get("name") else "the graph"
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            msg = f"TensorRT {version} cannot parse {onnx_path.name}: {where}: {first['message']}{more}"
            raise EngineBuildError(msg, errors)

        config = builder.create_builder_config()
        if workspace_mib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
        if fp16 and not strong:
            config.set_flag(trt.BuilderFlag.FP16)  # 10.x weak typing only (removed in 11.x)
        tf32_flag = getattr(trt.BuilderFlag, "TF32", None)
        if tf32_flag is not None:
            config.clear_flag(tf32_flag)  # on by default: fp32 GEMMs would round their inputs to 10-bit mantissas
        _set_compatibility(trt, config, version_compatible, hardware_compatibility, version)
        profile = builder.create_optimization_profile()
        used: dict[str, list[list[int]]] = {}
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dynamic = any(d < 0 for d in tensor.shape)
            if tensor.name in profiles:
                lo, opt, hi = (tuple(s) for s in profiles[tensor.name])
                profile.set_shape(tensor.name, lo, opt, hi)
                used[tensor.name] = [list(lo), list(opt), list(hi)]
            elif dynamic:
                shape = tuple(tensor.shape)
                raise ConfigError(f"input {tensor.name!r} of {onnx_path.name} is dynamic {shape} but has no profile")
        config.add_optimization_profile(profile)

        cache_path = Path(timing_cache_path) if timing_cache_path else None
        cache_status = _attach_timing_cache(config, cache_path)

        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineBuildError(f"TensorRT {version} could not build an engine from {onnx_path.name} (see its log)")
        seconds = time.perf_counter() - t0
        atomic_write_bytes(engine_path, bytes(serialized))
        saved, cache_status = _save_timing_cache(config, cache_path, cache_status)
    info = EngineInfo(
        engine=engine_path.name, onnx=onnx_path.name, onnx_sha256=sha256_file(onnx_path), tensorrt_version=version,
        gpu=gpu, compute_capability=cc, precision="fp16" if (fp16 or fp16_graph) else "fp32",
        typing="strong" if strong else "weak", profiles=used,
        timing_cache=cache_path.name if saved else None, seconds=round(seconds, 2),
        tf32=False if tf32_flag is not None else None, version_compatible=bool(version_compatible),
        hardware_compatibility=hardware_compatibility, timing_cache_status=cache_status, device=int(device),
    )
    atomic_write_bytes(sidecar_path(engine_path), json.dumps(info.to_dict(), indent=2).encode() + b"\n")
    return info


def _set_compatibility(trt, config, version_compatible: bool, hardware: str, version: str) -> None:
    """The builder flags of the compatible build modes; a TensorRT without one is a :class:`ConfigError`."""
    if version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if flag is None:
            raise ConfigError(f"TensorRT {version} has no BuilderFlag.VERSION_COMPATIBLE")
        config.set_flag(flag)
    if hardware != "none":
        levels = getattr(trt, "HardwareCompatibilityLevel", None)
        level = getattr(levels, HARDWARE_LEVELS[hardware], None) if levels is not None else None
        if level is None:
            raise ConfigError(f"TensorRT {version} has no HardwareCompatibilityLevel.{HARDWARE_LEVELS[hardware]}")
        config.hardware_compatibility_level = level


def _attach_timing_cache(config, cache_path: Path | None) -> str:
    """Load ``cache_path`` into the builder config; a cache TensorRT will not take is replaced by a fresh one.

    ``set_timing_cache`` returns False for a cache it rejects (``ignore_mismatch=False``: one made on another device
    must not steer this build); ``create_timing_cache`` may fail on damaged bytes. Either way the build goes on with
    an empty cache and a warning, as Polygraphy does. Returns what happened (the record's ``timing_cache_status``)."""
    data = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    status = "none" if cache_path is None else ("reused" if data else "new")
    if data:
        try:
            cache = config.create_timing_cache(data)
            accepted = cache is not None and bool(config.set_timing_cache(cache, False))
            why = "TensorRT rejected it (made on another GPU or TensorRT version?)"
        except Exception as exc:  # noqa: BLE001 - damaged bytes: TensorRT raises its own error types
            accepted, why = False, f"it could not be read ({type(exc).__name__}: {exc})"
        if accepted:
            return status
        warnings.warn(f"timing cache {cache_path.name} not used: {why}; building with a fresh timing cache",
                      stacklevel=3)
        status = f"replaced: {why}"
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return status


def _save_timing_cache(config, cache_path: Path | None, status: str) -> tuple[bool, str]:
    """Write the builder's timing cache to ``cache_path``; (whether it was written, the status to record).

    ``get_timing_cache()`` may return None and ``serialize()`` None (seen with a cache moved from another GPU): the
    cache file is then left as it was, with a warning, and the engine is still good."""
    if cache_path is None:
        return False, status
    cache = config.get_timing_cache()
    blob = cache.serialize() if cache is not None else None
    if blob is None or len(bytes(blob)) == 0:
        warnings.warn(f"TensorRT returned no timing cache to save; {cache_path.name} is left as it was",
                      stacklevel=3)
        return False, f"{status}; not saved: TensorRT returned no cache"
    atomic_write_bytes(cache_path, bytes(blob))
    return True, status


def sidecar_path(engine_path: str | Path) -> Path:
    """The ``.json`` file beside an engine that records how and where it was built."""
    return Path(f"{engine_path}.json")


def build_bundle_engines(
    bundle: str | Path,
    *,
    graphs: Sequence[str] | None = None,
    fp16: bool = False,
    batch: Sequence[int] = DEFAULT_BATCH,
    sequence: Sequence[int] | None = None,
    axes: dict[str, Sequence[int]] | None = None,
    timing_cache: str | Path | None = None,
    workspace_mib: int | None = None,
    lint: bool = True,
    device: int = 0,
    version_compatible: bool = False,
    hardware_compatibility: str = "none",
) -> list[EngineInfo]:
    """Build an engine for each graph of ``bundle`` on CUDA device ``device`` and record them in its manifest.

    With ``fp16`` each graph's ``fp16`` variant is the source when the bundle has one (required on TensorRT 11).
    The TensorRT lint runs first (``lint=False`` skips it) so an unsupported op fails with its node name before
    TensorRT is even loaded. Engines become variants ``trt`` / ``trt-fp16`` of their graph. ``version_compatible``
    and ``hardware_compatibility`` are passed to :func:`build_engine` (and recorded)."""
    from fine_infer.bundle import commit_manifest, read_bundle
    from fine_infer.export.lint import lint_gate
    from fine_infer.bundle.variants import engine_variant

    b = read_bundle(bundle)
    m = b.manifest
    names = list(graphs or m.graphs)
    for n in names:
        b.graph(n)  # unknown names: BundleError listing the graph names
    sources, profiles = {}, {}
    for n in names:  # everything that can be checked without TensorRT is checked first
        entry = m.graphs[n]
        src = entry.variants.get("fp16") if fp16 else None
        sources[n] = (b.file(src) if src else b.file(entry.file), "fp16" if src else "fp32")
        profiles[n] = default_profiles(entry.spec, m.text.max_length if m.text else None, batch=batch,
                                       sequence=sequence, axes=axes)
        if lint:
            lint_gate(sources[n][0], profile_axes={"batch", "sequence", *(axes or {})})
    tensorrt_module()
    cuda_device(device)
    record = m.validation.setdefault("tensorrt", {})
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()
    # Every file gets a new name (engines, sidecars, the bundle's timing cache): the manifest still lists valid
    # files if the build stops half-way; the old ones are deleted only after the manifest has moved on.
    if timing_cache is not None:
        cache_in = cache_out = Path(timing_cache)
    else:
        old_cache = record.get("timing_cache")
        cache_in = b.path / old_cache if old_cache else None
        cache_out = b.path / f"tensorrt.{stamp}.timing-cache"
        if cache_in is not None and cache_in.is_file():
            atomic_write_bytes(cache_out, cache_in.read_bytes())
    infos: list[EngineInfo] = []
    for n in names:
        entry = m.graphs[n]
        src, src_variant = sources[n]
        key = engine_variant(src_variant)
        engine_file = f"{n}.{key}.{stamp}.engine"
        info = build_engine(src, b.path / engine_file, profiles[n], fp16=fp16, timing_cache_path=cache_out,
                            workspace_mib=workspace_mib, device=device, version_compatible=version_compatible,
                            hardware_compatibility=hardware_compatibility)
        infos.append(info)
        old = entry.variants.get(key)
        entry.variants[key] = engine_file
        record.setdefault("engines", {})[f"{n}:{key}"] = info.to_dict()
        if old and old != engine_file:
            m.files.pop(old, None), m.files.pop(f"{old}.json", None)
    added = [i.engine for i in infos] + [f"{i.engine}.json" for i in infos]
    if timing_cache is None and cache_out.is_file():
        if record.get("timing_cache"):
            m.files.pop(record["timing_cache"], None)
        record["timing_cache"] = cache_out.name
        added.append(cache_out.name)
    # Engines, sidecars and timing caches the manifest no longer lists (replaced ones) are deleted once it is written.
    stale = [p.name for pattern in ("*.engine", "*.engine.json", "tensorrt.*.timing-cache")
             for p in b.path.glob(pattern)]
    commit_manifest(b.path, m, added, stale)
    return infos
