"""Prometheus metrics: what an admin graphs and alerts on after months of running unattended.

Counters are bumped where things happen (cheaply: label children are cached, so the ESL
reading path pays a dict lookup and an increment). Levels that already exist as state
(queue depths, calls tracked, the outbox's counts) are read at scrape time by a collector
instead of being mirrored here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fsbridge.background import give_way
from fsbridge.esl.protocol import digits

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_ENDPOINT_RE = re.compile(r"^/api(?:/v5)?/(?P<name>telephony/[a-z/]+|integration-modules|credentials)")


_HTTP_ROUTES = ("records", "retailcrm/make-call", "retailcrm/status", "routing/manager", "logo.svg", "metrics",
                "healthz")


def http_route(path: str) -> str:
    """A low-cardinality label for a request path: the route, never ids, signatures or scanner noise."""
    stripped = path.lstrip("/")
    return next((r for r in _HTTP_ROUTES if stripped == r or stripped.startswith(r + "/")), "other")


def crm_endpoint(path: str) -> str:
    """A low-cardinality name for a CRM path (module codes and ids left out)."""
    m = _ENDPOINT_RE.match(path)
    return m.group("name") if m else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("fsbridge_esl_events_total", "Events received from FreeSWITCH, by name",
                              ["event"], registry=r)
        self.ingest_lag = Histogram(
            "fsbridge_esl_ingest_lag_seconds", "From FreeSWITCH firing an event to fsbridge handling it",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.crm_requests = Counter("fsbridge_crm_requests_total", "Requests to retailCRM by endpoint and status",
                                    ["method", "endpoint", "status"], registry=r)
        self.crm_latency = Histogram("fsbridge_crm_request_seconds", "retailCRM request latency",
                                     ["method", "endpoint"], registry=r)
        self.http = Counter("fsbridge_http_responses_total", "HTTP answers by route and status",
                            ["route", "status"], registry=r)
        self.http_bytes = Counter("fsbridge_http_sent_bytes_total", "Bytes sent (head and body), by route",
                                  ["route"], registry=r)
        # The standard process and garbage-collector families (process_cpu_seconds_total,
        # process_resident_memory_bytes, process_open_fds, python_gc_*): what a months-long run is watched by.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.up_since = Gauge("fsbridge_start_time_seconds", "When this fsbridge process started", registry=r)
        self.up_since.set(time.time())
        self._event_children: dict[str, Any] = {}

    def on_event(self, name: str, fired_us: str | None) -> None:
        child = self._event_children.get(name)
        if child is None:
            child = self._event_children[name] = self.events.labels(name)
        child.inc()
        if fired_us and digits(fired_us):
            self.ingest_lag.observe(max(0.0, time.time() - int(fired_us) / 1e6))

    def on_crm_request(self, method: str, path: str, status: int | None, seconds: float) -> None:
        endpoint = crm_endpoint(path)
        self.crm_requests.labels(method, endpoint, str(status) if status else "no reply").inc()
        self.crm_latency.labels(method, endpoint).observe(seconds)

    def on_http(self, path: str, status: int, sent: int) -> None:
        route = http_route(path)
        self.http.labels(route, str(status)).inc()
        self.http_bytes.labels(route).inc(sent)

    def watch(self, name: str, doc: str, read: Callable[[], Iterable[tuple[dict[str, str], float]]], *,
              counter: bool = False) -> None:
        """A value kept elsewhere, read at scrape time: `read` yields (labels, value)."""
        self.registry.register(_Levels(name, doc, read, counter))

    def render(self) -> bytes:
        # Rendering everything at once took ~4 ms with 5 000 calls in progress, during which no event was
        # read and no card sent; other greenlets run between metric families instead, and within a large
        # family every RENDER_CHUNK samples (1 000 tenants' card outcomes, 4 000 samples, held the hub 81 ms).
        parts: list[bytes] = []
        for family in self.registry.collect():
            samples = family.samples
            for start in range(0, max(len(samples), 1), RENDER_CHUNK):
                family.samples = samples[start:start + RENDER_CHUNK]
                text = generate_latest(_One(family))  # type: ignore[arg-type]
                # One HELP/TYPE header per family: the later chunks are sample lines only.
                parts.append(text if start == 0 else text.split(b"\n", 2)[2])
                give_way()
            family.samples = samples
        return b"".join(parts)


# Samples formatted between two turns of the other greenlets (~20 us each).
RENDER_CHUNK = 100


class _One:
    def __init__(self, family: Any) -> None:
        self.family = family

    def collect(self) -> Iterator[Any]:
        yield self.family


class _Levels(Collector):
    def __init__(self, name: str, doc: str, read: Callable[[], Iterable[tuple[dict[str, str], float]]],
                 counter: bool) -> None:
        self.name, self.doc, self.read, self.counter = name, doc, read, counter

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        rows = list(self.read())
        labels = sorted({k for row, _ in rows for k in row})
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        family = kind(self.name, self.doc, labels=labels)
        for n, (row, value) in enumerate(rows, 1):
            family.add_metric([row.get(k, "") for k in labels], value)
            if n % RENDER_CHUNK == 0:
                give_way()
        yield family
