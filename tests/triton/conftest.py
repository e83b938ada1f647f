"""Fixtures of the Triton tests: every zoo arch's tiny bundle (and a small Hugging Face CLIP bundle), built once per
session, and their repositories written with ``backend="python"`` (what the CPU-only ``tritonserver`` of
``nvidia-pytriton`` serves: it has no ONNX Runtime or TensorRT backend)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # triton_helpers, beside this file

from triton_helpers import ZOO_ARCHS, export_bundles  # noqa: E402


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """name → bundle folder: the five zoo archs at their tiny preset with the shipped weights, and ``clip``."""
    return export_bundles(tmp_path_factory.mktemp("triton-bundles"))


@pytest.fixture(scope="session")
def zoo_archs():
    return list(ZOO_ARCHS)
