"""What the call model hands to the CRM side: card events and finished calls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One retailCRM call event (`in` / `out` / `hangup`): a pop-up card opens or closes."""

    type: str
    phone: str
    codes: tuple[str, ...]
    call_id: str
    external_phone: str | None = None
    site: str | None = None
    hangup_status: str | None = None
    tenant: str = ""               # the company whose CRM gets it ("": the single company)
    # When fsbridge learnt of it (time.monotonic()): a card older than the age limit is worthless.
    created: float = field(default_factory=time.monotonic)

    def to_crm(self) -> dict[str, Any]:
        event: dict[str, Any] = {"phone": self.phone, "type": self.type, "codes": list(self.codes),
                                 "callExternalId": self.call_id}
        if self.hangup_status:
            event["hangupStatus"] = self.hangup_status
        if self.external_phone:
            event["externalPhone"] = self.external_phone
        if self.site:
            event["site"] = self.site
        return event


@dataclass(frozen=True, slots=True)
class FinishedCall:
    """A customer call that has ended, with everything the call history needs."""

    call_id: str                    # = callExternalId of its events = externalId in the history
    direction: str                  # "in" | "out"
    phone: str                      # the customer
    manager_code: str | None        # who talked to the customer; else the last manager it rang
    codes: tuple[str, ...]          # every manager concerned
    answered: bool                  # a manager was bridged to the customer
    result: str                     # calls/upload `result`
    hangup_status: str              # call/event `hangupStatus`
    hangup_cause: str               # the FreeSWITCH cause that decided it
    start_us: int                   # UTC microseconds (FreeSWITCH epochs), never local stamps
    answer_us: int | None           # the bridge to the manager, UTC microseconds
    end_us: int
    external_phone: str | None = None
    site: str | None = None
    recording_path: str | None = None
    recording_ms: int | None = None
    # The channels of the call (uuids): FreeSWITCH's CDR documents of these legs are this call's.
    legs: tuple[str, ...] = ()
    # Some of its events were never seen (taken over after a restart, or legs closed by reconciliation
    # after a socket gap): what is known of it may be a guess, and FreeSWITCH's CDRs say better.
    gap: bool = False
    # Where fsbridge learnt it: "events" (followed live) or "cdr" (rebuilt from FreeSWITCH's CDR documents).
    source: str = "events"
    # The company whose history it goes to ("": the single company). A call rebuilt from a CDR document
    # gets it from the document's variables.domain_name (tenants.Attribution.tenant_of_domain).
    tenant: str = ""

    @property
    def duration(self) -> int:
        """Talk seconds, from the bridge to the manager."""
        return max(0, round((self.end_us - self.answer_us) / 1e6)) if self.answer_us else 0

    @property
    def duration_waiting(self) -> int:
        """Seconds until a manager answered, or until the caller gave up."""
        until = self.answer_us or self.end_us
        return max(0, round((until - self.start_us) / 1e6))
