"""The contact-center flows of issue 14 on a real FreeSWITCH: queues (mod_callcenter), call pickup,
attended transfer, voicemail after no answer, forwarding to a mobile through a trunk, a ring group
through loopback/ legs, hold with music, park and retrieve. Each test asserts what the managers see in
the CRM (the cards, exactly), the call history entry, and how long after the phone's `180 Ringing`
each `in` card reached the CRM.

FSBRIDGE_E2E_CAPTURE_DIR=dir records each flow's Event Socket traffic (`event plain ALL` and `event json
ALL` connections) as dir/<flow>.{plain,json}.raw: how tests/fixtures/esl/'s flow captures were made.
"""

from __future__ import annotations

import json

import gevent
import pytest

from tests.e2e.conftest import World
from tests.e2e.harness import (
    CUSTOMER,
    DID_100,
    DID_FORWARD,
    DID_LOOPBACK,
    DID_PICKUP,
    DID_QUEUE_EMPTY,
    DID_QUEUE_IDLE,
    DID_QUEUE_RINGALL,
    DID_VOICEMAIL,
)
from tests.e2e.test_calls import check_card_delay, check_history, only_call
from tests.waiting import until

pytestmark = pytest.mark.e2e

UNASSIGNED = "200"  # history.unassigned_code of the e2e config (conftest.py)
def cards(world: World) -> list[tuple[str, tuple[str, ...], str | None, str | None]]:
    """(type, codes, externalPhone, hangupStatus) of each call event; codes sorted (legs of one ring
    reach FreeSWITCH's event queue in either order)."""
    assert {e["phone"] for e in world.crm.events} <= {CUSTOMER}
    return [(e["type"], tuple(sorted(e["codes"])), e.get("externalPhone"), e.get("hangupStatus"))
            for e in world.crm.events]


def in_cards(world: World) -> list[str]:
    """Every code that got an `in` card, in order, each once."""
    codes = [c for e in world.crm.events if e["type"] == "in" for c in e["codes"]]
    assert len(codes) == len(set(codes)), f"a manager got two cards: {world.events()}"
    return codes


def leg_of(world: World, ext: str) -> str:
    """The uuid of FreeSWITCH's channel to extension `ext`'s phone."""
    rows = json.loads(world.fs.api("show channels as json")).get("rows") or []
    for row in rows:
        if row.get("direction") == "outbound" and row.get("dest") == ext and "loopback" not in row.get("name", ""):
            return str(row["uuid"])
    raise AssertionError(f"no channel to {ext}: {rows}")


def answered(world: World, ext: str) -> str:
    """The uuid of `ext`'s channel, once it is bridged."""
    uuid = ""

    def up() -> bool:
        nonlocal uuid
        try:
            uuid = leg_of(world, ext)
        except AssertionError:
            return False
        partner = world.fs.api(f"uuid_getvar {uuid} bridge_uuid").strip()
        return partner not in ("", "_undef_") and not partner.startswith("-ERR")

    until(up, 15, f"{ext} to answer and be bridged")
    return uuid


# -- queues (mod_callcenter) ------------------------------------------------------------------------

def test_queue_ring_all_answered(world: World) -> None:
    world.capture("queue_ringall_answered")
    first = world.sipp.phone("100", "ring")
    second = world.sipp.phone("200", "answer", ring_ms=1500)
    customer = world.sipp.customer(DID_QUEUE_RINGALL, "talk", hold_ms=6000)
    customer.ok()
    second.ok()
    first.ok()

    world.wait_events(2)
    assert cards(world) == [("in", ("100", "200"), DID_QUEUE_RINGALL, None),
                            ("hangup", ("100", "200"), DID_QUEUE_RINGALL, "answered")]
    check_card_delay(world, second, "200")
    call = only_call(world)
    assert call.manager_code == "200" and call.answered
    assert call.duration_waiting >= 1, "the wait in the queue counts"
    check_history(world, call.call_id, result="answered", code="200", did=DID_QUEUE_RINGALL,
                  talk_s=call.duration, recorded=True)


