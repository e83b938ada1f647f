"""Fashion-FINE (Seun9wan/Fashion-FINE, ECCV 2024): declarations, normalisation, graph modules, the text pooler's
padding switch, a float64 re-implementation of both towers and the MAA written the way the official code does it,
and checkpoints in our layout and in the official (ALBEF) layout."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.models import create
from fine_infer.models._registry import _REGISTRY, get_arch
from fine_infer.models.fashion_fine import FashionFine, paper_config, tiny_config
from fine_infer.specs import CLIP_MEAN, CLIP_STD


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Replace the std-0.02 init by livelier weights, so a wrong softmax axis or a dropped term shows up: matrices
    ~N(0, 1/fan_in), LayerNorm gains ~1 ± 0.1, biases ~N(0, 0.1), and a MAA scorer (W_v ~ N(0, 0.25²)) whose
    softmax is clearly non-uniform without collapsing onto one token (every pooled token then shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "W_v":
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _tiny(seed: int = 0, **overrides) -> FashionFine:
    model = FashionFine(dataclasses.replace(tiny_config(), **overrides)).eval()
    _randomise(model, seed)
    return model


def _text(model: FashionFine, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    return model.example_inputs("text", batch=batch, seq_len=seq_len, generator=torch.Generator().manual_seed(seed))


def _image(model: FashionFine, batch: int, seed: int) -> torch.Tensor:
    return model.example_inputs("image", batch=batch, generator=torch.Generator().manual_seed(seed))["pixels"]


# --- declarations ---------------------------------------------------------------------------------------------------
def test_registered_with_paper_sizes():
    entry = get_arch("fashion-fine")
    assert entry.model_cls is FashionFine and set(entry.presets) >= {"tiny", "paper"}
    assert "ECCV 2024" in entry.source
    p = paper_config()
    assert (p.image_size, p.patch_size, p.vision_width, p.vision_depth, p.vision_heads) == (256, 16, 768, 12, 12)
    assert (p.text_width, p.text_layers, p.text_heads, p.text_intermediate) == (768, 6, 12, 3072)
    assert (p.vocab_size, p.max_text_len, p.embed_dim) == (30522, 180, 256)
    assert (p.r_img, p.r_text, p.mask_text_padding, p.vocab_file) == (0.05, 0.25, False, None)
    assert _REGISTRY["fashion-fine"].presets["tiny"]().image_size == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.r_img = 0.5  # type: ignore[misc]


def test_graph_specs_and_preprocessing():
    model = _tiny()
    img, txt = model.graph("image"), model.graph("text")
    assert (img.task, [t.name for t in img.inputs]) == ("embed_image", ["pixels"])
    assert img.inputs[0].shape == ("batch", 3, 64, 64) and img.inputs[0].dtype == "float32"
    assert (txt.task, [(t.name, t.dtype, t.shape) for t in txt.inputs]) == (
        "embed_text",
        [("input_ids", "int64", ("batch", "sequence")), ("attention_mask", "int64", ("batch", "sequence"))],
    )
    for g in (img, txt):
        assert [(t.name, t.dtype, t.shape) for t in g.outputs] == [("embedding", "float32", ("batch", 32))]
    pre = model.image_preprocess
    assert (pre.size, pre.crop, pre.resize, pre.interpolation) == (64, 64, "exact", "bicubic")
    assert (pre.mean, pre.std) == (CLIP_MEAN, CLIP_STD)
    text = model.text_preprocess
    assert (text.tokenizer, text.max_length, text.padding, text.pad_id, text.first_word_id) == (
        "wordpiece", 32, "max_length", 0, 5,
    )
    assert model.embed_dim == 32
    with pytest.raises(ConfigError):
        model.graph_module("compose")


def test_config_validation():
    with pytest.raises(ConfigError, match="vision_width"):
        FashionFine(dataclasses.replace(tiny_config(), text_width=48))
    with pytest.raises(ConfigError, match="patch_size"):
        FashionFine(dataclasses.replace(tiny_config(), image_size=60))
    with pytest.raises(ConfigError, match="max_positions"):
        FashionFine(dataclasses.replace(tiny_config(), max_text_len=100))
    with pytest.raises(ConfigError, match="unknown config field"):
        create("fashion-fine", "tiny", r_image=0.1)


def test_tokenizer_pads_to_max_length_and_feeds_the_text_graph():
    from fine_infer.tokenization import encode

    model = _tiny()
    tok = model.build_tokenizer()
    ids, mask = encode(tok, ["red striped dress", "black leather boots with heels"], model.text_preprocess)
    assert ids.shape == mask.shape == (2, 32) and ids[0, 0] == tok.token_to_id("[CLS]")
    assert (ids[mask == 0] == 0).all() and mask[0].sum() == 5  # [CLS] red striped dress [SEP]
    with torch.no_grad():
        e = model.graph_module("text")(torch.from_numpy(ids), torch.from_numpy(mask))
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))


# --- forward paths --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_graph_modules_match_methods_and_are_unit_norm():
    model = _tiny(seed=1)
    pixels, text = _image(model, 4, seed=11), _text(model, 4, 20, seed=12)
    gi, gt = model.graph_module("image"), model.graph_module("text")
    assert set(gi.state_dict()) == {"model." + k for k in model.state_dict()}  # shares, does not copy
    ei, et = gi(pixels), gt(text["input_ids"], text["attention_mask"])
    assert ei.shape == et.shape == (4, 32)
    torch.testing.assert_close(ei, model.embed_image(pixels), rtol=0, atol=0)
    torch.testing.assert_close(et, model.embed_text(text["input_ids"], text["attention_mask"]), rtol=0, atol=0)
    torch.testing.assert_close(ei.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(et.norm(dim=-1), torch.ones(4))
    assert (ei[0] - ei[1]).abs().max() > 1e-3 and (et[0] - et[1]).abs().max() > 1e-3  # inputs matter
    # Each row is computed independently of the rest of the batch.
    torch.testing.assert_close(model.embed_image(pixels[2:3]), ei[2:3], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        model.embed_text(text["input_ids"][2:3], text["attention_mask"][2:3]), et[2:3], atol=1e-6, rtol=1e-5
    )


@torch.no_grad()
def test_text_pooler_padding_switch():
    """Paper mode pools over padding (so the padded length matters); mask_text_padding=True does not."""
    paper = _tiny(seed=2)
    masked = _tiny(seed=2, mask_text_padding=True)
    ids_full = torch.randint(5, 1024, (3, 12), generator=torch.Generator().manual_seed(21))
    full = torch.ones(3, 12, dtype=torch.int64)
    # No padding: the two modes agree exactly.
    torch.testing.assert_close(paper.embed_text(ids_full, full), masked.embed_text(ids_full, full), rtol=0, atol=0)

    text = _text(paper, 3, 12, seed=22)
    ids, mask = text["input_ids"], text["attention_mask"]
    mask[1, 6:] = 0  # make sure at least one row is padded
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
    assert (paper.embed_text(ids, mask) - masked.embed_text(ids, mask))[1].abs().max() > 1e-3

    extra = 9
    longer_mask = torch.cat([mask, torch.zeros(3, extra, dtype=torch.int64)], dim=1)
    pad_ids = torch.cat([ids, torch.zeros(3, extra, dtype=torch.int64)], dim=1)
    junk_ids = torch.where(longer_mask.bool(), pad_ids, torch.randint(5, 1024, pad_ids.shape))
    # Masked pooler: extra padding, whatever ids it holds, changes nothing (BERT masks padded keys too).
    for longer_ids in (pad_ids, junk_ids):
        torch.testing.assert_close(
            masked.embed_text(longer_ids, longer_mask), masked.embed_text(ids, mask), atol=1e-6, rtol=1e-5
        )
    # Paper pooler: the same texts padded further embed differently (why the preprocess pads to max_length).
    assert (paper.embed_text(pad_ids, longer_mask) - paper.embed_text(ids, mask)).abs().max() > 1e-3


# --- float64 reference ----------------------------------------------------------------------------------------------
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _mha(q, k, v, heads, additive=None):
    B, N, W = q.shape
    d = W // heads
    q, k, v = (t.reshape(B, N, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    if additive is not None:
        scores = scores + additive
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v).permute(0, 2, 1, 3).reshape(B, N, W)


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ref_vit(sd, c, pixels):
    """ALBEF's ViT written out: the patch conv as a matmul over unfolded patches, pre-norm blocks, final norm."""
    B, P, g = pixels.shape[0], c.patch_size, c.image_size // c.patch_size
    patches = pixels.reshape(B, 3, g, P, g, P).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, 3 * P * P)
    w = sd["visual_encoder.patch_embed.proj.weight"].reshape(c.vision_width, -1)
    x = patches @ w.T + sd["visual_encoder.patch_embed.proj.bias"]
    x = torch.cat([sd["visual_encoder.cls_token"].expand(B, 1, -1), x], 1) + sd["visual_encoder.pos_embed"]
    for i in range(c.vision_depth):
        p = f"visual_encoder.blocks.{i}."
        h = _ln(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], c.vision_eps)
        q, k, v = _lin(sd, p + "attn.qkv", h).chunk(3, dim=-1)
        x = x + _lin(sd, p + "attn.proj", _mha(q, k, v, c.vision_heads))
        h = _ln(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], c.vision_eps)
        x = x + _lin(sd, p + "mlp.fc2", _gelu(_lin(sd, p + "mlp.fc1", h)))
    return _ln(x, sd["visual_encoder.norm.weight"], sd["visual_encoder.norm.bias"], c.vision_eps)


