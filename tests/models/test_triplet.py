"""Triplet embedding model: shapes, normalisation, configurable dim, checkpoints and the torchvision layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.models._registry import _REGISTRY
from fine_infer.models.triplet import TripletNet, paper_config, tiny_config


def _tiny(seed: int = 0, **overrides) -> TripletNet:
    torch.manual_seed(seed)
    model = TripletNet(dataclasses.replace(tiny_config(), **overrides)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


@torch.no_grad()
def _embed(model: TripletNet, pixels: torch.Tensor) -> torch.Tensor:
    return model.graph_module("image")(pixels)


def test_registered_with_presets():
    entry = _REGISTRY["triplet"]
    assert entry.model_cls is TripletNet and set(entry.presets) >= {"tiny", "paper"}
    paper = entry.presets["paper"]()
    assert (paper.resnet_layers, paper.resnet_width, paper.embed_dim, paper.image_size) == ((3, 4, 6, 3), 64, 256, 224)


def test_graph_spec_and_preprocessing():
    model = _tiny()
    spec = model.graph("image")
    assert spec.task == "embed_image" and [t.name for t in spec.inputs] == ["pixels"]
    assert spec.inputs[0].shape == ("batch", 3, 64, 64) and spec.outputs[0].shape == ("batch", 32)
    pre = model.image_preprocess
    assert (pre.size, pre.crop, pre.resize, pre.interpolation) == (64, 64, "shorter", "bilinear")
    assert model.text_preprocess is None and model.build_tokenizer() is None
    with pytest.raises(ConfigError):
        model.graph_module("compose")


@pytest.mark.parametrize("dim", [32, 7])
def test_unit_norm_embeddings_of_configurable_dim(dim):
    model = _tiny(embed_dim=dim)
    out = _embed(model, torch.randn(5, 3, 64, 64))
    assert out.shape == (5, dim) and model.embed_dim == dim
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_batch_rows_are_independent():
    model = _tiny()
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(_embed(model, x)[2:3], _embed(model, x[2:3]), atol=1e-6, rtol=1e-5)


def test_embedding_matches_float64_head():
    model = _tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feat = model.backbone(x)[-1].double().mean(dim=(2, 3)).numpy()
    w = model.embedding.weight.double().detach().numpy()
    b = model.embedding.bias.double().detach().numpy()
    ref = feat @ w.T + b
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(_embed(model, x).numpy(), ref, atol=1e-5)


def test_checkpoint_round_trip_safetensors(tmp_path):
    from safetensors.torch import save_file

    a, b = _tiny(seed=0), _tiny(seed=1)
    x = torch.randn(3, 3, 64, 64)
    path = tmp_path / "triplet.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b.load_checkpoint(path)
    torch.testing.assert_close(_embed(b, x), _embed(a, x))


def test_key_and_shape_mismatch_are_checkpoint_errors(tmp_path):
    path = tmp_path / "other_dim.pt"
    torch.save(dict(_tiny(embed_dim=16).state_dict()), path)
    with pytest.raises(CheckpointError, match="embedding.weight"):
        _tiny().load_checkpoint(path)
    state = dict(_tiny().state_dict())
    state.pop("backbone.layer4.0.conv1.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="missing keys"):
        _tiny().load_checkpoint(path)


def test_torchvision_layout_maps(tmp_path):
    """A torchvision ResNet whose ``fc`` was replaced by the embedding layer, saved under DataParallel's
    ``module.`` prefix, loads into ``backbone``/``embedding``."""
    ours = _tiny(seed=0)
    tv = {}
    for k, v in ours.state_dict().items():
        tv["module." + (("fc." + k[len("embedding."):]) if k.startswith("embedding.") else k[len("backbone."):])] = v
    assert "module.conv1.weight" in tv and "module.layer1.0.downsample.0.weight" in tv
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": tv}, path)
    loaded = _tiny(seed=3)
    loaded.load_checkpoint(path)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_embed(loaded, x), _embed(ours, x))


def test_invalid_configs_are_config_errors():
    with pytest.raises(ConfigError):
        TripletNet(dataclasses.replace(tiny_config(), image_size=50))
    with pytest.raises(ConfigError):
        TripletNet(dataclasses.replace(tiny_config(), embed_dim=0))


@pytest.mark.slow
def test_paper_preset_shapes():
    torch.manual_seed(0)
    model = TripletNet(paper_config()).eval()
    assert model.backbone.stage_channels == [256, 512, 1024, 2048]
    out = _embed(model, torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 256)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))
