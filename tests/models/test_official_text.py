"""Raw query text gets the token ids the official pipelines produced: Fashion-FINE's template + pre_caption + BERT with
its category signs, MAAF's str.split() words, CLIP's cleaning and regex (RAF). Each reference below is written here
from the official code's documented behaviour (not copied from it), independent of fine-infer's implementation; the
runtime path (a bundle's manifest read by ``fine_infer.load``, ``Session.tokenize``) is the one checked.

The references were confirmed once against the official code itself (benchmarks/RESULTS.md, "Official checkpoints
and tokenizers")."""

from __future__ import annotations

import dataclasses
import gzip
import html
import math
import string
import unicodedata

import numpy as np
import pytest

from fine_infer.errors import ConfigError
from fine_infer.specs import TextPreprocess
from fine_infer.textclean import apply_conventions, clip_clean, fix_text_like_ftfy, pre_caption
from fine_infer.tokenization import FASHION_SIGN_TOKENS, bpe_tokenizer, encode, word_tokenizer

# Awkward captions and queries: contractions, digits and units, HTML entities, ligatures, emoji, accents, scripts,
# control characters, whitespace of every kind, the category signs, long strings.
CORPUS = [
    "it's a red dress", "don't make it longer", "I'm looking for THEY'RE WE'VE you'll he'd", "rock'n'roll 'sup ''s",
    "it’s got ‘curly’ “quotes”", "5cm heels", "size 42 jeans", "3/4 sleeves, 100% cotton", "2.5\" brim, $19.99",
    "10-12 years; 1st/2nd", "Ｔ－ＳＨＩＲＴ　ＸＬ", "&amp; &quot;quoted&quot; &#39;single&#39; &lt;b&gt;",
    "<b>bold</b> &amp; more", "&amp;amp;lt; twice", "fish &amp chips &nbsp;x &EACUTE;t&eacute;", "&#x2019;s &#8217;t",
    "ﬁtted ﬂoral ﬀ ﬃ ﬅ", "ǆ Ǳ ĳ", "👗🔥 party", "❤️ with a heart", "👩🏽‍🦱 model", "café naïve Ångström ÉTÉ ñandú",
    "cafe\u0301 e\u0301te\u0301", "ΣΟΦΙΑΣ φόρεμα", "İstanbul ß ẞ", "连衣裙 红色", "فستان أحمر", "साड़ी लाल",
    "tab\there\nnew line\r\nwindows", "nul\x00 bell\x07 esc\x1b[31m red\x1b[0m", "fs\x1cgs\x1drs\x1eus\x1fend",
    "del\x7f zwsp\u200bfeff\ufeff nel\x85 ls\u2028ps\u2029", "nbsp\xa0thin\u2009ideo\u3000end",
    "  leading and trailing  ", "many     spaces", "[tops_sign] red striped shirt", "[DRESSES_SIGN] a blue dress",
    "a[pants_sign]b [ tops_sign ] [tops sign]", "<person> wears it<br>with a belt", "slim-fit/loose jeans!!!",
    "What? (really) *stars* #tag: ~x; \"q\"", "under_score and back`tick {braces} |pipe|", "<|endoftext|> inside",
    "C1 controls \x80 \x92 \x9d", "long " + "very " * 60 + "long", "x" * 150 + " word",
]


# --- Fashion-FINE ---------------------------------------------------------------------------------------------------
def _pre_caption_reference(text: str) -> str:
    """Fashion-FINE's dataset/utils.py pre_caption as its code documents it, written out character by character."""
    text = text.lower()
    text = "".join(c for c in text if c not in ",.'!\"()*#:;~")
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person").replace("<br>", " ")
    out, i = [], 0
    while i < len(text):  # a run of two or more whitespace characters becomes one space
        j = i
        while j < len(text) and text[j].isspace():
            j += 1
        if j - i >= 2:
            out.append(" ")
        elif j == i:
            out.append(text[i])
            j += 1
        else:
            out.append(text[i])
        i = j
    text = "".join(out)
    while text.endswith("\n"):
        text = text[:-1]
    return text.strip(" ")


def _is_punct(c: str) -> bool:
    o = ord(c)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(c)[0] == "P"