def _ref_bert(sd, c, ids, mask):
    """xbert's text mode written out: embeddings (type 0), post-norm layers, additive (1 - mask) * -10000."""
    e = "text_encoder.embeddings."
    L = ids.shape[1]
    x = sd[e + "word_embeddings.weight"][ids] + sd[e + "token_type_embeddings.weight"][0]
    x = x + sd[e + "position_embeddings.weight"][:L]
    x = _ln(x, sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], c.text_eps)
    additive = (1.0 - mask[:, None, None, :].double()) * -10000.0
    for i in range(c.text_layers):
        p = f"text_encoder.encoder.layer.{i}."
        a = p + "attention."
        ctx = _mha(_lin(sd, a + "self.query", x), _lin(sd, a + "self.key", x), _lin(sd, a + "self.value", x),
                   c.text_heads, additive)
        x = _ln(_lin(sd, a + "output.dense", ctx) + x, sd[a + "output.LayerNorm.weight"],
                sd[a + "output.LayerNorm.bias"], c.text_eps)
        h = _gelu(_lin(sd, p + "intermediate.dense", x))
        x = _ln(_lin(sd, p + "output.dense", h) + x, sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"],
                c.text_eps)
    return x


def _ref_adapter(sd, embeds, kind, r, start, mask=None):
    """The MAA as model_retrieval.py / retrieval.py write it (tanh → @ W_v → softmax(dim=1) → expand → mul →
    sum), then combine(proj(.)) on CLS and on the pooled vector, normalise, mix with r, normalise."""
    word = embeds[:, start:, :]
    att = torch.tanh(_lin(sd, "att_layer_v", word)) @ sd["W_v"]  # (B, N, 1)
    if mask is not None:  # our switch, not the paper: padded tokens get no weight
        att = att.masked_fill(~mask[:, start:, None].bool(), -math.inf)
    att = att.softmax(dim=1).nan_to_num(0.0).expand(-1, -1, embeds.shape[-1])
    word_sum = word.mul(att).sum(1)
    proj, combine = f"{kind}_proj", f"combine_{kind}_proj"
    feat = F.normalize(_lin(sd, combine, _lin(sd, proj, embeds[:, 0, :])), dim=-1)
    word_sum = F.normalize(_lin(sd, combine, _lin(sd, proj, word_sum)), dim=-1)
    return F.normalize(feat * (1 - r) + word_sum * r, dim=-1)


