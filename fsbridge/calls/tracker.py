"""The call model: channel events in, call events and finished calls out.

A customer call is the set of legs joined to it by origination (a leg created on behalf
of another) and by bridges. Its id is its first leg's uuid: the customer's leg for an
inbound call, the manager's for one the manager dialled or clicked. Legs are classified
on their own (legs.py), so a ring group, a transfer or a pickup only adds manager legs
to the call the customer is in.

Everything here is CPU-only and runs on the ESL reading path: no I/O, no waiting.
Results go to the two callbacks, which must only enqueue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fsbridge.calls import outcome
from fsbridge.calls.legs import CUSTOMER, MANAGER, OTHER, Directory, Leg, classify
from fsbridge.calls.model import CallEvent, FinishedCall
from fsbridge.esl.protocol import Event, digits
from fsbridge.history.cdr import record_id_of

log = logging.getLogger("fsbridge.calls")

_RINGING = frozenset({"CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER"})
# Events that show a channel is alive; others about a channel we do not know (a late
# DESTROY after the call was closed) must not resurrect it.
_ALIVE = _RINGING | {"CHANNEL_CREATE", "CHANNEL_BRIDGE"}
# The directory of legs no company claims: they can be nobody's manager.
NOBODY = Directory(managers=frozenset(), external_phones={}, tenant=None)
# How a new leg names the leg it was created for (a loopback-b half: its -a half, or the leg that dialled it).
_PARENT_VARIABLES = ("variable_originating_leg_uuid", "variable_cc_member_session_uuid",
                     "variable_fifo_bridge_uuid", "variable_other_loopback_leg_uuid",
                     "variable_other_loopback_from_uuid")
# A bridge is looked through at most this many loopback pairs.
_MAX_LOOPBACK_HOPS = 8


@dataclass(slots=True, eq=False)
class Call:
    id: str
    direction: str                      # "in" | "out" | "" while it is not a customer call yet
    start_us: int
    legs: list[Leg] = field(default_factory=list)
    phone: str = ""
    external_phone: str | None = None
    site: str | None = None
    announced: list[str] = field(default_factory=list)   # codes that got a card, in order
    rang: list[str] = field(default_factory=list)        # codes whose phone rang, in order
    talked: str | None = None                            # the last manager bridged to the customer
    bridge_us: int = 0
    recording_path: str | None = None
    recording_ms: int | None = None
    clicked: bool = False                                # originated by fsbridge (click-to-call)
    # The company the call belongs to, decided once (attribution.py): None while no tenant claims it,
    # and then it is nobody's: no card, no history. Kept beside `directory`, not read from it: a reload that
    # removes the company leaves its calls in progress with no directory, still that company's calls.
    tenant: str | None = None
    directory: Directory | None = None
    gap: bool = False                                    # some of its events were missed (see FinishedCall.gap)

    def customer(self) -> Leg | None:
        return next((leg for leg in self.legs if leg.role == CUSTOMER), None)

    def managers(self) -> list[Leg]:
        return [leg for leg in self.legs if leg.role == MANAGER]


@dataclass(frozen=True, slots=True)
class ExpectedCall:
    """A click-to-call fsbridge started: the first leg's uuid is known before FreeSWITCH creates it."""

    phone: str
    code: str
    external_phone: str | None = None
    tenant: str | None = ""


