"""The Python-backend models of a Triton repository written by ``fine-infer triton-repo``.

Each ``model.py`` of the repository is a two-line shim importing :class:`TritonPythonModel` from here, so the server
runs the code of the installed fine-infer, the code ``fine_infer.load`` runs. The model config's ``role`` parameter
picks what a model does:

- ``preprocess``: raw inputs → a graph's tensors. ``text`` (UTF-8 strings) and ``image`` (the encoded file's bytes),
  both ``TYPE_STRING``, become ``input_ids``/``attention_mask`` and ``pixels`` through the bundle's own
  :meth:`Session.tokenize <fine_infer.runtime.Session.tokenize>` and :meth:`Session.preprocess_images
  <fine_infer.runtime.Session.preprocess_images>` (text cleaning and templates, resizing, cropping, normalisation),
  so a request's tensors are the ones the runtime computes for the same inputs. Each request is its own batch, as a
  call of ``session.embed(...)`` is.
- ``graph``: one graph of the bundle on :func:`fine_infer.load` (ONNX Runtime or OpenVINO on CPU: ``--backend
  python``). The requests Triton's dynamic batcher hands over run as one batch, padded along the sequence axis as the
  runtime's own batcher pads them (:mod:`fine_infer.batching.merging`).
- ``search``: query embeddings → the top-``k`` ``ids``, ``scores`` and ``metadata`` (one JSON document per hit, as
  ``fine-infer serve`` shows it) from a :class:`fine_infer.Index`; the batch's queries are searched in one call.

The bundle (and the index) sit inside the repository, named relative to its root by the ``bundle`` (``index``)
parameter; every Python model verifies the bundle's checksums (and the index file's) when it loads, so a changed
file keeps the model, and with it the server, from starting. A bad request (an unreadable image, an empty text, a
missing input) is answered with a Triton error naming the problem; the model and its batch-mates go on.

The Triton Python backend's stub converts tensors with numpy: the stub shipped by ``nvidia-pytriton`` 0.7.0
(Triton 2.51) is built against numpy 1, and numpy 2 in the server's Python silently scrambles every tensor.
:func:`check_tensor_roundtrip` catches that when a model loads and refuses with the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fine_infer.batching.merging import batchable, feed_rows, groups, merge, split
from fine_infer.errors import BundleError, ConfigError, FineInferError, InputError

ROLES = ("preprocess", "graph", "search")
TEXT, IMAGE, K = "text", "image", "k"
SEARCH_OUTPUTS = ("ids", "scores", "metadata")
DEFAULT_K = 10
MAX_K = 1000  # as fine-infer serve's default limit


def _pb():
    """``triton_python_backend_utils``: only importable inside the Python backend's stub."""
    import triton_python_backend_utils as pb_utils

    return pb_utils


def parameters(config: dict[str, Any]) -> dict[str, str]:
    """A model config's ``parameters`` as plain strings."""
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def resolve(model_dir: str | Path, where: str) -> Path:
    """A path a config parameter names: absolute, or relative to the repository root (the model folder's parent)."""
    p = Path(where)
    return p if p.is_absolute() else Path(model_dir).parent / p


def check_tensor_roundtrip(pb_utils: Any) -> None:
    """Refuse to start when the stub's numpy bridge scrambles tensors (a stub built against numpy 1 with numpy 2
    imported): every answer would be wrong or the stub would crash on the first string tensor."""
    probe = np.array([[1, 2, 300]], dtype=np.int64)
    try:
        back = pb_utils.Tensor("probe", probe).as_numpy()
        ok = back.shape == probe.shape and back.tolist() == probe.tolist()
    except Exception:  # noqa: BLE001 - any failure here means the same thing
        ok = False
    if not ok:
        raise ConfigError(
            f"this Triton Python backend stub does not read numpy {np.__version__} arrays correctly (stubs built "
            "against numpy 1, such as nvidia-pytriton 0.7.0's, need numpy<2 in the server's Python); run the "
            "server with a Python whose numpy matches its stub (python -m fine_infer.serve.triton_server sets one "
            "up from a folder holding numpy<2)")