@pytest.mark.parametrize("mask_text_padding", [False, True])
@torch.no_grad()
def test_matches_float64_reference(mask_text_padding):
    model = _tiny(seed=3, mask_text_padding=mask_text_padding)
    c = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    pixels = _image(model, 3, seed=31)
    text = _text(model, 4, 14, seed=32)
    ids, mask = text["input_ids"], text["attention_mask"]
    mask[1, 2:] = 0  # a row with nothing to pool when padding is masked: the local term drops out
    mask[2, 7:] = 0
    ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))

    ref_img = _ref_adapter(sd, _ref_vit(sd, c, pixels.double()), "vision", c.r_img, 1)
    ref_txt = _ref_adapter(sd, _ref_bert(sd, c, ids, mask), "text", c.r_text, 2, mask if mask_text_padding else None)
    torch.testing.assert_close(model.embed_image(pixels).double(), ref_img, atol=2e-5, rtol=0)
    torch.testing.assert_close(model.embed_text(ids, mask).double(), ref_txt, atol=2e-5, rtol=0)
    # The encoders on their own (the adapter above sees their outputs).
    torch.testing.assert_close(model.text_encoder(ids, mask).double(), _ref_bert(sd, c, ids, mask), atol=1e-4, rtol=0)


# --- checkpoints ----------------------------------------------------------------------------------------------------
def test_own_layout_round_trip_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _tiny(seed=4)
    path = tmp_path / "ff.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    loaded = create("fashion-fine", "tiny", checkpoint=path)
    pixels = _image(src, 2, seed=41)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_image(pixels), src.embed_image(pixels), rtol=0, atol=0)


_MOMENTUM = ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "combine_vision_proj", "combine_text_proj")


