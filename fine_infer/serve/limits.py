"""What one request, and the server as a whole, may ask for; and the error each limit answers with.

Every limit has a name (``max_body_bytes``, ``max_image_pixels``, ...) that appears in the JSON error, so a client
can tell which one it hit, and each is a ``fine-infer serve`` option reported by ``GET /v1/info``. The request checks
are cheap and run before any decoding or model work: the body size from its ``Content-Length`` (and counted while it
streams), an image's pixels from its header and the request's pixels as their sum, a text's tokens from its byte
length (a token covers at least one UTF-8 byte, so only texts near the limit are tokenized to count). The server
limits bound time and numbers: how long a request may take and its headers and body may take to arrive, how long an
idle connection stays open, how many connections are open and how many requests are admitted at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fine_infer.errors import ConfigError, FineInferError
from fine_infer.preprocess import image_size
from fine_infer.tokenization import blank_text_message, is_blank

RETRY_AFTER_S = 1  # what a 429 (queue full) or 503 (too many connections) tells the client to wait


class ServeError(FineInferError):
    """An error answered as JSON ``{"error": {"type", "message", ...}}`` with an HTTP status."""

    status: int = 400
    type: str = "invalid_input"

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}  # e.g. Retry-After, Connection: close
        self.extra = {k: v for k, v in extra.items() if v is not None}

    def body(self) -> dict[str, Any]:
        """The JSON error document."""
        return {"error": {"type": self.type, "message": str(self), **self.extra}}


class LimitExceeded(ServeError):
    """A request past one of the :class:`Limits`; the error names the limit and its value."""

    type = "limit_exceeded"

    def __init__(self, limit: str, value: int | float, message: str, status: int = 400,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{message} (limit {limit} = {value})", status=status, limit=limit, limit_value=value,
                         headers=headers)


@dataclass(frozen=True)
class Limits:
    """What one request, and the server as a whole, may ask for. Defaults suit an edge box; change them with the
    ``serve`` options (each field is the option of that name). Every value must be positive."""

    # --- one request
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 25_000_000  # one image, from its header
    max_request_pixels: int = 64_000_000  # all images of one request (about 3 s of decoding on one core)
    max_text_tokens: int | None = None  # None: the model's own maximum (the manifest's max_length)
    max_text_chars: int = 2048  # the session's tokenize() is set to the same bound
    max_batch_items: int = 32  # images or texts in one embed/classify request
    max_k: int = 1000
    # --- time and numbers
    request_timeout_s: float = 30.0  # from the first byte of the headers to the answer: then 504
    read_timeout_s: float = 15.0  # for a request's headers to arrive, and again for its body: then 408
    idle_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # open connections; more are answered 503 and closed at once
    max_queue: int = 256  # /v1 requests in progress with their body in (decoded, queued or run); more: 429
    max_header_bytes: int = 64 * 1024  # a request's headers (the parser sets no bound of its own): more: 431
    # request bodies held in memory at once, over every request (received, or being received): more: 503. Without
    # it, max_connections bodies of max_body_bytes each (16 GB by default) could be held together
    max_body_bytes_held: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "max_text_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"limit {f.name} must be a positive number, not {v!r}")

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

    def check_image_header(self, data: bytes, index: int) -> int:
        """Read only the image header and refuse more than ``max_image_pixels`` pixels (HTTP 413); returns its pixels.

        Undecodable data passes here (0 pixels); decoding it later fails with a clear ``invalid_input`` error.
        """
        size = image_size(data, self.max_image_pixels)
        if size is None:
            return 0
        w, h = size
        if w * h > self.max_image_pixels:
            raise LimitExceeded("max_image_pixels", self.max_image_pixels,
                                f"image {index} is {w}×{h} = {w * h} pixels", 413)
        return w * h

    def check_request_pixels(self, pixels: int, images: int) -> None:
        """Refuse a request whose images hold more than ``max_request_pixels`` pixels together (HTTP 413)."""
        if pixels > self.max_request_pixels:
            raise LimitExceeded("max_request_pixels", self.max_request_pixels,
                                f"the request's {images} images hold {pixels} pixels", 413)

    def text_token_limit(self, model_max: int | None) -> int | None:
        """The token limit in force: the smaller of ``max_text_tokens`` and the model's maximum."""
        if self.max_text_tokens is None:
            return model_max
        return self.max_text_tokens if model_max is None else min(self.max_text_tokens, model_max)

    def check_chars(self, texts: list[str], field: str = "texts") -> None:
        """Refuse blank texts (:func:`~fine_infer.tokenization.is_blank`) and texts over ``max_text_chars``. ``field``:
        the request's field holding them (``texts``, a list; or ``text``, one string), named in the error."""
        for i, t in enumerate(texts):
            if is_blank(t):
                raise ServeError(blank_text_message(i), field=f"texts[{i}]" if field == "texts" else field)
            if len(t) > self.max_text_chars:
                raise LimitExceeded("max_text_chars", self.max_text_chars, f"text {i} has {len(t)} characters")

    def check_texts(self, texts: list[str], tokenizer: Any, model_max: int | None, field: str = "texts") -> None:
        """Refuse blank texts, texts over ``max_text_chars`` and texts over the token limit."""
        self.check_chars(texts, field)
        limit = self.text_token_limit(model_max)
        for i, t in enumerate(texts):
            # Every token covers at least one UTF-8 byte, and a tokenizer adds at most 2 special tokens:
            # only a text whose bytes could exceed the limit is tokenized here to count.
            if limit is not None and tokenizer is not None and len(t.encode("utf-8")) + 2 > limit:
                n = sum(tokenizer.encode(t).attention_mask)  # padding excluded
                if n > limit:
                    raise LimitExceeded("max_text_tokens", limit, f"text {i} has {n} tokens; shorten it or send "
                                        '"truncate": true to cut it')