def _is_cjk(o: int) -> bool:
    return any(a <= o <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _bert_reference(text: str, vocab: dict[str, int], signs: tuple[str, ...]) -> list[int]:
    """BERT's slow tokenizer as Fashion-FINE ran it (lowercase; its added sign tokens split off whole first; then per
    piece: drop control characters, whitespace → space, CJK ideographs padded, lowercase and strip accents, split
    punctuation; greedy longest-match WordPiece, a word over 100 characters or with no match is [UNK]), with [CLS]
    and [SEP]."""
    pieces = [text.lower()]
    for sign in signs:
        pieces = [p for piece in pieces for p in _split_keep(piece, sign)]
    ids = [vocab["[CLS]"]]
    for piece in pieces:
        if piece in signs:
            ids.append(vocab[piece])
            continue
        clean = "".join(" " if c in " \t\n\r" or unicodedata.category(c) == "Zs" else c for c in piece
                        if not (ord(c) in (0, 0xFFFD) or (c not in "\t\n\r" and unicodedata.category(c)[0] == "C")))
        clean = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in clean)
        for word in clean.split():
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            parts, cur = [], ""
            for c in word:
                if _is_punct(c):
                    parts += [cur, c] if cur else [c]
                    cur = ""
                else:
                    cur += c
            parts += [cur] if cur else []
            for part in parts:
                ids += _wordpiece(part, vocab)
    return ids + [vocab["[SEP]"]]


def _split_keep(text: str, sep: str) -> list[str]:
    out = []
    for i, chunk in enumerate(text.split(sep)):
        if i:
            out.append(sep)
        if chunk.strip():
            out.append(chunk)
    return out


def _wordpiece(word: str, vocab: dict[str, int]) -> list[int]:
    if len(word) > 100:
        return [vocab["[UNK]"]]
    out, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start and (("##" if start else "") + word[start:end]) not in vocab:
            end -= 1
        if end == start:
            return [vocab["[UNK]"]]
        out.append(vocab[("##" if start else "") + word[start:end]])
        start = end
    return out


