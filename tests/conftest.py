"""Test configuration. TRITON_INTERPRET is set (to 1) only where no CUDA device can run the kernels, before any
@triton.jit function is defined; on a GPU box the kernels are compiled and run for real.

Seeds: a run draws one run seed from ``os.urandom``, or takes ``FINE_INFER_TEST_SEED`` when set, and shows it in the
report header. Every test, and every session-, package-, module- or class-scoped fixture, gets a seed derived from
the run seed and its node id; it seeds torch's global RNG (when a test module imported torch), numpy's legacy global
RNG and Python's ``random`` just before that fixture is set up and before the test runs. The ``rng`` fixture is a
numpy Generator of the test's seed (``module_rng`` one of the module's, for module-scoped fixtures). A test prints
its seed and the run seed (pytest shows the output of a failing test); ``FINE_INFER_TEST_SEED=<run seed> pytest
<test id>`` replays the test with the same draws, the random weights of its module fixtures included, whichever other
tests run with it.
"""

import os
import sys

# --- the Triton interpreter: only where no CUDA device can run the kernels --------------------------------------------
# TRITON_INTERPRET must be decided before any @triton.jit function is defined (the kernel modules define theirs on
# import, and the mode cannot change afterwards), so this runs first, before any test module is imported. On a GPU box
# it stays unset and `pytest -m gpu` compiles and runs the real kernels.
_NVIDIA_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvhost-gpu", "/dev/nvgpu")  # desktop/server GPUs and Jetson


def _cuda_nodes_present() -> bool:
    """A cheap probe before importing torch: NVIDIA device nodes (fine_infer.index._gpu probes the same ones)."""
    if not sys.platform.startswith("linux"):
        return True  # no cheap probe elsewhere: ask torch
    return any(os.path.exists(p) for p in _NVIDIA_NODES)


def _torch_sees_cuda() -> bool:
    """``torch.cuda.is_available()`` (the check that un-skips the ``gpu`` tests below); False without torch."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def triton_interpret_value(environ, nodes_present=_cuda_nodes_present, sees_cuda=_torch_sees_cuda) -> str | None:
    """What ``TRITON_INTERPRET`` should be set to for this run, or None to leave the environment alone.

    An explicit ``TRITON_INTERPRET`` (``0`` or ``1``) is kept. Otherwise the interpreter is used only where no CUDA
    device can run the kernels: hidden by ``CUDA_VISIBLE_DEVICES`` (empty or ``-1``), no NVIDIA device node (torch is
    not even imported), or torch sees no CUDA device (a CPU build of torch on a GPU box). With a usable GPU it stays
    unset, so the kernels are compiled for it."""
    if "TRITON_INTERPRET" in environ:
        return None
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "1"
    if not nodes_present() or not sees_cuda():
        return "1"
    return None


_interpret = triton_interpret_value(os.environ)
if _interpret is not None:
    os.environ["TRITON_INTERPRET"] = _interpret
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SEED_ENV = "FINE_INFER_TEST_SEED"
_RUN_SEED = pytest.StashKey[int]()


def pytest_configure(config):
    value = os.environ.get(SEED_ENV)
    if value is None:
        seed = int.from_bytes(os.urandom(4), "little")
        # pytest-xdist's workers are started after this and inherit the environment: one run seed for all of them
        os.environ[SEED_ENV] = str(seed)
    else:
        try:
            seed = int(value)
        except ValueError:
            raise pytest.UsageError(f"{SEED_ENV}={value!r} is not an integer") from None
        if not 0 <= seed < 2**32:
            raise pytest.UsageError(f"{SEED_ENV}={seed} is outside 0..2**32-1")
    config.stash[_RUN_SEED] = seed


def pytest_report_header(config):
    seed = config.stash[_RUN_SEED]
    return f"seed {seed} ({SEED_ENV}={seed} replays this run's random draws)"


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests with a reason where no CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _derived_seed(config, key: str) -> int:
    """The seed of one test or fixture: a hash of the run seed and ``key`` (its node id), in 0..2**32-1."""
    digest = hashlib.sha256(f"{config.stash[_RUN_SEED]}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _seed_global_rngs(seed: int) -> None:
    """Seed the process-wide RNGs; torch's only if it is imported already (this never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Before a fixture wider than a test is set up, seed for it: its draws (random weights of a zoo model built
    once per module, say) then depend on the run seed only, not on which tests ran before it."""
    if fixturedef.scope != "function":
        key = f"{request.node.nodeid}::{fixturedef.argname}[{request.param_index}]"
        _seed_global_rngs(_derived_seed(request.config, key))
    return (yield)


@pytest.fixture(autouse=True)
def _test_seed(request) -> int:
    """The test's seed, printed; the global RNGs are seeded with it after the wider fixtures are set up."""
    seed = _derived_seed(request.config, request.node.nodeid)
    run = request.config.stash[_RUN_SEED]
    print(f"seed {seed} (derived from run seed {run} and the test id; {SEED_ENV}={run} replays it)")
    _seed_global_rngs(seed)
    return seed


@pytest.fixture
def rng(_test_seed) -> np.random.Generator:
    """A numpy Generator of the test's printed seed."""
    return np.random.default_rng(_test_seed)


@pytest.fixture(scope="module")
def module_rng(request) -> np.random.Generator:
    """A numpy Generator for module-scoped fixtures, of a seed derived from the run seed and the module."""
    return np.random.default_rng(_derived_seed(request.config, f"{request.node.nodeid}::module_rng"))
