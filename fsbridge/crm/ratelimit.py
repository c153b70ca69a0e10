"""Client-side pacing so that retailCRM never has to answer 503 for our own rate.

retailCRM's limiter is undocumented (sliding window, fixed window or nginx-style leaky
bucket are all plausible), so the limiter here admits no burst at all: request starts are
spaced at least 1/rate apart. That schedule satisfies every one of those algorithms, and
it costs almost nothing because the spacing (25 ms for telephony) is shorter than a
round trip.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import gevent


class RateLimiter:
    """Lets one caller through at a time, at least `1/rate` seconds after the previous one.

    A token bucket holding at most one token. The spacing is measured from the moment the
    previous caller actually went through, not from when it was scheduled: if the process
    stalls (a busy CPU, a GC pause) and a caller wakes late, the next one moves back with
    it. Pre-booked time slots would instead let the overdue callers go out back to back,
    and the server, which counts arrivals, would see a burst.
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
        self._last = float("-inf")  # when the previous caller went through
        # Held while waiting for the slot, so callers queue on it in arrival order; under
        # monkey-patching this is gevent's cooperative lock.
        self._lock = threading.Lock()

    def acquire(self, deadline: float | None = None) -> bool:
        """Wait for the next slot; False when it would come after `deadline` (a clock() value).

        A refused caller consumes nothing, so the callers behind it are not delayed.
        """
        if deadline is None:
            self._lock.acquire()
        elif not self._lock.acquire(timeout=max(0.0, deadline - self._clock())):
            return False
        try:
            now = self._clock()
            start = max(now, self._last + self.interval)
            if deadline is not None and start > deadline:
                return False
            if start > now:
                self._sleep(start - now)
            self._last = self._clock()
            return True
        finally:
            self._lock.release()
