"""RAF (ClipResMAAF, yahoo/maaf): shapes, normalisation, causal/padding invariance, the residual formula in float64,
CLIP blocks against CLIP's own formulation, checkpoints and the official key layout."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.models import _fusion
from fine_infer.models._clip_text import ResidualAttentionBlock, causal_mask
from fine_infer.models._registry import _REGISTRY
from fine_infer.models._resnet import AttentionPool2d
from fine_infer.models.raf import RAF, our_to_clip_token_rows, paper_config, tiny_config
from fine_infer.specs import CLIP_MEAN


def _tiny(seed: int = 0, **overrides) -> RAF:
    torch.manual_seed(seed)
    model = RAF(dataclasses.replace(tiny_config(), **overrides)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _inputs(model: RAF, batch: int = 3, seq_len: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    return model.example_inputs("compose", batch=batch, seq_len=seq_len, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _compose(model: RAF, ex: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.compose(ex["pixels"], ex["input_ids"], ex["attention_mask"])


def test_registered_with_presets():
    entry = _REGISTRY["raf"]
    assert entry.model_cls is RAF and set(entry.presets) >= {"tiny", "paper"}
    paper = entry.presets["paper"]()
    assert (paper.embed_dim, paper.num_blocks, paper.num_heads, paper.ff_dim) == (1024, 1, 8, 256)
    assert paper.context_length == 77 and paper.maaf_weight == pytest.approx(0.0067)
    assert (paper.vision_layers, paper.vision_width, paper.clip_embed_dim) == ((3, 4, 6, 3), 64, 1024)


def test_graph_specs_and_preprocessing():
    model = _tiny()
    assert model.graph("compose").task == "compose" and model.graph("gallery").task == "embed_image"
    assert model.graph("compose").outputs[0].shape == ("batch", 64)
    pre, text = model.image_preprocess, model.text_preprocess
    assert (pre.interpolation, pre.resize, pre.mean) == ("bicubic", "shorter", CLIP_MEAN)
    assert (text.tokenizer, text.max_length, text.pad_id, text.first_word_id) == ("bpe", 32, 0, 3)
    assert paper_config().context_length == 77
    with pytest.raises(ConfigError):
        model.graph_module("image")


def test_embeddings_are_unit_norm():
    model = _tiny()
    ex = _inputs(model, batch=4)
    with torch.no_grad():
        q = model.graph_module("compose")(ex["pixels"], ex["input_ids"], ex["attention_mask"])
        g = model.graph_module("gallery")(ex["pixels"])
    assert q.shape == g.shape == (4, 64)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(4))
    assert (q - g).abs().max() > 1e-3  # the image-only target differs from the composed query


def test_padding_does_not_change_compose():
    model = _tiny()
    ex = _inputs(model, batch=3, seq_len=6)
    pad = 7
    mask = torch.cat([ex["attention_mask"], torch.zeros(3, pad, dtype=torch.int64)], dim=1)
    ids = torch.cat([ex["input_ids"], torch.zeros(3, pad, dtype=torch.int64)], dim=1)
    junk = torch.where(mask.bool(), ids, torch.randint(3, 1024, ids.shape))  # causal mask: later tokens unseen
    for longer_ids in (ids, junk):
        longer = {"pixels": ex["pixels"], "input_ids": longer_ids, "attention_mask": mask}
        torch.testing.assert_close(_compose(model, longer), _compose(model, ex), atol=1e-6, rtol=1e-5)


def test_compose_and_gallery_match_float64_formula():
    """compose = norm(attnpool + text[EOT] + w·mean(rwpool(image), masked mean(text))), recomputed in float64."""
    model = _tiny()
    ex = _inputs(model, batch=3, seq_len=8)
    w = model.config.maaf_weight
    with torch.no_grad():
        tokens, pooled, sizes = model.image_model(ex["pixels"])
        text = model.text_model(ex["input_ids"])
        fi, ft = _fusion.fuse_tokens(model.encoder, tokens, text, ex["attention_mask"])
        fg = model.encoder(tokens, None)
    assert sizes == [4, 1] and tokens.shape[1] == 5
    P, T, FI, FT, FG = (t.double().numpy() for t in (pooled, text, fi, ft, fg))
    m = ex["attention_mask"].numpy()
    q_ref, g_ref = [], []
    for b in range(3):
        n = int(m[b].sum())
        maaf = ((FI[b, :4].mean(0) + FI[b, 4]) / 2 + FT[b, :n].mean(0)) / 2
        v = P[b] + T[b, n - 1] + w * maaf
        q_ref.append(v / np.linalg.norm(v))
        v = P[b] + w * (FG[b, :4].mean(0) + FG[b, 4]) / 2
        g_ref.append(v / np.linalg.norm(v))
    np.testing.assert_allclose(_compose(model, ex).numpy(), np.stack(q_ref), atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(model.gallery(ex["pixels"]).numpy(), np.stack(g_ref), atol=1e-5)


def test_attention_pool_matches_clip_formulation():
    torch.manual_seed(0)
    pool = AttentionPool2d(spacial_dim=3, embed_dim=16, num_heads=4, output_dim=8).eval()
    x = torch.randn(2, 16, 3, 3)
    # CLIP's forward: every token is a query through F.multi_head_attention_forward, keep token 0.
    t = x.flatten(2).permute(2, 0, 1)
    t = torch.cat([t.mean(dim=0, keepdim=True), t], dim=0) + pool.positional_embedding[:, None, :]
    ref, _ = F.multi_head_attention_forward(
        query=t, key=t, value=t, embed_dim_to_check=16, num_heads=4,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False,
    )
    with torch.no_grad():
        torch.testing.assert_close(pool(x), ref[0], atol=1e-5, rtol=1e-5)


def test_text_block_matches_clip_multihead_attention():
    torch.manual_seed(0)
    block = ResidualAttentionBlock(16, 4).eval()
    mha = torch.nn.MultiheadAttention(16, 4).eval()
    mha.load_state_dict({k[len("attn."):]: v for k, v in block.state_dict().items() if k.startswith("attn.")})
    x = torch.randn(2, 6, 16)
    additive = torch.full((6, 6), float("-inf")).triu_(1)  # CLIP's build_attention_mask
    with torch.no_grad():
        y = block.ln_1(x).transpose(0, 1)
        ref = x + mha(y, y, y, need_weights=False, attn_mask=additive)[0].transpose(0, 1)
        ref = ref + block.mlp(block.ln_2(ref))
        torch.testing.assert_close(block(x, causal_mask(6)), ref, atol=1e-5, rtol=1e-5)


def test_end_token_is_the_last_valid_position():
    model = _tiny()
    tok = model.build_tokenizer()
    from fine_infer.tokenization import encode

    ids, mask = encode(tok, ["a red dress", "blue striped shirt with a long collar"], model.text_preprocess)
    end = tok.token_to_id("<|endoftext|>")
    assert [ids[i, mask[i].sum() - 1] for i in range(2)] == [end, end]
    assert ids.max() < model.config.vocab_size
    with torch.no_grad():
        out = model.compose(torch.randn(2, 3, 64, 64), torch.from_numpy(ids), torch.from_numpy(mask))
    assert torch.isfinite(out).all()


def test_checkpoint_round_trip_safetensors(tmp_path):
    from safetensors.torch import save_file

    a, b = _tiny(seed=0), _tiny(seed=1)
    ex = _inputs(a)
    path = tmp_path / "raf.safetensors"
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(path))
    b.load_checkpoint(path)
    torch.testing.assert_close(_compose(b, ex), _compose(a, ex))


def test_key_mismatch_is_a_checkpoint_error(tmp_path):
    state = dict(_tiny().state_dict())
    del state["text_model.out_layer.weight"]
    path = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match="text_model.out_layer.weight"):
        _tiny().load_checkpoint(path)


def test_official_clipresmaaf_layout_maps(tmp_path):
    """A ClipResMAAF checkpoint as yahoo/maaf's src/maaf/train.py saves it: {'it', 'model_state_dict'}, CLIP registered
    twice, the encoder aliased as `model`, and the metric head's scale under `head.normalization_layer`."""
    ours = _tiny(seed=0)
    official: dict[str, torch.Tensor] = {}
    for k, v in ours.state_dict().items():
        if k.startswith("encoder."):
            key = "encoder." + _fusion.official_encoder_key(k[len("encoder."):])
            official[key] = official[key.replace("encoder.", "model.", 1)] = v  # `self.model = self.encoder`
        elif k.startswith("text_model.transformer."):
            official["text_model.model." + k[len("text_model.transformer."):]] = v
        elif k == "text_model.token_embedding.weight":
            official[k] = our_to_clip_token_rows(v)  # CLIP's id order: start/end last
        else:
            official[k] = v
        if k.startswith("image_model.model."):  # ClipResMAAF also registers the whole CLIP model as `clip`
            official["clip.visual." + k[len("image_model.model."):]] = v
    official["clip.logit_scale"] = torch.tensor(4.6)
    official["head.normalization_layer.norm_s"] = torch.tensor([math.log(4.0)])  # heads.Metric, training only
    path = tmp_path / "latest_checkpoint.pth"
    torch.save({"it": 4321, "model_state_dict": official}, path)

    loaded = _tiny(seed=7)
    with pytest.warns(UserWarning, match="vocab_file"):
        loaded.load_checkpoint(path)
    ex = _inputs(ours, batch=3)
    # Only the pad row differs (CLIP has none); it never reaches a kept position.
    torch.testing.assert_close(_compose(loaded, ex), _compose(ours, ex))


def test_invalid_configs_are_config_errors():
    for bad in ({"image_size": 48}, {"norm": "rms"}, {"output": "token"}, {"num_heads": 5}, {"text_heads": 5}):
        with pytest.raises(ConfigError):
            RAF(dataclasses.replace(tiny_config(), **bad))


@pytest.mark.slow
def test_paper_preset_shapes():
    torch.manual_seed(0)
    model = RAF(paper_config()).eval()
    ex = model.example_inputs("compose", batch=1, seq_len=77)
    with torch.no_grad():
        tokens, pooled, sizes = model.image_model(ex["pixels"])
        assert tokens.shape == (1, 50, 1024) and pooled.shape == (1, 1024) and sizes == [49, 1]
        q = model.compose(ex["pixels"], ex["input_ids"], ex["attention_mask"])
    assert q.shape == (1, 1024)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(1))
