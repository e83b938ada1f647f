"""The model family as plain PyTorch modules (``fine_infer.models``).

``create(arch, preset="tiny"|"paper", **overrides)`` builds any registered arch; ``list_archs()`` names them.
"""

from fine_infer.models._builder import ZooModel
from fine_infer.models._checkpoint import shipped_weights
from fine_infer.models._registry import (
    config_from_dict,
    config_to_dict,
    create,
    get_arch,
    list_archs,
    make_config,
    rebuild,
)

__all__ = ["ZooModel", "config_from_dict", "config_to_dict", "create", "get_arch", "list_archs", "make_config",
           "rebuild", "shipped_weights"]
