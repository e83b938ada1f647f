"""Request and response bodies of the HTTP API (pydantic). Requests are strict: unknown fields and wrong types
are refused with a 422 that names the field, never silently dropped or coerced."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(extra="forbid", strict=True)

IMAGE_DOC = "base64 of an image file (PNG, JPEG, WebP, ...); a `data:image/...;base64,` prefix is accepted"


class EmbedRequest(BaseModel):
    """Embed texts, images, or image+text pairs (a composed query per pair, for composed-retrieval archs)."""

    model_config = _STRICT
    texts: Optional[list[str]] = Field(None, description="strings to embed")
    images: Optional[list[str]] = Field(None, description=IMAGE_DOC)
    truncate: bool = Field(False, description="cut texts longer than the model's maximum instead of refusing them")


class SearchRequest(BaseModel):
    """Top-k search of the server's index by text, image, or both (composed retrieval)."""

    model_config = _STRICT
    text: Optional[str] = Field(None, description="query text (or the modification text, with `image`)")
    image: Optional[str] = Field(None, description=IMAGE_DOC)
    k: int = Field(10, description="number of hits (1..max_k)")
    truncate: bool = False


class ClassifyRequest(BaseModel):
    """Predict every attribute head of a classifier bundle for each image."""

    model_config = _STRICT
    images: list[str] = Field(..., description=IMAGE_DOC)


class EmbedResponse(BaseModel):
    """L2-normalised float32 embeddings, one row per input (or per image+text pair)."""

    embeddings: list[list[float]]
    dim: int
    count: int
    graph: str


class SearchHit(BaseModel):
    """One hit: the stored id, its inner-product score and the metadata stored with it."""

    id: int
    score: float
    metadata: Optional[dict[str, Any]] = None


class SearchResponse(BaseModel):
    """Hits, best first (fewer than k when the index holds fewer items)."""

    hits: list[SearchHit]
    k: int
    graph: str


class Prediction(BaseModel):
    """The predicted label of one attribute head, its probability and every label's probability."""

    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    """Per image, per attribute head: a prediction."""

    predictions: list[dict[str, Prediction]]
    graph: str


class ErrorDetail(BaseModel):
    """What went wrong; ``limit``/``field`` name the limit or the request field at fault where there is one
    (``limit_value``: a count, or seconds for the ``*_timeout_s`` limits)."""

    type: str
    message: str
    limit: Optional[str] = None
    limit_value: Optional[float] = None
    field: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: bad input (400, 413, 415, 422), a slow client (408, 431), too much at once (429 and 503,
    with ``Retry-After``), a request past its time (504)."""

    error: ErrorDetail


REQUEST_MODELS = (EmbedRequest, SearchRequest, ClassifyRequest)