def _official_like_vocab(path) -> list[str]:
    """A vocab.txt laid out as FashionSAP's fashion_annotation/vocab.txt: [PAD], the nine signs, [unused…], the BERT
    specials, then characters, word pieces and words."""
    signs = ["[tops_sign]", "[pants_sign]", "[skirts_sign]", "[coats_sign]", "[dresses_sign]", "[shoes_sign]",
             "[bags_sign]", "[accessories_sign]", "[others_sign]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation) + list("ßσςφρεμαιıαæø")
    words = ("the image description is a an red blue dress shirt striped with belt it wears jeans slim fit loose "
             "heels size sleeves cotton quoted single bold more twice fish chips party model heart really stars tag "
             "under score back tick braces pipe looking for person long very word new line tab here windows").split()
    tokens = ["[PAD]", *signs, *(f"[unused{i}]" for i in range(9, 30)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars,
              *("##" + c for c in chars if c.isalnum()), *words, "##s", "##ed", "##ing", "##er", "##ly"]
    tokens = list(dict.fromkeys(tokens))
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return tokens


def _official_fashion_fine_ids(texts, vocab, max_length=180):
    """retrieval.py's text path: "the image description is " + pre_caption(text), BertTokenizer with the signs added,
    padding="max_length", truncation=True (the text's tokens cut, [CLS] and [SEP] kept)."""
    ids = np.zeros((len(texts), max_length), np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(texts):
        row = _bert_reference("the image description is " + _pre_caption_reference(t), vocab, FASHION_SIGN_TOKENS)
        row = row if len(row) <= max_length else row[: max_length - 1] + row[-1:]
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def _session(model, out, graph):
    import fine_infer
    from fine_infer.export import export_model

    export_model(model, out, graphs=[graph], gates=False)
    return fine_infer.load(out, backend="onnxruntime")


@pytest.fixture(scope="module")
def fashion_fine_bundle(tmp_path_factory):
    """A tiny-sized Fashion-FINE with the paper preset's text conventions and an official-layout vocab.txt, exported;
    the session reads the conventions from the manifest."""
    from fine_infer.models import create
    from fine_infer.models.fashion_fine import paper_config

    root = tmp_path_factory.mktemp("ff")
    tokens = _official_like_vocab(root / "vocab.txt")
    paper = paper_config()
    model = create("fashion-fine", "tiny", vocab_file=str(root / "vocab.txt"), vocab_size=len(tokens),
                   max_text_len=paper.max_text_len, max_positions=192, text_clean=paper.text_clean,
                   text_template=paper.text_template)
    return _session(model, root / "bundle", "text"), {t: i for i, t in enumerate(tokens)}


def test_pre_caption_matches_the_reference():
    for text in CORPUS:
        assert pre_caption(text) == _pre_caption_reference(text), text
    assert pre_caption("A red, striped   T-shirt/top!") == "a red striped t shirt top"
    assert pre_caption("one two three four", max_words=2) == "one two"


def test_paper_preset_declares_the_official_convention_and_tiny_does_not():
    from fine_infer.models.fashion_fine import paper_config, tiny_config

    paper = paper_config()
    assert (paper.text_clean, paper.text_template) == ("pre_caption", "the image description is {text}")
    assert (tiny_config().text_clean, tiny_config().text_template) == (None, None)  # the shipped tiny weights' texts


def test_fashion_fine_session_ids_equal_the_official_pipeline(fashion_fine_bundle):
    session, vocab = fashion_fine_bundle
    text = session.manifest.text
    assert (text.clean, text.template) == ("pre_caption", "the image description is {text}")
    ids, mask = session.tokenize(CORPUS, truncate=True)
    want_ids, want_mask = _official_fashion_fine_ids(CORPUS, vocab)
    for i, t in enumerate(CORPUS):
        assert ids[i].tolist() == want_ids[i].tolist() and mask[i].tolist() == want_mask[i].tolist(), t
    signs = {vocab[s] for s in FASHION_SIGN_TOKENS}
    assert signs == set(range(1, 10))  # the official vocab.txt's ids 1-9
    row = ids[CORPUS.index("[DRESSES_SIGN] a blue dress")]
    assert row[5] == vocab["[dresses_sign]"]  # [CLS] the image description is [dresses_sign] …: one id


def test_fashion_fine_ids_equal_transformers_slow_bert_tokenizer(fashion_fine_bundle, tmp_path):
    """The same, with transformers' slow (pure-Python) BertTokenizer as the official code set it up."""
    bert = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy", reason="transformers not installed")
    session, vocab = fashion_fine_bundle
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = bert.BertTokenizerLegacy(str(vocab_file), do_lower_case=True)
    tok.add_tokens(list(FASHION_SIGN_TOKENS), special_tokens=True)
    texts = ["the image description is " + _pre_caption_reference(t) for t in CORPUS]
    want = tok(texts, padding="max_length", truncation=True, max_length=180)["input_ids"]
    ids, _ = session.tokenize(CORPUS, truncate=True)
    for i, t in enumerate(CORPUS):
        assert ids[i].tolist() == want[i], t


# --- MAAF ---------------------------------------------------------------------------------------------------------
def _maaf_reference(text: str) -> list[str]:
    """yahoo/maaf SimpleVocab.tokenize_text: ASCII only, lowercase, string.punctuation deleted, str.split()."""
    text = text.encode("ascii", "ignore").decode("ascii").lower()
    return "".join(c for c in text if c not in string.punctuation).split()


def test_maaf_words_split_as_str_split():
    words = sorted({w for t in CORPUS for w in _maaf_reference(t)})
    tok = word_tokenizer(512, words)
    for text in CORPUS:
        enc = tok.encode(text)
        assert [tok.id_to_token(i) for i, m in zip(enc.ids, enc.attention_mask) if m] == _maaf_reference(text), text
    assert [tok.id_to_token(i) for i in tok.encode("red\x1cdress\x1fblue").ids] == ["red", "dress", "blue"]


# --- CLIP (RAF) -----------------------------------------------------------------------------------------------------
try:  # the CLIP reference's own dependencies (the test extra); fine-infer needs neither
    import ftfy
    import regex
except ImportError:  # pragma: no cover - only without the test extra
    ftfy = regex = None
needs_clip_reference = pytest.mark.skipif(ftfy is None or regex is None,
                                          reason="the CLIP reference needs ftfy and regex: pip install -e '.[test]'")
_CLIP_PAT = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> dict[int, str]:
    """CLIP's reversible map of the 256 bytes to printable characters: printable Latin-1 bytes map to themselves, the
    others to chr(256 + n) in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


_BYTES = _byte_alphabet()


def _clip_pieces(text: str) -> list[str]:
    """CLIP's cleaning (ftfy.fix_text, html.unescape twice, whitespace runs → one space, strip, lowercase) and its
    regex (case-insensitive), each piece in the byte alphabet."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    text = regex.sub(r"\s+", " ", text).strip().lower()
    return [p if p in _CLIP_SPECIAL else "".join(_BYTES[b] for b in p.encode("utf-8"))
            for p in regex.findall(_CLIP_PAT, text, flags=regex.IGNORECASE)]


def _bpe_reference(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    if piece in _CLIP_SPECIAL:
        return [piece]
    symbols = [*piece[:-1], piece[-1] + "</w>"]
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


@pytest.fixture(scope="module")
def clip_merges(tmp_path_factory):
    """Merges in CLIP's file format (a header line, then "a b" per line, gzipped), learned from the corpus and a few
    words, so that contractions, digits and multi-byte characters meet real merges."""
    from fine_infer.tokenization import learn_bpe_merges

    pieces = [p for t in [*CORPUS, *(["it's don't 5cm 42 cotton café fitted floral"] * 3)] for p in _clip_pieces(t)
              if p not in _CLIP_SPECIAL]
    merges = learn_bpe_merges(pieces, 700)
    path = tmp_path_factory.mktemp("clip") / "bpe_test_vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return path, {m: r for r, m in enumerate(merges)}


def _clip_reference(text: str, ranks) -> list[str]:
    return [_CLIP_SPECIAL[0], *(s for p in _clip_pieces(text) for s in _bpe_reference(p, ranks)), _CLIP_SPECIAL[1]]


@needs_clip_reference
def test_clip_tokens_equal_the_reference_on_awkward_captions(clip_merges):
    path, ranks = clip_merges
    tok = bpe_tokenizer(77, path)
    assert len(ranks) > 300 and tok.get_vocab_size() == 3 + 512 + len(ranks)  # CLIP's layout, our ids + 3
    mojibake = "cafÃ© dress â€™s"  # ftfy repairs mojibake; fine-infer leaves it (textclean module docstring)
    for text in CORPUS:
        ours = [tok.id_to_token(i) for i in tok.encode(clip_clean(text)).ids]
        assert ours == _clip_reference(text, ranks), text
    assert [tok.id_to_token(i) for i in tok.encode(clip_clean(mojibake)).ids] != _clip_reference(mojibake, ranks)


@needs_clip_reference
def test_raf_text_preprocess_applies_clip_cleaning(clip_merges):
    """The RAF model's text preprocess names the cleaning; encode (what Session.tokenize, the batcher and the server
    run, from the manifest: see the Fashion-FINE bundle test) applies it."""
    from fine_infer.models import create

    path, ranks = clip_merges
    model = create("raf", "tiny", vocab_file=str(path), vocab_size=3 + 512 + len(ranks), context_length=77)
    spec = model.text_preprocess
    assert spec.clean == "clip" and spec.template is None
    assert TextPreprocess.from_dict(spec.to_dict()) == spec
    tok = model.build_tokenizer()
    vocab = tok.get_vocab()
    texts = [t for t in CORPUS if len(_clip_reference(t, ranks)) <= 77]
    assert len(texts) >= len(CORPUS) - 2
    ids, mask = encode(tok, texts, spec)
    for i, t in enumerate(texts):
        assert ids[i][mask[i] == 1].tolist() == [vocab[s] for s in _clip_reference(t, ranks)], t


@needs_clip_reference
def test_ftfy_fixes_without_ftfy(rng):
    """fix_text_like_ftfy is ftfy.fix_text less the mojibake repair, on random mixes of what ftfy fixes."""
    pool = [*"ab Z9\n\r\t'\"<>&;#", "&amp;", "&lt;", "&#8217;", "&#x2019;", "&EACUTE;", "&eacute;", "&nbsp;", "&#39",
            "&amp;amp;", "\x85", "\x80", "\x81", "\x9d", "ﬁ", "ﬅ", "Ǆ", "ＡＢ", "\u3000", "‘", "”", "ʼ", "\u2028",
            "\x1b[31m", "\x00", "\x1c", "\x7f", "\ufeff", "\u206a", "e\u0301", "é", "😀", "\ud83d\ude00", "\ud800", "ΣΑΣ",
            "日本", "\u200b", "\xa0"]
    for _ in range(3000):
        text = "".join(pool[i] for i in rng.integers(len(pool), size=rng.integers(1, 14)))
        assert fix_text_like_ftfy(text) == ftfy.fix_text(text, fix_encoding=False), repr(text)
    for text in CORPUS:
        assert fix_text_like_ftfy(text) == ftfy.fix_text(text), text


# --- the conventions in a TextPreprocess ----------------------------------------------------------------------------
def test_conventions_are_optional_manifest_fields():
    old = {"tokenizer": "wordpiece", "max_length": 32, "padding": "max_length", "pad_id": 0, "first_word_id": 5,
           "lowercase": True, "extra": {}}
    assert TextPreprocess.from_dict(old).to_dict() == old  # older manifests read, write and hash the same
    spec = TextPreprocess("wordpiece", 32, template="the image description is {text}", clean="pre_caption",
                          clean_args={"max_words": 3})
    assert TextPreprocess.from_dict(spec.to_dict()) == spec
    assert apply_conventions(["A Red, Dress - Long"], spec.clean, spec.clean_args, spec.template) == [
        "the image description is a red dress"]
    for bad in ({"clean": "nfkc"}, {"template": "no slot"}, {"template": "{text} {text}"},
                {"clean": "pre_caption", "clean_args": {"words": 3}}, {"clean_args": {"max_words": 3}}):
        with pytest.raises(ConfigError):
            dataclasses.replace(spec, **{"clean": None, "clean_args": {}, "template": None, **bad})


def test_encode_applies_the_conventions():
    spec = TextPreprocess("word", 16, template="query {text}", clean="pre_caption")
    tok = word_tokenizer(16, ["query", "red", "t", "shirt", "dress"])
    ids, mask = encode(tok, ["Red T-Shirt!", "dress"], spec)
    assert [[tok.id_to_token(i) for i, m in zip(r, k) if m] for r, k in zip(ids, mask)] == [
        ["query", "red", "t", "shirt"], ["query", "dress"]]
