"""Client-side pacing so that retailCRM never has to answer 503 for our own rate.

retailCRM's limiter is undocumented (sliding window, fixed window or nginx-style leaky
bucket are all plausible). With `burst=1` (the default) the limiter here admits no burst at
all: request starts are spaced at least 1/rate apart, a schedule that satisfies every one of
those algorithms. With `burst=b`, up to b requests may start back to back, and never more
than `rate` start within any one second and one slot (a sliding window on top of the token
bucket): what a per-second count, sliding or fixed, allows. Call events use a small burst: spaced strictly,
a company calling at a steady 24 cards/s (60 % of its budget) kept a card waiting for its
slot up to ~100 ms at the 99th percentile, however idle the CRM was; with a few slots of
slack a card waits only when the company really goes over its rate. Against an nginx limit
without burst, the extra requests get 503 and are retried after 25 ms, as any 503.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable

import gevent

# A wait shorter than this is none: the clock's rounding must not make a caller sleep forever for 1e-16 s.
_NOW = 1e-9


class RateLimiter:
    """Lets one caller through at a time: a token bucket of `burst` tokens refilled at `rate`
    per second, and no more than `rate` starts in any one second.

    The bucket is measured from the moments callers actually went through, not from when
    they were scheduled: if the process stalls (a busy CPU, a GC pause) and callers wake
    late, the time lost earns at most `burst` tokens. Pre-booked time slots would instead let
    the overdue callers go out back to back, and the server, which counts arrivals, would
    see a burst.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = gevent.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = rate
        self.interval = 1.0 / rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._refilled = float("-inf")  # when the tokens were last counted
        # The starts of the last second, when a burst could otherwise put more than `rate` in one.
        self._window: collections.deque[float] | None = (
            collections.deque(maxlen=max(1, math.floor(rate))) if burst > 1 else None)
        # Held while waiting for the slot, so callers queue on it in arrival order; under
        # monkey-patching this is gevent's cooperative lock.
        self._lock = threading.Lock()

    def _tokens_at(self, now: float) -> float:
        return min(float(self.burst), self._tokens + (now - self._refilled) * self.rate)

    def _wait(self, now: float) -> float:
        """Seconds until a caller may start, as of `now`."""
        tokens = self._tokens_at(now)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) * self.interval
        window = self._window
        if window is not None and len(window) == window.maxlen:
            # One slot more than a second: arrival gaps shrink by the network's and the scheduler's
            # jitter, and the server counts arrivals (a flood then runs at rate x 0.97).
            wait = max(wait, window[0] + 1.0 + self.interval - now)
        return wait

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
            wait = self._wait(now)
            if deadline is not None and now + wait > deadline:
                return False
            while wait > _NOW:
                # Again after the sleep: a timer may fire a little early (gevent counts from its loop's
                # cached time), and a start before the window's second is over is one too many.
                self._sleep(wait)
                now = self._clock()
                wait = self._wait(now)
            self._tokens = max(self._tokens_at(now) - 1.0, 0.0)
            self._refilled = now
            if self._window is not None:
                self._window.append(now)
            return True
        finally:
            self._lock.release()
