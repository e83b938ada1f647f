"""Prometheus metrics of the server, in a registry of its own (several apps in one process never clash).

- ``fine_infer_http_requests_total{route,method,status}`` and ``fine_infer_http_request_duration_seconds{route}``
- ``fine_infer_http_requests_in_flight``; a request whose client went away is counted with ``status="disconnected"``
- ``fine_infer_connections_open``, ``fine_infer_connections_refused_total`` (over ``max_connections``) and
  ``fine_infer_connection_timeouts_total{phase}`` (:mod:`fine_infer.serve.connections`)
- ``fine_infer_batch_size{graph}`` (rows per model run), ``fine_infer_batch_requests{graph}`` (requests merged),
  ``fine_infer_batch_duration_seconds{graph}`` (model time per batch)
- ``fine_infer_queue_depth{graph}``, ``fine_infer_max_batch_size{graph}`` and ``fine_infer_lanes{graph}`` (batches in
  the model at once), read from the batcher at scrape time
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _BatcherCollector:
    """Queue depth and batch size per graph, read when scraped (no bookkeeping on the hot path)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """The gauges, read now."""
        depth = GaugeMetricFamily("fine_infer_queue_depth", "Requests waiting for a batch, per graph", labels=["graph"])
        size = GaugeMetricFamily("fine_infer_max_batch_size", "Batch size in force, per graph", labels=["graph"])
        lanes = GaugeMetricFamily("fine_infer_lanes", "Batches in the model at once, per graph", labels=["graph"])
        batcher = getattr(self.state, "batcher", None)
        if batcher is not None:
            for g in self.state.session.manifest.graphs:
                depth.add_metric([g], batcher.queue_depth(g))
                n = batcher.max_batch_size(g)
                if n is not None:
                    size.add_metric([g], n)
                lanes.add_metric([g], batcher.lanes(g))
        yield depth
        yield size
        yield lanes


class Metrics:
    """The server's metrics; :meth:`render` gives the Prometheus text exposition."""

    def __init__(self, state: Any | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fine_infer_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("fine_infer_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("fine_infer_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.connections_open = Gauge("fine_infer_connections_open", "Open client connections", registry=r)
        self.connections_refused = Counter("fine_infer_connections_refused", "Connections refused (503) over "
                                           "max_connections", registry=r)
        self.connection_timeouts = Counter("fine_infer_connection_timeouts", "Connections closed by a timeout: "
                                           "idle (nothing sent), headers (408), headers_too_large (431), body",
                                           ["phase"], registry=r)
        self.batch_rows = Histogram("fine_infer_batch_size", "Rows per model run", ["graph"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("fine_infer_batch_requests", "Requests merged into one model run", ["graph"],
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("fine_infer_batch_duration_seconds", "Model time per batch", ["graph"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        if state is not None:
            r.register(_BatcherCollector(state))
        self._children: dict[tuple, Any] = {}  # labelled children cached: .labels() is the costly part

    def observe_request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """Count one HTTP request and its latency."""
        key = (route, method, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (self.requests.labels(route, method, str(status)), self.latency.labels(route))
        child[0].inc()
        child[1].observe(seconds)

    def observe_batch(self, graph: str, rows: int, requests: int, seconds: float) -> None:
        """Record one model run of the batcher (its ``on_batch`` callback)."""
        self.batch_rows.labels(graph).observe(rows)
        self.batch_requests.labels(graph).observe(requests)
        self.batch_seconds.labels(graph).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
