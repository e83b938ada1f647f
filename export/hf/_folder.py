"""What a local Hugging Face folder holds, read from its JSON files alone (nothing is imported or loaded), and the one
line naming what is supported when it is something else."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fine_infer.errors import ConfigError

# Backbones of sentence-transformers models whose exports are tested (BERT, MiniLM: model_type "bert").
ST_BACKBONES = ("bert",)
ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
SUPPORTED = ("a sentence-transformers folder (modules.json) with a BERT-family Transformer, Pooling (mean, cls or "
             "max), optional Dense and Normalize; a transformers CLIPModel folder; a transformers SiglipModel folder "
             "(each with its tokenizer.json and, for CLIP/SigLIP, its processor config)")


@dataclass(frozen=True)
class Folder:
    """A supported folder: ``kind`` is ``sentence-transformers``, ``clip`` or ``siglip``."""

    path: Path
    kind: str
    model_type: str
    modules: list[dict[str, Any]] = field(default_factory=list)  # sentence-transformers: modules.json
    transformer_path: Path | None = None  # sentence-transformers: the Transformer module's folder


def _json(path: Path, kind: type = dict) -> Any:
    """``path``'s JSON, which must be a ``kind`` (an object, or for modules.json a list of objects)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({type(exc).__name__}: {exc})") from None
    items = data if kind is list and isinstance(data, list) else [data]
    if not isinstance(data, kind) or not all(isinstance(x, dict) for x in items):
        want = "a list of objects" if kind is list else "an object"
        raise ConfigError(f"{path} is not {want} as transformers / sentence-transformers write it")
    return data


def _unsupported(path: Path, what: str) -> ConfigError:
    return ConfigError(f"--hf {path}: {what}; fine-infer exports {SUPPORTED}")


def inspect_folder(path: str | Path) -> Folder:
    """Classify ``path`` (a folder written by transformers ``save_pretrained`` or sentence-transformers ``save``);
    anything else is a :class:`ConfigError` of one line naming what is supported. Never contacts the hub."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--hf takes a local folder written by save_pretrained/save (the hub is never contacted); "
                          f"{path} is not a folder")
    p = p.resolve()
    if (p / "modules.json").is_file():
        modules = _json(p / "modules.json", list)
        if not modules:
            raise _unsupported(p, "modules.json lists no modules")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        odd = [k for k in kinds if k not in ST_MODULES]
        if odd:
            raise _unsupported(p, f"sentence-transformers module(s) {', '.join(odd)} are not supported")
        if kinds.count("Transformer") != 1 or kinds[0] != "Transformer" or "Pooling" not in kinds:
            raise _unsupported(p, f"sentence-transformers modules {' → '.join(kinds)} are not Transformer → Pooling "
                                  "[→ Dense] [→ Normalize]")
        tpath = (p / str(modules[0].get("path", ""))).resolve()
        if not tpath.is_relative_to(p) or not (tpath / "config.json").is_file():
            raise _unsupported(p, f"its Transformer module has no config.json in {tpath}")
        model_type = str(_json(tpath / "config.json").get("model_type", "?"))
        if model_type not in ST_BACKBONES:
            raise _unsupported(p, f"its Transformer is a {model_type!r} model")
        return Folder(p, "sentence-transformers", model_type, modules, tpath)
    if not (p / "config.json").is_file():
        raise _unsupported(p, "it has neither modules.json nor config.json")
    config = _json(p / "config.json")
    model_type = str(config.get("model_type", "?"))
    archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
    if model_type in ("clip", "siglip"):
        return Folder(p, model_type, model_type)
    raise _unsupported(p, f"model_type {model_type!r} ({archs}) is not supported")
