"""MAAF (yahoo/maaf): shapes, normalisation, masking, pooling, the fusion block against the official math, checkpoints
and ONNX export with a dynamic sequence (the LSTM path)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.models import _fusion
from fine_infer.models._registry import _REGISTRY
from fine_infer.models.maaf import MAAF, MAAFConfig, paper_config, tiny_config


def _tiny(seed: int = 0, **overrides) -> MAAF:
    torch.manual_seed(seed)
    model = MAAF(dataclasses.replace(tiny_config(), **overrides)).eval()
    # Non-trivial BatchNorm statistics, so a checkpoint test would notice buffers that do not load.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _inputs(model: MAAF, batch: int = 3, seq_len: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    return model.example_inputs("compose", batch=batch, seq_len=seq_len, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _compose(model: MAAF, ex: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.compose(ex["pixels"], ex["input_ids"], ex["attention_mask"])


def test_registered_with_presets():
    entry = _REGISTRY["maaf"]
    assert entry.model_cls is MAAF and set(entry.presets) >= {"tiny", "paper"}
    paper = entry.presets["paper"]()
    assert (paper.embed_dim, paper.num_blocks, paper.num_heads, paper.ff_dim) == (512, 2, 8, 128)
    assert paper.feature_layers == (3, 4) and paper.output == "rwpool" and paper.norm == "annotated"
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.embed_dim = 3  # type: ignore[misc]


def test_create_through_registry():
    from fine_infer.models import create

    model = create("maaf", "tiny", embed_dim=16, num_heads=2)
    assert model.embed_dim == 16 and not model.training


def test_graph_specs():
    model = _tiny()
    compose, gallery = model.graph("compose"), model.graph("gallery")
    assert compose.task == "compose" and gallery.task == "embed_image"
    assert [t.name for t in compose.inputs] == ["pixels", "input_ids", "attention_mask"]
    assert [t.dtype for t in compose.inputs] == ["float32", "int64", "int64"]
    assert compose.inputs[0].shape == ("batch", 3, 64, 64)
    assert compose.outputs[0].shape == ("batch", 32) and compose.outputs[0].name == "embedding"
    assert [t.name for t in gallery.inputs] == ["pixels"]
    with pytest.raises(ConfigError):
        model.graph_module("text")


def test_embeddings_are_unit_norm():
    model = _tiny()
    ex = _inputs(model, batch=4)
    with torch.no_grad():
        q = model.graph_module("compose")(ex["pixels"], ex["input_ids"], ex["attention_mask"])
        g = model.graph_module("gallery")(ex["pixels"])
    assert q.shape == g.shape == (4, 32)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(4))


def test_padding_does_not_change_compose():
    model = _tiny()
    ex = _inputs(model, batch=3, seq_len=6)
    pad = 5
    ids = torch.cat([ex["input_ids"], torch.zeros(3, pad, dtype=torch.int64)], dim=1)
    mask = torch.cat([ex["attention_mask"], torch.zeros(3, pad, dtype=torch.int64)], dim=1)
    longer = {"pixels": ex["pixels"], "input_ids": ids, "attention_mask": mask}
    torch.testing.assert_close(_compose(model, longer), _compose(model, ex), atol=1e-6, rtol=1e-5)
    # What sits at padded positions does not matter either (the LSTM runs forward, padding comes after the words).
    junk = torch.where(mask.bool(), ids, torch.randint(2, 1024, ids.shape))
    got = _compose(model, {**longer, "input_ids": junk})
    torch.testing.assert_close(got, _compose(model, ex), atol=1e-6, rtol=1e-5)


def test_text_changes_compose_and_gallery_differs():
    model = _tiny()
    ex = _inputs(model, batch=2)
    with torch.no_grad():
        g = model.gallery(ex["pixels"])
    q = _compose(model, ex)
    assert (q - g).abs().max() > 1e-3
    other = {**ex, "input_ids": torch.where(ex["attention_mask"].bool(), (ex["input_ids"] + 7) % 1024, 0)}
    assert (_compose(model, other) - q).abs().max() > 1e-4


def test_masked_mean_and_rwpool_match_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 5))
    mask = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    ref = np.stack([x[b, mask[b] == 1].mean(axis=0) for b in range(3)])
    got = _fusion.masked_mean(torch.tensor(x, dtype=torch.float32), torch.tensor(mask))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-6)

    tokens = rng.standard_normal((2, 16 + 4, 6))
    ref_rw = (tokens[:, :16].mean(axis=1) + tokens[:, 16:].mean(axis=1)) / 2
    got_rw = _fusion.resolutionwise_pool(torch.tensor(tokens, dtype=torch.float32), [16, 4])
    np.testing.assert_allclose(got_rw.numpy(), ref_rw, atol=1e-6)
    with pytest.raises(ValueError):
        _fusion.resolutionwise_pool(torch.tensor(tokens), [16, 3])


def test_compose_output_matches_float64_pooling():
    """The model's output = norm(mean(rwpool(fused image), masked mean(fused text))), recomputed in float64."""
    model = _tiny()
    ex = _inputs(model, batch=3, seq_len=7)
    with torch.no_grad():
        image_tokens, sizes = model.image_model(ex["pixels"])
        text_tokens = model.text_model(ex["input_ids"])
        fused_image, fused_text = _fusion.fuse_tokens(model.encoder, image_tokens, text_tokens, ex["attention_mask"])
    assert sizes == [16, 4]  # layer3 4×4 and layer4 2×2 at 64 px
    fi, ft, m = fused_image.double().numpy(), fused_text.double().numpy(), ex["attention_mask"].numpy()
    out = []
    for b in range(3):
        img = (fi[b, :16].mean(0) + fi[b, 16:].mean(0)) / 2
        txt = ft[b, m[b] == 1].mean(0)
        v = (img + txt) / 2
        out.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(_compose(model, ex).numpy(), np.stack(out), atol=1e-5)


