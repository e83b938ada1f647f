"""Load test of a hardened ``fine-infer serve``: busy clients beside many idle connections (loopback only, bounded).

    python benchmarks/load_test.py                                  # tiny MAAF bundle + a 256-image index, exported here
    python benchmarks/load_test.py --bundle B --index I.fidx --clients 64 --idle 500 --seconds 30

Starts ``fine-infer serve`` (a subprocess, on a free 127.0.0.1 port, default limits unless ``--serve-arg``), then for
``--seconds``: ``--clients`` threads each send real requests back to back over one keep-alive connection (image
embeds and image searches, alternating), while ``--idle`` connections are held open without sending a byte (the
server closes them after its idle timeout; each is opened again at once, so that many are open all the time).
Reports the requests by status, transport errors, p50/p99 latency, throughput, how often the idle connections were
closed by the server and refused (503), then stops the server with SIGTERM and records its exit status. Prints one
JSON document (``--json FILE`` writes it too) with the machine (``lscpu`` model name and flags).

The load generator shares the machine with the server: the figures are a floor. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def png(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A random RGB PNG."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class IdleConnections:
    """``n`` connections to ``host:port`` held open without a byte sent; each one the server closes is opened again.
    Counts what the server did: closed them (its idle timeout) or refused them (a 503 first)."""

    def __init__(self, host: str, port: int, n: int) -> None:
        self.addr, self.n = (host, port), n
        self.sel = selectors.DefaultSelector()
        self.opened = self.closed = self.refused = self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="idle-connections", daemon=True)

    def _open(self) -> None:
        try:
            s = socket.create_connection(self.addr, timeout=5)
        except OSError:
            self.failed += 1
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ)
        self.opened += 1

    def open_count(self) -> int:
        return len(self.sel.get_map())

    def __enter__(self) -> "IdleConnections":
        for _ in range(self.n):
            self._open()
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.is_set():
            for key, _ in self.sel.select(timeout=0.1):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 503"):
                    self.refused += 1
                else:
                    self.closed += 1
                self.sel.unregister(s)
                s.close()
            while not self.stop.is_set() and self.open_count() < self.n:
                self._open()

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def run_load(url: str, *, clients: int, idle: int, seconds: float, images: list[bytes],
             timeout: float = 30.0) -> dict[str, Any]:
    """``clients`` busy clients and ``idle`` idle connections against ``url`` for ``seconds``: the counts and
    latencies (module docstring)."""
    import httpx

    host, port = url.removeprefix("http://").split(":")
    bodies = [("/v1/embed", {"images": [base64.b64encode(im).decode()]}) for im in images]
    bodies += [("/v1/search", {"image": base64.b64encode(im).decode(), "k": 5}) for im in images]
    lat: list[list[float]] = [[] for _ in range(clients)]
    status: list[dict[str, int]] = [{} for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    deadline = time.monotonic() + seconds

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            i = c
            while time.monotonic() < deadline:
                route, body = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = http.post(route, json=body)
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = "error"
                    if len(errors[c]) < 5:
                        errors[c].append(f"{type(exc).__name__}: {exc}")
                lat[c].append(time.perf_counter() - t0)
                status[c][key] = status[c].get(key, 0) + 1

    with IdleConnections(host, int(port), idle) as held:
        time.sleep(0.5)  # all idle connections are open before the load starts
        idle_open_at_start = held.open_count()
        threads = [threading.Thread(target=client, args=(c,), name=f"client-{c}") for c in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + timeout + 10)
        wall = time.monotonic() - t0
        idle_open_at_end = held.open_count()
        server_open = metrics(url).get("fine_infer_connections_open")  # while the idle ones are still held
        idle_stats = {"held": idle, "open_at_start": idle_open_at_start, "open_at_end": idle_open_at_end,
                      "server_connections_open_at_end": server_open, "closed_by_server": held.closed,
                      "refused_503": held.refused, "connect_failed": held.failed}
    assert not any(t.is_alive() for t in threads), "a client did not finish"
    all_lat = sorted(x for c in lat for x in c)
    by_status: dict[str, int] = {}
    for st in status:
        for k, v in st.items():
            by_status[k] = by_status.get(k, 0) + v
    n = len(all_lat)
    return {
        "clients": clients, "seconds": round(wall, 2), "requests": n, "by_status": dict(sorted(by_status.items())),
        "server_errors_5xx": sum(v for k, v in by_status.items() if k.startswith("5")),
        "transport_errors": by_status.get("error", 0), "error_samples": [e for c in errors for e in c][:5],
        "requests_per_s": round(n / wall, 1) if wall else None,
        "p50_ms": round(1000 * statistics.median(all_lat), 1) if n else None,
        "p99_ms": round(1000 * all_lat[min(n - 1, int(0.99 * n))], 1) if n else None,
        "max_ms": round(1000 * all_lat[-1], 1) if n else None,
        "idle": idle_stats,
    }


def metrics(url: str) -> dict[str, float]:
    """The server's connection and request counters from /metrics (totals over labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        if fam.name.startswith(("fine_infer_connection", "fine_infer_http_requests")):
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in ("status", "phase"))
                key = s.name + (f"{{{label}}}" if label else "")
                out[key] = out.get(key, 0) + s.value
    return out


