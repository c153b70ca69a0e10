"""Delivers call events (pop-up cards) to retailCRM off the ESL reading path.

A card is only useful while the phone rings, so each one carries a deadline: what
cannot be delivered within `max_age` is dropped and counted, never shown minutes late.
Events of one call always go through the same worker, so a `hangup` never overtakes
its `in`.

When the CRM falls behind (the oldest waiting card has waited `BACKLOG_AFTER` seconds), a
worker takes the newest card first: the calls ringing now matter, and in first-come order
every card would reach the CRM at the end of its life. An older card of a call whose newer
card went first is dropped as stale (a `hangup` sent, the `in` of that call is no use).
When a worker's queue is full, its oldest card makes room.

Workers are started on demand: a lane's greenlet is spawned by the card that finds it idle and ends when
the lane is empty. A virtual PBX runs a CardSender per company, and a thousand companies' idle workers
(eight each, every one a suspended greenlet holding a copy of its stack) cost ~100 MB for nothing.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import zlib
from collections.abc import Callable

import gevent

from fsbridge.calls.model import CallEvent
from fsbridge.config import EXTENSION_RE
from fsbridge.crm.client import RetailCRM
from fsbridge.crm.errors import CRMError, CRMRejected, CRMUnavailable

log = logging.getLogger("fsbridge.cards")

# Seconds the oldest card of a worker may wait before the worker turns to the newest ones.
BACKLOG_AFTER = 2.0


class _Lane:
    """One worker's waiting cards: first come first served, newest first once backlogged."""

    __slots__ = ("items", "maxsize", "worker")

    def __init__(self, maxsize: int) -> None:
        self.items: collections.deque[tuple[int, CallEvent]] = collections.deque()
        self.maxsize = maxsize
        self.worker: gevent.Greenlet | None = None  # delivering this lane's cards; None while it is empty

    def qsize(self) -> int:
        return len(self.items)

    def put(self, seq: int, event: CallEvent) -> CallEvent | None:
        """Queue `event`; the oldest card it pushed out when the lane was full, else None."""
        pushed_out = self.items.popleft()[1] if len(self.items) >= self.maxsize else None
        self.items.append((seq, event))
        return pushed_out

    def get(self) -> tuple[int, CallEvent] | None:
        """The next card to deliver; None when the lane is empty."""
        items = self.items
        if not items:
            return None
        if time.monotonic() - items[0][1].created >= BACKLOG_AFTER:
            return items.pop()
        return items.popleft()


