"""Session and runners: input checks against the graph spec, reported providers, task routing."""

import sys
from pathlib import Path

import numpy as np
import pytest

import fine_infer
from fine_infer.errors import BundleError, ConfigError, InputError
from fine_infer.export import export_module, parse_dynamic_axes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    sys.path.insert(0, str(FIXTURES))
    from user_encoder import factory

    model, example = factory()
    out = tmp_path_factory.mktemp("s") / "b"
    export_module(model, example, out, dynamic_axes=parse_dynamic_axes(["ids:1", "mask:1"]), batch_sizes=(2,))
    return fine_infer.load(out)


def _feeds(rng, batch=2, length=5):
    return {"ids": rng.integers(1, 100, (batch, length)), "mask": np.ones((batch, length), dtype=np.int64)}


def test_valid_feeds_run_and_int32_ids_are_widened(session, rng):
    f = _feeds(rng)
    out = session.run("model", f)["output"]
    f32 = {k: v.astype(np.int32) for k, v in f.items()}
    np.testing.assert_array_equal(session.run("model", f32)["output"], out)
    assert out.dtype == np.float32 and out.shape == (2, 16)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda f: f.pop("mask"), "missing \\['mask'\\]"),
        (lambda f: f.update(extra=np.zeros(2)), "unexpected \\['extra'\\]"),
        (lambda f: f.update(ids=f["ids"].astype(np.float32)), "is float32; graph 'model' needs int64"),
        (lambda f: f.update(ids=f["ids"][0]), "has shape \\(5,\\)"),
        (lambda f: f.update(mask=f["mask"][:, :3]), "disagree on 'sequence'"),
        (lambda f: f.update(ids=f["ids"][:0]), "empty dim 0"),
    ],
)
def test_bad_feeds_are_named_input_errors(session, mutate, needle, rng):
    f = _feeds(rng)
    mutate(f)
    with pytest.raises(InputError, match=needle):
        session.run("model", f)


def test_nan_float_input_is_refused(rng):
    from fine_infer.runtime.base import check_feeds
    from fine_infer.specs import GraphSpec, TensorSpec

    spec = GraphSpec("g", "embed_image", (TensorSpec("pixels", "float32", ("batch", 3)),), ())
    x = rng.standard_normal((2, 3)).astype(np.float32)
    x[1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        check_feeds(spec, {"pixels": x})
    with pytest.raises(InputError, match="dim 1 must be 3"):
        check_feeds(spec, {"pixels": np.ones((2, 4), np.float32)})


def test_task_routing_and_unknown_backend(session, rng):
    with pytest.raises(ConfigError, match="takes no images"):
        session.embed_images([np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ConfigError, match="takes no text"):
        session.embed_texts(["a dress"])
    with pytest.raises(BundleError, match="no graph 'image'"):
        session.run("image", _feeds(rng))
    with pytest.raises(ConfigError, match="unknown backend"):
        fine_infer.load(session.bundle.path, backend="tpu")
    from fine_infer.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="user module"):
        fine_infer.load(session.bundle.path, backend="torch").run("model", _feeds(rng))
    assert session.providers["model"] == "CPUExecutionProvider"
