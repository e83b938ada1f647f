"""Fixtures of the kernel tests. The seeds come from tests/conftest.py (a fresh, printed seed per test)."""

from __future__ import annotations

import pytest


@pytest.fixture
def poisoned_triton():
    """Run on the Triton kernels (the interpreter on CPU) without autograd, every buffer a wrapper allocates
    NaN-poisoned: an element a kernel forgets to write fails the comparison. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("poisoned_triton")``."""
    import torch

    from fine_infer import kernels
    from fine_infer.kernels import _dispatch

    with _dispatch.poison_allocations(), kernels.use_backend("triton"), torch.no_grad():
        yield
