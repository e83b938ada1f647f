"""Reading checkpoints safely and applying them with a clear report of mismatched keys."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from torch import nn

from fine_infer.errors import CheckpointError, first_line

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no arbitrary unpickling).

    Official checkpoints that nest the state dict under ``model``, ``state_dict`` or ``model_state_dict``
    (yahoo/maaf) are unwrapped. The one class beyond tensors and plain containers that the unpickler accepts is
    ``argparse.Namespace``: yahoo/maaf's 2020 ``main.py`` saves its options (``'opt'``) beside the weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused something that is not a tensor (maybe code)
        # torch's text advises weights_only=False: never the advice for a file from elsewhere
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "global" in ln), lines[-1] if lines else "")
        raise CheckpointError(f"checkpoint {path} is not a plain tensor checkpoint: loading it with weights_only=True "
                              f"refused it ({why[:200]}); export its state dict to safetensors") from None
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported the same way
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {first_line(exc)}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def apply_state_dict(module: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, source: str = "") -> None:
    """Copy ``state`` into ``module``; missing/unexpected keys or wrong shapes raise :class:`CheckpointError`."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if strict and (missing or unexpected or wrong):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatch: " + _short([f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong])
            )
        raise CheckpointError(f"checkpoint {source or ''} does not match the model: " + "; ".join(parts))
    module.load_state_dict({k: v for k, v in state.items() if k in own and k not in wrong}, strict=False)


def _short(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", … (+{len(items) - n} more)" if len(items) > n else "")


def shipped_weights(arch: str, preset: str) -> Path:
    """The safetensors file shipped in the package for ``arch`` at ``preset``."""
    path = WEIGHTS_DIR / f"{arch}-{preset}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no pretrained weights ship for {arch} preset {preset!r} (looked for {path.name})")
    return path