def _strings(tensor: Any, what: str) -> list[Any]:
    """A ``TYPE_STRING`` input (batch, 1) → one ``bytes`` per row."""
    arr = tensor.as_numpy()
    if arr.dtype != object:
        raise InputError(f"input {what!r} must be BYTES (TYPE_STRING), not {arr.dtype}")
    if arr.ndim == 0 or arr.size != arr.shape[0]:
        raise InputError(f"input {what!r} takes one element per row, shape (batch, 1); got {list(arr.shape)}")
    return [x if isinstance(x, bytes) else bytes(x) for x in arr.reshape(-1)]


def decode_texts(items: list[bytes]) -> list[str]:
    """UTF-8 bytes → strings, naming the first that is not UTF-8."""
    out = []
    for i, b in enumerate(items):
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(f"text {i} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return out


class Preprocess:
    """Raw ``text``/``image`` → ``input_ids``, ``attention_mask``, ``pixels`` with the bundle's session."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __call__(self, inputs: dict[str, list[bytes]], wanted: set[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "pixels" in wanted:
            if IMAGE not in inputs:
                raise InputError("this model takes an 'image' input (the encoded file's bytes)")
            out["pixels"] = self.session.preprocess_images(inputs[IMAGE])
        if wanted & {"input_ids", "attention_mask"}:
            if TEXT not in inputs:
                raise InputError("this model takes a 'text' input (UTF-8 strings)")
            out["input_ids"], out["attention_mask"] = self.session.tokenize(decode_texts(inputs[TEXT]))
        if IMAGE in inputs and TEXT in inputs and len(inputs[IMAGE]) != len(inputs[TEXT]):
            raise InputError(f"give one text per image; got {len(inputs[IMAGE])} images and {len(inputs[TEXT])} texts")
        return {k: v for k, v in out.items() if k in wanted}


class GraphRunner:
    """Runs one graph for a list of requests' feeds: one batch (padded as the runtime's batcher pads), or each
    request alone when the batch fails, so a bad request fails alone."""

    def __init__(self, session: Any, graph: str) -> None:
        if graph not in session.manifest.graphs:
            raise ConfigError(f"the bundle has no graph {graph!r}; it has: {', '.join(session.manifest.graphs)}")
        self.session = session
        self.graph = graph
        self.spec = session.manifest.graphs[graph].spec
        text = session.manifest.text
        self.pad_id = text.pad_id if text else 0

    def check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A request's feeds with the graph's dtypes and ranks, or :class:`InputError`."""
        for t in self.spec.inputs:
            a = feeds.get(t.name)
            if a is None:
                raise InputError(f"input {t.name!r} is missing")
            if str(a.dtype) != t.dtype:
                raise InputError(f"input {t.name!r} is {a.dtype}; the graph takes {t.dtype}")
            if a.ndim != len(t.shape):
                raise InputError(f"input {t.name!r} has shape {list(a.shape)}; the graph takes {list(t.shape)}")
        return feeds

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Exception]:
        out: list[dict[str, np.ndarray] | Exception] = [InputError("not run")] * len(requests)
        good = []
        for i, feeds in enumerate(requests):
            try:
                good.append(_Feeds(i, self.check(feeds)))
            except InputError as exc:
                out[i] = exc
        parts = groups(self.spec, good) if batchable(self.spec) and len(good) > 1 else [[r] for r in good]
        for part in parts:
            try:
                if len(part) == 1:
                    results = [self.session.run(self.graph, part[0].feeds)]
                else:
                    merged, lengths = merge(self.spec, [r.feeds for r in part], self.pad_id)
                    outs = self.session.run(self.graph, merged)
                    results = split(self.spec, outs, [feed_rows(r.feeds) for r in part], lengths)
            except Exception as exc:  # noqa: BLE001 - run them one by one: only the bad one fails
                if len(part) == 1:
                    out[part[0].index] = exc
                    continue
                for r in part:
                    out[r.index] = self.run([r.feeds])[0]
                continue
            for r, res in zip(part, results):
                out[r.index] = {k: np.ascontiguousarray(v) for k, v in res.items()}
        return out


