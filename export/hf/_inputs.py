"""Seeded real inputs for the gates of encoders with a tokenizer or image preprocessing: sentences of varied length
(short, long, over the limit; unicode and punctuation), images of varied size, aspect and mode, and the samplers that
turn them into graph feeds through the bundle's own tokenizer and preprocessing (:mod:`fine_infer.tokenization`,
:mod:`fine_infer.preprocess`: the functions the runtime calls)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from fine_infer.preprocess import preprocess_images
from fine_infer.specs import ImagePreprocess, TextPreprocess
from fine_infer.tokenization import BUILTIN_WORDS, encode

if TYPE_CHECKING:
    import torch

_WORDS = (*BUILTIN_WORDS, *"""
    i you we they he she people time year day week way thing world life hand part child eye place work case point
    company number group problem fact good new first last great little own old right big high small next early young
    important few public bad able say get go know take see come think look want give use find tell ask seem feel try
    leave call about over after before under between through during because while although however therefore
    price delivery order size colour color season collection style brand model fabric material quality review
    customer return shipping available discount sale limited edition weekend evening office travel outdoor
    """.split())
_UNICODE = ("café", "naïve", "Zürich", "São", "Paulo", "résumé", "façade", "jalapeño", "Ελληνικά", "русский", "日本語",
            "中文", "한국어", "🙂", "👗", "—", "…", "“quoted”", "«guillemets»", "€49.99", "½", "℃", "Ⅻ", "ß", "İstanbul")
_PUNCT = (",", ";", ":", " -", " (see above)", " & co", "!", "?", "'s", "/", "...")
_ENDS = (".", "!", "?", ".", ".")


def sentence(rng: np.random.Generator, words: int) -> str:
    """A text of about ``words`` words: sentences of dictionary words with punctuation, numbers and (one word in
    ten) non-ASCII words and symbols."""
    out: list[str] = []
    start = True
    for _ in range(max(1, words)):
        r = rng.random()
        if r < 0.1:
            w = str(rng.choice(_UNICODE))
        elif r < 0.14:
            w = str(rng.integers(0, 1000)) + str(rng.choice(("", "cm", "%", "kg", ".5")))
        else:
            w = str(rng.choice(_WORDS))
        if start:
            w = w[:1].upper() + w[1:]
            start = False
        if rng.random() < 0.08:
            w += str(rng.choice(_PUNCT))
        if rng.random() < 0.07:
            w += str(rng.choice(_ENDS))
            start = True
        out.append(w)
    text = " ".join(out)
    return text if text[-1] in ".!?" else text + str(rng.choice(_ENDS))


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` with the template's special tokens, without padding."""
    return len(tokenizer.encode(text).ids)


def text_of_tokens(rng: np.random.Generator, tokenizer, lo: int, hi: int) -> str:
    """A text of between ``lo`` and ``hi`` tokens (special tokens included): words are added until it reaches ``lo``
    and dropped from the end while it passes ``hi``."""
    words = max(1, lo)
    text = sentence(rng, words)
    while token_count(tokenizer, text) < lo:
        words = int(words * 1.3) + 1
        text = sentence(rng, words)
    parts = text.split(" ")
    while len(parts) > 1 and token_count(tokenizer, " ".join(parts)) > hi:
        parts = parts[: max(1, int(len(parts) * 0.9))] if len(parts) > 20 else parts[:-1]
    return " ".join(parts)


def sample_texts(rng: np.random.Generator, n: int, tokenizer, max_length: int, over: int = 0) -> list[str]:
    """``n`` texts within ``max_length`` tokens, in shares: short (up to 6 tokens), medium, and long (from the middle
    of the limit to the limit itself; past 128 tokens when the limit allows), then ``over`` texts past the limit
    (to be truncated)."""
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            lo, hi = 3, min(6, max_length)
        elif kind == 1:
            lo, hi = min(7, max_length), max(7, min(max_length, max_length // 2))
        else:
            lo, hi = max(min(129, max_length - 8), max_length // 2), max_length
        lo = min(lo, hi)
        out.append(text_of_tokens(rng, tokenizer, int(rng.integers(lo, hi + 1)), hi))
    for _ in range(over):  # at most twice the limit: long enough to be cut, within the runtime's character bound
        out.append(text_of_tokens(rng, tokenizer, max_length + 1 + int(rng.integers(0, max_length // 2 + 1)),
                                  2 * max_length + 8))
    return out


def sample_images(rng: np.random.Generator, n: int, side: int) -> list:
    """``n`` random images around ``side`` pixels (half to three times it, each dimension drawn apart, so aspect
    varies): uint8 RGB arrays, with a grey PIL image and a half-transparent RGBA PIL image among them."""
    out: list = []
    for i in range(n):
        h, w = (int(rng.integers(max(1, side // 2), 3 * side + 1)) for _ in range(2))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 4 == 1:
            out.append(Image.fromarray(np.ascontiguousarray(arr[..., 0])))
        elif i % 4 == 2:
            alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
            out.append(Image.fromarray(np.concatenate([arr, alpha], axis=2)))
        else:
            out.append(arr)
    return out


def _rng(gen: "torch.Generator") -> np.random.Generator:
    import torch

    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))


def text_feeds(tokenizer, spec: TextPreprocess, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` of ``texts`` as the runtime makes them (truncated at the limit)."""
    ids, mask = encode(tokenizer, list(texts), spec, truncate=True)
    return {"input_ids": ids, "attention_mask": mask}


def text_sampler(tokenizer, spec: TextPreprocess):
    """A :data:`~fine_infer.export.gates.InputSampler` of token ids from real texts: the first row reaches the
    sequence length asked for (the spec's ``max_length`` when it pads to it), the others are shorter."""

    def sample(batch: int, seq_len: int | None, gen: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import torch

        rng = _rng(gen)
        L = spec.max_length if spec.padding == "max_length" or seq_len is None else min(seq_len, spec.max_length)
        texts = [text_of_tokens(rng, tokenizer, L + 1, 2 * L + 8)]
        texts += [text_of_tokens(rng, tokenizer, lo, max(lo, L))
                  for lo in (int(rng.integers(1, max(2, L))) for _ in range(batch - 1))]
        feeds = text_feeds(tokenizer, replace(spec, max_length=L) if spec.padding != "max_length" else spec, texts)
        return {k: torch.from_numpy(v) for k, v in feeds.items()}

    return sample


def image_sampler(spec: ImagePreprocess):
    """A :data:`~fine_infer.export.gates.InputSampler` of ``pixels`` from random images of varied size and mode."""

    def sample(batch: int, seq_len: int | None, gen: "torch.Generator") -> dict[str, "torch.Tensor"]:
        import torch

        return {"pixels": torch.from_numpy(preprocess_images(sample_images(_rng(gen), batch, spec.size), spec))}

    return sample
