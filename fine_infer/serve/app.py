"""The HTTP API (FastAPI): embed, search, classify, health, readiness, metrics, an OpenAPI schema.

    app = create_app(fine_infer.load("bundle/"), index=Index.load("gallery.idx"))

Requests from every client of a graph meet in one :class:`~fine_infer.batching.DynamicBatcher`, so
concurrent requests share model runs. The handlers stay thin: bodies are parsed by pydantic-core straight from
bytes, texts are tokenized on the event loop (microseconds), images are decoded in worker threads (at most one per
core at a time), and responses are serialised with :mod:`json` directly, skipping FastAPI's response validation.

Readiness: the app answers ``/healthz`` at once, and ``/readyz`` (and the ``/v1`` routes) only once every graph has
been warmed up and its batch size calibrated in a background thread. Shutdown: the server stops accepting, finishes
in-flight requests, then the batcher drains its queue. What the app serves is a
:class:`~fine_infer.serve.state.ServeState`; the API key, body limit and metrics sit in front of the routes
(:mod:`fine_infer.serve.guard`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import threading
from pathlib import PurePath
from typing import Any, Sequence

import anyio
import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from fine_infer.batching import BatchSettings
from fine_infer.errors import BundleError, ConfigError, FineInferError, InputError
from fine_infer.preprocess import preprocess_images
from fine_infer.runtime import classify_outputs
from fine_infer.serve import schemas
from fine_infer.serve.guard import Guard, error_body, error_headers
from fine_infer.serve.limits import Limits, ServeError
from fine_infer.serve.metrics import CONTENT_TYPE
from fine_infer.serve.search import public_metadata
from fine_infer.serve.state import ServeState

# From this size a scan holds the event loop longer than handing it to the search worker costs: such galleries are
# searched off the event loop, batched across concurrent requests (one scan serves the batch); smaller ones inline.
INDEX_THREAD_MIN = 10_000
PARSE_INLINE_BYTES = 64 << 10  # JSON bodies from this size are parsed in a worker thread


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json")


def _error_response(err: ServeError) -> Response:
    body = error_body(err)
    return Response(body, status_code=err.status, headers={k.decode(): v.decode() for k, v in
                                                           error_headers(err, len(body))})


_HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}
JSON_TYPES = ("application/json",)  # what a JSON route takes (a browser's "simple" requests cannot send it)


# --- request parsing -------------------------------------------------------------------------------------------------
def _validation_error(exc: ValidationError, model: type[BaseModel]) -> ServeError:
    e = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in e.get("loc", ()))
    allowed = ", ".join(model.model_fields)
    if e["type"] == "json_invalid":
        return ServeError(f"the body is not valid JSON ({e.get('msg')})", status=400, type="invalid_json")
    if e["type"] == "extra_forbidden":
        return ServeError(f"unknown field {loc!r}; this request takes: {allowed}", status=422, type="unknown_field",
                          field=loc)
    if not loc:
        return ServeError(f"the body must be a JSON object with fields: {allowed}", status=422, type="invalid_body")
    return ServeError(f"field {loc!r}: {e['msg']}", status=422, type="invalid_field", field=loc)


def model_name(m: Any) -> str:
    """The bundle's model as clients may see it: the zoo arch, or the source's kind and folder name (a source such as
    ``hf:/home/me/models/x`` holds a path of this machine)."""
    if m.arch:
        return m.arch
    kind, sep, where = (m.source or "custom").partition(":")
    return f"{kind}:{PurePath(where).name}" if sep else kind


async def _parse(request: Request, model: type[BaseModel], state: ServeState, multipart: bool) -> tuple[Any, dict]:
    """The validated JSON body, or for multipart: ``(None, {"images": [bytes], "texts": [str]})``. Any other
    Content-Type is refused (415)."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media == "multipart/form-data" and multipart:
        return None, await _parse_form(request, model, state)
    if media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        takes = "application/json or multipart/form-data" if multipart else "application/json"
        raise ServeError(f"this route takes Content-Type {takes}, not {media or 'none'}", status=415,
                         type="unsupported_media_type")
    body = await request.body()
    if not body:
        raise ServeError(f"empty body: send a JSON object with fields: {', '.join(model.model_fields)}",
                         status=400, type="invalid_json")
    try:
        if len(body) < PARSE_INLINE_BYTES:
            return model.model_validate_json(body), {}
        # a large body (up to max_body_bytes: millions of list items) takes a core for a while: not the event loop's
        return await anyio.to_thread.run_sync(model.model_validate_json, body, limiter=state.cpu_limiter), {}
    except ValidationError as exc:
        raise _validation_error(exc, model) from None