def _official_encoder_float64(
    state: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor, heads: int
) -> torch.Tensor:
    """yahoo/maaf's Encoder (Annotated Transformer) re-derived from its source, in float64, reading official keys."""
    s = {k: v.double() for k, v in state.items()}

    def norm(prefix: str, t: torch.Tensor) -> torch.Tensor:
        mean = t.mean(-1, keepdim=True)
        std = t.std(-1, keepdim=True)
        return s[prefix + "a_2"] * (t - mean) / (std + 1e-6) + s[prefix + "b_2"]

    def lin(prefix: str, t: torch.Tensor) -> torch.Tensor:
        return t @ s[prefix + "weight"].T + s[prefix + "bias"]

    B, L, D = x.shape
    d_k = D // heads
    i = 0
    while f"layers.{i}.sublayer.0.norm.a_2" in s:
        p = f"layers.{i}."
        y = norm(p + "sublayer.0.norm.", x)
        q, k, v = (lin(p + f"self_attn.linears.{j}.", y).view(B, L, heads, d_k).transpose(1, 2) for j in range(3))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e9)
        att = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, L, D)
        x = x + lin(p + "self_attn.linears.3.", att)
        y = norm(p + "sublayer.1.norm.", x)
        x = x + lin(p + "feed_forward.w_2.", torch.relu(lin(p + "feed_forward.w_1.", y)))
        i += 1
    return norm("norm.", x)


def test_fusion_encoder_matches_official_math():
    torch.manual_seed(0)
    enc = _fusion.FusionEncoder(dim=16, num_blocks=2, num_heads=4, ff_dim=8).eval()
    with torch.no_grad():  # non-trivial norm parameters, so a weight/bias swap would show
        for name, p in enc.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    official = {_fusion.official_encoder_key(k): v for k, v in enc.state_dict().items()}
    assert {_fusion.rename_official_encoder_key(k) for k in official} == set(enc.state_dict())
    x = torch.randn(3, 11, 16)
    mask = torch.ones(3, 11, dtype=torch.int64)
    mask[1, 8:] = 0
    mask[2, 6:] = 0
    with torch.no_grad():
        got = enc(x, mask.bool())
    ref = _official_encoder_float64(official, x.double(), mask, heads=4)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_safetensors(tmp_path):
    from safetensors.torch import save_file

    a, b = _tiny(seed=0), _tiny(seed=1)
    ex = _inputs(a)
    assert (_compose(a, ex) - _compose(b, ex)).abs().max() > 1e-3
    path = tmp_path / "maaf.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b.load_checkpoint(path)
    torch.testing.assert_close(_compose(b, ex), _compose(a, ex))
    with torch.no_grad():
        torch.testing.assert_close(b.gallery(ex["pixels"]), a.gallery(ex["pixels"]))


