"""Tokenizers for the text front-ends of the model family and of Hugging Face models, and the one function that
encodes strings.

All are ``tokenizers.Tokenizer`` objects, so a bundle ships one ``tokenizer.json`` and the runtime needs neither torch
nor transformers:

- ``wordpiece``: BERT's (Fashion-FINE): lowercase, ``[CLS] … [SEP]``, ``[PAD]`` = 0.
- ``bpe``: CLIP's byte-level BPE (RAF): ``<|startoftext|> … <|endoftext|>``, pad = 0.
- ``word``: MAAF's word vocabulary (its ``SimpleVocab`` cleaning: ASCII only, punctuation deleted, lowercase),
  whitespace split, ``<pad>`` = 0, ``<unk>`` = 1.
- ``hf``: a Hugging Face ``tokenizer.json`` as its model shipped it (:func:`load_hf_tokenizer`), with its own
  padding and truncation removed: the bundle's :class:`~fine_infer.specs.TextPreprocess` says how long and how
  padded (:func:`hf_text_preprocess`).

Without an official vocabulary file, the first three are built from :data:`BUILTIN_WORDS` (the tiny presets and the
demo).
"""

from __future__ import annotations

import gzip
import json
import re
import string
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

from fine_infer.errors import BundleError, ConfigError, InputError, first_line
from fine_infer.specs import TextPreprocess
from fine_infer.textclean import apply_conventions

# The words of the generated catalogue's captions and relative captions (and a few more), so the tiny
# tokenizers cover the demo's queries with whole-word tokens.
BUILTIN_WORDS: tuple[str, ...] = tuple(
    """
    a an the with and or of in on to for it is are make change more less same but not no without instead than
    this that has have its into made replace add remove turn keep different other like
    red orange yellow green blue navy purple pink brown black white grey gray beige cream gold silver khaki
    light dark bright pale deep
    solid plain stripes striped stripe dots dotted dot polka checks checked check checkered plaid floral print
    printed pattern patterned pinstripe
    dress shirt t-shirt tshirt tee skirt trousers pants jeans jacket coat shoe shoes sneaker boot boots bag handbag
    hat scarf sweater hoodie blouse top shorts sock socks belt sandal heels
    short long sleeve sleeves sleeveless collar collared neck v-neck round mini midi maxi slim loose fit fitted
    casual formal party summer winter cotton denim leather wool silk knit
    small large big tiny wide narrow tall
    background centre center left right up down
    """.split()
)

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CLIP_SPECIALS = ("<pad>", "<|startoftext|>", "<|endoftext|>")
_WORD_SPECIALS = ("<pad>", "<unk>")
MAX_TEXT_CHARS = 4096  # the default bound on the work one string can cost before tokenizing...
CHARS_PER_TOKEN_BOUND = 16  # ...raised for long-context models to this many characters per token of their limit


