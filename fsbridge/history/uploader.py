"""Moves finished calls from the outbox to retailCRM's call history.

Two strategies, as the vendor's guide names them: `immediate` (a call is sent within a second of its
hangup, together with whatever finished meanwhile) and `periodic` (every N minutes, what accumulated).
Either way batches hold at most 50 calls, and a batch is marked sent only after the CRM confirmed it.

Failures split by what fixes them:
- the CRM is unreachable, overloaded (503/429/5xx, HTML pages, timeouts) or refuses us as a whole (wrong
  key, telephony disabled, wrong URL): nothing is wrong with the calls, so the batch is retried forever
  with a capped exponential backoff; the client's rate limiter keeps every attempt under 40 requests/s;
- the CRM refuses the data (a 4xx with its validation errors): only the calls at fault are quarantined
  with the CRM's words and the rest goes through. The error keys look like `calls[3][result]` in the
  fake, but the real format is unconfirmed, so a refusal that names no call is narrowed down by bisecting
  the batch until single calls are refused.

With tenants_dir, no company's uploader runs a loop of its own: the shared FairScheduler (scheduler.py)
asks each in turn for one batch (`take_turn`), and a CRM failure puts that company in backoff instead of
holding a worker while it waits.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from fsbridge.background import give_way
from fsbridge.calls.model import FinishedCall
from fsbridge.crm.backoff import backoff_delay
from fsbridge.crm.client import MAX_CALLS_PER_UPLOAD, RetailCRM
from fsbridge.crm.errors import CRMAuthError, CRMError, CRMRejected
from fsbridge.history.cdr import CdrBuilder
from fsbridge.history.outbox import Entry, Outbox, OutboxError

if TYPE_CHECKING:
    from fsbridge.history.scheduler import FairScheduler

log = logging.getLogger("fsbridge.history")

IMMEDIATE, PERIODIC = "immediate", "periodic"
STRATEGIES = (IMMEDIATE, PERIODIC)

# Statuses under which the CRM judged the calls themselves; anything else (3xx, 401/403, 404, 405 pages)
# says the request never reached validation: a configuration problem, not bad calls.
_DATA_STATUSES = frozenset({400, 422, 460})
# Refusals that arrive as 400 but concern the account, not the calls (docs, "Known messages").
_SYSTEMIC_MESSAGES = ("telephony not enabled", "api method not found", "account does not exist",
                      "access denied", "apikey", "parameter 'calls' is missing")
# `calls[3][result]` (the fake, Symfony-style) or `calls[3].result` / `calls.3.result`.
_ERROR_KEY = re.compile(r"^calls(?:\[(\d+)\]|\.(\d+))(.*)$")
_MAX_VALUE = 60


class _Stopping(Exception):
    """The uploader is stopping; the batch stays pending."""


class _Backoff(Exception):
    """Scheduled mode: the CRM failed as a whole; the batch stays pending until `until` (time.monotonic())."""

    def __init__(self, until: float) -> None:
        self.until = until


@dataclass(slots=True)
class _Item:
    entry: Entry
    cdr: dict[str, Any]


@dataclass
class UploaderStats:
    sent: int = 0                 # calls the CRM confirmed (stored or duplicate)
    duplicates: int = 0           # of those, already known to the CRM (a re-send after a crash)
    quarantined: int = 0
    requests: int = 0             # upload attempts, answered or not
    failures: int = 0             # attempts that failed as a whole (CRM unavailable or refusing us)
    unwritten: int = 0            # finished calls waiting in memory because the outbox refused a write


def attribute_errors(errors: Any, size: int) -> dict[int, list[tuple[str, str]]] | None:
    """{batch index: [(field, message)]} when every error names a call of the batch; else None."""
    if not isinstance(errors, dict) or not errors:
        return None
    found: dict[int, list[tuple[str, str]]] = {}
    for key, message in errors.items():
        match = _ERROR_KEY.match(str(key))
        if match is None:
            return None
        index = int(match[1] or match[2])
        if index >= size:
            return None
        field = match[3].strip("[].").replace("][", ".").replace("].[", ".")
        found.setdefault(index, []).append((field, " ".join(str(message).split())))
    return found


def _is_systemic(exc: CRMError) -> bool:
    if isinstance(exc, CRMAuthError) or not isinstance(exc, CRMRejected):
        return True
    if exc.status not in _DATA_STATUSES:
        return True
    text = exc.message.lower()
    return any(fragment in text for fragment in _SYSTEMIC_MESSAGES)


def _reason(exc: CRMRejected, fields: list[tuple[str, str]] | None, cdr: dict[str, Any]) -> str:
    if not fields:
        return exc.message
    parts = []
    for field, message in fields:
        value = cdr.get(field) if field else None
        shown = f" (sent {str(value)[:_MAX_VALUE]!r})" if value is not None else ""
        parts.append(f"{field}: {message}{shown}" if field else message)
    return f"retailCRM refused it (HTTP {exc.status}): " + "; ".join(parts)


class Uploader:
    """The loop between the outbox and the CRM. One per outbox; all methods run on the gevent hub.

    period, linger, poll_interval, retry_* and request_window are seconds.
    """

    def __init__(
        self,
        outbox: Outbox,
        crm: RetailCRM,
        builder: CdrBuilder,
        *,
        strategy: str = IMMEDIATE,
        period: float = 600.0,
        linger: float = 0.5,
        poll_interval: float = 30.0,
        batch_size: int = MAX_CALLS_PER_UPLOAD,
        concurrency: int = 4,
        retry_base: float = 0.5,
        retry_max: float = 60.0,
        request_window: float = 30.0,
        keep_sent: float | None = 30 * 86400.0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not 1 <= batch_size <= MAX_CALLS_PER_UPLOAD:
            raise ValueError(f"batch_size must be 1..{MAX_CALLS_PER_UPLOAD}, got {batch_size}")
        if concurrency < 1 or period <= 0 or retry_base <= 0 or retry_max < retry_base:
            raise ValueError("concurrency, period and retry delays must be positive")
        self.outbox = outbox
        self.crm = crm
        self.builder = builder
        self.strategy = strategy
        self.period = period
        self.linger = linger
        self.poll_interval = poll_interval
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.request_window = request_window
        self.keep_sent = keep_sent
        self.stats = UploaderStats()
        self._wake = gevent.event.Event()
        self._unwritten: list[FinishedCall] = []
        self._loop: gevent.Greenlet | None = None
        self._workers: set[gevent.Greenlet] = set()
        self._stopping = False
        # Seconds of failures before the log says the history waits on the CRM (once per episode).
        self.waiting_after = 10.0
        self._failing_since: float | None = None
        self._waiting_said = False
        self._last_failure = ""
        self._sent_at_wait = 0
        # While retailCRM has the module deactivated or frozen (activity.py): calls wait in the outbox.
        self.paused: Callable[[], bool] = lambda: False
        # With tenants_dir: the shared scheduler that gives this company its turns (no loop of its own) and the
        # name it knows it by. Failures in a row (the backoff's exponent), across turns when scheduled.
        self.scheduler: FairScheduler | None = None
        self.name = ""
        self._failures = 0

    # -- the ESL side ----------------------------------------------------------------------------

    def on_finished(self, call: FinishedCall) -> None:
        """`Bridge.on_finished`: runs on the ESL reading path, so it only writes and wakes.

        If the outbox refuses the write (disk full, locked for too long) the call is kept in memory and
        retried by the loop: the reader must not die, and dropping the call would lose it for sure.
        """
        try:
            self.outbox.add(call)
        except (sqlite3.Error, OutboxError) as exc:
            self._unwritten.append(call)
            self.stats.unwritten = len(self._unwritten)
            log.error("cannot write call %s to the outbox (%s); %d call(s) held in memory until it works",
                      call.call_id, exc, len(self._unwritten))
            self._wake.set()
            return
        if self.strategy == IMMEDIATE:
            self._wake.set()
            if self.scheduler is not None:
                self.scheduler.wake(self)

    def record(self, calls: Sequence[FinishedCall]) -> bool:
        """Store calls rebuilt from FreeSWITCH's CDRs, in one transaction: True once they are durably in the
        outbox. Unlike on_finished, a refused write is not held in memory: the CDR documents still have
        the calls, and are only marked accounted for when this returned True."""
        try:
            self.outbox.add_many(calls)
        except (sqlite3.Error, OutboxError) as exc:
            log.error("cannot write %d call(s) to the outbox (%s); retried from their CDRs", len(calls), exc)
            return False
        self._wake.set()
        return True

    def known(self, call_ids: list[str]) -> set[str]:
        """Which of these call ids are already in the history (outbox, or held in memory)."""
        held = {c.call_id for c in self._unwritten}
        return self.outbox.known(call_ids) | (held & set(call_ids))

    @property
    def holds_unwritten(self) -> bool:
        """Finished calls kept in memory because the outbox refused to store them."""
        return bool(self._unwritten)

    def wake(self) -> None:
        self._wake.set()
        if self.scheduler is not None:
            self.scheduler.wake(self)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        if self.scheduler is not None:
            self.scheduler.register(self)
            return
        self._loop = gevent.spawn(self._run)

    def stop(self, timeout: float = 5.0) -> None:
        """Let batches in flight finish for up to `timeout`, then abandon them (they stay pending)."""
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        if self.scheduler is not None:
            # Its turn in flight (if any) finishes within the timeout, or is abandoned: the rows stay pending.
            self.scheduler.unregister(self, timeout)
        while self._workers and time.monotonic() < deadline:
            gevent.sleep(0.02)
        gevent.killall(list(self._workers), timeout=1.0)
        if self._loop is not None:
            self._loop.kill(timeout=1.0)
            self._loop = None
        self._flush_unwritten()

    def close(self, timeout: float = 5.0) -> None:
        self.stop(timeout)
        self.outbox.close()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        # Whatever the strategy, a backlog left by the previous run goes out at once.
        self._drain_logged()
        next_tick = time.monotonic() + self.period
        while not self._stopping:
            if self.strategy == IMMEDIATE:
                woke = self._wake.wait(timeout=self.poll_interval)
                if woke and self.linger > 0 and not self._stopping:
                    # Coalesce: calls ending in the next moment share the request.
                    gevent.sleep(self.linger)
                self._wake.clear()
                self._drain_logged()
            else:
                self._wake.wait(timeout=max(0.0, next_tick - time.monotonic()))
                self._wake.clear()
                self._flush_unwritten()
                if time.monotonic() >= next_tick:
                    self._drain_logged()
                    now = time.monotonic()
                    while next_tick <= now:
                        next_tick += self.period

    def _drain_logged(self) -> None:
        try:
            self.drain()
        except Exception:
            # An outbox failure (disk full, a locked file) must not end the loop: what is not marked
            # sent stays pending, and the next round tries again.
            log.exception("call history upload round failed; retrying in %.0f s", self.retry_max)
            gevent.sleep(self.retry_max)

    def drain(self) -> int:
        """Send everything pending now, `concurrency` batches at a time; returns calls settled."""
        self._flush_unwritten()
        self._purge()
        if self.paused():
            return 0
        before = self.stats.sent + self.stats.quarantined
        workers = []
        for _ in range(self.concurrency):
            worker = gevent.spawn(self._work)
            # Workers leave the set themselves, so stop() still sees them if this drain is killed.
            self._workers.add(worker)
            worker.link(self._workers.discard)
            workers.append(worker)
        gevent.joinall(workers, raise_error=True)
        return self.stats.sent + self.stats.quarantined - before

    def _work(self) -> None:
        while not self._stopping:
            # Between the steps of preparing a batch, everything else that is ready goes first: events,
            # cards and the worker whose request slot is due do not wait for the whole batch.
            give_way()
            entries = self.outbox.claim(self.batch_size)
            if not entries:
                return
            try:
                self._deliver(entries)
            except _Stopping:
                return
            finally:
                # Settled rows are already out of the claim; this frees what a stop abandoned.
                self.outbox.release(e.row for e in entries)

    def take_turn(self) -> float | None:
        """Scheduled mode: one batch of this company's calls. None when nothing is pending (or it must wait:
        paused, stopping); else the time.monotonic() from which it may have its next turn (now when more
        is pending, later in backoff)."""
        self._flush_unwritten()
        self._purge()
        give_way()
        # After giving way, right before the claim: retailCRM may have switched the module off meanwhile.
        if self._stopping or self.paused():
            return None
        entries = self.outbox.claim(self.batch_size)
        if not entries:
            return None
        try:
            self._deliver(entries)
        except _Backoff as backoff:
            return backoff.until
        except _Stopping:
            return None
        finally:
            self.outbox.release(e.row for e in entries)
        return time.monotonic()

    def _flush_unwritten(self) -> None:
        while self._unwritten:
            try:
                self.outbox.add(self._unwritten[0])
            except (sqlite3.Error, OutboxError):
                return
            self._unwritten.pop(0)
            self.stats.unwritten = len(self._unwritten)

    def _purge(self) -> None:
        # Hourly, and once per outbox file, not per company: with tenants a thousand uploaders share it.
        if self.keep_sent is None or not self.outbox.purge_due(3600.0):
            return
        try:
            purged = self.outbox.purge_sent(self.keep_sent)
        except sqlite3.Error as exc:
            log.warning("could not purge delivered calls from the outbox: %s", exc)
            return
        if purged:
            log.info("purged %d call(s) delivered more than %.0f day(s) ago", purged, self.keep_sent / 86400)

    # -- one batch -------------------------------------------------------------------------------

    def _deliver(self, entries: Sequence[Entry]) -> None:
        items: list[_Item] = []
        for entry in entries:
            give_way()  # building is background work: cards and events go first
            try:
                items.append(_Item(entry, self.builder.build(entry.call)))
            except Exception as exc:  # a bug or a bad stored call must not block the others
                log.exception("cannot build the history entry of call %s", entry.call.call_id)
                self._quarantine([entry], f"fsbridge could not build the entry: {exc!r}")
        parts = [items] if items else []
        while parts:
            part = parts.pop()
            refusal = self._upload(part)
            if refusal is None:
                continue
            culprits = attribute_errors(refusal.errors, len(part))
            if culprits:
                for index, fields in culprits.items():
                    self._quarantine([part[index].entry], _reason(refusal, fields, part[index].cdr))
                rest = [item for index, item in enumerate(part) if index not in culprits]
                if rest:
                    parts.append(rest)
            elif len(part) == 1:
                self._quarantine([part[0].entry], _reason(refusal, None, part[0].cdr))
            else:
                # The refusal names no call: halve until it does, or until single calls are refused.
                middle = len(part) // 2
                parts.append(part[middle:])
                parts.append(part[:middle])

    def _upload(self, part: list[_Item]) -> CRMRejected | None:
        """Send until the CRM answers about the calls: None when it took them, else its refusal."""
        while True:
            if self._stopping:
                raise _Stopping()
            self.stats.requests += 1
            try:
                reply = self.crm.upload_calls([item.cdr for item in part],
                                              deadline=time.monotonic() + self.request_window)
            except CRMError as exc:
                if isinstance(exc, CRMRejected) and not _is_systemic(exc):
                    return exc
                self.stats.failures += 1
                self._failures += 1
                delay = backoff_delay(self.retry_base, self._failures, self.retry_max)
                # One line per problem and per episode, not per retry: an outage of hours stays readable.
                level = logging.ERROR if isinstance(exc, CRMRejected) else logging.WARNING
                message = str(exc)
                if message != self._last_failure:
                    log.log(level, "call history upload of %d call(s) failed, retrying with backoff: %s",
                            len(part), exc)
                    self._last_failure = message
                self._note_failure()
                if self.scheduler is not None:
                    # A turn never waits: the company is skipped until then, and the worker serves the others.
                    raise _Backoff(time.monotonic() + delay) from None
            else:
                self._failures = 0
                self._confirmed(part, reply)
                return None
            gevent.sleep(delay)

    def _note_failure(self) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if not self._waiting_said and now - self._failing_since >= self.waiting_after:
            self._waiting_said = True
            self._sent_at_wait = self.stats.sent
            log.warning("call history is waiting on the CRM (failing for %.0f s): %d call(s) wait in the outbox, "
                        "kept until it accepts them", now - self._failing_since, self.outbox.pending_here())

    def _note_success(self) -> None:
        self._failing_since = None
        self._last_failure = ""
        if self._waiting_said and self.outbox.pending_here() == 0:
            self._waiting_said = False
            log.info("call history drained: the CRM took the %d call(s) that waited for it",
                     self.stats.sent - self._sent_at_wait)

    def _confirmed(self, part: list[_Item], reply: dict[str, Any]) -> None:
        # Marked at once: a stop or a crash between the CRM's answer and the mark means a re-send.
        self.outbox.mark_sent([item.entry.row for item in part])
        duplicates = reply.get("duplicateCalls")
        duplicates = duplicates if isinstance(duplicates, list) else []
        self.stats.sent += len(part)
        self.stats.duplicates += len(duplicates)
        processed = reply.get("processedCallsCount")
        if isinstance(processed, int) and processed + len(duplicates) != len(part):
            log.warning("retailCRM confirmed %d of %d call(s) (%d duplicate); counted all as delivered",
                        processed, len(part), len(duplicates))
        self._note_success()

    def _quarantine(self, entries: Sequence[Entry], reason: str) -> None:
        self.outbox.quarantine([e.row for e in entries], reason)
        self.stats.quarantined += len(entries)
        for entry in entries:
            log.error("call %s quarantined (see `fsbridge outbox`): %s", entry.call.call_id, reason)

    # -- for health checks, metrics and the status page ---------------------------------------------

    @property
    def alive(self) -> bool:
        """The loop runs (started and not dead of an unexpected error)."""
        if self.scheduler is not None:
            return self.scheduler.alive
        return self._loop is not None and not self._loop.dead

    def oldest_pending_age(self) -> float | None:
        """Seconds the oldest undelivered call has waited (one indexed lookup: cheap to poll)."""
        oldest = self.outbox.oldest_pending()
        return None if oldest is None else max(0.0, time.time() - oldest)