async def _parse_form(request: Request, model: type[BaseModel], state: ServeState) -> dict:
    lim = state.limits
    try:
        form = await request.form(max_files=lim.max_batch_items + 1, max_fields=lim.max_batch_items + 1,
                                  max_part_size=lim.max_body_bytes)
    except HTTPException as exc:  # starlette's answer to a malformed multipart body: {"detail": ...}
        raise ServeError(f"malformed multipart body: {exc.detail}", status=400, type="invalid_multipart") from None
    try:
        allowed = set(model.model_fields)
        parts: dict[str, list] = {"images": [], "texts": []}
        for key, value in form.multi_items():
            if key not in allowed or key not in parts:
                raise ServeError(f"unknown form field {key!r}; multipart takes: images (files), texts",
                                 status=422, type="unknown_field", field=key)
            if key == "images":
                if isinstance(value, str):
                    raise ServeError("form field 'images' must be a file", status=422, type="invalid_field",
                                     field="images")
                parts["images"].append(await value.read())
            else:
                if not isinstance(value, str):
                    raise ServeError("form field 'texts' must be text", status=422, type="invalid_field",
                                     field="texts")
                parts["texts"].append(value)
    finally:
        await form.close()
    return parts


def _decode_image(s: str, i: int) -> bytes:
    if s.startswith("data:"):
        s = s.partition(",")[2]
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(f"image {i} is not valid base64", field=f"images[{i}]") from None
    if not data:
        raise ServeError(f"image {i} is empty", field=f"images[{i}]")
    return data


