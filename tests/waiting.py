"""Waiting for something asynchronous to happen, with a bound and a useful failure."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import gevent

T = TypeVar("T")


def until(check: Callable[[], T], timeout: float = 5.0, what: str = "condition", every: float = 0.01) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        gevent.sleep(every)


def waited(check: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> float:
    """Seconds until `check` held: for "it happened within ..." assertions."""
    start = time.monotonic()
    until(check, timeout, what)
    return time.monotonic() - start
