"""How long fsbridge's one event loop was kept from running, and how much of that was the garbage collector.

Every card, ESL read and HTTP answer shares one gevent hub: anything that holds it for a few milliseconds
shows up as latency everywhere at once. These two histograms tell an admin whether a slow card came from
fsbridge itself (blocked hub, and whether the collector did it) or from the CRM's side.
"""

from __future__ import annotations

import gc
import time

import gevent
from prometheus_client import CollectorRegistry, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HubWatch:
    """A greenlet that sleeps `interval` at a time and records how late it woke up, plus a gc callback."""

    def __init__(self, registry: CollectorRegistry, interval: float = 0.01) -> None:
        self.interval = interval
        self.blocked = Histogram("fsbridge_hub_blocked_seconds",
                                 f"How late a {interval * 1e3:g} ms timer fired: time the event loop was busy",
                                 buckets=_BUCKETS, registry=registry)
        self.gc_pause = Histogram("fsbridge_gc_pause_seconds", "Garbage collector pauses by generation",
                                  ["generation"], buckets=_BUCKETS, registry=registry)
        self._gc_children = [self.gc_pause.labels(str(g)) for g in range(3)]
        self._gc_started = 0.0
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None

    def _run(self) -> None:
        interval, observe, clock = self.interval, self.blocked.observe, time.perf_counter
        while True:
            t = clock()
            gevent.sleep(interval)
            observe(max(0.0, clock() - t - interval))

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self._gc_children[min(int(info.get("generation", 0)), 2)].observe(
                time.perf_counter() - self._gc_started)
            self._gc_started = 0.0
