"""The running companies: found by name (a call's tenant), by clientId (retailCRM's callbacks) and by
domain (the dialplan's routing lookup); rebuilt from the tenant files on `fsbridge reload` / SIGHUP.

clientId lookup: each company is filed under an HMAC-SHA256 of its clientId with a key drawn at start, and
the presented clientId is hashed the same way: one dict lookup, then one constant-time comparison with the
secret of the company found. Nothing compares the presented value with every tenant's secret, so response
times say nothing about anybody's secret (the dict sees only digests an attacker cannot steer).

Reload, per tenant file:
- unchanged: the company runs on untouched;
- changed, same CRM account (company.same_account): a new Company built on the running one's CRM client,
  card queue, key state and uploader (no card queued or in flight changes hands, so none is lost or
  overtaken), with the new managers, DIDs, routing, click-to-call and history settings;
- changed to another CRM account, or removed: the calls in progress of that tenant stay "pinned" to the
  old company, whose card queue delivers their remaining cards (in order, to the account they started
  on); the old company stops once they have all finished, and then its queue drains for up to the card
  age limit (what is still queued after that is dropped, counted and said). The history of every call
  goes through the tenant's current company (its rows in the outbox are the tenant's), or, for a
  removed tenant, stays in the outbox (`fsbridge outbox`) until the tenant comes back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Iterator

import gevent

from fsbridge import history, logs
from fsbridge.activity import DEFAULT_PATH as ACTIVITY_PATH
from fsbridge.activity import MAX_BODY as ACTIVITY_MAX_BODY
from fsbridge.activity import ActivityHandler
from fsbridge.calls.legs import Directory
from fsbridge.calls.model import CallEvent, FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.config import Config
from fsbridge.crm.client import RetailCRM
from fsbridge.esl.listener import EventListener
from fsbridge.history.outbox import Outbox
from fsbridge.http.app import Request, Response, Router, same_secret
from fsbridge.http.lookup import RoutingHandler
from fsbridge.http.make_call import DEFAULT_PATH as MAKE_CALL_PATH
from fsbridge.http.status import DEFAULT_PATH as STATUS_PATH
from fsbridge.originate import ClickWatch
from fsbridge.record_links import RecordLinks
from fsbridge.recordings import Recordings
from fsbridge.routing import ManagerLookup
from fsbridge.tenants.attribution import Attribution
from fsbridge.tenants.company import Company, same_account
from fsbridge.tenants.settings import IMPLICIT, Tenant, load_all

log = logging.getLogger("fsbridge.tenants")


class Companies:
    def __init__(self, cfg: Config, *, outbox: Outbox, links: RecordLinks,
                 observe_crm: Callable[[Company, str, str, int | None, float], None] | None = None) -> None:
        self.cfg = cfg
        self.outbox = outbox
        self.links = links
        self.observe_crm = observe_crm
        self.watch = ClickWatch()
        loaded = load_all(cfg)
        for problem in loaded.errors.values():
            # At start-up a broken file stops nothing but its own tenant.
            log.error("tenant refused: %s", problem)
        self.errors = dict(loaded.errors)
        self.tenants: dict[str, Tenant] = loaded.tenants
        self.by_name: dict[str, Company] = {}
        self._key = os.urandom(32)
        self._by_client: dict[bytes, Company] = {}
        self._by_domain: dict[str, Company] = {}
        self.directory: Directory | Attribution = self._directory()
        self._listener: EventListener | None = None
        self._tracker: CallTracker | None = None
        self.started = False
        # With tenant files, every company's history takes turns on one shared scheduler.
        self.scheduler = None if self.single else history.FairScheduler(
            cfg.history.upload_workers, pending=outbox.pending_by_tenant)
        # Calls in progress whose tenant was changed to another CRM account or removed: call id -> the
        # retired company that still takes their cards (see the module docstring).
        self._pinned: dict[str, Company] = {}
        self._retiring: set[Company] = set()
        self._retirer: gevent.Greenlet | None = None
        self.cards_dropped_retired = 0

    @property
    def single(self) -> bool:
        """The single-company setup (no tenants_dir): one implicit tenant, every domain its."""
        return self.cfg.tenants_dir is None

    def _directory(self) -> Directory | Attribution:
        if self.single:
            return Directory.from_config(self.cfg)
        return Attribution(self.tenants.values(), self.cfg.trunks)

    def build(self, listener: EventListener, tracker: CallTracker, crm: RetailCRM | None = None) -> None:
        """Create every company (not started). `crm`: the single company's client (tests)."""
        self._listener, self._tracker = listener, tracker
        for tenant in self.tenants.values():
            self.by_name[tenant.name] = self._company(tenant, crm if tenant.name == IMPLICIT else None)
        self._index()

    def _company(self, tenant: Tenant, crm: RetailCRM | None = None, reuse: Company | None = None) -> Company:
        assert self._listener is not None and self._tracker is not None
        return Company(tenant, outbox=self.outbox, links=self.links, listener=self._listener,
                       tracker=self._tracker, watch=self.watch, observe_crm=self.observe_crm, crm=crm,
                       scheduler=self.scheduler, reuse=reuse)

    def _index(self) -> None:
        self._by_client = {self._digest(c.cfg.integration.client_id): c for c in self.by_name.values()}
        self._by_domain = {d: c for c in self.by_name.values() for d in c.tenant.domains}

    def _digest(self, client_id: str) -> bytes:
        return hmac.new(self._key, client_id.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def __iter__(self) -> Iterator[Company]:
        return iter(list(self.by_name.values()))

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, tenant: str | None) -> Company | None:
        return None if tenant is None else self.by_name.get(tenant)

    def by_client_id(self, given: str) -> Company | None:
        company = self._by_client.get(self._digest(given)) if given else None
        if company is None or not same_secret(given, company.cfg.integration.client_id):
            return None
        return company

    def for_domain(self, domain: str | None) -> Company | None:
        if self.single:
            return self.by_name.get(IMPLICIT)
        return self._by_domain.get((domain or "").strip().lower().rstrip("."))

    def recording_subdir(self, path: str | None, tenant: str | None, recordings: Recordings) -> str | None:
        """Where a call's recording is under records.dir: "" for the directory itself (also for a path that
        is not under it: only the allow-listed uuid is used then, as always), the directory its RECORD_STOP
        path names (FusionPBX: <domain>/archive/<YYYY>/<Mon>/<DD>), or None when that directory belongs to
        another tenant's domain: a link then resolves to no file at all."""
        subdir = recordings.subdir_of(path)
        if not subdir:
            return ""
        if self.single:
            return subdir
        company = self.get(tenant)
        return subdir if company is not None and subdir.split("/", 1)[0] in company.tenant.domains else None

    # -- the ESL reading path: enqueue only --

    def card(self, event: CallEvent) -> None:
        company = self._pinned.get(event.call_id) if self._pinned else None
        if company is None:
            company = self.by_name.get(event.tenant)
        if company is not None:
            company.cards.submit(event)

    def finished(self, call: FinishedCall) -> None:
        if self._pinned:
            self._pinned.pop(call.call_id, None)
        company = self.by_name.get(call.tenant)
        if company is not None:
            company.finished(call)
            return
        # Its tenant was removed while the call went on: the call is kept (`fsbridge outbox` shows it) and
        # goes out if the tenant comes back.
        try:
            self.outbox.add(call)
        except Exception as exc:
            log.error("cannot keep call %s of removed tenant %s in the outbox: %s", call.call_id, call.tenant, exc)
        else:
            log.warning("call %s belongs to tenant %s, which is no longer configured: kept in the outbox",
                        call.call_id, call.tenant)

    # -- lifecycle --

    def start(self) -> None:
        if self.scheduler is not None:
            self.scheduler.start()
        for company in self:
            company.start()
        self.started = True

    def stop(self, timeout: float) -> None:
        if self._retirer is not None:
            self._retirer.kill()
        companies = list(self) + list(self._retiring)
        self._retiring.clear()
        self._pinned.clear()
        if companies:
            # Together, not one after the other: a thousand tenants share the same few seconds.
            gevent.joinall([gevent.spawn(c.stop, timeout) for c in companies], timeout=timeout + 2.0)
        if self.scheduler is not None:
            self.scheduler.stop(1.0)

    def reload(self) -> dict[str, str]:
        """Apply added, changed and removed tenant files; returns the refusals (tenant -> one line).

        Nothing yields between reading the files and the swap, so no event is handled half under the old
        and half under the new set. A call in progress keeps the directory it was attributed with (the
        managers and DIDs it started with); its cards and history go to its tenant's current company."""
        if self.single:
            return {}
        loaded = load_all(self.cfg, keep=self.tenants)
        for name, problem in loaded.errors.items():
            if self.errors.get(name) != problem:
                log.error("tenant %s: %s%s", name, problem,
                          "; it keeps its last good settings" if name in loaded.tenants else "")
        retired: list[Company] = []
        by_name: dict[str, Company] = {}
        for name, tenant in loaded.tenants.items():
            current = self.by_name.get(name)
            if current is not None and current.tenant is tenant:
                by_name[name] = current
                continue
            logs.add_secrets((tenant.cfg.crm.api_key, tenant.cfg.integration.client_id))
            if current is not None and same_account(current.tenant, tenant):
                # Same CRM account: the running parts carry on under the new settings (nothing to start).
                by_name[name] = self._company(tenant, reuse=current)
                log.info("tenant %s changed", tenant.label)
                continue
            company = self._company(tenant)
            if self.started:
                company.start()
            by_name[name] = company
            if current is not None:
                retired.append(current)
            log.info("tenant %s %s", tenant.label, "changed (new CRM account)" if current is not None else "added")
        for name, company in self.by_name.items():
            if name not in by_name:
                retired.append(company)
                log.info("tenant %s removed; its calls still in the outbox stay there", company.tenant.label)
        self._pin(retired)
        self.tenants, self.by_name, self.errors = loaded.tenants, by_name, dict(loaded.errors)
        self.directory = self._directory()
        if self._tracker is not None:
            self._tracker.directory = self.directory
        self._index()
        if retired:
            self._retiring.update(retired)
            for company in retired:
                # Its history is the tenant's current company's now (or waits for the tenant to return).
                gevent.spawn(company.history.stop, 5.0)
            if self._retirer is None or self._retirer.dead:
                self._retirer = gevent.spawn(self._retire)
        return dict(loaded.errors)

    def _pin(self, retired: list[Company]) -> None:
        """The calls in progress of `retired` companies keep sending their cards through them."""
        if not retired or self._tracker is None:
            return
        by_tenant = {c.name: c for c in retired}
        for leg in self._tracker.legs.values():
            call = leg.call
            if call is not None and call.tenant in by_tenant:
                self._pinned[call.id] = by_tenant[call.tenant]

    def _live_calls(self) -> set[str]:
        return {leg.call.id for leg in self._tracker.legs.values() if leg.call is not None} \
            if self._tracker is not None else set()

    def _retire(self) -> None:
        """Stop each retiring company once no call in progress is pinned to it (see the module docstring)."""
        while self._retiring:
            gevent.sleep(0.5)
            if self._pinned:
                # A call that never finishes as a customer call (no FinishedCall) unpins when its legs are gone.
                live = self._live_calls()
                for call_id in [c for c in self._pinned if c not in live]:
                    del self._pinned[call_id]
            busy = set(self._pinned.values())
            done = [c for c in self._retiring if c not in busy]
            if done:
                self._retiring.difference_update(done)
                gevent.joinall([gevent.spawn(self._stop_retired, c) for c in done])

    def _stop_retired(self, company: Company) -> None:
        # Up to the card age limit: by then every card still queued has been delivered or dropped as stale.
        # (Its history uploader was stopped by the reload that retired it.)
        self.cards_dropped_retired += company.stop_cards(company.cfg.crm.card_max_age + 1.0)
        company.crm.close()


