"""The call model on captured FreeSWITCH traffic: which cards pop, for whom, and how calls end."""

from __future__ import annotations

import pytest

from fsbridge.calls.legs import Directory
from fsbridge.calls.model import CallEvent, FinishedCall
from fsbridge.calls.tracker import CallTracker, ExpectedCall
from tests import capture

DIRECTORY = Directory(managers=frozenset({"100", "200"}),
                      external_phones={"74999999999": "shop1", "74999999998": "shop2"})
CUSTOMER = "75555555555"   # calls in (fixtures/README.md)
CALLED = "79121234567"     # the customer managers call


class Recorder:
    def __init__(self, directory: Directory = DIRECTORY) -> None:
        self.cards: list[CallEvent] = []
        self.finished: list[FinishedCall] = []
        self.tracker = CallTracker(directory, self.cards.append, self.finished.append)

    def feed(self, evs: list[dict]) -> Recorder:
        for e in evs:
            self.tracker.handle(e)
        return self

    def summary(self) -> list[tuple]:
        return [(c.type, c.phone, c.codes, c.external_phone, c.site, c.hangup_status) for c in self.cards]


INBOUND = {
    # scenario: (ext, DID, shop, hangupStatus, result, answered)
    "inbound_answered": ("100", "74999999999", "shop1", "answered", "answered", True),
    "inbound_no_answer": ("100", "74999999999", "shop1", "cancel", "no answer", False),
    "inbound_busy": ("200", "74999999998", "shop2", "busy", "busy", False),
    "inbound_ext_no_answer": ("200", "74999999998", "shop2", "no answered", "no answer", False),
}


@pytest.mark.parametrize("fmt", ["plain", "json"])
@pytest.mark.parametrize("name", sorted(INBOUND))
def test_inbound_scenarios(name: str, fmt: str) -> None:
    ext, did, shop, status, result, answered = INBOUND[name]
    evs = capture.events(name, fmt)
    rec = Recorder().feed(evs)
    assert rec.summary() == [
        ("in", CUSTOMER, (ext,), did, shop, None),
        ("hangup", CUSTOMER, (ext,), did, shop, status),
    ]
    a_leg = capture.legs(evs)[0]
    assert {c.call_id for c in rec.cards} == {a_leg}
    [call] = rec.finished
    assert (call.call_id, call.direction, call.phone, call.manager_code, call.result, call.answered) == \
        (a_leg, "in", CUSTOMER, ext, result, answered)
    assert call.recording_path.endswith(f"/{a_leg}.wav")
    assert rec.tracker.legs == {}, "every leg is forgotten once the call is over"


def test_in_card_pops_when_the_extension_rings_not_before() -> None:
    evs = capture.events("inbound_answered")
    rec = Recorder()
    for e in evs:
        rec.feed([e])
        if rec.cards:
            break
    assert e["Event-Name"] in ("CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA")
    assert e["Unique-ID"] == capture.legs(evs)[1], "the manager's leg, not the customer's early media"


def test_answered_call_times_come_from_utc_epochs() -> None:
    evs = capture.events("inbound_answered")
    [call] = Recorder().feed(evs).finished
    created = int(next(e for e in evs if e["Event-Name"] == "CHANNEL_CREATE")["Caller-Channel-Created-Time"])
    bridge = next(e for e in evs if e["Event-Name"] == "CHANNEL_BRIDGE")
    assert call.start_us == created
    assert call.answer_us == int(bridge["Event-Date-Timestamp"])
    # ~1 s ringing, ~8 s talk (fixtures/README.md)
    assert call.duration_waiting == 1 and 7 <= call.duration <= 9


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_manager_dials_a_customer(fmt: str) -> None:
    evs = capture.events("outbound_ext_dial", fmt)
    rec = Recorder().feed(evs)
    assert rec.summary() == [("out", CALLED, ("100",), None, None, None),
                             ("hangup", CALLED, ("100",), None, None, "answered")]
    [call] = rec.finished
    assert call.call_id == capture.legs(evs)[0] and call.manager_code == "100" and call.answered


