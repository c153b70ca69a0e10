"""Retry delays towards the CRM: capped exponential backoff with jitter, for the client and the uploader."""

from __future__ import annotations

import random


def backoff_delay(base: float, failures: int, cap: float) -> float:
    """Seconds to wait after the `failures`-th failure in a row.

    The ceiling doubles from `base` up to `cap`; the delay is half the ceiling plus a random part of the
    other half, so greenlets that failed together (every worker during an outage) do not retry together.
    """
    ceiling = backoff_ceiling(base, failures, cap)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def backoff_ceiling(base: float, failures: int, cap: float) -> float:
    """`base` after the first failure in a row, doubling with each further one, never above `cap`."""
    return min(cap, base * 2.0 ** min(max(failures, 1) - 1, 60))
