"""Load-testing a running ``fine-infer serve``: closed-loop HTTP clients, latency percentiles and requests/s."""

from __future__ import annotations

import base64
import http.client
import io
import json
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
            raise ConfigError(f"--serve takes an http(s):// URL, got {url!r}")
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        self.conn = cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=timeout)
        self.prefix = u.path.rstrip("/")
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on the kept-alive connection: (status, body)."""
        self.conn.request(method, self.prefix + path, body=body, headers=self.headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


def load_test(
    url: str,
    path: str,
    body: dict[str, Any],
    concurrency: int,
    *,
    requests: int = 400,
    max_time_s: float = 10.0,
    warmup: int = 2,
    api_key: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """``concurrency`` clients in a closed loop sending ``body`` to ``path`` until ``requests`` are answered or
    ``max_time_s`` passes; latency percentiles, requests/s and the error count."""
    payload = json.dumps(body).encode()
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
                client.request("POST", path, payload)
            start.wait()
            while take():
                t0 = time.perf_counter()
                try:
                    status, _ = client.request("POST", path, payload)
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
    names = list(workloads or payloads)
    unknown = [w for w in names if w not in payloads]
    if unknown:
        raise ConfigError(f"workload(s) {', '.join(unknown)} not served here; this server offers {', '.join(payloads)}")
    result: dict[str, Any] = {"kind": RESULT_KIND, "version": RESULT_VERSION, "mode": "serve", "url": url,
                              "arch": info.get("arch"), "server": info, "rows": [], "skipped": []}
    bar = Progress(len(names) * len(concurrency), progress, "load test")
    try:
        for w in names:
            path, body = payloads[w]
            for c in concurrency:
                bar.update(f"{w} × {c} clients")
                stats = load_test(url, path, body, c, requests=requests, max_time_s=max_time_s, api_key=api_key)
                result["rows"].append({"mode": "serve", "graph": w, "task": path, "backend": "http", "batch": c,
                                       "concurrency": c, **stats})
    finally:
        bar.close()
    result["machine"] = machine_info()
    return result
