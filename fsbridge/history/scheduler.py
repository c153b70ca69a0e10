"""A fair share of history uploads across companies (tenants_dir): a bounded set of workers taking turns.

Every company keeps its own Uploader (its CRM client, its 40 requests/s budget and backoff, its strategy,
quarantine and bisecting, its log lines and metrics), but none runs a loop of its own: with a thousand
tenants that was a thousand loops racing first-come-first-served for the hub and the outbox file. Here:

- the companies with pending calls wait in a round-robin ring; a free worker takes the first one, which
  uploads ONE batch (`Uploader.take_turn`) and, if more is pending, goes to the back of the ring: a company
  with a backlog of thousands gets one batch per round, like the company with one call;
- a company has at most one turn in flight, so a slow CRM holds at most one worker;
- a company whose CRM failed as a whole (down, slow, 429, key refused) or whose integration is switched off
  leaves the ring: it is skipped, holding no worker, until its retry time (or until it is woken);
- companies whose last turn was slow or failed ("slow" ones) get at most half the workers between them, so
  that even when many CRMs answer in seconds the healthy companies keep workers of their own; when both
  kinds wait, they alternate;
- `immediate` companies come back to the ring within `linger` of a call's end (calls ending meanwhile
  share the batch) and every `poll_interval` anyway; `periodic` ones at their period's ticks. Whatever the
  strategy, a backlog found at registration goes at once.
All of it runs on the gevent hub: no locks, and nothing here yields between reading and changing state.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

import gevent
import gevent.event
import gevent.pool

from fsbridge.history.uploader import PERIODIC, Uploader

log = logging.getLogger("fsbridge.history")

IDLE, READY, TIMED, BUSY = "idle", "ready", "timed", "busy"


@dataclass(eq=False)
class _Turns:
    """A company's place in the scheduler."""

    uploader: Uploader
    state: str = IDLE
    slow: bool = False
    again: bool = False            # woken while its turn was in flight: look again after it
    timer: int = 0                 # the id of its live timer (older heap entries are stale)
    next_tick: float = 0.0         # periodic strategy: when its next upload is due
    turn: gevent.Greenlet | None = field(default=None, repr=False)


