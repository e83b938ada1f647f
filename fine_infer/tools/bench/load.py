"""Load-testing a running server: closed-loop HTTP clients, latency percentiles and requests/s.

Two kinds of server: ``fine-infer serve`` (its JSON API, :func:`bench_server`) and NVIDIA Triton Inference Server over
KServe v2 (``POST /v2/models/NAME/infer``, :func:`bench_triton`), e.g. a repository ``fine-infer triton-repo`` wrote,
whose raw-input models take ``text`` and ``image`` as BYTES: the same queries, the same clients, so the two compare.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import struct
import threading
import time
import urllib.parse
from typing import Any, Sequence

import numpy as np

from fine_infer.errors import ConfigError, FineInferError
from fine_infer.tools.bench.machine import machine_info
from fine_infer.tools.bench.runtime import RESULT_KIND, RESULT_VERSION
from fine_infer.tools.bench.timing import Progress, latency_stats

DEFAULT_CONCURRENCY = (1, 8, 32)
QUERY_TEXT = "a red striped dress with long sleeves"


def sample_png(size: int = 96, seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def server_payloads(info: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per workload name, ``(path, JSON body)`` of one single-item request the server's bundle can answer."""
    tasks = set(info.get("tasks", ()))
    image = base64.b64encode(sample_png()).decode()
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    if "embed_text" in tasks:
        out["embed_text"] = ("/v1/embed", {"texts": [QUERY_TEXT]})
    if "embed_image" in tasks:
        out["embed_image"] = ("/v1/embed", {"images": [image]})
    if "compose" in tasks:
        out["compose"] = ("/v1/embed", {"images": [image], "texts": [QUERY_TEXT]})
    if "classify" in tasks:
        out["classify"] = ("/v1/classify", {"images": [image]})
    if info.get("index"):
        if "embed_text" in tasks:
            out["search_text"] = ("/v1/search", {"text": QUERY_TEXT, "k": 10})
        elif "compose" in tasks:
            out["search_compose"] = ("/v1/search", {"text": QUERY_TEXT, "image": image, "k": 10})
        elif "embed_image" in tasks:
            out["search_image"] = ("/v1/search", {"image": image, "k": 10})
    return out


