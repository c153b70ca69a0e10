"""Click-to-call: ring the manager's phone, then, when they answer, the customer.

Every value that reaches FreeSWITCH is checked against an allow-list here, and the
originate string is built by us from the admin's templates, never from request text
(freeswitch-notes.md, "Originate security"). The command goes out with `bgapi` so the
event socket is never blocked for the 30-60 s an originate can take.
"""

from __future__ import annotations

import logging
import re
import time
import uuid as uuidlib
from collections.abc import Collection
from dataclasses import dataclass

import gevent
import gevent.event

from fsbridge.calls.tracker import CallTracker, ExpectedCall
from fsbridge.config import DIAL_TEMPLATE_RE, DOMAIN_RE, EXTENSION_RE
from fsbridge.esl.connection import EslError
from fsbridge.esl.listener import EventListener
from fsbridge.esl.protocol import Event
from fsbridge.record_links import UUID_RE
from fsbridge.routing import normalize_phone

log = logging.getLogger("fsbridge.originate")

GATEWAY_RE = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")
_RINGING = {"CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER"}


class ClickRejected(Exception):
    """The request is not acceptable (HTTP 400); the message is one line, echoing no input."""


class ClickFailed(Exception):
    """FreeSWITCH refused or failed the call (HTTP 502), or did not ring in time (HTTP 504)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class DialPlan:
    """The admin's dial-string templates, checked once at start-up."""

    manager_dial: str = "user/{code}"
    customer_dial: str = "sofia/gateway/{gateway}/{phone}"
    gateway: str = ""
    ring_timeout: int = 30         # seconds the manager's phone rings
    ringing_wait: float = 5.0      # how long the HTTP request waits for the phone to start ringing
    dedupe_window: float = 5.0     # the same click again within this many seconds starts no second call
    record_dir: str = ""           # record the call to <record_dir>/<call id>.wav, like the inbound dialplan
    domain: str = ""               # a tenant's FreeSWITCH domain, for {domain} in the dial strings

    def __post_init__(self) -> None:
        for name in ("manager_dial", "customer_dial"):
            if not DIAL_TEMPLATE_RE.fullmatch(getattr(self, name)):
                raise ValueError(f"{name}: only letters, digits, '_./@:+-' and {{code}}, {{phone}}, {{gateway}}")
        if "{code}" not in self.manager_dial:
            raise ValueError("manager_dial: must contain {code}")
        if "{phone}" not in self.customer_dial:
            raise ValueError("customer_dial: must contain {phone}")
        if not GATEWAY_RE.fullmatch(self.gateway):
            raise ValueError("gateway: a sofia gateway name (letters, digits, '_.-')")
        if self.record_dir and not re.fullmatch(r"/[A-Za-z0-9_./-]*", self.record_dir):
            raise ValueError("record_dir: an absolute path of letters, digits and '_./-'")
        if "{gateway}" in self.customer_dial + self.manager_dial and not self.gateway:
            raise ValueError("gateway: missing; the dial-string templates use {gateway}")
        if self.domain and not DOMAIN_RE.fullmatch(self.domain):
            raise ValueError("domain: a FreeSWITCH domain name (letters, digits, '.-')")
        if "{domain}" in self.customer_dial + self.manager_dial and not self.domain:
            raise ValueError("manager_dial: {domain} needs a tenant with a domain")


@dataclass(frozen=True)
class Click:
    """A validated click: every field matched an allow-list."""

    code: str
    phone: str
    external_phone: str | None


def validate_click(code: str | None, phone: str | None, external_phone: str | None,
                   managers: Collection[str], external_phones: dict[str, str]) -> Click:
    if not code or not EXTENSION_RE.fullmatch(code) or code not in managers:
        raise ClickRejected("code: not a configured manager extension")
    # '+7 (912) 123-45-67' is what a manager clicks: separators go, anything else is refused.
    number = normalize_phone(phone)
    if number is None:
        raise ClickRejected("phone: expected 5 to 16 digits with an optional leading '+' "
                            "(spaces, brackets, dots and dashes allowed)")
    ext: str | None = None
    if external_phone:
        normalized = normalize_phone(external_phone)
        ext = normalized.lstrip("+") if normalized else None
        if ext is None or ext not in external_phones:
            raise ClickRejected("externalPhone: not one of the configured external numbers")
    return Click(code=code, phone=number, external_phone=ext)


def originate_command(click: Click, plan: DialPlan, call_uuid: str) -> str:
    """`originate` arguments; every interpolated value has passed an allow-list."""
    assert UUID_RE.fullmatch(call_uuid)
    fill = {"code": click.code, "phone": click.phone, "gateway": plan.gateway, "domain": plan.domain}
    manager = plan.manager_dial.format(**fill)
    customer = plan.customer_dial.format(**fill)
    # The manager's phone shows whom they are about to call.
    manager_vars = [f"origination_uuid={call_uuid}", f"origination_caller_id_number={click.phone}",
                    f"origination_caller_id_name={click.phone}", f"originate_timeout={plan.ring_timeout}",
                    "ignore_early_media=true", "fsbridge_click=true"]
    if plan.record_dir:
        # The call id spelt out: FreeSWITCH refuses `${...}` in originate variables (an injection
        # guard, switch_ivr_originate.c) unless origination_nested_vars lifts it, which we never do.
        manager_vars += ["RECORD_STEREO=true",
                         f"execute_on_answer='record_session {plan.record_dir.rstrip('/')}/{call_uuid}.wav'"]
    customer_vars = ["fsbridge_click=true"]
    if click.external_phone:
        customer_vars += [f"origination_caller_id_number={click.external_phone}",
                          f"origination_caller_id_name={click.external_phone}",
                          f"effective_caller_id_number={click.external_phone}"]
    return f"originate {{{','.join(manager_vars)}}}{manager} &bridge({{{','.join(customer_vars)}}}{customer})"


