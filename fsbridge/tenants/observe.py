"""The companies seen from outside: /healthz detail, per-tenant metrics, the service-wide CRM health.

Per-tenant metric families carry a `tenant` label whose values are the configured tenants only (a call's
tenant is one of them by construction), so the label set is bounded by the files in tenants_dir.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fsbridge.health import Check
from fsbridge.metrics import Metrics

if TYPE_CHECKING:
    from fsbridge.tenants.company import Company
    from fsbridge.tenants.registry import Companies


class TenantsReachability:
    """CrmReachability of the service (health.py): failing only while every company's CRM is failing.

    One customer's CRM outage is that customer's (the `tenants` check says which); it does not make the
    provider's fsbridge unready."""

    def __init__(self, companies: Companies) -> None:
        self.companies = companies

    @property
    def last_answer(self) -> float | None:
        answers = [c.reachability.last_answer for c in self.companies if c.reachability.last_answer is not None]
        return max(answers) if answers else None

    @property
    def failing_since(self) -> float | None:
        states = [c.reachability.failing_since for c in self.companies]
        if not states or any(s is None for s in states):
            return None
        return max(s for s in states if s is not None)

    @property
    def last_problem(self) -> str:
        return next((c.reachability.last_problem for c in self.companies if c.reachability.last_problem), "")


def tenant_checks(companies: Companies) -> dict[str, Check]:
    """The `tenants` check of /healthz: ok, with the tenants in trouble named in its detail; and the
    `activity` check: which companies retailCRM has deactivated or frozen (their choice, not a failure)."""
    off = [f"{c.tenant.label + ': ' if c.name else ''}{c.activity.state.describe()}"
           for c in companies if not c.activity.delivering]
    checks = {"activity": Check(True, "; ".join(off) or "active")}
    if companies.single:
        return checks
    trouble = []
    for company in companies:
        state = company.state()["crm"]
        if state not in ("answering", "no request yet"):
            trouble.append(f"{company.tenant.label}: {state}")
    refused = [f"{name}: file refused" for name in sorted(companies.errors)]
    detail = "; ".join(trouble + refused) or "all answering"
    checks["tenants"] = Check(True, f"{len(companies)} tenant(s); {detail}")
    return checks


class AllCards:
    """The card figures of every company, summed (the service-wide metrics of before)."""

    def __init__(self, companies: Companies) -> None:
        self.companies = companies

    def _sum(self, name: str) -> int:
        return sum(getattr(c.cards, name) for c in self.companies)

    pending = property(lambda self: self._sum("pending"))
    sent = property(lambda self: self._sum("sent"))
    dropped_stale = property(lambda self: self._sum("dropped_stale"))
    dropped_full = property(lambda self: self._sum("dropped_full"))
    rejected = property(lambda self: self._sum("rejected"))


class TenantMetrics:
    def __init__(self, metrics: Metrics, companies: Companies) -> None:
        self.companies = companies
        self._requests: dict[tuple[str, str], int] = {}
        metrics.watch("fsbridge_module_delivering", "1 while retailCRM has the module active and not frozen",
                      lambda: [({"tenant": c.name}, 1.0 if c.activity.delivering else 0.0) for c in companies])
        metrics.watch("fsbridge_call_events_dropped_inactive_total",
                      "Cards dropped because retailCRM has the module deactivated or frozen",
                      lambda: [({"tenant": c.name}, float(c.cards.dropped_inactive)) for c in companies], counter=True)
        if companies.single:
            return
        m = metrics
        m.watch("fsbridge_tenant_call_events_total", "Call events by tenant and outcome", self._cards, counter=True)
        m.watch("fsbridge_tenant_outbox_pending_calls", "Calls waiting for upload, by tenant", self._pending)
        m.watch("fsbridge_tenant_crm_requests_total", "Requests to the tenant's retailCRM by status",
                lambda: [({"tenant": t, "status": s}, float(n)) for (t, s), n in self._requests.items()
                         if companies.get(t) is not None], counter=True)
        m.watch("fsbridge_tenant_crm_key_rejected", "1 while the tenant's retailCRM rejects its API key",
                lambda: [({"tenant": c.name}, 1.0 if c.key.rejected_since is not None else 0.0) for c in companies])
        m.watch("fsbridge_tenant_history_sent_total", "Calls delivered to the tenant's call history",
                lambda: [({"tenant": c.name}, float(c.history.stats.sent)) for c in companies], counter=True)
        m.watch("fsbridge_tenants_refused", "Tenant files refused at the last (re)load",
                lambda: [({}, float(len(companies.errors)))])

    def on_crm_request(self, company: Company, status: int | None) -> None:
        if self.companies.single:
            return
        key = (company.name, str(status) if status else "no reply")
        self._requests[key] = self._requests.get(key, 0) + 1

    def _cards(self) -> list[tuple[dict[str, str], float]]:
        rows = []
        for c in self.companies:
            cards = c.cards
            for outcome, value in (("sent", cards.sent), ("stale", cards.dropped_stale),
                                   ("queue_full", cards.dropped_full), ("rejected", cards.rejected)):
                rows.append(({"tenant": c.name, "outcome": outcome}, float(value)))
        return rows

    def _pending(self) -> list[tuple[dict[str, str], float]]:
        pending = self.companies.outbox.pending_by_tenant()
        return [({"tenant": c.name}, float(pending.get(c.name, 0))) for c in self.companies]


def last_call(company: Company) -> str:
    at = company.last_call_at
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