def test_queue_longest_idle_agent_answered(world: World) -> None:
    world.capture("queue_idle_answered")
    phones = {"100": world.sipp.phone("100", "answer", ring_ms=1000),
              "200": world.sipp.phone("200", "answer", ring_ms=1000)}
    customer = world.sipp.customer(DID_QUEUE_IDLE, "talk", hold_ms=5000)
    customer.ok()
    # One agent at a time: the longest idle one is offered the call, and answers.
    offered = [code for code, phone in phones.items() if "INVITE" in phone.messages()]
    assert len(offered) == 1, offered
    code = offered[0]
    phones[code].ok()

    world.wait_events(2)
    assert cards(world) == [("in", (code,), DID_QUEUE_IDLE, None), ("hangup", (code,), DID_QUEUE_IDLE, "answered")]
    check_card_delay(world, phones[code], code)
    call = only_call(world)
    assert call.manager_code == code
    check_history(world, call.call_id, result="answered", code=code, did=DID_QUEUE_IDLE,
                  talk_s=call.duration, recorded=True)


def test_queue_abandoned_before_any_agent_was_offered(world: World) -> None:
    world.capture("queue_abandoned_unoffered")
    customer = world.sipp.customer(DID_QUEUE_EMPTY, "talk", hold_ms=3000)
    customer.ok()

    call = world.wait_finished()
    gevent.sleep(0.5)
    assert world.events() == [], "nobody's phone rang: a queued customer is not a card"
    assert not call.answered and call.manager_code is None and call.duration_waiting >= 2
    check_history(world, call.call_id, result="no answer", code=UNASSIGNED, did=DID_QUEUE_EMPTY)


def test_queue_abandoned_after_agents_were_rung(world: World) -> None:
    world.capture("queue_abandoned_rung")
    first = world.sipp.phone("100", "ring")
    second = world.sipp.phone("200", "ring")
    customer = world.sipp.customer(DID_QUEUE_RINGALL, "talk", hold_ms=4000)
    customer.ok()
    first.ok()
    second.ok()

    world.wait_events(2)
    assert cards(world) == [("in", ("100", "200"), DID_QUEUE_RINGALL, None),
                            ("hangup", ("100", "200"), DID_QUEUE_RINGALL, "cancel")]
    check_card_delay(world, first, "100")
    check_card_delay(world, second, "200")
    call = only_call(world)
    assert not call.answered and set(call.codes) == {"100", "200"}
    check_history(world, call.call_id, result="no answer", code=call.manager_code, did=DID_QUEUE_RINGALL)


# -- pickup, transfers, hold, park ----------------------------------------------------------------

def test_call_pickup(world: World) -> None:
    world.capture("pickup")
    ringing = world.sipp.phone("100", "ring")
    customer = world.sipp.customer(DID_PICKUP, "talk", hold_ms=5000)
    until(lambda: "INVITE" in ringing.messages(), 10, "100's phone to ring")
    gevent.sleep(1.0)
    picker = world.sipp.extension_dials("**100", caller="200")
    customer.ok()
    picker.ok()
    ringing.ok()

    world.wait_events(3)
    assert cards(world) == [("in", ("100",), DID_PICKUP, None), ("in", ("200",), DID_PICKUP, None),
                            ("hangup", ("100", "200"), DID_PICKUP, "answered")]
    check_card_delay(world, ringing, "100")
    call = only_call(world)
    assert call.manager_code == "200", "credited to the manager who picked it up"
    check_history(world, call.call_id, result="answered", code="200", did=DID_PICKUP, talk_s=5, recorded=True)


@pytest.mark.parametrize("consult", ["answered", "not-answered"])
def test_attended_transfer(world: World, consult: str) -> None:
    """100 consults 200 (att_xfer, as a phone's transfer key bound to it does). Answered: 100 hangs up 6 s
    after answering and the customer is 200's. Not answered: 200 rings 4 s (originate_timeout), then 100
    takes the customer back and keeps the call."""
    answers = consult == "answered"
    world.capture("attended_transfer" if answers else "attended_transfer_no_answer")
    first = world.sipp.phone("100", "talk", ring_ms=1000, hold_ms=6000) if answers \
        else world.sipp.phone("100", "answer", ring_ms=1000)
    second = world.sipp.phone("200", "answer" if answers else "ring", ring_ms=1000)
    customer = world.sipp.customer(DID_100, "talk", hold_ms=12000)
    leg = answered(world, "100")
    gevent.sleep(1.0)
    world.fs.api(f"uuid_broadcast {leg} att_xfer::{{originate_timeout=4,origination_caller_id_number=100}}"
                 f"sofia/internal/200@127.0.0.1:{world.fs.ports.ext200} aleg")
    customer.ok()
    first.ok()
    second.ok()

    world.wait_events(3)
    assert cards(world) == [("in", ("100",), DID_100, None), ("in", ("200",), DID_100, None),
                            ("hangup", ("100", "200"), DID_100, "answered")]
    check_card_delay(world, first, "100")
    check_card_delay(world, second, "200")
    call = only_call(world)
    code = "200" if answers else "100"
    assert call.manager_code == code, "credited to the last manager who talked"
    check_history(world, call.call_id, result="answered", code=code, did=DID_100, talk_s=12, recorded=True)