class _Feeds:
    __slots__ = ("feeds", "index")

    def __init__(self, index: int, feeds: dict[str, np.ndarray]) -> None:
        self.index, self.feeds = index, feeds


class Search:
    """Query embeddings → top-k ids, scores and metadata JSON; the batch's queries searched in one call."""

    def __init__(self, index: Any, default_k: int = DEFAULT_K) -> None:
        self.index = index
        self.default_k = default_k

    def k_of(self, k: np.ndarray | None) -> int:
        if k is None:
            return self.default_k
        values = {int(v) for v in np.asarray(k).reshape(-1)}
        if len(values) != 1:
            raise InputError(f"give one k per request (all rows the same); got {sorted(values)}")
        value = values.pop()
        if not 1 <= value <= MAX_K:
            raise InputError(f"k = {value} is out of range; k must be between 1 and {MAX_K}")
        return value

    def __call__(self, requests: list[tuple[np.ndarray, int]]) -> list[dict[str, np.ndarray]]:
        from fine_infer.serve.search import public_metadata

        n = len(self.index)
        queries = np.concatenate([q for q, _ in requests]) if len(requests) > 1 else requests[0][0]
        if n:
            scores, ids = self.index.search(queries, min(n, max(k for _, k in requests)))
        else:  # an empty index: no hits (not -1 ids and -inf scores)
            scores, ids = np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        out, lo = [], 0
        for q, k in requests:
            hi, kk = lo + len(q), min(k, n)
            s, i = scores[lo:hi, :kk], ids[lo:hi, :kk]
            meta = np.array([[json.dumps(public_metadata(self.index.get_metadata(int(x))) if x >= 0 else None,
                                         separators=(",", ":")).encode() for x in row] for row in i], dtype=object)
            out.append({"ids": np.ascontiguousarray(i, dtype=np.int64),
                        "scores": np.ascontiguousarray(s, dtype=np.float32), "metadata": meta})
            lo = hi
        return out


def open_session(model_dir: str | Path, params: dict[str, str]) -> Any:
    """The bundle a model serves, loaded (and its checksums verified) with the config's options."""
    import fine_infer

    if not params.get("bundle"):
        raise ConfigError("the model config names no bundle (parameter 'bundle')")
    bundle = resolve(model_dir, params["bundle"])
    if not bundle.is_dir():
        raise BundleError(f"the bundle {bundle} this model serves is missing; write the repository again "
                          "(fine-infer triton-repo)")
    threads = int(params["threads"]) if params.get("threads") else None
    return fine_infer.load(bundle, params.get("backend") or "auto", variant=params.get("variant") or None,
                           threads=threads)


def open_index(model_dir: str | Path, params: dict[str, str]) -> Any:
    """The index a search model serves, loaded (and verified)."""
    from fine_infer.index import Index

    if not params.get("index"):
        raise ConfigError("the model config names no index (parameter 'index')")
    return Index.load(resolve(model_dir, params["index"]))


