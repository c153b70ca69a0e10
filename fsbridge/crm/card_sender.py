"""Delivers call events (pop-up cards) to retailCRM off the ESL reading path.

A card is only useful while the phone rings, so each one carries a deadline: what
cannot be delivered within `max_age` is dropped and counted, never shown minutes late.
Events of one call always go through the same worker, so a `hangup` never overtakes
its `in`.
"""

from __future__ import annotations

import logging
import time
import zlib

import gevent
import gevent.queue

from fsbridge.calls.model import CallEvent
from fsbridge.crm.client import RetailCRM
from fsbridge.crm.errors import CRMError, CRMRejected, CRMUnavailable

log = logging.getLogger("fsbridge.cards")


class CardSender:
    def __init__(self, crm: RetailCRM, *, max_age: float = 30.0, workers: int = 4,
                 queue_size: int = 10000) -> None:
        self.crm = crm
        self.max_age = max_age
        self.queues = [gevent.queue.Queue(maxsize=queue_size) for _ in range(workers)]
        self.sent = 0
        self.dropped_stale = 0
        self.dropped_full = 0
        self.rejected = 0
        self.not_exist_codes: set[str] = set()
        self._last_stale_log = -1e9
        self._greenlets: list[gevent.Greenlet] = []

    @property
    def running(self) -> bool:
        return bool(self._greenlets) and not any(g.dead for g in self._greenlets)

    @property
    def pending(self) -> int:
        return sum(q.qsize() for q in self.queues)

    def submit(self, event: CallEvent) -> None:
        """Never blocks: the caller is the ESL reader."""
        queue = self.queues[zlib.crc32(event.call_id.encode()) % len(self.queues)]
        try:
            queue.put_nowait(event)
        except gevent.queue.Full:
            self.dropped_full += 1
            if self.dropped_full == 1 or self.dropped_full % 1000 == 0:
                log.error("call-event queue full (%d waiting): dropped %d card(s) so far; the CRM is not "
                          "keeping up", queue.qsize(), self.dropped_full)

    def start(self) -> None:
        self._greenlets = [gevent.spawn(self._work, q) for q in self.queues]

    def stop(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            gevent.sleep(0.05)
        gevent.killall(self._greenlets, timeout=1.0)

    def _work(self, queue: gevent.queue.Queue) -> None:
        while True:
            event = queue.get()
            self.deliver(event)

    def deliver(self, event: CallEvent) -> None:
        deadline = event.created + self.max_age
        if time.monotonic() >= deadline:
            self._stale(event, "it waited too long in the queue")
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
        missing = set(reply.get("notExistCodes") or []) - self.not_exist_codes
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
