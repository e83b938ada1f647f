"""The model-family registry: archs by name, their presets and configs, and ``create``.

An arch is registered once, by its family module, with its presets (``tiny`` and ``paper``). Every built model is
a :class:`~fine_infer.models._builder.ZooModel`: an ``nn.Module`` that also declares its inference graphs (named
inputs and outputs), its preprocessing and its tokenizer. Export, the runtime's torch backend and the tests read
only these declarations, and every public module of this package is a family found at first use, so a new arch
needs no change anywhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fine_infer.errors import ConfigError
from fine_infer.models._builder import ZooModel
from fine_infer.models._checkpoint import shipped_weights


@dataclass(frozen=True)
class ArchEntry:
    """One registered arch: its model class, presets and a one-line description."""

    name: str
    model_cls: type[ZooModel]
    presets: dict[str, Callable[[], Any]]
    description: str = ""
    source: str = ""


_REGISTRY: dict[str, ArchEntry] = {}


def register(
    name: str, model_cls: type[ZooModel], presets: dict[str, Callable[[], Any]], description: str = "", source: str = ""
) -> None:
    """Register an arch. ``presets`` maps a preset name to a zero-argument function returning its config."""
    if name in _REGISTRY:
        raise ConfigError(f"arch {name!r} is registered twice")
    if not {"tiny", "paper"} <= set(presets):
        raise ConfigError(f"arch {name!r} must define 'tiny' and 'paper' presets")
    methods = model_cls.graph_methods.values()
    if not methods or not all(callable(getattr(model_cls, m, None)) for m in methods):
        raise ConfigError(
            f"arch {name!r} must map each graph to one of its methods; graph_methods is {dict(model_cls.graph_methods)}"
        )
    model_cls.arch = name
    _REGISTRY[name] = ArchEntry(name, model_cls, presets, description, source)


@functools.cache
def _ensure_loaded() -> None:
    # Importing a family module registers it. Families are found, not listed (a new one needs no edit here), and
    # imported at first use, so `import fine_infer.models` stays cheap; `_`-modules are shared plumbing.
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")


def list_archs() -> list[str]:
    """Names of every registered arch."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_arch(name: str) -> ArchEntry:
    """The registry entry of ``name``; an unknown name is a :class:`ConfigError` listing the known ones."""
    _ensure_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown arch {name!r}; known archs: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_config(arch: str, preset: str = "tiny", **overrides: Any) -> Any:
    """The config dataclass of ``arch`` at ``preset`` with ``overrides`` applied (unknown fields are an error)."""
    entry = get_arch(arch)
    if preset not in entry.presets:
        raise ConfigError(f"arch {arch!r} has no preset {preset!r}; presets: {', '.join(entry.presets)}")
    config = entry.presets[preset]()
    if overrides:
        names = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown config field(s) for {arch}: {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            )
        config = dataclasses.replace(config, **overrides)
    return config


def config_from_dict(arch: str, values: dict[str, Any]) -> Any:
    """Rebuild an arch's config from :func:`config_to_dict` output (as stored in a bundle manifest)."""
    entry = get_arch(arch)
    base = entry.presets["tiny"]()
    known = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"config for {arch} has unknown field(s): {', '.join(unknown)}")
    # JSON turned the config's tuples (and tuples of tuples) into lists; frozen configs compare as tuples.
    fixed = {
        k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
        for k, v in values.items()
    }
    return dataclasses.replace(base, **fixed)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass."""
    return dataclasses.asdict(config)


def create(
    arch: str,
    preset: str = "tiny",
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **overrides: Any,
) -> ZooModel:
    """Build ``arch`` at ``preset`` (``"tiny"`` or ``"paper"``) in eval mode.

    ``overrides`` replace config fields (``create("triplet", embed_dim=128)``). ``checkpoint`` loads weights
    (safetensors or ``weights_only`` torch files); ``pretrained`` loads the weights shipped with the package
    for the tiny preset where they exist.
    """
    entry = get_arch(arch)
    config = make_config(arch, preset, **overrides)
    model = entry.model_cls(config)
    # Where the weights came from: an export records it in the manifest, so nobody mistakes random weights' chance-level
    # results for a broken model.
    model.weights_origin = {"kind": "random"}
    if pretrained:
        path = shipped_weights(arch, preset)
        model.load_checkpoint(path)
        model.weights_origin = {"kind": "shipped", "file": path.name}
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
        model.weights_origin = {"kind": "checkpoint", "file": Path(checkpoint).name}
    return model.eval()


def rebuild(arch: str, config: dict[str, Any], weights: str | Path | None = None) -> ZooModel:
    """``arch`` from a stored config (:func:`config_to_dict` output, as a bundle manifest holds it) with ``weights``
    saved from this package's own model (a bundle's ``weights.safetensors``: no official-layout mapping), in eval
    mode; a key mismatch is a :class:`~fine_infer.errors.CheckpointError` listing the missing and unexpected keys."""
    from fine_infer.models._checkpoint import apply_state_dict, load_state_dict_file

    model = get_arch(arch).model_cls(config_from_dict(arch, config))
    if weights is not None:
        apply_state_dict(model, load_state_dict_file(weights), source=str(weights))
    return model.eval()


__all__ = [
    "ArchEntry",
    "config_from_dict",
    "config_to_dict",
    "create",
    "get_arch",
    "list_archs",
    "make_config",
    "rebuild",
    "register",
]