def test_key_mismatch_is_a_checkpoint_error(tmp_path):
    state = dict(_tiny().state_dict())
    del state["encoder.norm.weight"]
    state["encoder.extra.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        _tiny().load_checkpoint(path)
    assert "encoder.norm.weight" in str(info.value) and "encoder.extra.weight" in str(info.value)


def _official_state(model: MAAF, layout: str, official_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our weights in yahoo/maaf's key layout: ``2020`` (models/*.py) or ``2021`` (src/maaf/models/*.py)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder."):
            keys = ["encoder." + _fusion.official_encoder_key(k[len("encoder."):])]
            keys.append(keys[0].replace("encoder.", "model.", 1))  # the official `self.model = self.encoder` alias
            if layout == "2020":
                keys = ["composer." + key.replace("model.", "m.", 1) for key in keys]
        elif k.startswith("image_model.projections.") and layout == "2020":
            n = k.split(".")[2]
            keys = [f"img_model.l{n}_conv_proj." + ".".join(k.split(".")[3:])]
        elif k.startswith("image_model.") and layout == "2020":
            keys = ["img_model." + k[len("image_model."):]]
        else:
            keys = [k]
        for key in keys:
            out[key] = v
    out["text_model.embedding_layer.weight"] = official_rows
    d, ff = model.config.embed_dim, model.config.ff_dim
    if layout == "2020":  # the unused fc head the 2020 image model keeps, under both of its names
        out["img_model.model.fc.0.weight"] = out["img_model.fc.0.weight"] = torch.zeros(32, 256)
        # SequenceConcatComposer keeps the feed-forward block it deep-copies into every layer as `self.ff`
        out.update({"composer.ff.w_1.weight": torch.randn(ff, d), "composer.ff.w_1.bias": torch.randn(ff),
                    "composer.ff.w_2.weight": torch.randn(d, ff), "composer.ff.w_2.bias": torch.randn(d)})
        out["normalization_layer.norm_s"] = torch.tensor([math.log(4.0)])  # ImgTextCompositionBase's own
    else:  # src/maaf: the metric head (heads.Metric) holds the NormalizationLayer
        out["head.normalization_layer.norm_s"] = torch.tensor([math.log(4.0)])
    return out


class _Unlisted:
    """A class no checkpoint may bring along (the loader never unpickles arbitrary objects)."""


@pytest.mark.parametrize("zipfile", [True, False])
def test_main_py_checkpoint_with_argparse_options_loads(tmp_path, zipfile):
    """yahoo/maaf's 2020 main.py saves {'it', 'opt': argparse.Namespace, 'model_state_dict'}: weights_only=True
    refuses the Namespace unless that one class is allowed; any other class is still refused."""
    import argparse

    a, b = _tiny(seed=0), _tiny(seed=1)
    opt = argparse.Namespace(model="sequence_concat_attention", embed_dim=32, number_attention_blocks=2,
                             att_layer_spec="34", learning_rate=1e-2, whole_model_path=None, resolutionwise_pool=True,
                             savedir="", image_model_arch="resnet50", lr_decay_steps=[5, 10])
    path = tmp_path / "latest_checkpoint.pth"
    torch.save({"it": 1234, "opt": opt, "model_state_dict": a.state_dict()}, path,
               _use_new_zipfile_serialization=zipfile)
    b.load_checkpoint(path)
    ex = _inputs(a)
    torch.testing.assert_close(_compose(b, ex), _compose(a, ex))

    torch.save({"it": 1, "opt": _Unlisted(), "model_state_dict": a.state_dict()}, path)
    with pytest.raises(CheckpointError, match="_Unlisted"):
        _tiny().load_checkpoint(path)


def test_official_2020_checkpoint_drops_the_composer_ff_copy(tmp_path):
    """The paper-era code (yahoo/maaf e7a49f9) stores `composer.ff.*`, the feed-forward block it deep-copies into the
    layers: strict loading must drop it, not report it as unexpected."""
    words = ["red", "dress", "blue"]
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["<UNK>", *words]) + "\n", encoding="utf-8")
    ours = _tiny(seed=0, vocab_file=str(vocab_file), vocab_size=len(words) + 2)
    emb = ours.text_model.embedding_layer.weight.detach()
    tok = ours.build_tokenizer()
    state = _official_state(ours, "2020", torch.stack([emb[1]] + [emb[tok.token_to_id(w)] for w in words]))
    assert {k for k in state if k.startswith("composer.ff.")} == {f"composer.ff.w_{i}.{p}" for i in (1, 2)
                                                                 for p in ("weight", "bias")}
    path = tmp_path / "ckpt_epoch100.pth"
    torch.save(state, path)
    loaded = _tiny(seed=5, vocab_file=str(vocab_file), vocab_size=len(words) + 2)
    loaded.load_checkpoint(path)  # strict
    ex = _inputs(ours)
    torch.testing.assert_close(_compose(loaded, ex), _compose(ours, ex))


