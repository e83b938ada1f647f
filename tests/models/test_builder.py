"""The shared plumbing, walked over every registered arch: family discovery, graph adapters, the checked tokenizer,
``embed_dim`` and the registration checks."""

from __future__ import annotations

import dataclasses
import inspect
import pkgutil
import subprocess
import sys

import pytest
import torch

import fine_infer.models
from fine_infer.errors import ConfigError
from fine_infer.models import ZooModel, create, list_archs
from fine_infer.models._builder import GraphAdapter
from fine_infer.models._registry import register

ARCHS = ("attributes", "fashion-fine", "maaf", "raf", "triplet")


def test_every_public_module_of_the_package_is_a_discovered_family():
    families = {m.name for m in pkgutil.iter_modules(fine_infer.models.__path__) if not m.name.startswith("_")}
    assert families == {"attributes", "fashion_fine", "maaf", "raf", "triplet"}
    assert tuple(list_archs()) == ARCHS


def test_discovery_needs_no_family_imported_first():
    code = "from fine_infer.models import list_archs; print(','.join(list_archs()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ",".join(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_graph_modules_are_adapters_of_the_declared_methods(arch):
    torch.manual_seed(0)
    model = create(arch)
    assert set(model.graph_methods) == set(model.graphs())
    for name, spec in model.graphs().items():
        module = model.graph_module(name)
        assert isinstance(module, GraphAdapter) and module.model is model
        # forward keeps the method's named inputs (torch.export binds dict dynamic_shapes by them)
        assert list(inspect.signature(module.forward).parameters) == [t.name for t in spec.inputs]
        assert {id(p) for p in module.parameters()} == {id(p) for p in model.parameters()}
        inputs = list(model.example_inputs(name, batch=3, generator=torch.Generator().manual_seed(1)).values())
        with torch.no_grad():
            got = module(*inputs)
            want = getattr(model, model.graph_methods[name])(*inputs)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        assert len(got) == len(spec.outputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="has no graph"):
        model.graph_module("no-such-graph")


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_dim_is_the_configs_and_none_for_classifiers(arch):
    model = create(arch)
    assert model.embed_dim == (None if arch == "attributes" else model.config.embed_dim)


@pytest.mark.parametrize("arch", ["fashion-fine", "maaf", "raf"])
def test_tokenizer_larger_than_the_vocabulary_names_the_fix(arch):
    model = create(arch)
    n = model.build_tokenizer().get_vocab_size()
    small = type(model)(dataclasses.replace(model.config, vocab_size=n - 1))
    with pytest.raises(ConfigError, match=rf"the {arch} tokenizer .*create the model with vocab_size={n}"):
        small.build_tokenizer()


def test_image_only_models_have_no_tokenizer():
    assert create("triplet").build_tokenizer() is None and create("attributes").build_tokenizer() is None


def test_a_family_must_declare_its_graphs():
    class NoGraphs(ZooModel):
        pass

    with pytest.raises(TypeError, match="graphs"):
        NoGraphs(None)


def test_register_rejects_a_graph_without_a_method():
    class Typo(ZooModel):
        graph_methods = {"image": "embed_imgae"}

        def graphs(self):
            return {}

    with pytest.raises(ConfigError, match="graph_methods"):
        register("typo", Typo, {"tiny": dict, "paper": dict})
    assert "typo" not in list_archs()


def test_models_do_not_import_the_catalogue():
    """The attribute model reads its labels from fine_infer.labels, not from the catalogue's renderer."""
    code = "import sys, fine_infer.models.attributes; print([m for m in sys.modules if m.endswith('catalogue')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