class Server:
    """``fine-infer serve BUNDLE --index INDEX`` on a free loopback port, as a subprocess; SIGTERM on exit."""

    def __init__(self, bundle: str | Path, index: str | Path | None, extra: list[str] = ()) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "fine_infer.cli", "serve", str(bundle), "--port", str(self.port),
               "--log-level", "warning", *(["--index", str(index)] if index else []), *extra]
        self.log = tempfile.TemporaryFile()
        # its own process group: the CPU time of every process of the server (``--workers``) can be read by group
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        self.exit_status: int | None = None

    def wait_ready(self, timeout: float = 120.0) -> None:
        from fine_infer.serve import wait_ready

        wait_ready(self.url, timeout, died=lambda: None if self.proc.poll() is None else
                   f"exit {self.proc.returncode}: {self.stderr()}")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.exit_status = self.proc.returncode
        return self.exit_status

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.log.close()


def machine() -> dict[str, Any]:
    """``lscpu``'s model name and flags, the cores this process may use, the Python and fine-infer versions."""
    info: dict[str, Any] = {"cpus_usable": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["model_name"] = fields.get("Model name", "").strip()
        info["flags"] = fields.get("Flags", "").strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import fine_infer

        info["fine_infer"] = fine_infer.__version__
    except ImportError:
        pass
    return info


def tiny_bundle_and_index(folder: Path, items: int = 256) -> tuple[Path, Path]:
    """The tiny MAAF bundle (exported here) and an index of ``items`` random images embedded with it."""
    import fine_infer
    from fine_infer.export import export_arch
    from fine_infer.index import Index

    bundle = folder / "maaf"
    export_arch("maaf", bundle, "tiny", force=True)
    session = fine_infer.load(bundle)
    index = Index(session.manifest.embed_dim)
    for lo in range(0, items, 32):
        ids = list(range(lo, min(items, lo + 32)))
        index.add(session.embed_images([png(10_000 + i) for i in ids]), ids,
                  metadata=[{"path": f"gallery/{i}.png"} for i in ids])
    index.attrs.update(bundle=str(bundle.resolve()), bundle_identity=session.manifest.identity())
    index.save(folder / "gallery.fidx")
    return bundle, folder / "gallery.fidx"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", help="bundle to serve (default: the tiny MAAF bundle, exported to a temp folder)")
    p.add_argument("--index", help="index to serve (default: 256 random images embedded with the bundle)")
    p.add_argument("--clients", type=int, default=64, help="busy clients (default: %(default)s)")
    p.add_argument("--idle", type=int, default=500, help="idle connections held open (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the load runs (default: %(default)s)")
    p.add_argument("--serve-arg", action="append", default=[], help="an extra `fine-infer serve` argument")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 < args.clients <= 512 or not 0 <= args.idle <= 5000:
        p.error("bounded: --seconds in (0, 600], --clients in (0, 512], --idle in [0, 5000]")
    with tempfile.TemporaryDirectory() as tmp:
        bundle, index = args.bundle, args.index
        if bundle is None:
            bundle, made = tiny_bundle_and_index(Path(tmp))
            index = index or made
        images = [png(10_000 + i) for i in range(32)]
        with Server(bundle, index, args.serve_arg) as srv:
            srv.wait_ready()
            result = run_load(srv.url, clients=args.clients, idle=args.idle, seconds=args.seconds, images=images)
            result["server_metrics"] = metrics(srv.url)
            result["limits"] = __import__("httpx").get(srv.url + "/v1/info", timeout=10).json()["limits"]
            result["server_exit_status"] = srv.stop()
            log = srv.stderr().strip().splitlines()
            result["server_log_lines"] = len(log)
            result["server_log_tail"] = log[-5:]
    result["machine"] = machine()
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0 if result["server_errors_5xx"] == 0 and result["transport_errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