# --- the work --------------------------------------------------------------------------------------------------------
class _Handlers:
    """The route bodies, over one :class:`ServeState`."""

    def __init__(self, state: ServeState) -> None:
        self.st = state

    def _ready(self) -> None:
        if not self.st.ready:
            detail = f": {self.st.error}" if self.st.error else " (warming up)"
            raise ServeError("the server is not ready" + detail, status=503, type="not_ready")

    def _graph(self, task: str) -> Any:
        try:
            return self.st.session.bundle.graph_for_task(task).spec
        except BundleError:  # its message names the bundle's path on this machine: not for clients
            m = self.st.session.manifest
            have = ", ".join(f"{n} ({g.spec.task})" for n, g in m.graphs.items())
            raise ServeError(f"this bundle ({model_name(m)}) cannot {task}; its graphs: {have}",
                             type="unsupported") from None

    def _headers(self, images: Sequence[bytes | str]) -> list[bytes]:
        """base64 decoded; each image's pixels (from its header) checked, and the request's sum."""
        lim = self.st.limits
        raw = [_decode_image(x, i) if isinstance(x, str) else x for i, x in enumerate(images)]
        pixels = sum(lim.check_image_header(data, i) for i, data in enumerate(raw))
        lim.check_request_pixels(pixels, len(raw))
        return raw

    def _preprocess(self, data: bytes, i: int) -> np.ndarray:
        spec = self.st.session.manifest.image
        if spec is None:
            raise ServeError("this bundle takes no images", type="unsupported")
        return preprocess_images([data], spec, max_pixels=self.st.limits.max_image_pixels, start=i)

    async def _pixels(self, images: Sequence[bytes | str]) -> np.ndarray:
        # base64, header checks, decoding and resizing are CPU work, done in worker threads (at most one per core at
        # once) so the event loop only routes: first every header (the pixel limits refuse a request before any
        # decoding), then one image per call, so requests take turns image by image and a large request cannot hold
        # a core for all its images while small ones wait; a request past its timeout stops at the next image.
        lim = self.st.cpu_limiter
        raw = await anyio.to_thread.run_sync(self._headers, list(images), limiter=lim)
        rows = [await anyio.to_thread.run_sync(self._preprocess, data, i, limiter=lim) for i, data in enumerate(raw)]
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _texts(self, texts: list[str], truncate: bool,
               field: str = "texts") -> tuple[dict[str, np.ndarray], list[str] | None]:
        """Check ``texts`` against the limits. Returns ``(feeds, texts)``: normally ``({}, texts)``, for the batcher
        to tokenize in its worker with the batch's other texts (each tokenizer call on the event loop gives up the
        GIL and must win it back, which under load costs more than the tokenizing); tokenized here
        (``({"input_ids", "attention_mask"}, None)``) when the server's token limit is below the model's."""
        s = self.st.session
        m = s.manifest.text
        if m is None:
            raise ServeError(f"this bundle ({s.manifest.arch or s.manifest.source}) takes no text", type="unsupported")
        lim = self.st.limits
        limit = lim.text_token_limit(m.max_length)
        below = limit is not None and limit < m.max_length  # the server's limit is stricter than the model's
        if truncate:
            lim.check_chars(texts, field)  # blank or over max_text_chars: refused; over the token limit: cut (to the lower)
            if not below:
                return {}, texts
            ids, mask = s.tokenize(texts, truncate=True, max_tokens=limit)
            return {"input_ids": ids, "attention_mask": mask}, None
        lim.check_texts(texts, None, m.max_length, field)  # empty and over-long (characters) texts, without tokenizing
        if not below:
            return {}, texts  # the tokenizer itself refuses a text over the model's maximum (see _run)
        lim.check_texts(texts, s.tokenizer, m.max_length, field)
        ids, mask = s.tokenize(texts)
        return {"input_ids": ids, "attention_mask": mask}, None

    async def _run(self, spec: Any, feeds: dict[str, np.ndarray], texts: list[str] | None,
                   truncate: bool) -> dict[str, np.ndarray]:
        try:
            return await self.st.batcher.run_async(spec.name, feeds, texts=texts, truncate=truncate)
        except InputError:
            if texts is not None and not truncate:  # a text over the model's token limit: name the limit
                m = self.st.session.manifest.text
                self.st.limits.check_texts(texts, self.st.session.tokenizer, m.max_length if m else None)
            raise

    async def _embed(self, images: list[bytes | str] | None, texts: list[str] | None,
                     truncate: bool, field: str = "texts") -> tuple[np.ndarray, str]:
        if images and texts:
            if len(images) != len(texts):
                raise ServeError(f"a composed query needs one text per image; got {len(images)} images and "
                                 f"{len(texts)} texts")
            spec = self._graph("compose")
            feeds, to_tokenize = self._texts(texts, truncate, field)
            feeds["pixels"] = await self._pixels(images)
        elif images:
            spec = self._graph("embed_image")
            feeds, to_tokenize = {"pixels": await self._pixels(images)}, None
        elif texts:
            spec = self._graph("embed_text")
            feeds, to_tokenize = self._texts(texts, truncate, field)
        else:
            raise ServeError("give texts, images or both", type="invalid_input")
        out = await self._run(spec, feeds, to_tokenize, truncate)
        return out[spec.outputs[0].name], spec.name

    async def embed(self, request: Request) -> Response:
        """``POST /v1/embed``: texts, images (JSON base64 or multipart files) or image+text pairs."""
        self._ready()
        body, parts = await _parse(request, schemas.EmbedRequest, self.st, multipart=True)
        if body is not None:
            images, texts, truncate = body.images, body.texts, body.truncate  # base64 decoded off the event loop
        else:
            images, texts, truncate = parts["images"] or None, parts["texts"] or None, False
        for items, what in ((images, "images"), (texts, "texts")):
            if items is not None:
                if not items:
                    raise ServeError(f"'{what}' is an empty list", field=what)
                self.st.limits.check_items(len(items), what)
        vectors, graph = await self._embed(images, texts, truncate)
        return _json({"embeddings": np.round(vectors, 7).tolist(), "dim": int(vectors.shape[1]),
                      "count": int(vectors.shape[0]), "graph": graph})

    async def search(self, request: Request) -> Response:
        """``POST /v1/search``: embed the query (text, image or both), then top-k in the index with metadata."""
        self._ready()
        body, _ = await _parse(request, schemas.SearchRequest, self.st, multipart=False)
        self.st.limits.check_k(body.k)
        index = self.st.index
        if index is None:
            raise ServeError("this server has no index: start it with --index INDEX", type="no_index", status=404)
        if body.text is None and body.image is None:
            raise ServeError("give 'text', 'image' or both")
        images = [body.image] if body.image is not None else None
        texts = [body.text] if body.text is not None else None
        vectors, graph = await self._embed(images, texts, body.truncate, "text")
        if len(index) >= INDEX_THREAD_MIN and self.st.searcher is not None:  # off the event loop, batched
            scores, ids = await self.st.searcher.search(vectors, body.k)
        else:
            scores, ids = index.search(vectors, body.k)
        hits = [{"id": int(i), "score": float(s), "metadata": public_metadata(index.get_metadata(int(i)))}
                for s, i in zip(scores[0], ids[0]) if i >= 0]
        return _json({"hits": hits, "k": body.k, "graph": graph})

    async def classify(self, request: Request) -> Response:
        """``POST /v1/classify``: per image, per attribute head, the label and probabilities."""
        self._ready()
        body, parts = await _parse(request, schemas.ClassifyRequest, self.st, multipart=True)
        if body is not None:
            images = body.images
        else:
            if parts["texts"]:
                raise ServeError("classify takes images only", status=422, type="unknown_field", field="texts")
            images = parts["images"]
        if not images:
            raise ServeError("'images' is an empty list", field="images")
        self.st.limits.check_items(len(images), "images")
        spec = self._graph("classify")
        out = await self.st.batcher.run_async(spec.name, {"pixels": await self._pixels(images)})
        return _json({"predictions": classify_outputs(out, self.st.session.manifest.class_labels), "graph": spec.name})