def _official_state(model: FashionFine, pos_grid: int, extra_text_layers: int = 2) -> dict[str, torch.Tensor]:
    """An official ALBEF-layout Fashion-FINE state dict built from ``model``'s weights: momentum copies, queues,
    temp, itm_head, xbert's position_ids, fusion layers with cross-attention, pos_embed on a ``pos_grid`` grid."""
    g = torch.Generator().manual_seed(99)
    c = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    W = c.text_width
    state["visual_encoder.pos_embed"] = torch.randn(1, 1 + pos_grid * pos_grid, W, generator=g) * 0.3
    layer0 = {k: v for k, v in state.items() if k.startswith("text_encoder.encoder.layer.0.")}
    for i in range(c.text_layers, c.text_layers + extra_text_layers):
        for k, v in layer0.items():
            state[k.replace(".layer.0.", f".layer.{i}.")] = torch.randn(v.shape, generator=g)
        for part in ("self.query", "self.key", "self.value", "output.dense"):
            state[f"text_encoder.encoder.layer.{i}.crossattention.{part}.weight"] = torch.randn(W, W, generator=g)
            state[f"text_encoder.encoder.layer.{i}.crossattention.{part}.bias"] = torch.randn(W, generator=g)
    state["text_encoder.embeddings.position_ids"] = torch.arange(c.max_positions)[None]
    for k in list(state):
        top, rest = k.split(".", 1) if "." in k else (k, "")
        if top in _MOMENTUM:
            state[f"{top}_m.{rest}"] = state[k] + 0.01 * torch.randn(state[k].shape, generator=g) \
                if state[k].is_floating_point() else state[k].clone()
    E = c.embed_dim
    state.update(
        temp=torch.tensor(0.07),
        image_queue=F.normalize(torch.randn(E, 16, generator=g), dim=0),
        text_queue=F.normalize(torch.randn(E, 16, generator=g), dim=0),
        queue_ptr=torch.zeros(1, dtype=torch.long),
        idx_queue=torch.full((1, 16), -100),
        ptr_queue=torch.zeros(1, dtype=torch.long),
    )
    state["itm_head.weight"] = torch.randn(2, W, generator=g)
    state["itm_head.bias"] = torch.randn(2, generator=g)
    return state


def test_official_checkpoint_layout_loads(tmp_path):
    src = _tiny(seed=5)
    official = _official_state(src, pos_grid=8)  # trained at 128 px (8×8 patches); tiny runs at 64 px (4×4)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": official}, path)

    # Expected: the source weights with pos_embed resized the way ALBEF's interpolate_pos_embed does it.
    pos = official["visual_encoder.pos_embed"]
    grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, -1)
    with torch.no_grad():
        src.visual_encoder.pos_embed.copy_(torch.cat([pos[:, :1], grid], dim=1))

    loaded = create("fashion-fine", "tiny", checkpoint=path)
    assert set(loaded.state_dict()) == set(src.state_dict())
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0, msg=k)
    pixels, text = _image(src, 3, seed=51), _text(src, 3, 16, seed=52)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_image(pixels), src.embed_image(pixels), rtol=0, atol=0)
        torch.testing.assert_close(
            loaded.embed_text(text["input_ids"], text["attention_mask"]),
            src.embed_text(text["input_ids"], text["attention_mask"]),
            rtol=0, atol=0,
        )


@pytest.mark.parametrize("missing", ["att_layer_v.bias", "text_encoder.encoder.layer.1.output.LayerNorm.weight"])
def test_missing_key_is_a_checkpoint_error(tmp_path, missing):
    state = _official_state(_tiny(seed=6), pos_grid=4)
    del state[missing]
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        create("fashion-fine", "tiny", checkpoint=path)
    assert missing in str(info.value) and "missing" in str(info.value)


def test_unexpected_cross_attention_in_a_text_layer_is_reported(tmp_path):
    """Cross-attention inside the kept text layers means a config mismatch, not something to drop silently."""
    model = _tiny(seed=7)
    state = dict(model.state_dict())
    key = "text_encoder.encoder.layer.0.crossattention.self.query.weight"
    state[key] = torch.randn(64, 64)
    path = tmp_path / "odd.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="unexpected"):
        create("fashion-fine", "tiny", checkpoint=path)


# --- paper size -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@torch.no_grad()
def test_paper_preset_shapes():
    model = create("fashion-fine", "paper")
    assert model.visual_encoder.pos_embed.shape == (1, 257, 768)
    assert len(model.text_encoder.encoder.layer) == 6
    assert model.text_encoder.embeddings.word_embeddings.weight.shape == (30522, 768)
    # ViT-B/16 at 256 px (85.84M) + BERT-base embeddings and 6 layers (66.36M) + projections and the MAA (1.12M).
    assert sum(p.numel() for p in model.visual_encoder.parameters()) == 85_844_736
    assert sum(p.numel() for p in model.text_encoder.parameters()) == 66_364_416
    assert sum(p.numel() for p in model.parameters()) == 153_325_824
    pixels = _image(model, 1, seed=61)
    text = _text(model, 2, 180, seed=62)
    ei = model.graph_module("image")(pixels)
    et = model.graph_module("text")(text["input_ids"], text["attention_mask"])
    assert ei.shape == (1, 256) and et.shape == (2, 256)
    torch.testing.assert_close(ei.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(et.norm(dim=-1), torch.ones(2))