class ByClientId:
    """A retailCRM callback (make-call, status) handed to the company whose clientId it carries; 403 else."""

    def __init__(self, companies: Companies, handler: Callable[[Company], Callable[[Request], Response]]) -> None:
        self.companies = companies
        self.handler = handler

    def __call__(self, request: Request) -> Response:
        company = self.companies.by_client_id(request.query.get("clientId", ""))
        if company is None:
            return Response.text(403, "forbidden")
        return self.handler(company)(request)


class TenantRoutingHandler(RoutingHandler):
    """GET /routing/manager?phone=..&domain=..: the Lua script passes the call's ${domain_name}; that
    domain's company answers (the single company answers whatever the domain)."""

    def __init__(self, companies: Companies, allow_from: list[str]) -> None:
        super().__init__(None, allow_from=allow_from)  # type: ignore[arg-type]
        self.companies = companies

    def lookup_for(self, request: Request) -> ManagerLookup | None:
        company = self.companies.for_domain(request.query.get("domain"))
        return None if company is None else company.lookup


def register_callbacks(router: Router, companies: Companies) -> None:
    """retailCRM's callbacks, as http/status.py and http/make_call.py register them for one company."""
    router.add({"GET"}, STATUS_PATH, ByClientId(companies, lambda c: c.status_handler))
    router.add({"GET"}, MAKE_CALL_PATH, ByClientId(companies, lambda c: c.make_call_handler), literal_plus=("phone",))
    router.add({"POST"}, ACTIVITY_PATH, ActivityHandler(companies), max_body=ACTIVITY_MAX_BODY)