class _Client:
    """One keep-alive HTTP/1.1 connection (http.client: far cheaper per request than a full-featured client,
    which matters when the load generator shares the CPU with the server)."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise ConfigError(f"a server URL is http(s)://HOST:PORT, got {url!r}")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=timeout)
        self.prefix = u.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request on the kept-alive connection: (status, body)."""
        self.conn.request(method, self.prefix + path, body=body,
                          headers={**self.headers, **headers} if headers else self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


# --- KServe v2 (Triton) --------------------------------------------------------------------------------------------
KSERVE_TYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int64": "INT64", "int32": "INT32",
                "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}


def kserve_request(inputs: dict[str, Any], outputs: Sequence[str] = ()) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 inference request with every input as binary data (Triton's binary tensor extension): ``inputs``
    maps names to numpy arrays, or to lists of ``bytes``/``str`` (BYTES, shape (n, 1)). Returns (body, headers)."""
    head: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in inputs.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            if str(value.dtype) not in KSERVE_TYPES:
                raise ConfigError(f"input {name!r}: dtype {value.dtype} has no KServe v2 type")
            blob, shape, dtype = np.ascontiguousarray(value).tobytes(), list(value.shape), KSERVE_TYPES[str(value.dtype)]
        else:
            items = [x.encode() if isinstance(x, str) else bytes(x) for x in np.asarray(value, dtype=object).ravel()]
            blob = b"".join(struct.pack("<I", len(x)) + x for x in items)
            shape = list(np.shape(value)) if isinstance(value, np.ndarray) else [len(items), 1]
            dtype = "BYTES"
        head.append({"name": name, "shape": shape, "datatype": dtype, "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    doc: dict[str, Any] = {"inputs": head}
    if outputs:
        doc["outputs"] = [{"name": o, "parameters": {"binary_data": False}} for o in outputs]
    header = json.dumps(doc, separators=(",", ":")).encode()
    return header + b"".join(blobs), {"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))}


def kserve_outputs(body: bytes) -> dict[str, np.ndarray]:
    """The outputs of a KServe v2 JSON response (``data`` lists) as numpy arrays of their shapes; BYTES → bytes."""
    doc = json.loads(body)
    out = {}
    for o in doc.get("outputs", []):
        if o["datatype"] == "BYTES":
            arr = np.array([x.encode() if isinstance(x, str) else x for x in o["data"]], dtype=object)
        else:
            dtype = {v: k for k, v in KSERVE_TYPES.items()}[o["datatype"]]
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out


def triton_payloads(url: str, timeout: float = 10.0) -> tuple[dict[str, Any], dict[str, tuple[str, bytes, dict]]]:
    """The server's metadata and, per ready model taking raw ``text`` / ``image`` BYTES inputs (and an optional
    ``k``: a search ensemble), ``(path, body, headers)`` of one single-item request."""
    client = _Client(url, None, timeout)
    try:
        status, raw = client.request("GET", "/v2")
        if status != 200:
            raise FineInferError(f"{url}/v2 answered {status}: {raw[:200]!r} (not a KServe v2 server?)")
        server = json.loads(raw)
        status, raw = client.request("POST", "/v2/repository/index", b"{}")
        models = [m["name"] for m in json.loads(raw) if m.get("state") == "READY"] if status == 200 else []
        payloads = {}
        for name in sorted(models):
            status, raw = client.request("GET", f"/v2/models/{name}")
            if status != 200:
                continue
            ins = {i["name"]: i["datatype"] for i in json.loads(raw).get("inputs", [])}
            raw_in = [n for n in ("image", "text") if ins.get(n) == "BYTES"]
            if not raw_in or set(ins) - {"image", "text", "k"}:
                continue
            sample = {"image": [sample_png()], "text": [QUERY_TEXT]}
            body, headers = kserve_request({n: sample[n] for n in raw_in})
            payloads[name] = (f"/v2/models/{name}/infer", body, headers)
    except OSError as exc:
        raise FineInferError(f"cannot reach {url}: {exc}") from None
    finally:
        client.close()
    return server, payloads


def load_test(
    url: str,
    path: str,
    body: dict[str, Any] | bytes,
    concurrency: int,
    *,
    requests: int = 400,
    max_time_s: float = 10.0,
    warmup: int = 2,
    api_key: str | None = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``concurrency`` clients in a closed loop sending ``body`` (a JSON document, or bytes sent as they are with
    ``headers``) to ``path`` until ``requests`` are answered or ``max_time_s`` passes; latency percentiles,
    requests/s and the error count."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    lock = threading.Lock()
    times: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    start = threading.Event()
    deadline = [0.0]

    def take() -> bool:
        nonlocal issued
        with lock:
            if issued >= requests or time.perf_counter() > deadline[0]:
                return False
            issued += 1
            return True

    def worker() -> None:
        client = _Client(url, api_key, timeout)
        try:
            for _ in range(warmup):
                client.request("POST", path, payload, headers)
            start.wait()
            while take():
                t0 = time.perf_counter()
                try:
                    status, _ = client.request("POST", path, payload, headers)
                except (OSError, http.client.HTTPException) as exc:
                    status = type(exc).__name__
                    client.close()
                    client = _Client(url, api_key, timeout)
                dt = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        times.append(dt)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1
        finally:
            client.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    t_start = time.perf_counter()
    deadline[0] = t_start + max_time_s
    start.set()
    for t in threads:
        t.join(max_time_s + timeout + 5)
    wall = time.perf_counter() - t_start
    if not times:
        raise FineInferError(f"no request to {url}{path} succeeded (errors: {errors or 'none'})")
    stats = latency_stats(times, 1)
    stats["items_per_s"] = len(times) / wall  # closed loop: throughput is answered requests over wall time
    stats["ms_per_item"] = 1e3 / stats["items_per_s"]
    stats["errors"] = sum(errors.values())
    stats["error_statuses"] = errors
    return stats


def _rows(url: str, result: dict[str, Any], payloads: dict[str, tuple], names: Sequence[str],
          concurrency: Sequence[int], backend: str, progress: bool, **kw: Any) -> dict[str, Any]:
    """One load-test row per workload × concurrency into ``result`` (``payloads``: name → (path, body[, headers]))."""
    bar = Progress(len(names) * len(concurrency), progress, "load test")
    try:
        for w in names:
            path, body, *headers = payloads[w]
            for c in concurrency:
                bar.update(f"{w} × {c} clients")
                stats = load_test(url, path, body, c, headers=headers[0] if headers else None, **kw)
                result["rows"].append({"mode": "serve", "graph": w, "task": path, "backend": backend, "batch": c,
                                       "concurrency": c, **stats})
    finally:
        bar.close()
    result["machine"] = machine_info()
    return result


def _workloads(payloads: dict[str, Any], workloads: Sequence[str] | None, what: str) -> list[str]:
    names = list(workloads or payloads)
    unknown = [w for w in names if w not in payloads]
    if unknown or not names:
        raise ConfigError(f"{what} {', '.join(unknown) or '(none)'} not served here; this server offers "
                          f"{', '.join(payloads) or 'none'}")
    return names


def bench_server(
    url: str,
    *,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    workloads: Sequence[str] | None = None,
    requests: int = 400,
    max_time_s: float = 10.0,
    api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Load-test a running ``fine-infer serve``: per workload and concurrency, latency percentiles and requests/s."""
    client = _Client(url, api_key, 10.0)
    try:
        status, raw = client.request("GET", "/v1/info")
    except OSError as exc:
        raise FineInferError(f"cannot reach {url}: {exc}") from None
    finally:
        client.close()
    if status != 200:
        raise FineInferError(f"{url}/v1/info answered {status}: {raw[:200]!r}")
    info = json.loads(raw)
    payloads = server_payloads(info)
    names = _workloads(payloads, workloads, "workload(s)")
    result: dict[str, Any] = {"kind": RESULT_KIND, "version": RESULT_VERSION, "mode": "serve", "url": url,
                              "arch": info.get("arch"), "server": info, "rows": [], "skipped": []}
    return _rows(url, result, payloads, names, concurrency, "http", progress, requests=requests,
                 max_time_s=max_time_s, api_key=api_key)


def bench_triton(
    url: str,
    *,
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY,
    workloads: Sequence[str] | None = None,
    requests: int = 400,
    max_time_s: float = 10.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Load-test a Triton Inference Server (KServe v2): per raw-input model (``text`` / ``image`` BYTES, e.g. the
    ensembles of ``fine-infer triton-repo``) and concurrency, latency percentiles and requests/s; the same query
    text and image as :func:`bench_server` sends."""
    server, payloads = triton_payloads(url)
    names = _workloads(payloads, workloads, "raw-input model(s)")
    result: dict[str, Any] = {"kind": RESULT_KIND, "version": RESULT_VERSION, "mode": "serve", "server_kind": "triton",
                              "url": url, "arch": None, "server": server, "rows": [], "skipped": []}
    return _rows(url, result, payloads, names, concurrency, "triton", progress, requests=requests,
                 max_time_s=max_time_s)