def test_hold_with_music(world: World) -> None:
    world.capture("hold_moh")
    phone = world.sipp.phone("100", "hold", ring_ms=1000)
    customer = world.sipp.customer(DID_100, "talk", hold_ms=6000)
    customer.ok()
    phone.ok()

    world.wait_events(2)
    assert cards(world) == [("in", ("100",), DID_100, None), ("hangup", ("100",), DID_100, "answered")]
    check_card_delay(world, phone, "100")
    call = only_call(world)
    assert call.manager_code == "100"
    check_history(world, call.call_id, result="answered", code="100", did=DID_100, talk_s=6, recorded=True)


def test_park_and_retrieve(world: World) -> None:
    world.capture("park_retrieve")
    first = world.sipp.phone("100", "transfer", ring_ms=1000, transfer_to="6001")
    customer = world.sipp.customer(DID_100, "talk", hold_ms=10000)
    first.ok()  # parked: FreeSWITCH took the REFER and hung 100's phone up
    gevent.sleep(1.0)
    retriever = world.sipp.extension_dials("6001", caller="200")
    customer.ok()
    retriever.ok()

    world.wait_events(3)
    assert cards(world) == [("in", ("100",), DID_100, None), ("in", ("200",), DID_100, None),
                            ("hangup", ("100", "200"), DID_100, "answered")]
    check_card_delay(world, first, "100")
    call = only_call(world)
    assert call.manager_code == "200", "credited to the manager who took the call from the lot"
    check_history(world, call.call_id, result="answered", code="200", did=DID_100, talk_s=10, recorded=True)


# -- voicemail, forwarding, loopback ----------------------------------------------------------------

def test_voicemail_after_no_answer(world: World) -> None:
    world.capture("voicemail")
    phone = world.sipp.phone("100", "ring")
    customer = world.sipp.customer(DID_VOICEMAIL, "talk", hold_ms=4000)
    customer.ok(timeout=60)
    phone.ok()

    world.wait_events(2)
    assert cards(world) == [("in", ("100",), DID_VOICEMAIL, None), ("hangup", ("100",), DID_VOICEMAIL, "no answered")]
    check_card_delay(world, phone, "100")
    call = only_call(world)
    assert not call.answered, "FreeSWITCH answered the customer, but no manager talked"
    check_history(world, call.call_id, result="no answer", code="100", did=DID_VOICEMAIL)


def test_forwarded_to_a_mobile_through_a_trunk(world: World) -> None:
    world.capture("forward_mobile")
    mobile = world.sipp.phone("customer", "answer", ring_ms=1000)
    customer = world.sipp.customer(DID_FORWARD, "talk", hold_ms=4000)
    customer.ok()
    mobile.ok()

    world.wait_events(2)
    assert cards(world) == [("in", ("100",), DID_FORWARD, None), ("hangup", ("100",), DID_FORWARD, "answered")]
    check_card_delay(world, mobile, "100")
    call = only_call(world)
    assert call.manager_code == "100" and call.answered, "the mobile's leg is the manager's, not a customer's"
    check_history(world, call.call_id, result="answered", code="100", did=DID_FORWARD, talk_s=4, recorded=True)


def test_ring_group_through_loopback_legs(world: World) -> None:
    world.capture("loopback_ring_group")
    first = world.sipp.phone("100", "ring")
    second = world.sipp.phone("200", "answer", ring_ms=1500)
    customer = world.sipp.customer(DID_LOOPBACK, "talk", hold_ms=4000)
    customer.ok()
    second.ok()
    first.ok()

    until(lambda: world.crm.events and world.crm.events[-1]["type"] == "hangup", 20, "the hangup card")
    gevent.sleep(0.5)
    assert sorted(in_cards(world)) == ["100", "200"]
    assert cards(world)[-1] == ("hangup", ("100", "200"), DID_LOOPBACK, "answered")
    check_card_delay(world, first, "100")
    check_card_delay(world, second, "200")
    call = only_call(world)
    assert call.manager_code == "200"
    check_history(world, call.call_id, result="answered", code="200", did=DID_LOOPBACK, talk_s=4, recorded=True)
