"""A company's running objects, built from its `Tenant`: nothing here is shared with another company.

Its own CRM client (and with it retailCRM's 40 requests/s budget of that account), its own card queue and
workers, its own history uploader claiming only its rows of the shared outbox, its own routing lookup and
manager statuses, its own click-to-call plan. A company whose CRM is down, slow or refusing its key
therefore delays nobody else's cards or history. Its history uploader takes turns with the other
companies' on the service's shared FairScheduler (history/scheduler.py) when there are tenant files.

A reload that changes a tenant's file but not its CRM account (`same_account`) builds the new Company
from the old one's CRM client, card queue, key state, activity, statuses and uploader: cards queued or in
flight stay in order and nothing restarts; only what the settings shape (routing lookup, click-to-call
plan, history entries, handlers) is built anew.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gevent

from fsbridge import history
from fsbridge.activity import Activity
from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.crm.card_sender import CardSender
from fsbridge.crm.client import RetailCRM
from fsbridge.esl.listener import EventListener
from fsbridge.health import CrmReachability
from fsbridge.history.outbox import Entry, Outbox, Quarantined
from fsbridge.history.scheduler import FairScheduler
from fsbridge.http.make_call import MakeCallHandler
from fsbridge.http.status import StatusHandler
from fsbridge.manager_status import ManagerStatus
from fsbridge.originate import ClickWatch, DialPlan, Originator
from fsbridge.record_links import RecordLinks
from fsbridge.routing import ManagerLookup
from fsbridge.tenants.settings import IMPLICIT, Tenant

log = logging.getLogger("fsbridge.tenants")


class TenantOutbox:
    """A company's share of the shared outbox: what its uploader adds, claims and waits for is its own."""

    def __init__(self, outbox: Outbox, tenant: str) -> None:
        self.outbox = outbox
        self.tenant = tenant

    def add(self, call: FinishedCall) -> bool:
        return self.outbox.add(call)

    def claim(self, limit: int) -> list[Entry]:
        return self.outbox.claim(limit, tenant=self.tenant)

    def oldest_pending(self) -> float | None:
        return self.outbox.oldest_pending(self.tenant)

    def pending_here(self) -> int:
        """This company's pending calls (the uploader's "waits on the CRM" / "drained" lines count these)."""
        return self.outbox.pending_of(self.tenant)

    def quarantined(self, limit: int | None = None) -> list[Quarantined]:
        """This company's calls its CRM refused (its account page lists and re-queues these)."""
        return self.outbox.quarantined(limit, tenant=self.tenant)

    def recent(self, limit: int) -> list[tuple[FinishedCall, int]]:
        """This company's newest calls (its account page)."""
        return self.outbox.recent(limit, tenant=self.tenant)

    def release(self, rows: Iterable[int]) -> None:
        self.outbox.release(rows)

    def close(self) -> None:
        """The file is the service's: it closes it once every company stopped."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.outbox, name)


class KeyState:
    """Whether retailCRM refuses this company's API key: said once when it starts, once when it ends."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.rejected_since: float | None = None
        self.rejections = 0

    def observe(self, status: int | None) -> None:
        if status in (401, 403):
            self.rejections += 1
            if self.rejected_since is None:
                self.rejected_since = time.time()
                log.error("tenant %s: retailCRM rejects the API key (HTTP %s); its cards are dropped and its "
                          "calls wait in the outbox until the key works again", self.label, status)
        elif status is not None and status < 500 and status != 429 and self.rejected_since is not None:
            log.warning("tenant %s: retailCRM accepts the API key again", self.label)
            self.rejected_since = None


def _account(cfg: Any) -> tuple[Any, ...]:
    """What the CRM client and the card queue are built from: equal, a reload keeps them."""
    c = cfg.crm
    return c.url, c.api_key, c.timeout, c.telephony_rate, c.card_workers, c.card_queue_size


def same_account(old: Tenant, new: Tenant) -> bool:
    return _account(old.cfg) == _account(new.cfg)