def test_out_card_waits_for_the_customer_leg() -> None:
    """Dialling a number is not yet a call to a customer: the card pops when the customer's leg exists."""
    evs = capture.events("outbound_ext_dial")
    _manager_leg, customer_leg = capture.legs(evs)[:2]
    rec = Recorder()
    for e in evs:
        rec.feed([e])
        if rec.cards:
            break
    assert e["Unique-ID"] == customer_leg


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_click_to_call_known_to_fsbridge_pops_at_once(fmt: str) -> None:
    evs = capture.events("outbound_originate_answered", fmt)
    first = capture.legs(evs)[0]
    rec = Recorder()
    rec.tracker.expect(first, ExpectedCall(phone="+79121234567", code="100", external_phone="74999999999"))
    create = next(i for i, e in enumerate(evs) if e["Event-Name"] == "CHANNEL_CREATE")
    rec.feed(evs[:create + 1])
    assert rec.summary() == [("out", "+79121234567", ("100",), "74999999999", "shop1", None)]
    rec.feed(evs[create + 1:])
    assert rec.summary()[-1] == ("hangup", "+79121234567", ("100",), "74999999999", "shop1", "answered")
    assert rec.finished[0].call_id == first


def test_click_to_call_from_elsewhere_is_still_an_out_call() -> None:
    rec = Recorder().feed(capture.events("outbound_originate_answered"))
    assert [s[0] for s in rec.summary()] == ["out", "hangup"]
    assert rec.summary()[0][1] == CALLED