class TritonPythonModel:
    """The Python backend's entry point (see the module's description for the roles)."""

    def initialize(self, args: dict[str, str]) -> None:
        pb_utils = _pb()
        check_tensor_roundtrip(pb_utils)
        self.config = json.loads(args["model_config"])
        self.params = parameters(self.config)
        self.role = self.params.get("role", "")
        if self.role not in ROLES:
            raise ConfigError(f"unknown role {self.role!r} in the model config; one of {', '.join(ROLES)}")
        self.outputs = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.config["output"]}
        model_dir = args["model_repository"]
        if self.role == "search":
            self.search = Search(open_index(model_dir, self.params), int(self.params.get("k") or DEFAULT_K))
            self.dim = self.search.index.dim
            want = next((i["dims"][-1] for i in self.config["input"] if i["name"] == "embedding"), self.dim)
            if int(want) != self.dim:
                raise ConfigError(f"the index holds {self.dim}-dimensional vectors; this model's embeddings have "
                                  f"{want}: write the repository with an index built by this bundle")
            return
        session = open_session(model_dir, self.params)
        if self.role == "preprocess":
            self.preprocess = Preprocess(session)
        else:
            self.runner = GraphRunner(session, self.params.get("graph", ""))

    # --- per role -------------------------------------------------------------------------------------------------
    def _answer(self, requests: list[Any], work: Callable[[list[Any]], list[Any]]) -> list[Any]:
        pb_utils = _pb()
        results = work(requests)
        responses = []
        for r in results:
            if isinstance(r, Exception):
                responses.append(pb_utils.InferenceResponse(error=_error(pb_utils, r)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(k, v if v.dtype == object else v.astype(self.outputs[k], copy=False))
                     for k, v in r.items()]))
        return responses

    def _preprocess(self, requests: list[Any]) -> list[Any]:
        pb_utils = _pb()
        out: list[Any] = []
        for req in requests:
            try:
                inputs = {}
                for name in (TEXT, IMAGE):
                    t = pb_utils.get_input_tensor_by_name(req, name)
                    if t is not None:
                        inputs[name] = _strings(t, name)
                wanted = set(req.requested_output_names()) or set(self.outputs)
                out.append(self.preprocess(inputs, wanted))
            except Exception as exc:  # noqa: BLE001 - this request fails alone (InputError: the client's)
                out.append(exc)
        return out

    def _graph(self, requests: list[Any]) -> list[Any]:
        pb_utils = _pb()
        feeds = []
        for req in requests:
            mine = {}
            for t in self.runner.spec.inputs:
                tensor = pb_utils.get_input_tensor_by_name(req, t.name)
                if tensor is not None:
                    mine[t.name] = tensor.as_numpy()
            feeds.append(mine)
        return self.runner.run(feeds)

    def _search(self, requests: list[Any]) -> list[Any]:
        pb_utils = _pb()
        out: list[Any] = [None] * len(requests)
        good, where = [], []
        for i, req in enumerate(requests):
            try:
                q = pb_utils.get_input_tensor_by_name(req, "embedding")
                if q is None:
                    raise InputError("input 'embedding' is missing")
                q = np.asarray(q.as_numpy(), dtype=np.float32)
                if q.ndim != 2 or q.shape[1] != self.dim:
                    raise InputError(f"'embedding' has shape {list(q.shape)}; the index takes (batch, {self.dim})")
                k = pb_utils.get_input_tensor_by_name(req, K)
                good.append((q, self.search.k_of(k.as_numpy() if k is not None else None)))
                where.append(i)
            except Exception as exc:  # noqa: BLE001
                out[i] = exc
        if good:
            try:
                for i, res in zip(where, self.search(good)):
                    out[i] = res
            except Exception as exc:  # noqa: BLE001
                for i in where:
                    out[i] = exc
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        work = {"preprocess": self._preprocess, "graph": self._graph, "search": self._search}[self.role]
        return self._answer(requests, work)

    def finalize(self) -> None:
        if self.role != "search":
            session = getattr(self, "preprocess", None) or getattr(self, "runner", None)
            if session is not None:
                session.session.close()


def _error(pb_utils: Any, exc: Exception) -> Any:
    """A Triton error for ``exc``: bad input is the client's (INVALID_ARG, HTTP 400), anything else INTERNAL."""
    message = str(exc) if isinstance(exc, FineInferError) else f"{type(exc).__name__}: {exc}"
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if isinstance(exc, InputError) else "INTERNAL", None)
    try:
        return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    except TypeError:  # a backend without error codes
        return pb_utils.TritonError(message)