# --- the app ---------------------------------------------------------------------------------------------------------
_ERRORS = {400: {"model": schemas.ErrorResponse, "description": "bad input or a limit exceeded (named)"},
           408: {"model": schemas.ErrorResponse, "description": "the body did not arrive within read_timeout_s"},
           413: {"model": schemas.ErrorResponse, "description": "body or image too large (limit named)"},
           415: {"model": schemas.ErrorResponse, "description": "not application/json (or multipart where taken)"},
           422: {"model": schemas.ErrorResponse, "description": "unknown field or wrong type (field named)"},
           429: {"model": schemas.ErrorResponse, "description": "max_queue requests in progress: retry after "
                                                                "Retry-After seconds"},
           503: {"model": schemas.ErrorResponse, "description": "not ready yet, or too many connections"},
           504: {"model": schemas.ErrorResponse, "description": "the request took longer than request_timeout_s"}}


def _body_doc(model: type[BaseModel], multipart: bool) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if multipart:
        props: dict[str, Any] = {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}
        if "texts" in model.model_fields:
            props["texts"] = {"type": "array", "items": {"type": "string"}}
        content["multipart/form-data"] = {"schema": {"type": "object", "properties": props}}
    return {"requestBody": {"required": True, "content": content}}


def create_app(session: Any, index: Any | None = None, *, batching: BatchSettings | None = None,
               limits: Limits | None = None, api_key: str | None = None, prepare: str = "background",
               allow_index_mismatch: bool = False, kernel_cache: str | None = None,
               worker: tuple[int, int] | None = None) -> FastAPI:
    """The ASGI app serving ``session`` (and ``index`` for ``/v1/search``).

    ``batching``: how requests are batched (:class:`~fine_infer.batching.BatchSettings`; default: each graph's
    batch size and lanes calibrated at start-up, a 2 ms adaptive delay). ``prepare``: ``"background"`` (warm-up and
    calibration after start-up; ``/readyz`` says when done), ``"now"`` (before this returns) or ``"skip"`` (ready at
    once). ``allow_index_mismatch``: serve an index that records another bundle (refused otherwise). ``kernel_cache``:
    the folder kept across restarts for compiled Triton kernels and their tuning, where fused kernels run.
    ``worker``: (index, count) of this process among ``fine-infer serve --workers``. The :class:`ServeState` is
    ``app.state.serve``.
    """
    state = ServeState(session, index, batching=batching, limits=limits, api_key=api_key,
                       allow_index_mismatch=allow_index_mismatch, kernel_cache=kernel_cache, worker=worker)
    if prepare == "now":
        state.prepare()
    elif prepare == "skip":
        state.ready = True
    elif prepare != "background":
        raise ConfigError(f"prepare must be 'background', 'now' or 'skip', not {prepare!r}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        """Start warm-up/calibration in the background; on shutdown, drain the batcher."""
        if not state.ready and state.error is None:
            threading.Thread(target=state.prepare, name="serve-prepare", daemon=True).start()
        yield
        # Reached after uvicorn stopped accepting and in-flight requests finished: drain what is still queued.
        await anyio.to_thread.run_sync(state.close)

    m = session.manifest
    # redirect_slashes off: its 307 to "/healthz" would be built from the client's Host header
    app = FastAPI(title="fine-infer", version=_version(), lifespan=lifespan, redirect_slashes=False, **_NO_TELEMETRY,
                  description=f"Embedding, search and classification with a {model_name(m)} bundle.")
    app.state.serve = state
    h = _Handlers(state)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> Response:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        """Starlette's own answers (unknown route, wrong method, ...) in the documented error shape."""
        kind = _HTTP_ERRORS.get(exc.status_code, "invalid_input" if exc.status_code < 500 else "internal")
        return _error_response(ServeError(str(exc.detail), status=exc.status_code, type=kind,
                                          headers=dict(exc.headers or {})))

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> Response:
        return _error_response(ServeError(str(exc), type="invalid_input"))

    @app.exception_handler(FineInferError)
    async def _other_error(request: Request, exc: FineInferError) -> Response:
        return _error_response(ServeError(str(exc), type="unsupported"))

    @app.post("/v1/embed", summary="Embed texts, images or image+text pairs", responses={200: {"model":
              schemas.EmbedResponse}, **_ERRORS}, openapi_extra=_body_doc(schemas.EmbedRequest, True))
    async def embed(request: Request) -> Response:
        """Embed `texts`, `images` (base64 in JSON, or multipart files) or both (one composed query per pair, for
        composed-retrieval archs). Returns L2-normalised float32 rows."""
        return await h.embed(request)

    @app.post("/v1/search", summary="Top-k search by text, image or both", responses={200: {"model":
              schemas.SearchResponse}, 404: {"model": schemas.ErrorResponse, "description": "no index"}, **_ERRORS},
              openapi_extra=_body_doc(schemas.SearchRequest, False))
    async def search(request: Request) -> Response:
        """Search the server's index by `text`, `image` or both (composed retrieval); `k` hits with their stored
        metadata, best first."""
        return await h.search(request)

    @app.post("/v1/classify", summary="Predict every attribute head per image", responses={200: {"model":
              schemas.ClassifyResponse}, **_ERRORS}, openapi_extra=_body_doc(schemas.ClassifyRequest, True))
    async def classify(request: Request) -> Response:
        """Classify `images` with a classifier bundle: per attribute head, the label and all probabilities."""
        return await h.classify(request)

    @app.get("/v1/info", summary="The bundle, its graphs and batch sizes, the index and the limits")
    async def info() -> Response:
        """The arch, graphs and their batch sizes, the index size and the request limits."""
        return _json(state.info())

    @app.api_route("/healthz", methods=["GET", "HEAD"], summary="Liveness: the process answers")
    async def healthz() -> Response:
        """200 while the process answers."""
        return _json({"status": "ok"})

    @app.api_route("/readyz", methods=["GET", "HEAD"],
                   summary="Readiness: bundle loaded and warmed up, index loaded",
                   responses={503: {"model": schemas.ErrorResponse}})
    async def readyz() -> Response:
        """200 once the bundle is warmed up and calibrated and the index loaded; 503 before, and while draining."""
        if state.ready and not state.draining:
            return _json({"status": "ready", "index": state.index is not None})
        reason = "draining" if state.draining else (state.error or "warming up")
        return _error_response(ServeError(f"not ready: {reason}", status=503, type="not_ready"))

    @app.get("/metrics", summary="Prometheus metrics (text exposition)")
    async def metrics() -> Response:
        """Prometheus text exposition: requests by route and status, latencies, batch sizes, queue depth."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        """The OpenAPI schema, with the request bodies' models."""
        # Routes read their bodies themselves (JSON or multipart): add the request models to the components.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in schemas.REQUEST_MODELS:
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[model.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Guard, state=state, paths=frozenset(getattr(r, "path", "") for r in app.routes))
    return app


def _no_telemetry() -> dict[str, Any]:
    # Newer FastAPI traces every request with OpenTelemetry by default; /metrics already counts what matters here,
    # and the spans would cost more than the routing. Older FastAPI has no such option.
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}


_NO_TELEMETRY = _no_telemetry()


def _version() -> str:
    from fine_infer import __version__

    return __version__
