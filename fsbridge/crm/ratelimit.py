"""Client-side pacing so that retailCRM never has to answer 503 for our own rate.

retailCRM's limiter is undocumented (sliding window, fixed window or nginx-style leaky
bucket are all plausible), so the limiter here admits no burst at all: request starts are
spaced exactly 1/rate apart. That schedule satisfies every one of those algorithms, and
it costs almost nothing because the spacing (25 ms for telephony) is shorter than a
round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import gevent


class RateLimiter:
    """Hands out start times at least `1/rate` seconds apart, first come first served.

    A token bucket holding at most one token (equivalently GCRA with no burst tolerance).
    Each caller books the next free slot and sleeps until it, so greenlets never spin and
    the order of arrival is the order of admission.
    """

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = gevent.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        self.rate = rate
        self.interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._next_free = float("-inf")
        # Nothing yields while the lock is held, so under gevent it is never contended; it
        # only matters if the client is shared between real OS threads.
        self._lock = threading.Lock()

    def reserve(self, deadline: float | None = None) -> float | None:
        """Book the next slot and return how long to wait for it.

        Returns None, booking nothing, when that slot starts after `deadline` (a
        clock() value): the caller would only waste a slot others could use.
        """
        with self._lock:
            now = self._clock()
            start = max(now, self._next_free)
            if deadline is not None and start > deadline:
                return None
            self._next_free = start + self.interval
            return start - now

    def acquire(self, deadline: float | None = None) -> bool:
        """Wait for a slot; False (without waiting) when none is free before `deadline`."""
        wait = self.reserve(deadline)
        if wait is None:
            return False
        if wait > 0:
            self._sleep(wait)
        return True