class Company:
    """One tenant, running. `observe_crm(company, method, path, status, seconds)` sees every CRM request.

    `scheduler`: the shared history scheduler (tenant files), None for the single company's own loop.
    `reuse`: the running company of the same tenant and CRM account that this one replaces (reload)."""

    def __init__(self, tenant: Tenant, *, outbox: Outbox, links: RecordLinks, listener: EventListener,
                 tracker: CallTracker, watch: ClickWatch,
                 observe_crm: Callable[[Company, str, str, int | None, float], None] | None = None,
                 crm: RetailCRM | None = None, scheduler: FairScheduler | None = None,
                 reuse: Company | None = None) -> None:
        self.tenant = tenant
        cfg = self.cfg = tenant.cfg
        c = cfg.crm
        self._observe_crm = observe_crm
        if reuse is not None:
            self._take_over(reuse, links)
        else:
            self.crm = crm or RetailCRM(c.url, c.api_key, timeout=c.timeout, telephony_rate=c.telephony_rate)
            self.reachability = CrmReachability()
            self.key = KeyState(tenant.label)
            self.cards = CardSender(self.crm, max_age=c.card_max_age, workers=c.card_workers,
                                    queue_size=c.card_queue_size)
            self.history = history.uploader(cfg, self.crm, TenantOutbox(outbox, tenant.name), links)
            if scheduler is not None:
                self.history.scheduler, self.history.name = scheduler, tenant.name
                # A turn holds a worker for one attempt, not for the client's retries of half a minute.
                self.history.request_window = min(self.history.request_window, 2 * c.timeout)
            self.activity = Activity(self.state_dir(cfg.storage.dir, tenant.name) / "activity.json",
                                     on_resume=self.history.wake)
            self.statuses = ManagerStatus(self.state_dir(cfg.storage.dir, tenant.name) / "manager_status.json")
            self.last_call_at: float | None = None
            self.calls = 0
        self.crm.observer = self._observe
        self.cards.paused = self.history.paused = lambda: not self.activity.delivering
        r = cfg.routing
        self.lookup = ManagerLookup(self.crm, cfg.manager_codes, self.statuses, timeout=r.timeout,
                                    cache_ttl=r.cache_ttl, negative_ttl=r.negative_ttl, cache_size=r.cache_size,
                                    ignore_status=r.ignore_status, breaker=r.breaker, breaker_max=r.breaker_max)
        self.click_to_call_off = ""
        self.originator = self._originator(listener, tracker, watch)
        self.status_handler = StatusHandler(cfg.integration.client_id, cfg.manager_codes, self.statuses)
        self.make_call_handler = MakeCallHandler(cfg.integration.client_id, cfg.managers, cfg.external_phones,
                                                 self.originator, off_reason=self.click_to_call_off)

    def _take_over(self, old: Company, links: RecordLinks) -> None:
        """The running parts of `old` (same tenant, same CRM account), under this company's settings."""
        cfg = self.cfg
        self.crm, self.reachability, self.key = old.crm, old.reachability, old.key
        self.key.label = self.tenant.label
        self.cards, self.activity, self.statuses = old.cards, old.activity, old.statuses
        self.cards.max_age = cfg.crm.card_max_age
        up = self.history = old.history
        # What the history settings shape: the entries (managers, time zone, unassigned code) and the strategy.
        up.builder = history.builder_from_config(cfg, links)
        up.strategy, up.period = cfg.history.strategy, cfg.history.period * 60.0
        self.last_call_at, self.calls = old.last_call_at, old.calls

    @property
    def name(self) -> str:
        return self.tenant.name

    @staticmethod
    def state_dir(storage: Path, name: str) -> Path:
        """The single company keeps its files where they always were; a tenant gets a directory of its own."""
        return storage if name == IMPLICIT else storage / "tenants" / name

    def _observe(self, method: str, path: str, status: int | None, seconds: float) -> None:
        self.reachability.observe(status)
        self.key.observe(status)
        if self._observe_crm is not None:
            self._observe_crm(self, method, path, status, seconds)

    def _originator(self, listener: EventListener, tracker: CallTracker, watch: ClickWatch) -> Originator | None:
        o, cfg = self.cfg.originate, self.cfg
        try:
            plan = DialPlan(manager_dial=o.manager_dial, customer_dial=o.customer_dial, gateway=o.gateway,
                            ring_timeout=o.ring_timeout, ringing_wait=o.ringing_wait,
                            dedupe_window=o.dedupe_window, record_dir=str(cfg.records.dir),
                            domain=self.tenant.domains[0] if self.tenant.domains else "")
        except ValueError as exc:
            where = f"tenant {self.tenant.label}: " if self.name else ""
            self.click_to_call_off = f"click-to-call is off: {where}originate.{exc}"
            log.warning("%s", self.click_to_call_off)
            return None
        return Originator(listener, tracker, plan, watch=watch, tenant=self.name)

    def finished(self, call: FinishedCall) -> None:
        self.calls += 1
        self.last_call_at = time.time()
        self.history.on_finished(call)

    def start(self) -> None:
        self.cards.start()
        self.history.start()

    def stop(self, timeout: float) -> None:
        """Cards get half of `timeout`, the history the rest; what is not sent stays in the outbox."""
        deadline = time.monotonic() + timeout
        self.stop_cards(timeout / 2)
        self.history.stop(max(0.5, deadline - time.monotonic()))
        self.crm.close()

    def stop_cards(self, timeout: float) -> int:
        """Deliver what is queued within `timeout`; the cards still queued then are dropped, counted and
        said (never lost silently). Returns how many."""
        try:
            self.cards.stop(timeout)
        except gevent.Timeout:
            log.warning("tenant %s: call-event workers did not stop in time", self.tenant.label)
        left = self.cards.pending
        if left:
            log.warning("tenant %s: %d card(s) still queued when its call-event workers stopped: dropped",
                        self.tenant.label, left)
        return left

    def dead_workers(self) -> list[str]:
        where = f" of tenant {self.tenant.label}" if self.name else ""
        dead = []
        if not self.history.alive:
            dead.append("history uploader" + where)
        if not self.cards.running:
            dead.append("call-event workers" + where)
        return dead

    def state(self) -> dict[str, Any]:
        """What `fsbridge tenants` and /healthz say about it."""
        reach = self.reachability
        if self.key.rejected_since is not None:
            crm = "API key rejected"
        elif reach.failing_since is not None:
            crm = f"not answering ({reach.last_problem})"
        else:
            crm = "answering" if reach.last_answer is not None else "no request yet"
        return {"crm": crm, "activity": self.activity.state.describe(),
                "cards_pending": self.cards.pending, "cards_sent": self.cards.sent,
                "cards_dropped": self.cards.dropped_stale + self.cards.dropped_full + self.cards.dropped_inactive,
                "last_call": self.last_call_at, "calls": self.calls}