def test_click_to_call_manager_not_answering() -> None:
    evs = capture.events("outbound_originate_answered")
    first = capture.legs(evs)[0]
    # Only the manager's leg, ending unanswered: the capture's first leg up to its ANSWER, then its end.
    leg = capture.of_leg(evs, first)
    ringing = [e for e in leg if e["Event-Name"] in ("CHANNEL_CREATE", "CHANNEL_PROGRESS")]
    end = capture.set_fields([e for e in leg if e["Event-Name"] in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")],
                             Hangup__Cause="NO_ANSWER")
    rec = Recorder()
    rec.tracker.expect(first, ExpectedCall(phone="79121234567", code="100"))
    rec.feed(ringing + end)
    assert rec.summary() == [("out", "79121234567", ("100",), None, None, None),
                             ("hangup", "79121234567", ("100",), None, None, "no answered")]
    [call] = rec.finished
    assert (call.result, call.manager_code, call.answered) == ("no answer", "100", False)


def ring_group() -> tuple[list[dict], str]:
    """inbound_answered with a second manager (200) ringing in parallel and losing the race."""
    evs = capture.events("inbound_answered")
    _a_leg, b_leg = capture.legs(evs)[:2]
    loser, loser_id = capture.rename(capture.of_leg(evs, b_leg), b_leg)
    loser = capture.set_fields(loser, Caller__Destination__Number="200", Caller__Callee__ID__Number="200")
    create = [e for e in loser if e["Event-Name"] in ("CHANNEL_CREATE", "CHANNEL_PROGRESS")]
    end = capture.set_fields([e for e in loser if e["Event-Name"] in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")],
                             Hangup__Cause="LOSE_RACE")
    out: list[dict] = []
    for e in evs:
        out.append(e)
        if e["Unique-ID" if "Unique-ID" in e else "Event-Name"] == b_leg and e["Event-Name"] == "CHANNEL_CREATE":
            out += create[:1]
        if e.get("Unique-ID") == b_leg and e["Event-Name"] == "CHANNEL_PROGRESS":
            out += create[1:]
        if e.get("Unique-ID") == b_leg and e["Event-Name"] == "CHANNEL_ANSWER":
            out += end
    return out, loser_id


def test_ring_group_pops_one_card_for_every_ringing_manager() -> None:
    evs, _ = ring_group()
    rec = Recorder().feed(evs)
    assert rec.summary() == [
        ("in", CUSTOMER, ("100", "200"), "74999999999", "shop1", None),
        ("hangup", CUSTOMER, ("100", "200"), "74999999999", "shop1", "answered"),
    ]
    [call] = rec.finished
    assert call.manager_code == "100" and call.answered, "the loser (LOSE_RACE) is not a missed call"


def test_ring_group_nobody_answers_names_the_last_manager_rung() -> None:
    evs, loser = ring_group()
    a_leg, b_leg = capture.legs(evs)[:2]
    # Stop before anyone answers, then both legs time out and the customer's leg ends.
    cut = next(i for i, e in enumerate(evs) if e["Event-Name"] == "CHANNEL_ANSWER")
    ends = [e for e in evs if e["Event-Name"] == "CHANNEL_HANGUP_COMPLETE" and e["Unique-ID"] in (b_leg, a_leg)]
    ends = capture.set_fields(ends, Hangup__Cause="NO_ANSWER")
    loser_end = [e for e in evs[cut:] if e.get("Unique-ID") == loser]
    loser_end = capture.set_fields(loser_end, Hangup__Cause="NO_ANSWER")
    rec = Recorder().feed([*evs[:cut], ends[0], *loser_end, ends[1]])
    assert rec.summary()[-1] == ("hangup", CUSTOMER, ("100", "200"), "74999999999", "shop1", "no answered")
    [call] = rec.finished
    assert (call.result, call.manager_code) == ("no answer", "200")


def test_blind_transfer_pops_a_card_for_the_new_manager_and_credits_them() -> None:
    evs = capture.events("inbound_answered")
    _a_leg, b_leg = capture.legs(evs)[:2]
    first_bridge = next(i for i, e in enumerate(evs) if e["Event-Name"] == "CHANNEL_BRIDGE")
    # Manager 100 talks, then transfers: their leg ends with BLIND_TRANSFER...
    before = evs[:first_bridge + 1]
    b_end = capture.set_fields([e for e in capture.of_leg(evs, b_leg)
                                if e["Event-Name"] in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")],
                               Hangup__Cause="BLIND_TRANSFER")
    # ...and the customer's leg now rings 200, who answers and talks until the customer hangs up.
    second, c_leg = capture.rename(capture.of_leg(evs, b_leg), b_leg)
    second = capture.set_fields(second, Caller__Destination__Number="200", Caller__Callee__ID__Number="200")
    c_ring = [e for e in second if e["Event-Name"] in ("CHANNEL_CREATE", "CHANNEL_PROGRESS", "CHANNEL_ANSWER")]
    bridge2, _ = capture.rename([evs[first_bridge]], b_leg, c_leg)
    after = [e for e in evs[first_bridge + 1:] if e.get("Unique-ID") != b_leg]
    c_end = [e for e in second if e["Event-Name"] in ("CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY")]
    rec = Recorder().feed(before + b_end + c_ring + bridge2 + c_end + after)
    assert rec.summary() == [
        ("in", CUSTOMER, ("100",), "74999999999", "shop1", None),
        ("in", CUSTOMER, ("200",), "74999999999", "shop1", None),
        ("hangup", CUSTOMER, ("100", "200"), "74999999999", "shop1", "answered"),
    ]
    [call] = rec.finished
    assert call.manager_code == "200" and call.direction == "in"
    assert call.answer_us == int(evs[first_bridge]["Event-Date-Timestamp"]), "talk counted from the first bridge"


def test_internal_call_between_managers_is_not_a_customer_call() -> None:
    evs = capture.events("outbound_ext_dial")
    _manager_leg, _other = capture.legs(evs)[:2]
    internal = capture.set_fields(evs, Caller__Destination__Number="200", Caller__Callee__ID__Number="200")
    rec = Recorder().feed(internal)
    assert rec.cards == [] and rec.finished == []


def test_a_customer_whose_caller_id_looks_like_an_extension_is_still_a_customer_via_a_trunk() -> None:
    evs = capture.set_fields(capture.events("inbound_answered"), Caller__Caller__ID__Number="200",
                             Caller__Username="200")
    # Without trunk settings the caller looks like manager 200 calling manager 100: no card.
    assert Recorder().feed(evs).cards == []
    trunked = Directory(managers=DIRECTORY.managers, external_phones=DIRECTORY.external_phones,
                        contexts=frozenset({"public"}))
    rec = Recorder(trunked).feed(evs)
    assert [c.type for c in rec.cards] == ["in", "hangup"]


def test_reconcile_closes_calls_that_ended_while_disconnected() -> None:
    evs = capture.events("inbound_answered")
    bridge = next(i for i, e in enumerate(evs) if e["Event-Name"] == "CHANNEL_BRIDGE")
    rec = Recorder().feed(evs[:bridge + 1])
    assert len(rec.tracker.legs) == 2
    snapshot = rec.tracker.seen
    assert rec.tracker.reconcile(live=set(), snapshot=snapshot) == 2
    assert rec.summary()[-1][0] == "hangup" and rec.summary()[-1][-1] == "answered"
    [call] = rec.finished
    assert call.answered and call.manager_code == "100"
    # Events arriving later for those channels do not resurrect them.
    rec.feed(evs[bridge + 1:])
    assert len(rec.finished) == 1 and rec.tracker.legs == {}


def test_reconcile_keeps_live_channels_and_channels_newer_than_the_snapshot() -> None:
    evs = capture.events("inbound_answered")
    a_leg, b_leg = capture.legs(evs)[:2]
    bridge = next(i for i, e in enumerate(evs) if e["Event-Name"] == "CHANNEL_BRIDGE")
    rec = Recorder().feed(evs[:bridge])
    snapshot = rec.tracker.seen
    rec.feed([evs[bridge]])            # touches both legs after the snapshot was asked for
    assert rec.tracker.reconcile(live=set(), snapshot=snapshot) == 0
    assert rec.tracker.reconcile(live={a_leg, b_leg}, snapshot=rec.tracker.seen) == 0
    assert rec.finished == []


def test_lost_hangup_complete_is_covered_by_destroy() -> None:
    evs = [e for e in capture.events("inbound_busy") if e["Event-Name"] != "CHANNEL_HANGUP_COMPLETE"]
    rec = Recorder().feed(evs)
    assert rec.summary()[-1][-1] == "busy"
    assert rec.tracker.legs == {}


def test_manager_busy_without_ringing_is_still_the_manager_of_the_missed_call() -> None:
    """Do-not-disturb: FreeSWITCH ends the manager's leg with USER_BUSY before any ring (seen on 1.10.12)."""
    evs = [e for e in capture.events("inbound_busy") if e["Event-Name"] not in ("CHANNEL_PROGRESS",
                                                                                  "CHANNEL_PROGRESS_MEDIA")]
    rec = Recorder().feed(evs)
    assert rec.cards == [], "no ring, no card"
    [call] = rec.finished
    assert (call.manager_code, call.result, call.answered) == ("200", "busy", False)


def test_a_voicemail_message_does_not_replace_the_calls_recording() -> None:
    # The voicemail capture with its two RECORD_STOPs (record_session's <uuid>.wav and the voicemail
    # message) in the other order: the call's recording is still the record_session one.
    evs = capture.events("voicemail")
    stops = [i for i, e in enumerate(evs) if e.get("Event-Name") == "RECORD_STOP"]
    assert len(stops) == 2
    evs[stops[0]], evs[stops[1]] = evs[stops[1]], evs[stops[0]]
    assert "voicemail/" in evs[stops[1]]["Record-File-Path"]
    rec = Recorder().feed(evs)
    [call] = rec.finished
    assert call.recording_path.rsplit("/", 1)[-1] == f"{capture.legs(evs)[0]}.wav"
    assert (call.answered, call.result, call.manager_code) == (False, "no answer", "100")
