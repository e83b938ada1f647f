"""Training the tiny models on the generated catalogue with each paper's objective (``fine_infer.tools.train``).

``python -m fine_infer.tools.train --all --out fine_infer/weights --seed 0`` reproduces the shipped weights and
``TRAINING.json``; :func:`train_arch` is the Python entry point. Needs PyTorch (the ``export`` extra).

- :mod:`fine_infer.tools.train.losses`: HNM-F, batch softmax, semi-hard triplet, per-head cross-entropy.
- :mod:`fine_infer.tools.train.data`: the catalogue as tensors made with the model's own preprocessing and tokenizer.
- :mod:`fine_infer.tools.train.objectives`: the objective of each arch; :mod:`fine_infer.tools.train.recipes`: hyper-parameters.
"""

from fine_infer.tools.train.loop import TrainResult, train_arch
from fine_infer.tools.train.recipes import RECIPES, Recipe, recipe_for

__all__ = ["RECIPES", "Recipe", "TrainResult", "recipe_for", "train_arch"]