class FairScheduler:
    """`workers` upload turns at once at most, over every registered company, in round-robin order.

    slow_after: seconds a turn may take before its company counts as slow (see the module docstring)."""

    def __init__(self, workers: int, *, slow_after: float = 1.0, poll_interval: float = 30.0,
                 pending: Callable[[], Container[str]] | None = None) -> None:
        """`pending`: the names of the companies with pending calls in the outbox (None: ask each)."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.slow_cap = max(1, workers // 2)
        self.slow_after = slow_after
        self.poll_interval = poll_interval
        self.pending = pending
        self._pool = gevent.pool.Pool(workers)
        self._companies: dict[Uploader, _Turns] = {}
        self._ready: collections.deque[_Turns] = collections.deque()
        self._ready_slow: collections.deque[_Turns] = collections.deque()
        self._slow_busy = 0
        self._slow_next = False
        self._timers: list[tuple[float, int, _Turns]] = []
        self._ids = itertools.count(1)
        self._changed = gevent.event.Event()
        self._loop: gevent.Greenlet | None = None
        self._next_poll = 0.0
        self.turns = 0

    # -- companies -------------------------------------------------------------------------------

    def register(self, uploader: Uploader) -> None:
        """A company's uploader starts: whatever it has pending goes at once."""
        turns = self._companies.get(uploader)
        if turns is None:
            turns = self._companies[uploader] = _Turns(uploader)
        turns.next_tick = time.monotonic() + uploader.period
        self._make_ready(turns)

    def unregister(self, uploader: Uploader, timeout: float) -> None:
        """A company's uploader stops: no more turns; the one in flight gets `timeout` to finish."""
        turns = self._companies.pop(uploader, None)
        if turns is None:
            return
        self._drop(turns)
        turn = turns.turn
        if turn is not None and not turn.dead:
            turn.join(timeout)
            turn.kill(timeout=1.0)

    def wake(self, uploader: Uploader) -> None:
        """Calls of this company were written (immediate strategy) or its integration was switched back on."""
        turns = self._companies.get(uploader)
        if turns is None or uploader.strategy == PERIODIC:
            return
        if turns.state == BUSY:
            turns.again = True
        elif turns.state == IDLE:
            if uploader.linger > 0:
                self._at(turns, time.monotonic() + uploader.linger)
            else:
                self._make_ready(turns)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop is None or self._loop.dead:
            self._next_poll = time.monotonic() + self.poll_interval
            self._loop = gevent.spawn(self._run)

    def stop(self, timeout: float = 5.0) -> None:
        if self._loop is not None:
            self._loop.kill(timeout=1.0)
            self._loop = None
        self._pool.join(timeout=timeout)
        self._pool.kill(timeout=1.0)

    @property
    def alive(self) -> bool:
        return self._loop is not None and not self._loop.dead

    @property
    def in_flight(self) -> int:
        return len(self._pool)

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # A free worker first, then the pick: the ring's order is read at the last moment.
            self._pool.wait_available()
            self._changed.clear()
            self._fire_timers()
            turns = self._pick()
            if turns is None:
                self._changed.wait(timeout=self._idle_wait())
                continue
            turns.state = BUSY
            if turns.slow:
                self._slow_busy += 1
            turns.turn = self._pool.spawn(self._turn, turns, turns.slow)

    def _pick(self) -> _Turns | None:
        slow_ok = bool(self._ready_slow) and self._slow_busy < self.slow_cap
        if slow_ok and (not self._ready or self._slow_next):
            self._slow_next = False
            return self._ready_slow.popleft()
        if self._ready:
            self._slow_next = True
            return self._ready.popleft()
        return None

    def _idle_wait(self) -> float:
        wait = self._next_poll - time.monotonic()
        if self._timers:
            wait = min(wait, self._timers[0][0] - time.monotonic())
        return max(0.0, wait)

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, timer, turns = heapq.heappop(self._timers)
            if turns.timer == timer and turns.state == TIMED:
                self._make_ready(turns)
        if now >= self._next_poll:
            # As each uploader's own loop did: a company nobody woke is looked at again now and then.
            self._next_poll = now + self.poll_interval
            # Only the companies with something to send (one query for all): a thousand turns finding
            # nothing, all at once, held up cards for ~100 ms every poll.
            pending = self.pending() if self.pending is not None else None
            for turns in self._companies.values():
                if turns.state != IDLE:
                    continue
                if turns.uploader.strategy != PERIODIC:
                    if pending is None or turns.uploader.name in pending or turns.uploader.holds_unwritten:
                        self._make_ready(turns)
                else:
                    # Idle without a tick: switched to periodic by a reload while it was idle.
                    self._at(turns, self._tick_after(turns, now))

    def _turn(self, turns: _Turns, slow: bool) -> None:
        uploader = turns.uploader
        started = time.monotonic()
        try:
            again_at = uploader.take_turn()
        except Exception:
            # An outbox failure (disk full, a locked file) must not end the turns: what is not marked sent
            # stays pending, and the company is looked at again later.
            log.exception("call history upload turn of tenant %s failed; retrying in %.0f s",
                          uploader.name or "default", uploader.retry_max)
            again_at = time.monotonic() + uploader.retry_max
        finally:
            if slow:
                self._slow_busy -= 1
            turns.turn = None
        now = time.monotonic()
        turns.slow = now - started >= self.slow_after or (again_at is not None and again_at > now)
        if self._companies.get(uploader) is not turns:
            return   # unregistered meanwhile
        turns.state = IDLE
        if again_at is None:
            if turns.again:
                self._make_ready(turns)
            elif uploader.strategy == PERIODIC:
                self._at(turns, self._tick_after(turns, now))
        elif again_at <= now:
            self._make_ready(turns)
        else:
            self._at(turns, again_at)
        self.turns += 1
        self._changed.set()

    @staticmethod
    def _tick_after(turns: _Turns, now: float) -> float:
        period = turns.uploader.period
        if turns.next_tick <= now:
            turns.next_tick += period * (1 + int((now - turns.next_tick) // period))
        return turns.next_tick

    # -- states ----------------------------------------------------------------------------------

    def _make_ready(self, turns: _Turns) -> None:
        if turns.state in (READY, BUSY):
            return
        turns.state, turns.again = READY, False
        turns.timer = 0
        (self._ready_slow if turns.slow else self._ready).append(turns)
        self._changed.set()

    def _at(self, turns: _Turns, when: float) -> None:
        turns.state, turns.again = TIMED, False
        turns.timer = next(self._ids)
        heapq.heappush(self._timers, (when, turns.timer, turns))
        self._changed.set()

    def _drop(self, turns: _Turns) -> None:
        if turns.state == READY:
            ring = self._ready_slow if turns in self._ready_slow else self._ready
            ring.remove(turns)
        turns.state, turns.timer = IDLE, 0