class CallTracker:
    def __init__(self, directory: Directory, on_event: Callable[[CallEvent], None],
                 on_finished: Callable[[FinishedCall], None]) -> None:
        self.directory = directory
        self.on_event = on_event
        self.on_finished = on_finished
        self.legs: dict[str, Leg] = {}
        self.expected: dict[str, ExpectedCall] = {}
        self.seen = 0               # channel events handled; orders reconciliation against events
        self.calls_finished = 0
        self.closed_by_reconcile = 0
        self.adopted = 0
        self.refreshed = 0          # known calls found answered / bridged after a gap
        self._adopting = False
        self._handlers: dict[str, Callable[[Event, Leg], None]] = {
            "CHANNEL_PROGRESS": self._ringing,
            "CHANNEL_PROGRESS_MEDIA": self._ringing,
            "CHANNEL_ANSWER": self._ringing,
            "CHANNEL_BRIDGE": self._bridge,
            "CHANNEL_HANGUP_COMPLETE": self._hangup_complete,
            "CHANNEL_DESTROY": self._destroy,
            "RECORD_STOP": self._record_stop,
        }

    def expect(self, uuid: str, call: ExpectedCall) -> None:
        self.expected[uuid] = call

    def forget_expected(self, uuid: str) -> None:
        self.expected.pop(uuid, None)

    # -- events --

    def handle(self, ev: Event) -> None:
        name = ev.get("Event-Name", "")
        uuid = ev.get("Unique-ID")
        if not uuid:
            return
        self.seen += 1
        leg = self.legs.get(uuid)
        if leg is None:
            if name not in _ALIVE:
                return
            leg = self._new_leg(ev)
        leg.last_seen = self.seen
        handler = self._handlers.get(name)
        if handler is not None:
            handler(ev, leg)

    def _new_leg(self, ev: Event) -> Leg:
        created = _int(ev.get("Caller-Channel-Created-Time")) or _int(ev.get("Event-Date-Timestamp"))
        parent = self._parent_of(ev)
        host = parent.call if parent is not None else None
        expected = self.expected.pop(ev["Unique-ID"], None) if host is None else None
        directory = self.directory.for_event(ev)
        if directory is None:
            # Its own headers name no company: it is a leg of the call it joins, or of the click.
            directory = host.directory if host is not None else None
            if directory is None and expected is not None:
                directory = self.directory.named(expected.tenant)
        leg = classify(ev, directory or NOBODY, created)
        if host is not None and host.tenant is not None and leg.tenant not in (None, host.tenant):
            # Another company's phone in this company's call: neither its manager nor its customer.
            leg.role, leg.code, leg.number = OTHER, None, ""
        self.legs[leg.uuid] = leg
        if host is not None:
            self._join(host, leg)
        else:
            call = Call(id=leg.uuid, direction="", start_us=created)
            if leg.tenant is not None:
                call.tenant, call.directory = leg.tenant, directory
            if expected is not None:
                call.clicked = True
                call.phone = expected.phone
                call.external_phone = expected.external_phone
                call.site = self._directory(call).site_of(expected.external_phone)
            self._join(call, leg)
        return leg

    def _directory(self, call: Call) -> Directory:
        return call.directory or NOBODY

    def _attribute(self, call: Call, tenant: str) -> None:
        """The call is `tenant`'s from now on (its first leg that a company claims decides)."""
        call.tenant = tenant
        call.directory = self.directory.named(tenant)
        if call.direction == "in":
            first = call.legs[0]
            call.external_phone = self._directory(call).external(first.dialled)
            call.site = self._directory(call).site_of(first.dialled)

    def _parent_of(self, ev: Event) -> Leg | None:
        if ev.get("Other-Type") == "originator":
            parent = self.legs.get(ev.get("Other-Leg-Unique-ID", ""))
            if parent is not None:
                return parent
        for var in _PARENT_VARIABLES:
            parent = self.legs.get(ev.get(var, ""))
            if parent is not None:
                return parent
        return None

    def _join(self, call: Call, leg: Leg) -> None:
        if leg.call is not None and leg.call is not call:
            leg.call.legs.remove(leg)
        leg.call = call
        call.legs.append(leg)
        if call.tenant is None and leg.tenant is not None:
            self._attribute(call, leg.tenant)
        if call.direction:
            return
        first = call.legs[0]
        if first.role == CUSTOMER and first.inbound and not call.clicked:
            # The customer called us: a card pops when a manager's phone rings.
            call.direction = "in"
            call.phone = first.number
            call.external_phone = self._directory(call).external(first.dialled)
            call.site = self._directory(call).site_of(first.dialled)
            return
        manager = next((lg for lg in call.legs if lg.role == MANAGER), None)
        customer = call.customer()
        if manager is not None and (customer is not None or call.clicked):
            # A manager's call to a customer has started (dialled, or clicked in the CRM).
            call.direction = "out"
            if customer is not None and not call.clicked:
                call.phone = customer.number
                call.external_phone = self._directory(call).external(customer.caller_id)
                call.site = self._directory(call).site_of(call.external_phone)
            self._announce(call, "out", [manager.code or ""])

    def _ringing(self, ev: Event, leg: Leg) -> None:
        if leg.role != MANAGER or leg.rang or leg.call is None:
            return
        leg.rang = True
        call = leg.call
        call.rang.append(leg.code or "")
        if call.direction == "in":
            # Every leg of a simultaneous ring group exists before any of them rings, so
            # the first ring announces them all in one event.
            fresh = [lg.code for lg in call.managers()
                     if not lg.ended and lg.code and lg.code not in call.announced]
            self._announce(call, "in", fresh)

    def _bridge(self, ev: Event, leg: Leg) -> None:
        a = self.legs.get(ev.get("Bridge-A-Unique-ID", ""))
        b = self.legs.get(ev.get("Bridge-B-Unique-ID", ""))
        if a is None or b is None:
            return
        a.last_seen = b.last_seen = self.seen
        a.partner, b.partner = b.uuid, a.uuid
        # Rule (loopback legs): the customer bridged to loopback/100-a talks to whoever loopback/100-b is
        # bridged to. The two bridges come in either order; the second one finds both ends.
        a, b = self._through_loopback(a), self._through_loopback(b)
        roles = {a.role: a, b.role: b}
        customer, manager = roles.get(CUSTOMER), roles.get(MANAGER)
        if customer is None or manager is None:
            return
        call = customer.call if customer.call is not None and customer.call.direction else manager.call
        if call is None:
            return
        for other in (customer, manager):
            if other.call is not call:
                # A transfer or pickup brought a leg of another (internal) call to this customer.
                self._join(call, other)
        if not call.direction:
            return
        call.talked = manager.code
        if not call.bridge_us:
            call.bridge_us = _int(ev.get("Event-Date-Timestamp"))
        if manager.code and manager.code not in call.rang:
            call.rang.append(manager.code)
        if call.direction == "in" and manager.code and manager.code not in call.announced:
            self._announce(call, "in", [manager.code])

    def _through_loopback(self, leg: Leg) -> Leg:
        """The leg at the far end of a chain of loopback pairs (the leg itself if it is no loopback leg,
        or if the far side is not bridged yet)."""
        for _ in range(_MAX_LOOPBACK_HOPS):
            peer = self.legs.get(leg.loopback_peer) if leg.loopback_peer else None
            far = self.legs.get(peer.partner) if peer is not None and peer.partner else None
            if far is None:
                return leg
            leg = far
        return leg

    def _record_stop(self, ev: Event, leg: Leg) -> None:
        if leg.call is None:
            return
        path = ev.get("Record-File-Path") or ev.get("variable_record_file_path")
        if path and self._named_after_a_leg(leg.call, leg.call.recording_path) \
                and not self._named_after_a_leg(leg.call, path):
            # Rule (the recording): the call's recording is the record_session named after one of its legs
            # (<uuid>.wav, docs/deploy.md). Other files recorded on the same leg, such as the message the
            # customer left in a voicemail box (voicemail/<domain>/<ext>/msg_<uuid>.wav), do not replace it.
            return
        if path:
            leg.call.recording_path = path
            ms = ev.get("variable_record_ms") or ev.get("variable_record_seconds")
            if ms and digits(ms):
                leg.call.recording_ms = int(ms) if ev.get("variable_record_ms") else int(ms) * 1000

    @staticmethod
    def _named_after_a_leg(call: Call, path: str | None) -> bool:
        ref = record_id_of(path or "")
        return ref is not None and any(lg.uuid == ref[0] for lg in call.legs)

    def _hangup_complete(self, ev: Event, leg: Leg) -> None:
        end = _int(ev.get("variable_end_uepoch")) or _int(ev.get("Event-Date-Timestamp"))
        self._end_leg(leg, ev.get("Hangup-Cause") or ev.get("variable_hangup_cause") or "", end)

    def _destroy(self, ev: Event, leg: Leg) -> None:
        if not leg.ended:
            # HANGUP_COMPLETE was lost; DESTROY is the last word on a channel.
            self._end_leg(leg, ev.get("Hangup-Cause", ""), _int(ev.get("Event-Date-Timestamp")))
        self.legs.pop(leg.uuid, None)

    # -- ending --

    def _end_leg(self, leg: Leg, cause: str, end_us: int) -> None:
        if leg.ended:
            return
        leg.ended = True
        leg.hangup_cause = cause
        leg.end_us = end_us or int(time.time() * 1e6)
        call = leg.call
        if call is not None and all(lg.ended for lg in call.legs):
            self._finish(call)

    def _finish(self, call: Call) -> None:
        for leg in call.legs:
            # Late events of these channels (DESTROY) find nothing and are ignored.
            if self.legs.get(leg.uuid) is leg:
                del self.legs[leg.uuid]
            leg.call = None
        if not call.direction or not call.phone or call.tenant is None:
            return
        self.calls_finished += 1
        answered = call.talked is not None
        first = call.legs[0]
        if answered:
            result = outcome.ANSWERED
            cause = first.hangup_cause
        else:
            # Loopback halves only mirror the legs they connect: their causes say nothing of their own.
            counterparts = [lg for lg in call.legs
                            if lg is not first and lg.role != first.role and not lg.loopback_peer]
            result = outcome.unanswered_outcome([lg.hangup_cause for lg in counterparts], first.hangup_cause)
            telling = [lg.hangup_cause for lg in counterparts
                       if lg.hangup_cause and lg.hangup_cause not in outcome.NOT_THE_CALLS_END]
            cause = telling[-1] if telling else first.hangup_cause
        if call.announced:
            self._emit(call, "hangup", list(call.announced), result.hangup_status)
        if call.direction == "out":
            dialler = next((lg.code for lg in call.managers() if lg.code), None)
            code = call.talked or dialler
        else:
            # A phone that refused at once (busy, do-not-disturb) never rang but was still the one called.
            dialled = [lg.code for lg in call.managers() if lg.code]
            code = call.talked or (call.rang[-1] if call.rang else dialled[-1] if dialled else None)
        codes = tuple(dict.fromkeys(call.announced + call.rang))
        self.on_finished(FinishedCall(
            call_id=call.id, direction=call.direction, phone=call.phone, manager_code=code, codes=codes,
            answered=answered, result=result.result, hangup_status=result.hangup_status, hangup_cause=cause,
            start_us=call.start_us, answer_us=call.bridge_us or None,
            end_us=max(lg.end_us for lg in call.legs), external_phone=call.external_phone, site=call.site,
            recording_path=call.recording_path, recording_ms=call.recording_ms,
            legs=tuple(lg.uuid for lg in call.legs), gap=call.gap, tenant=call.tenant))

    def _announce(self, call: Call, kind: str, codes: list[str]) -> None:
        codes = [c for c in codes if c and c not in call.announced]
        if not codes or not call.phone:
            return
        call.announced.extend(codes)
        if not self._adopting:
            # An adopted call's cards were shown by the process before us: only its hangup is still due.
            self._emit(call, kind, codes, None)

    def _emit(self, call: Call, kind: str, codes: list[str], status: str | None) -> None:
        if call.tenant is None:
            return   # nobody's call: no company's CRM hears of it
        self.on_event(CallEvent(type=kind, phone=call.phone, codes=tuple(codes), call_id=call.id,
                                external_phone=call.external_phone, site=call.site, hangup_status=status,
                                tenant=call.tenant))

    # -- after a reconnect, or periodically --

    def adopt(self, channels: list[Event]) -> int:
        """Take over calls already up when fsbridge (re)started, from `uuid_dump <uuid> json` of each
        channel: the channel data FreeSWITCH would have sent in its events. Without this, a call in
        progress across a restart of fsbridge would never reach the history. Channels already known
        are brought up to date (answered or bridged while events were not arriving, after a socket gap).
        Returns how many channels were new."""
        fresh = [ch for ch in channels if ch.get("Unique-ID") and ch["Unique-ID"] not in self.legs]
        known = [ch for ch in channels if ch.get("Unique-ID") in self.legs]
        before = {id(c): (c.talked, c.bridge_us, len(c.rang)) for c in self._calls_of(known)}
        # Parents first, so a b-leg finds the call of the leg that originated it.
        fresh.sort(key=lambda ch: _int(ch.get("Caller-Channel-Created-Time")))
        self._adopting = True
        try:
            for ch in fresh:
                self.handle({**ch, "Event-Name": "CHANNEL_CREATE"})
            for call in self._calls_of(fresh):
                call.gap = True
            for ch in fresh + known:
                uuid = ch["Unique-ID"]
                if ch.get("Answer-State") in ("early", "answered") or ch.get("Channel-Call-State") == "RINGING":
                    self.handle({**ch, "Event-Name": "CHANNEL_PROGRESS"})
                bridged_us = _int(ch.get("Caller-Channel-Bridged-Time"))
                partner = ch.get("variable_bridge_uuid") or ch.get("variable_signal_bond") or ""
                if bridged_us and partner in self.legs:
                    self.handle({"Event-Name": "CHANNEL_BRIDGE", "Unique-ID": uuid, "Bridge-A-Unique-ID": uuid,
                                 "Bridge-B-Unique-ID": partner, "Event-Date-Timestamp": str(bridged_us)})
        finally:
            self._adopting = False
        updated = 0
        for call in self._calls_of(known):
            if before.get(id(call)) != (call.talked, call.bridge_us, len(call.rang)):
                call.gap = True
                updated += 1
        if updated:
            self.refreshed += updated
            log.info("%d call(s) answered or bridged while events were not arriving, brought up to date", updated)
        if fresh:
            self.adopted += len(fresh)
            log.info("took over %d channel(s) already up when fsbridge connected", len(fresh))
        return len(fresh)

    def _calls_of(self, channels: list[Event]) -> list[Call]:
        calls: dict[int, Call] = {}
        for ch in channels:
            leg = self.legs.get(ch.get("Unique-ID", ""))
            if leg is not None and leg.call is not None:
                calls[id(leg.call)] = leg.call
        return list(calls.values())

    def reconcile(self, live: set[str], snapshot: int, ended_by: float | None = None,
                  confirm_gone: Callable[[str], bool] | None = None) -> int:
        """Close legs FreeSWITCH no longer has. `snapshot` is `self.seen` when the channel
        list was requested: legs touched after that may be newer than the list. `ended_by`
        (wall clock) is when they were last known alive, the connection loss: the best
        estimate of their end, since FreeSWITCH restarts are the usual cause.
        `show channels` lags behind the events (FreeSWITCH fills its table asynchronously), so
        `confirm_gone` (uuid_exists) gets the last word on each leg missing from it."""
        gone = [leg for leg in list(self.legs.values())
                if not leg.ended and leg.uuid not in live and leg.last_seen <= snapshot
                and (confirm_gone is None or confirm_gone(leg.uuid))]
        gone = [leg for leg in gone if not leg.ended and self.legs.get(leg.uuid) is leg]
        now = int((ended_by or time.time()) * 1e6)
        for leg in gone:
            if leg.call is not None:
                leg.call.gap = True   # its end is a guess: FreeSWITCH's CDR of it knows better
            self._end_leg(leg, leg.hangup_cause or "", now)
            self.legs.pop(leg.uuid, None)
        if gone:
            self.closed_by_reconcile += len(gone)
            log.warning("reconciled %d channel(s) that ended while events were not arriving", len(gone))
        return len(gone)


def _int(text: str | None) -> int:
    return int(text) if text and digits(text) else 0