@pytest.mark.parametrize("layout", ["2020", "2021"])
def test_official_checkpoint_layout_maps(tmp_path, layout):
    """Both code generations as their training scripts save them: 2020 main.py ({'it', 'opt', 'model_state_dict'},
    composer.ff, normalization_layer), 2021 train.py ({'it', 'model_state_dict'}, head.normalization_layer)."""
    import argparse

    words = ["red", "dress", "with", "stripes", "blue", "shorter", "sleeves", "and", "a", "collar"]
    random.Random(3).shuffle(words)
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["<UNK>", *words]) + "\n", encoding="utf-8")  # line i = official id i
    ours = _tiny(seed=0, vocab_file=str(vocab_file), vocab_size=len(words) + 2)
    tok = ours.build_tokenizer()
    emb = ours.text_model.embedding_layer.weight.detach()
    official_rows = torch.stack([emb[1]] + [emb[tok.token_to_id(w)] for w in words])  # official order
    path = tmp_path / "official.pt"
    container = {"it": 50, "model_state_dict": _official_state(ours, layout, official_rows)}
    if layout == "2020":
        container["opt"] = argparse.Namespace(dataset="fashioniq", embed_dim=32)
    torch.save(container, path)

    loaded = _tiny(seed=5, vocab_file=str(vocab_file), vocab_size=len(words) + 2)
    loaded.load_checkpoint(path)
    from fine_infer.tokenization import encode

    texts = ["red dress with stripes", "blue and a collar, shorter sleeves", "zebra"]
    ids, mask = encode(tok, texts, ours.text_preprocess)
    pixels = torch.randn(3, 3, 64, 64)
    ex = {"pixels": pixels, "input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    torch.testing.assert_close(_compose(loaded, ex), _compose(ours, ex))

    without_vocab = _tiny(seed=5, vocab_size=len(words) + 2)
    with pytest.raises(CheckpointError, match="vocab_file"):
        without_vocab.load_checkpoint(path)


def test_tokenizer_and_real_text():
    model = _tiny()
    spec = model.text_preprocess
    assert (spec.tokenizer, spec.padding, spec.pad_id, spec.first_word_id) == ("word", "longest", 0, 2)
    pre = model.image_preprocess
    assert (pre.size, pre.crop, pre.resize, pre.interpolation) == (64, 64, "shorter", "bilinear")
    from fine_infer.tokenization import encode

    ids, mask = encode(model.build_tokenizer(), ["make it red with stripes", "blue"], spec)
    assert ids.max() < model.config.vocab_size and mask.sum(1).tolist() == [5, 1]
    with torch.no_grad():
        out = model.compose(torch.randn(2, 3, 64, 64), torch.from_numpy(ids), torch.from_numpy(mask))
    assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="vocab_size"):
        _tiny(vocab_size=10).build_tokenizer()


def test_invalid_configs_are_config_errors():
    for bad in ({"feature_layers": (4, 3)}, {"feature_layers": (5,)}, {"norm": "rms"}, {"output": "token"},
                {"image_size": 70}, {"num_heads": 5}):
        with pytest.raises(ConfigError):
            MAAF(dataclasses.replace(tiny_config(), **bad))


def test_onnx_export_with_dynamic_batch_and_sequence(tmp_path):
    """The LSTM is emitted as an ONNX LSTM node so another sequence length than the sample's still runs."""
    import warnings

    ort = pytest.importorskip("onnxruntime")
    model = _tiny()
    gm = model.graph_module("compose").eval()
    names = ["pixels", "input_ids", "attention_mask"]
    ex = _inputs(model, batch=2, seq_len=7)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {"pixels": {0: batch}, "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    path = tmp_path / "compose.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            gm, tuple(ex[n] for n in names), str(path), input_names=names, output_names=["embedding"],
            dynamic_shapes=dynamic,
            dynamo=True, verbose=False,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for b, L in ((1, 4), (3, 12), (8, 7)):
        ex = _inputs(model, batch=b, seq_len=L, seed=b)
        got = sess.run(None, {n: ex[n].numpy() for n in names})[0]
        np.testing.assert_allclose(got, _compose(model, ex).numpy(), atol=1e-4)


@pytest.mark.slow
def test_paper_preset_shapes():
    torch.manual_seed(0)
    model = MAAF(paper_config()).eval()
    with torch.no_grad():
        tokens, sizes = model.image_model(torch.randn(1, 3, 224, 224))
        assert tokens.shape == (1, 245, 512) and sizes == [196, 49]
        ex = model.example_inputs("compose", batch=2, seq_len=12)
        q = model.compose(ex["pixels"], ex["input_ids"], ex["attention_mask"])
        g = model.gallery(ex["pixels"])
    assert q.shape == g.shape == (2, 512)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(2))
    assert isinstance(model.config, MAAFConfig)
