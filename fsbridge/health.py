"""Is fsbridge alive, and is it doing its job?

Liveness (`/healthz/live`) only says the process is not wedged: the HTTP answer itself
proves the event loop runs, and the workers must still exist. systemd and Docker restart
on it. Readiness (`/healthz`) says whether calls are flowing end to end: FreeSWITCH
connected with heartbeats arriving, the call outbox draining, the CRM answering. A load
balancer or an alert watches that one; restarting would not fix a CRM outage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class Report:
    checks: dict[str, Check] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks.values())

    def as_dict(self) -> dict:
        return {"status": "ok" if self.ok else "failing",
                "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in self.checks.items()}}


class CrmReachability:
    """Remembers whether retailCRM answered lately; fed by the CRM client's observer."""

    def __init__(self) -> None:
        self.last_answer: float | None = None
        self.failing_since: float | None = None
        self.last_problem = ""

    def observe(self, status: int | None) -> None:
        now = time.monotonic()
        if status is not None and status < 500 and status != 429:
            self.last_answer = now
            self.failing_since = None
        else:
            self.last_problem = f"HTTP {status}" if status else "no reply"
            if self.failing_since is None:
                self.failing_since = now


class Health:
    def __init__(self, *, esl_connected: Callable[[], bool], last_event_age: Callable[[], float | None],
                 heartbeat_timeout: float, workers_alive: Callable[[], list[str]],
                 outbox_oldest_age: Callable[[], float | None] | None, outbox_max_age: float,
                 crm: CrmReachability, crm_grace: float = 120.0,
                 extra: Callable[[], dict[str, Check]] | None = None) -> None:
        self.esl_connected = esl_connected
        self.last_event_age = last_event_age
        self.heartbeat_timeout = heartbeat_timeout
        self.workers_alive = workers_alive
        self.outbox_oldest_age = outbox_oldest_age
        self.outbox_max_age = outbox_max_age
        self.crm = crm
        self.crm_grace = crm_grace
        self.extra = extra   # more checks (the tenants' detail)

    def live(self) -> Report:
        dead = self.workers_alive()
        return Report({"workers": Check(not dead, "all running" if not dead else "stopped: " + ", ".join(dead))})

    def ready(self) -> Report:
        report = self.live()
        age = self.last_event_age()
        if not self.esl_connected():
            report.checks["freeswitch"] = Check(False, "event socket not connected")
        elif age is None or age > self.heartbeat_timeout:
            report.checks["freeswitch"] = Check(False, "connected but no event or heartbeat lately")
        else:
            report.checks["freeswitch"] = Check(True, f"last event {age:.0f} s ago")
        if self.outbox_oldest_age is not None:
            oldest = self.outbox_oldest_age()
            if oldest is not None and oldest > self.outbox_max_age:
                report.checks["history"] = Check(False, f"oldest call waiting for upload for {oldest:.0f} s")
            else:
                report.checks["history"] = Check(True, "draining" if oldest else "nothing pending")
        failing = self.crm.failing_since
        if failing is not None and time.monotonic() - failing > self.crm_grace:
            report.checks["crm"] = Check(False, f"retailCRM failing for {time.monotonic() - failing:.0f} s "
                                                f"({self.crm.last_problem})")
        else:
            report.checks["crm"] = Check(True, "answering" if self.crm.last_answer else "no request yet")
        if self.extra is not None:
            report.checks.update(self.extra())
        return report
