"""How late the gevent hub wakes a sleeping greenlet: what a reader of events (or of cards) would feel.

Shared by the benchmarks and the fake CRM process they start; imports nothing of its own."""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent


def watch(samples: list[float], stopped: Callable[[], bool], step: float = 0.005) -> None:
    """Append to `samples`, until `stopped()`, how much later than `step` seconds each sleep of it ended."""
    while not stopped():
        t = time.perf_counter()
        gevent.sleep(step)
        samples.append(time.perf_counter() - t - step)
