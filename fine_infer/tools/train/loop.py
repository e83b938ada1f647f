"""The training loop: seeded, single-process, CPU; writes ``{arch}-tiny.safetensors`` and returns what it measured."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fine_infer._atomic import fsync_dir
from fine_infer.tools.train.data import TrainData, catalogue_split
from fine_infer.tools.train.objectives import OBJECTIVES
from fine_infer.tools.train.recipes import Recipe, recipe_for

LogFn = Callable[[str], None]


@dataclass
class TrainResult:
    """What one run did: the trained model (eval mode), its loss curve and, when evaluated, held-out metrics."""

    arch: str
    seed: int
    recipe: Recipe
    model: nn.Module
    losses: list[float]
    seconds: float
    eval: dict[str, float] = field(default_factory=dict)
    eval_seconds: float = 0.0
    weights: str | None = None

    def record(self) -> dict[str, Any]:
        """The ``TRAINING.json`` entry of this run."""
        k = max(1, len(self.losses) // 20)
        return {
            "seed": self.seed,
            "steps": self.recipe.steps,
            "catalogue": {"seed": self.recipe.catalogue_seed, "train_items": self.recipe.n_train,
                          "held_out_items": self.recipe.n_eval, "image_size": self.recipe.image_size},
            "train_seconds": round(self.seconds, 1),
            "loss_first": round(sum(self.losses[:k]) / k, 4),
            "loss_last": round(sum(self.losses[-k:]) / k, 4),
            "eval": {m: round(v, 4) for m, v in self.eval.items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "recipe": self.recipe.to_dict(),
        }


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up to ``recipe.lr``, then cosine decay to ``recipe.lr * recipe.final_lr_ratio``."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    low = recipe.lr * recipe.final_lr_ratio
    return low + 0.5 * (recipe.lr - low) * (1.0 + math.cos(math.pi * min(1.0, t)))


def _param_groups(modules: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_arch(
    arch: str,
    seed: int = 0,
    recipe: Recipe | None = None,
    *,
    out: str | Path | None = None,
    evaluate: bool = True,
    log: LogFn | None = None,
    log_every: int = 100,
) -> TrainResult:
    """Train the tiny ``arch`` from scratch on the catalogue's training split with its paper's objective.

    Deterministic for a given ``seed``, recipe, torch version and thread count (set ``torch.set_num_threads``
    before calling). ``out`` (a folder) receives ``{arch}-tiny.safetensors``; ``evaluate`` runs
    :func:`fine_infer.tools.evaluate.evaluate_model` on the held-out split afterwards."""
    from fine_infer.models import create

    recipe = recipe or recipe_for(arch)
    log = log or (lambda s: None)
    torch.manual_seed(seed)
    model = create(arch, "tiny")
    objective = OBJECTIVES[arch](recipe)
    train_items, _ = catalogue_split(recipe.n_train, 0, recipe.catalogue_seed, recipe.image_size)
    t0 = time.perf_counter()
    data = TrainData.build(model, train_items, pair_seeds=objective.pair_seeds)
    log(f"{arch}: {len(data)} training items"
        + (f", {len(data.pairs)} composed pairs" if data.pairs is not None else "")
        + f" prepared in {time.perf_counter() - t0:.1f} s")

    optimizer = torch.optim.AdamW(_param_groups([model, objective], recipe.weight_decay), lr=recipe.lr)
    generator = torch.Generator().manual_seed(seed)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, recipe)
        idx = objective.sample(data, generator)
        loss = objective.loss(model, data, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = losses[-log_every:]
            log(f"{arch}: step {step + 1}/{recipe.steps} loss {sum(recent) / len(recent):.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    model.eval()
    result = TrainResult(arch, seed, recipe, model, losses, seconds)
    if evaluate:
        from fine_infer.tools.evaluate import evaluate_model

        report = evaluate_model(model, n=recipe.n_eval, seed=recipe.catalogue_seed)
        result.eval, result.eval_seconds = report.metrics, report.seconds
        log(f"{arch}: held-out " + ", ".join(f"{k} {100 * v:.1f}" for k, v in report.metrics.items()))
    if out is not None:
        result.weights = str(save_weights(model, Path(out) / f"{arch}-tiny.safetensors"))
    return result


def save_weights(model: nn.Module, path: Path) -> Path:
    """Write the model's state dict as safetensors (atomically: a temp file renamed into place)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # safetensors creates 0600; these are package data files
    tmp.replace(path)
    fsync_dir(path.parent)
    return path


__all__ = ["TrainResult", "lr_at", "save_weights", "train_arch"]
