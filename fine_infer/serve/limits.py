"""Request limits of the HTTP server, and the error each one answers with.

Every limit has a name (``max_body_bytes``, ``max_image_pixels``, ...) that appears in the JSON error, so a client
can tell which one it hit. The checks are cheap and run before any decoding or model work: the body size from its
``Content-Length`` (and counted while it streams), an image's pixels from its header, a text's tokens from its byte
length (a token covers at least one UTF-8 byte, so only texts near the limit are tokenized to count).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from fine_infer.errors import FineInferError


class ServeError(FineInferError):
    """An error answered as JSON ``{"error": {"type", "message", ...}}`` with an HTTP status."""

    status: int = 400
    type: str = "invalid_input"

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.extra = {k: v for k, v in extra.items() if v is not None}

    def body(self) -> dict[str, Any]:
        """The JSON error document."""
        return {"error": {"type": self.type, "message": str(self), **self.extra}}


class LimitExceeded(ServeError):
    """A request past one of the :class:`Limits`; the error names the limit and its value."""

    type = "limit_exceeded"

    def __init__(self, limit: str, value: int, message: str, status: int = 400) -> None:
        super().__init__(f"{message} (limit {limit} = {value})", status=status, limit=limit, limit_value=value)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Defaults suit an edge box; raise them with the ``serve`` options."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_text_tokens: int | None = None  # None: the model's own maximum (the manifest's max_length)
    max_text_chars: int = 2048
    max_batch_items: int = 32  # images or texts in one embed/classify request
    max_k: int = 1000

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (reported by ``GET /v1/info``)."""
        return asdict(self)

    def check_body_length(self, length: int) -> None:
        """Refuse a body longer than ``max_body_bytes`` (HTTP 413)."""
        if length > self.max_body_bytes:
            raise LimitExceeded("max_body_bytes", self.max_body_bytes, f"request body of {length} bytes is too large", 413)

    def check_items(self, n: int, what: str) -> None:
        """Refuse an empty list or more than ``max_batch_items`` items."""
        if n > self.max_batch_items:
            raise LimitExceeded("max_batch_items", self.max_batch_items, f"{n} {what} in one request are too many")

    def check_k(self, k: int) -> None:
        """``k`` must lie in 1..``max_k``."""
        if k < 1 or k > self.max_k:
            raise LimitExceeded("max_k", self.max_k, f"k = {k} is out of range; k must be between 1 and {self.max_k}")

    def check_image_header(self, data: bytes, index: int) -> None:
        """Read only the image header and refuse more than ``max_image_pixels`` pixels (HTTP 413).

        Undecodable data passes here; decoding it later fails with a clear ``invalid_input`` error.
        """
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header, decodes nothing
                    w, h = img.size
        except Exception:  # noqa: BLE001 - not an image: the decoder names the problem later
            return
        if w * h > self.max_image_pixels:
            raise LimitExceeded("max_image_pixels", self.max_image_pixels,
                                f"image {index} is {w}×{h} = {w * h} pixels", 413)

    def text_token_limit(self, model_max: int | None) -> int | None:
        """The token limit in force: the smaller of ``max_text_tokens`` and the model's maximum."""
        if self.max_text_tokens is None:
            return model_max
        return self.max_text_tokens if model_max is None else min(self.max_text_tokens, model_max)

    def check_texts(self, texts: list[str], tokenizer: Any, model_max: int | None) -> None:
        """Refuse empty texts, texts over ``max_text_chars`` and texts over the token limit."""
        limit = self.text_token_limit(model_max)
        for i, t in enumerate(texts):
            if not t.strip():
                raise ServeError(f"text {i} is empty: give at least one word", field=f"texts[{i}]")
            if len(t) > self.max_text_chars:
                raise LimitExceeded("max_text_chars", self.max_text_chars, f"text {i} has {len(t)} characters")
            # Every token covers at least one UTF-8 byte, and a tokenizer adds at most 2 special tokens:
            # only a text whose bytes could exceed the limit is tokenized here to count.
            if limit is not None and tokenizer is not None and len(t.encode("utf-8")) + 2 > limit:
                n = sum(tokenizer.encode(t).attention_mask)  # padding excluded
                if n > limit:
                    raise LimitExceeded("max_text_tokens", limit, f"text {i} has {n} tokens")