class ClickWatch:
    """The first legs of clicks in progress, waiting for a ring; one for every tenant's Originator, so the
    reading path makes one dict lookup per event however many companies click."""

    def __init__(self) -> None:
        self.waiting: dict[str, gevent.event.AsyncResult] = {}

    def on_event(self, ev: Event) -> None:
        """Called for every event on the reading path: a dict lookup when nobody waits."""
        if not self.waiting:
            return
        uuid = ev.get("Unique-ID")
        waiter = self.waiting.get(uuid) if uuid else None
        if waiter is None:
            return
        name = ev.get("Event-Name")
        if waiter.ready():
            return   # the first word counts: a call that rang and later ended did ring
        if name in _RINGING:
            waiter.set(None)
        elif name in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY"):
            waiter.set(ev.get("Hangup-Cause") or "the call ended")


class Originator:
    """Starts clicks through the live event socket and watches their first leg ring."""

    def __init__(self, listener: EventListener, tracker: CallTracker, plan: DialPlan,
                 watch: ClickWatch | None = None, tenant: str = "") -> None:
        self.listener = listener
        self.tracker = tracker
        self.plan = plan
        self.tenant = tenant
        self.started = 0
        self.failed = 0
        self.watch = watch or ClickWatch()
        self._watch = self.watch.waiting
        self._recent: dict[tuple[str, str], tuple[float, gevent.event.AsyncResult]] = {}

    def on_event(self, ev: Event) -> None:
        self.watch.on_event(ev)

    def click(self, click: Click) -> str:
        """Start (or join) the call; returns its id once the manager's phone rings."""
        key = (click.code, click.phone)
        now = time.monotonic()
        self._recent = {k: v for k, v in self._recent.items() if now - v[0] < self.plan.dedupe_window}
        recent = self._recent.get(key)
        if recent is not None:
            # A double click, or the CRM retrying: the same call, not a second one.
            return recent[1].get()
        result = gevent.event.AsyncResult()
        self._recent[key] = (now, result)
        try:
            call_id = self._start(click)
        except Exception as exc:
            result.set_exception(exc)
            self._recent.pop(key, None)
            raise
        result.set(call_id)
        return call_id

    def _start(self, click: Click) -> str:
        conn = self.listener.connection
        if conn is None or not self.listener.connected:
            raise ClickFailed("FreeSWITCH is not connected", status=503)
        call_uuid = str(uuidlib.uuid4())
        ringing = gevent.event.AsyncResult()
        self._watch[call_uuid] = ringing
        self.tracker.expect(call_uuid, ExpectedCall(phone=click.phone, code=click.code,
                                                    external_phone=click.external_phone, tenant=self.tenant))
        try:
            try:
                job = conn.bgapi(originate_command(click, self.plan, call_uuid))
            except EslError as exc:
                raise ClickFailed(f"FreeSWITCH did not accept the originate: {exc}") from None
            self.started += 1
            # Whichever comes first: the phone rings, the leg ends, or the job reports an error.
            waiter = gevent.spawn(self._job_error, job)
            try:
                ready = gevent.wait([ringing, waiter], timeout=self.plan.ringing_wait, count=1)
            finally:
                waiter.kill(block=False)
            if ringing.ready():
                failure = ringing.get()
            elif waiter.ready():
                # "+OK" (None): the manager answered before we saw a ring, which is ringing too.
                failure = waiter.value if waiter.successful() else "the event socket closed"
            if not ready:
                self._hang_up(call_uuid)
                raise ClickFailed(f"extension {click.code} did not start ringing within "
                                  f"{self.plan.ringing_wait:g} s", status=504)
            if failure:
                raise ClickFailed(f"FreeSWITCH could not ring extension {click.code}: {failure}")
            log.info("click-to-call %s: extension %s is ringing", call_uuid, click.code)
            return call_uuid
        except ClickFailed:
            self.failed += 1
            self.tracker.forget_expected(call_uuid)
            raise
        finally:
            self._watch.pop(call_uuid, None)

    @staticmethod
    def _job_error(job: gevent.event.AsyncResult) -> str | None:
        body = str(job.get()).strip()
        return None if body.startswith("+OK") else (body.removeprefix("-ERR").strip() or "originate failed")

    def _hang_up(self, call_uuid: str) -> None:
        conn = self.listener.connection
        if conn is None:
            return
        try:
            conn.bgapi(f"uuid_kill {call_uuid} ORIGINATOR_CANCEL")
        except EslError as exc:
            log.warning("could not cancel click-to-call %s: %s", call_uuid, exc)