def default_max_chars(max_length: int) -> int:
    """The default character bound for a model taking ``max_length`` tokens: :data:`MAX_TEXT_CHARS`, or more for a
    model whose longest text (about 6 characters a token in English) would pass it, with room for texts to cut."""
    return max(MAX_TEXT_CHARS, CHARS_PER_TOKEN_BOUND * max_length)


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing to read: only whitespace, control characters (NUL, ...) and invisible format
    characters (zero-width spaces and joiners, the BOM, soft hyphens): Unicode categories Z* and C* throughout."""
    if text.isprintable():  # no C* or Z* character but the ASCII space (the common case, at C speed)
        return not text.strip()
    return all(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in text)


def blank_text_message(i: int) -> str:
    """The one-line refusal of a blank text (see :func:`is_blank`), the same wherever a text is checked."""
    return f"text {i} is empty (only spaces, control or zero-width characters): give at least one word"


def _chars() -> list[str]:
    return list("abcdefghijklmnopqrstuvwxyz0123456789-'.,!?&/")


# Fashion-FINE's (FashionSAP's) category signs: its retrieval.py registers them with
# tokenizer.add_tokens(..., special_tokens=True), so with its vocab.txt (ids 1-9) each is one token, never split.
FASHION_SIGN_TOKENS = ("[tops_sign]", "[pants_sign]", "[skirts_sign]", "[dresses_sign]", "[coats_sign]",
                       "[shoes_sign]", "[bags_sign]", "[accessories_sign]", "[others_sign]")


def wordpiece_tokenizer(max_length: int, vocab_file: str | Path | None = None, padding: str = "max_length"):
    """A BERT WordPiece tokenizer from ``vocab_file`` (one token per line, BERT's ``vocab.txt``) or built-in words.
    The :data:`FASHION_SIGN_TOKENS` the vocabulary holds are one token each."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

    if vocab_file is not None:
        tokens = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    else:
        words = sorted(set(BUILTIN_WORDS))
        tokens = [*_BERT_SPECIALS, *_chars(), *("##" + c for c in _chars()), *words]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    for special in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
        if special not in vocab:
            raise ConfigError(f"WordPiece vocabulary {vocab_file} has no {special} token")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    signs = [t for t in FASHION_SIGN_TOKENS if t in vocab]
    if signs:  # matched on the lowercased text, as the slow BertTokenizer lowercases before it splits them off
        tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in signs])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return _with_limits(tok, max_length, vocab["[PAD]"], "[PAD]", padding)


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table (as in its simple_tokenizer).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_bpe_merges(pieces: Sequence[str], max_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from ``pieces`` (pre-tokenized words, one count each), deterministically.

    Each piece starts as its characters with ``</w>`` on the last; the most frequent adjacent pair is merged, ties
    broken by the pair itself (lexicographic order), until ``max_merges`` merges or no pair is left. (The
    ``tokenizers`` BPE trainer breaks ties in hash order, so its vocabulary, and every token id, changes from one
    process to the next: a model trained on one build would be evaluated and served with another.)"""
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): 0 for w in pieces if w}
    for w in pieces:
        if w:
            words[tuple(w[:-1]) + (w[-1] + "</w>",)] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        counts: dict[tuple[str, str], int] = {}
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for symbols, n in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    return merges


def bpe_tokenizer(max_length: int, merges_file: str | Path | None = None, padding: str = "longest"):
    """A CLIP-style BPE tokenizer from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` merges, or from merges learned
    (deterministically, :func:`learn_bpe_merges`) on :data:`BUILTIN_WORDS`.

    Ids follow this module's convention (pad 0, start 1, end 2, then CLIP's vocabulary order: base bytes, base
    bytes with ``</w>``, one token per merge), so a real CLIP checkpoint's token embedding needs the matching row
    permutation; the arch's checkpoint filter owns that.

    Pre-tokenized as CLIP's ``SimpleTokenizer``: its regex (``'s``/``'t``/… contractions, runs of letters, single
    digits, runs of other non-space characters; case-insensitive), each piece as UTF-8 bytes with ``</w>`` on its
    end, and ``<|startoftext|>``/``<|endoftext|>`` in the text as those tokens. CLIP's cleaning (ftfy, HTML entities,
    whitespace, lowercase) is not expressible in ``tokenizers``: it is :func:`fine_infer.textclean.clip_clean`, which
    the text preprocess names (``clean="clip"``) and :func:`encode` applies.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("(?i)" + _CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if merges_file is not None:
        opener = gzip.open if str(merges_file).endswith(".gz") else open
        with opener(merges_file, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in lines if m.strip()]
    else:
        text = normalizer.normalize_str(" ".join(BUILTIN_WORDS))
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
        merges = learn_bpe_merges(pieces, _BUILTIN_BPE_SIZE - len(_CLIP_SPECIALS) - 2 * 256)
    base = list(_bytes_to_unicode().values())
    tokens = [*_CLIP_SPECIALS, *base, *(c + "</w>" for c in base), *("".join(m) for m in merges)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in _CLIP_SPECIALS[1:]])
    start, end = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", start), ("<|endoftext|>", end)]
    )
    return _with_limits(tok, max_length, tok.token_to_id("<pad>"), "<pad>", padding)


_BUILTIN_BPE_SIZE = 1024  # ids of the built-in BPE vocabulary at most (the tiny RAF's vocab_size)
# CLIP's pre-tokenizing regex (clip/simple_tokenizer.py; the \p classes are Unicode letters and numbers)
_CLIP_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def normalise_word_text(text: str) -> str:
    """MAAF's ``SimpleVocab`` text cleaning: non-ASCII dropped, every ``string.punctuation`` character deleted
    (so "t-shirt" → "tshirt"), lowercased. The tokenizer below applies the same rules inside ``tokenizers``."""
    return text.encode("ascii", "ignore").decode().translate(str.maketrans("", "", string.punctuation)).lower()


def word_tokenizer(max_length: int, words: Sequence[str] | None = None, padding: str = "longest"):
    """MAAF's word-level tokenizer: cleaned as :func:`normalise_word_text`, split on whitespace as ``str.split()``
    (``\x1c``-``\x1f`` included), unknown → ``<unk>``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    # Special markers such as MAAF's "<UNK>" (line 0 of its vocabulary) are not words: cleaning would make "unk".
    specials = {t.lower() for t in _WORD_SPECIALS}
    cleaned = (normalise_word_text(w) for w in (words or BUILTIN_WORDS) if w.lower() not in specials)
    words = sorted(set(w for w in cleaned if w) - set(_WORD_SPECIALS))
    vocab = {t: i for i, t in enumerate([*_WORD_SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(r"[^\x00-\x7f]"), ""),
            normalizers.Replace(Regex("[" + re.escape(string.punctuation) + "]"), ""),
            normalizers.Lowercase(),
            # str.split() also splits on \x1c-\x1f (WhitespaceSplit does not); the rest of its whitespace that
            # WhitespaceSplit lacks is not ASCII, so already gone
            normalizers.Replace(Regex("[\x1c-\x1f]"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _with_limits(tok, max_length, 0, "<pad>", padding)


def _with_limits(tok, max_length: int, pad_id: int, pad_token: str, padding: str):
    if padding not in ("max_length", "longest"):
        raise ConfigError(f"padding must be 'max_length' or 'longest', not {padding!r}")
    tok.no_truncation()
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length if padding == "max_length" else None)
    return tok


def build_tokenizer(spec: TextPreprocess, vocab_file: str | Path | None = None):
    """The tokenizer a :class:`TextPreprocess` describes (built-in vocabulary unless ``vocab_file`` is given)."""
    if spec.tokenizer == "wordpiece":
        return wordpiece_tokenizer(spec.max_length, vocab_file, spec.padding)
    if spec.tokenizer == "bpe":
        return bpe_tokenizer(spec.max_length, vocab_file, spec.padding)
    if spec.tokenizer == "word":
        words = Path(vocab_file).read_text(encoding="utf-8").split() if vocab_file else None
        return word_tokenizer(spec.max_length, words, spec.padding)
    if spec.tokenizer == "hf":
        raise ConfigError("an 'hf' tokenizer is not built: it ships in the bundle as tokenizer.json (load_tokenizer)")
    raise ConfigError(f"unknown tokenizer kind {spec.tokenizer!r}; expected wordpiece, bpe, word or hf")


def _special_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json spell it (a string or an AddedToken dict)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_hf_tokenizer(source):
    """A Hugging Face ``tokenizer.json`` (the file, a folder holding it, or a ``tokenizers.Tokenizer``) with its own
    padding and truncation removed, and what the source said about them: ``(tokenizer, info)``; ``info`` holds
    ``truncation`` (the tokenizer.json's max length or None), ``model_max_length`` (tokenizer_config.json's, or
    None), ``pad_token`` and ``pad_id`` (tokenizer_config.json / special_tokens_map.json beside the file first, then
    tokenizer.json's padding; None when the source names none), ``padding_side`` and ``special_ids`` (the ids of its
    special tokens)."""
    from tokenizers import Tokenizer

    config: dict = {}
    if hasattr(source, "to_str"):  # a tokenizers.Tokenizer
        raw = json.loads(source.to_str())
    else:
        path = Path(source)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"{path} is neither a tokenizer.json nor a folder holding one (a Hugging Face fast "
                              "tokenizer file is needed; a folder with only a slow tokenizer's vocabulary can be "
                              "converted with transformers' AutoTokenizer.from_pretrained(folder).save_pretrained("
                              "folder))")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{file} is not a readable tokenizer.json ({type(exc).__name__}: {exc})") from None
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # beside tokenizer.json; the latter wins
            f = file.parent / name
            try:
                config.update(json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {})
            except ValueError:
                raise ConfigError(f"{f} is not valid JSON") from None
    try:
        tok = Tokenizer.from_str(json.dumps(raw))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
        line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{source} is not a readable tokenizer.json: {line}") from None
    padding = raw.get("padding") or {}
    truncation = raw.get("truncation") or {}
    pad_token = _special_content(config.get("pad_token")) or padding.get("pad_token")
    pad_id = tok.token_to_id(pad_token) if pad_token else None
    if pad_id is None and padding:
        pad_id = padding.get("pad_id")
    mml = config.get("model_max_length")
    info = {
        "truncation": truncation.get("max_length"),
        "model_max_length": int(mml) if isinstance(mml, (int, float)) and mml < 1e6 else None,
        "pad_token": pad_token,
        "pad_id": pad_id,
        "padding_side": config.get("padding_side") or padding.get("direction", "right").lower(),
        "special_ids": sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special),
    }
    tok.no_padding()
    tok.no_truncation()
    return tok, info


def hf_text_preprocess(tokenizer, info: dict, max_length: int, padding: str = "longest") -> TextPreprocess:
    """The :class:`TextPreprocess` of a :func:`load_hf_tokenizer` tokenizer at ``max_length`` tokens (special tokens
    included): ``pad_id`` is the source's pad token (0 when it names none: the mask hides it), ``first_word_id``
    the first id above the special tokens at the start of the vocabulary, ``lowercase`` whether its normaliser
    lowercases."""
    if padding not in ("max_length", "longest"):
        raise ConfigError(f"padding must be 'max_length' or 'longest', not {padding!r}")
    if info.get("padding_side", "right") != "right":
        raise ConfigError(f"the tokenizer pads on the {info['padding_side']}; fine-infer pads on the right only")
    if not 0 < int(max_length) <= 1 << 16:
        raise ConfigError(f"text max length must be between 1 and 65536 tokens, not {max_length}")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    low = [i for i in info.get("special_ids", []) if i < size // 2]
    normalizer = json.loads(tokenizer.to_str()).get("normalizer") or {}
    text = json.dumps(normalizer)
    lowercase = '"Lowercase"' in text or (normalizer.get("type") == "BertNormalizer" and normalizer.get("lowercase"))
    pad_id = info.get("pad_id")
    return TextPreprocess(tokenizer="hf", max_length=int(max_length), padding=padding,
                          pad_id=int(pad_id) if pad_id is not None else 0,
                          first_word_id=max(low) + 1 if low else 0, lowercase=bool(lowercase))


MAX_TOKENIZER_BYTES = 256 << 20  # the largest real tokenizer.json files are tens of MB


def load_tokenizer(path: str | Path):
    """Read a ``tokenizer.json`` (written by :func:`save_tokenizer`, or a bundle's: a file from elsewhere, so any
    failure of the tokenizers library is a :class:`BundleError` naming the file)."""
    from tokenizers import Tokenizer

    path = Path(path)
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise BundleError(f"{path} is {size} bytes, more than a tokenizer can be ({MAX_TOKENIZER_BYTES}); refusing it")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises a bare Exception on a malformed file
        raise BundleError(f"{path} is not a readable tokenizer.json ({first_line(exc, 200)})") from None


def encode(tokenizer, texts: Sequence[str], spec: TextPreprocess, truncate: bool = False,
           max_chars: int | None = None, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode strings to ``(input_ids, attention_mask)``, both int64 of shape (batch, sequence).

    Each text is first cleaned and templated as ``spec`` says (``clean``, ``clean_args``, ``template``:
    :mod:`fine_infer.textclean`), as the official pipeline did to raw text. Empty texts are refused. A text longer
    than ``spec.max_length`` tokens is refused unless ``truncate`` is set
    (then it is cut, keeping the end token; for ``hf`` tokenizers the text's tokens are cut and every special token
    the template adds before and after them is kept, as the tokenizers library truncates), so a query is never
    silently shortened. A text over ``max_chars`` characters (default :func:`default_max_chars` of the model's
    limit) is refused before any tokenizing work. ``max_tokens``
    (at most ``spec.max_length``) lowers the limit that refuses or cuts; the padding stays the model's.
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise InputError("no texts given: pass at least one string")
    if max_chars is None:
        max_chars = default_max_chars(spec.max_length)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(f"text {i} is a {type(t).__name__}, not a string")
        if is_blank(t):
            raise InputError(blank_text_message(i))
        if len(t) > max_chars:
            raise InputError(f"text {i} has {len(t)} characters; the limit is {max_chars}")
    encodings = tokenizer.encode_batch(apply_conventions(texts, spec.clean, spec.clean_args, spec.template))
    L = spec.max_length if max_tokens is None else min(max_tokens, spec.max_length)
    rows = []
    for i, enc in enumerate(encodings):
        ids = [x for x, m in zip(enc.ids, enc.attention_mask) if m]
        special = [s for s, m in zip(enc.special_tokens_mask, enc.attention_mask) if m]
        if not ids or (spec.tokenizer == "hf" and all(special)):
            raise InputError(f"text {i} has no tokens once cleaned (only punctuation or symbols?): give a word")
        if len(ids) > L:
            if not truncate:
                raise InputError(
                    f"text {i} has {len(ids)} tokens; this model takes at most {L} (shorten it or pass truncate=True)"
                )
            ids = _truncate_hf(ids, special, L) if spec.tokenizer == "hf" else ids[: L - 1] + ids[-1:]
        rows.append(ids)
    width = spec.max_length if spec.padding == "max_length" else max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), spec.pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return input_ids, mask


def _truncate_hf(ids: list[int], special: list[int], length: int) -> list[int]:
    """Keep the template's leading and trailing special tokens and the first text tokens that fit in ``length``."""
    lead = next((i for i, s in enumerate(special) if not s), len(ids))
    trail = next((i for i, s in enumerate(reversed(special)) if not s), 0)
    keep = max(0, length - lead - trail)
    return ids[:lead] + ids[lead : lead + keep] + ids[len(ids) - trail :]


def vocab_size(tokenizer) -> int:
    """Number of ids the tokenizer can emit (including special tokens)."""
    return tokenizer.get_vocab_size(with_added_tokens=True)
