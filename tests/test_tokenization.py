"""Tokenizers of the three text front-ends and the encode bounds."""

import numpy as np
import pytest

from fine_infer.errors import InputError
from fine_infer.specs import TextPreprocess
from fine_infer.tokenization import build_tokenizer, encode, load_tokenizer, vocab_size


@pytest.mark.parametrize("kind,first", [("wordpiece", 5), ("bpe", 3), ("word", 2)])
def test_known_words_encode_without_unknowns_and_roundtrip_through_json(tmp_path, kind, first):
    spec = TextPreprocess(kind, 16, "longest", first_word_id=first)
    tok = build_tokenizer(spec)
    ids, mask = encode(tok, ["a red striped dress", "make it blue"], spec)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == mask.shape
    assert mask[0].sum() > mask[1].sum() - 2 and (ids[mask == 0] == 0).all()
    unk = tok.token_to_id("[UNK]") if kind == "wordpiece" else tok.token_to_id("<unk>")
    if unk is not None:
        assert unk not in ids[mask == 1]
    tok.save(str(tmp_path / "t.json"))
    again = load_tokenizer(tmp_path / "t.json")
    np.testing.assert_array_equal(encode(again, ["a red striped dress", "make it blue"], spec)[0], ids)
    assert ids.max() < vocab_size(tok) <= 1024


def test_max_length_padding_fills_every_row():
    spec = TextPreprocess("wordpiece", 12, "max_length")
    ids, mask = encode(build_tokenizer(spec), ["dress"], spec)
    assert ids.shape == (1, 12) and mask[0].tolist() == [1, 1, 1] + [0] * 9


def test_empty_overlong_and_wrong_types_are_refused_or_truncated_on_request():
    spec = TextPreprocess("word", 4, "longest")
    tok = build_tokenizer(spec)
    with pytest.raises(InputError, match="text 1 is empty"):
        encode(tok, ["dress", "   "], spec)
    with pytest.raises(InputError, match="text 0 has 6 tokens; this model takes at most 4"):
        encode(tok, ["a red striped dress with dots"], spec)
    ids, mask = encode(tok, ["a red striped dress with dots"], spec, truncate=True)
    assert ids.shape == (1, 4) and mask.all()
    with pytest.raises(InputError, match="not a string"):
        encode(tok, [3], spec)
    with pytest.raises(InputError, match="no texts"):
        encode(tok, [], spec)
    with pytest.raises(InputError, match="characters"):
        encode(tok, ["dress " * 2000], spec)


def test_builtin_bpe_is_the_same_in_every_process():
    """The tiny RAF's BPE vocabulary is learned at build time; its token ids must not depend on the process (hash
    seed), or shipped weights would meet other ids than they were trained on."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib; from fine_infer.tokenization import bpe_tokenizer; "
            "print(hashlib.sha256(bpe_tokenizer(32).to_str().encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2, 3)}
    from fine_infer.tokenization import bpe_tokenizer

    assert digests == {hashlib.sha256(bpe_tokenizer(32).to_str().encode()).hexdigest()}


def test_learned_bpe_merges_follow_frequency_then_lexicographic_order():
    from fine_infer.tokenization import learn_bpe_merges

    # (a, b) and (b, c</w>) both occur twice: the tie goes to the smaller pair. Then every pair occurs once, and
    # ("a", "b</w>") is the smallest of (ab, c</w>), (a, b</w>), (ab, d</w>), (b, c</w>).
    merges = learn_bpe_merges(["abc", "ab", "abd", "bc"], 10)
    assert merges[:2] == [("a", "b"), ("a", "b</w>")]
    assert merges[2:] == [("ab", "c</w>"), ("ab", "d</w>"), ("b", "c</w>")]
    assert learn_bpe_merges(["abc", "ab", "abd", "bc"], 1) == [("a", "b")]  # max_merges honoured
    assert learn_bpe_merges(["x"], 5) == []  # one symbol: nothing to merge


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "word"])
def test_blank_texts_are_refused_alike_whatever_their_characters(kind):
    """Whitespace, NUL and other control characters, zero-width spaces and joiners, the BOM, soft hyphens: nothing to
    read, so refused with the one message, by every tokenizer (some would embed them as [CLS] [SEP] or [UNK])."""
    from fine_infer.tokenization import is_blank

    spec = TextPreprocess(kind, 16, "longest")
    tok = build_tokenizer(spec)
    blank = ["   ", "\x00", "\x00\x00\t", "\u200b", "\u200b\u200c\u200d\u2060\ufeff", " \x00\u200b\n", "\u00ad", ""]
    messages = set()
    for t in blank:
        assert is_blank(t), repr(t)
        with pytest.raises(InputError) as err:
            encode(tok, ["dress", t], spec)
        messages.add(str(err.value))
    assert messages == {"text 1 is empty (only spaces, control or zero-width characters): give at least one word"}
    for t in ("red \u200b dress", "dress\x00", "\u00e9t\u00e9 dress", "\u2764 dress"):
        assert not is_blank(t), repr(t)
    encode(tok, ["red \u200b dress"], spec)