class CardSender:
    def __init__(self, crm: RetailCRM, *, max_age: float = 30.0, workers: int = 4,
                 queue_size: int = 10000) -> None:
        self.crm = crm
        self.max_age = max_age
        self.queues = [_Lane(queue_size) for _ in range(workers)]
        self._seq = itertools.count()
        # The newest card taken per call (sequence number, when): an older one taken later is superseded.
        # Kept max_age: by then every older card of that call is past its age limit anyway.
        self._taken: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self.sent = 0
        self.dropped_stale = 0
        self.dropped_full = 0
        # While retailCRM has the module deactivated or frozen (activity.py): cards are dropped, counted here.
        self.paused: Callable[[], bool] = lambda: False
        self.dropped_inactive = 0
        self.rejected = 0
        self.not_exist_codes: set[str] = set()
        self._last_stale_log = -1e9
        # How long a delivery usually takes (moving average): a card with less time left than twice that
        # would most likely reach the manager after its limit, and would spend a request of the CRM's
        # rate limit on it. 0 until measured.
        self._typical = 0.0
        self._started = False
        self._crashed = False  # a worker ended by an exception its loop does not catch
        # Cards taken from a lane and not yet answered: stop() waits for them too (a reload retiring a
        # company must not kill a card mid-request).
        self.in_flight = 0

    @property
    def running(self) -> bool:
        return self._started and not self._crashed

    @property
    def typical(self) -> float:
        """Seconds a delivery usually takes (moving average); 0 until measured."""
        return self._typical

    @property
    def pending(self) -> int:
        return sum(q.qsize() for q in self.queues)

    def submit(self, event: CallEvent) -> None:
        """Never blocks: the caller is the ESL reader."""
        if self.paused():
            self.dropped_inactive += 1
            return
        queue = self.queues[zlib.crc32(event.call_id.encode()) % len(self.queues)]
        if queue.put(next(self._seq), event) is not None:
            self.dropped_full += 1
            if self.dropped_full == 1 or self.dropped_full % 1000 == 0:
                log.error("call-event queue full (%d waiting): dropped the oldest, %d card(s) so far; the CRM "
                          "is not keeping up", queue.qsize(), self.dropped_full)
        if self._started:
            self._wake(queue)

    def _wake(self, queue: _Lane) -> None:
        if queue.worker is None and queue.items:
            queue.worker = gevent.spawn(self._work, queue)
            self._crashed = False  # the lane has a worker again: the sender works
            queue.worker.link_exception(self._worker_crashed)

    def _worker_crashed(self, worker: gevent.Greenlet) -> None:
        self._crashed = True
        log.error("a call-event worker ended: %r", worker.exception)

    def start(self) -> None:
        self._started = True
        for queue in self.queues:  # cards submitted before the start
            self._wake(queue)

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while (self.pending or self.in_flight) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self._started = False
        gevent.killall([q.worker for q in self.queues if q.worker is not None], timeout=1.0)

    def _work(self, queue: _Lane) -> None:
        try:
            self._drain(queue)
        finally:
            queue.worker = None

    def _drain(self, queue: _Lane) -> None:
        taken = self._taken
        while True:
            item = queue.get()
            if item is None:
                return   # the next card starts a new worker
            seq, event = item
            newest = taken.get(event.call_id)
            if newest is not None and newest[0] > seq:
                self._stale(event, "a newer event of the same call went first")
                continue
            now = time.monotonic()
            taken[event.call_id] = (seq, now)
            taken.move_to_end(event.call_id)
            while next(iter(taken.values()))[1] < now - self.max_age:
                taken.popitem(last=False)
            self.in_flight += 1
            try:
                self.deliver(event)
            except Exception:  # a bug or an odd reply must not end this worker: its lane would stall
                self.rejected += 1
                log.exception("call event %s of call %s could not be delivered", event.type, event.call_id)
            finally:
                self.in_flight -= 1

    def deliver(self, event: CallEvent) -> None:
        deadline = event.created + self.max_age
        started = time.monotonic()
        if started >= deadline:
            self._stale(event, "it waited too long in the queue")
            return
        if deadline - started < 2 * self._typical:
            self._stale(event, "too little time left for a request")
            return
        try:
            reply = self.crm.send_call_event(event.to_crm(), deadline=deadline)
        except CRMUnavailable as exc:
            self._stale(event, str(exc))
            return
        except CRMRejected as exc:
            self.rejected += 1
            log.error("retailCRM rejected the %s event of call %s: %s", event.type, event.call_id, exc)
            return
        except CRMError as exc:
            self.rejected += 1
            log.error("call event %s of call %s failed: %s", event.type, event.call_id, exc)
            return
        self.sent += 1
        # Capped: a delivery slowed by retries must not make every later card look hopeless (with the cap,
        # a card fresh from the queue always has more than twice the typical time left).
        took = min(time.monotonic() - started, self.max_age / 4)
        self._typical = took if not self._typical else self._typical + 0.1 * (took - self._typical)
        codes = reply.get("notExistCodes")
        # The CRM's own words: only extension-shaped strings are kept (they reach the log).
        missing = {c for c in codes if isinstance(c, str) and EXTENSION_RE.fullmatch(c)} if isinstance(
            codes, list) else set()
        missing -= self.not_exist_codes
        if missing:
            # Said once per code: a manager extension the CRM does not know never shows a card.
            self.not_exist_codes |= missing
            log.warning("retailCRM knows no user with extension code(s) %s: run `fsbridge register`",
                        ", ".join(sorted(missing)))

    def _stale(self, event: CallEvent, why: str) -> None:
        self.dropped_stale += 1
        # One line per 10 s at most: during a CRM outage every card goes stale, and a line each
        # would flood the log (and cost CPU) exactly when the admin needs it readable.
        now = time.monotonic()
        if now - self._last_stale_log >= 10.0:
            log.warning("dropped the %s card of call %s after %.0f s (%s); %d card(s) dropped so far",
                        event.type, event.call_id, self.max_age, why, self.dropped_stale)
            self._last_stale_log = now
