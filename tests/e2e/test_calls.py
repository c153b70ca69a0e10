"""Real calls through a real FreeSWITCH: SIPp customers and phones, fsbridge in-process,
the strict fake retailCRM. Each test asserts what a manager would see in the CRM: the
pop-up cards (call events, exactly), the call history entry and its playable recording.
Inbound calls through the lab dialplan, click-to-call through GET /retailcrm/make-call, and
inbound calls routed by the shipped fsbridge_inbound.xml + fsbridge_route.lua (DID_ROUTED).

How FreeSWITCH is found, and how to enable these tests: tests/e2e/conftest.py.
"""

from __future__ import annotations

import datetime
import os
import zoneinfo
from typing import Any

import gevent
import pytest
import requests

from tests.conftest import CLIENT_ID
from tests.e2e.conftest import CLICK_RING_TIMEOUT, World
from tests.e2e.harness import (
    CUSTOMER,
    DID_100,
    DID_200,
    DID_GROUP,
    DID_ROUTED,
    ROUTED_FALLBACK,
    free_port,
    read_wav,
    ringing_sent_at,
)

pytestmark = pytest.mark.e2e

CRM_ZONE = zoneinfo.ZoneInfo("Europe/Moscow")  # tests/conftest.py settings(): crm.timezone
USER_IDS = {"100": 1, "200": 2}               # tests/conftest.py settings(): managers
# Goal for an `in` card: in the CRM within this long after the manager's phone sent 180 Ringing (loopback).
CARD_DELAY_GOAL = float(os.environ.get("FSBRIDGE_E2E_CARD_DELAY", "0.05"))


def card(kind: str, codes: list[str], did: str | None, status: str | None = None, *, phone: str = CUSTOMER) -> tuple:
    return (kind, phone, codes, did, status)


def check_history(world: World, call_id: str, *, result: str, code: str, did: str | None,
                  talk_s: float = 0.0, recorded: bool | None = False, kind: str = "in",
                  phone: str = CUSTOMER) -> dict[str, Any]:
    """The call history entry, as the manager reads it in the CRM. recorded=None: not checked."""
    cdr = world.wait_cdr(call_id)
    assert {k: cdr.get(k) for k in ("type", "phone", "result", "code", "userId", "externalPhone", "site",
                                    "externalId")} == {
        "type": kind, "phone": phone, "result": result, "code": code, "userId": USER_IDS[code],
        "externalPhone": did, "site": "shop1" if did else None, "externalId": call_id}
    # The CRM reads dates on its own wall clock: a call that just happened is "now" in Moscow.
    date = datetime.datetime.strptime(cdr["date"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=CRM_ZONE)
    age = (datetime.datetime.now(CRM_ZONE) - date).total_seconds()
    assert 0 <= age < 120, f"history date {cdr['date']} is not the call's start on the CRM's clock"
    assert abs(cdr["duration"] - talk_s) <= 2, f"talk time {cdr['duration']} s, expected about {talk_s:g} s"
    if recorded:
        assert cdr.get("recordUrl"), "an answered call has a recording link"
        check_recording(world, cdr["recordUrl"], min_seconds=talk_s)
    elif recorded is False:
        assert not cdr.get("recordUrl"), "no link to the silence of a call nobody talked in"
    return cdr


def check_recording(world: World, url: str, min_seconds: float) -> None:
    """The manager clicks the link: the browser gets a WAV it can play and seek in."""
    if world.records_url is None:
        return  # no record proxy yet, or a FreeSWITCH whose recordings this machine cannot read
    got = requests.get(url, timeout=10)
    assert got.status_code == 200, f"{url} -> {got.status_code}"
    assert got.headers["Content-Type"] in ("audio/wav", "audio/x-wav", "audio/wave")
    wav = read_wav(got.content)
    assert (wav.channels, wav.rate) == (2, 8000), "record_session with RECORD_STEREO: 8 kHz stereo"
    assert wav.seconds >= min_seconds - 1, f"recording is {wav.seconds:.1f} s, the talk was {min_seconds:g} s"
    assert max(wav.rms) > 300, f"the recording is silent (RMS per channel {wav.rms})"
    part = requests.get(url, headers={"Range": "bytes=0-99"}, timeout=10)
    assert part.status_code == 206 and len(part.content) == 100, "players seek with Range requests"


def check_card_delay(world: World, phone: Any, code: str) -> float:
    """The `in` card of `code` reached the CRM within CARD_DELAY_GOAL of the phone's 180 Ringing (SIPp's
    trace), the moment the manager hears it ring."""
    card = next(e for e in world.crm.events if e["type"] == "in" and code in e["codes"])
    delay = card["_received"] - ringing_sent_at(phone)
    print(f"card delay {code}: {delay * 1000:.1f} ms")
    assert delay <= CARD_DELAY_GOAL, f"{code}'s card reached the CRM {delay * 1000:.0f} ms after its 180"
    return delay


def only_call(world: World) -> Any:
    call = world.wait_finished()
    assert [c.call_id for c in world.finished] == [call.call_id]
    assert {e["callExternalId"] for e in world.crm.events} == {call.call_id}, "one call, one id"
    return call


def test_inbound_answered(world: World) -> None:
    phone = world.sipp.phone("100", "answer", ring_ms=1000)
    customer = world.sipp.customer(DID_100, "talk", hold_ms=4000)
    customer.ok()
    phone.ok()

    world.wait_events(2)
    assert world.events() == [card("in", ["100"], DID_100), card("hangup", ["100"], DID_100, "answered")]
    check_card_delay(world, phone, "100")
    call = only_call(world)
    check_history(world, call.call_id, result="answered", code="100", did=DID_100, talk_s=4, recorded=True)


def test_manager_does_not_answer(world: World) -> None:
    phone = world.sipp.phone("200", "ring")
    customer = world.sipp.customer(DID_200, "refused")
    customer.ok(timeout=60)
    phone.ok()

    world.wait_events(2)
    assert world.events() == [card("in", ["200"], DID_200), card("hangup", ["200"], DID_200, "no answered")]
    call = only_call(world)
    assert call.hangup_cause == "NO_ANSWER"
    check_history(world, call.call_id, result="no answer", code="200", did=DID_200)


def test_manager_busy(world: World) -> None:
    # The lab's busy phone: it rings, then its owner (already on a call) rejects with 486.
    phone = world.sipp.phone("200", "busy", ring_ms=500)
    customer = world.sipp.customer(DID_200, "refused")
    customer.ok()
    phone.ok()

    world.wait_events(2)
    assert world.events() == [card("in", ["200"], DID_200), card("hangup", ["200"], DID_200, "busy")]
    call = only_call(world)
    assert call.hangup_cause == "USER_BUSY"
    check_history(world, call.call_id, result="busy", code="200", did=DID_200)


def test_manager_on_do_not_disturb(world: World) -> None:
    # 486 at once, no ringing: no card can pop, but the customer's missed call still belongs in the history.
    phone = world.sipp.phone("200", "dnd")
    customer = world.sipp.customer(DID_200, "refused")
    customer.ok()
    phone.ok()

    call = world.wait_finished()
    gevent.sleep(0.5)
    assert world.events() == [], "no phone rang: no card to pop"
    assert call.hangup_cause == "USER_BUSY"
    check_history(world, call.call_id, result="busy", code="200", did=DID_200)


def test_customer_gives_up_while_ringing(world: World) -> None:
    phone = world.sipp.phone("100", "ring")
    customer = world.sipp.customer(DID_100, "cancel", hold_ms=2500)
    customer.ok()
    phone.ok()

    world.wait_events(2)
    assert world.events() == [card("in", ["100"], DID_100), card("hangup", ["100"], DID_100, "cancel")]
    call = only_call(world)
    check_history(world, call.call_id, result="no answer", code="100", did=DID_100)


def test_ring_group_second_manager_answers(world: World) -> None:
    first = world.sipp.phone("100", "ring")
    second = world.sipp.phone("200", "answer", ring_ms=1500)
    customer = world.sipp.customer(DID_GROUP, "talk", hold_ms=3000)
    customer.ok()
    second.ok()
    first.ok()  # its phone stopped ringing (CANCEL) when 200 answered

    world.wait_events(2)
    # Both phones ring at once, and which of their legs FreeSWITCH reports first varies: the CRM
    # shows the card to both managers either way. Usually one `in` names both; when FreeSWITCH reports
    # 200's leg only after 100's phone rang (seen once with a FreeSWITCH started by hand), 200 gets an
    # `in` of its own right after. Each manager's card once, before the hangup that names both.
    events = [(kind, phone, sorted(codes), did, status) for kind, phone, codes, did, status in world.events()]
    assert events[-1] == card("hangup", ["100", "200"], DID_GROUP, "answered"), events
    ins = events[:-1]
    assert sorted(code for _, _, codes, _, _ in ins for code in codes) == ["100", "200"], events
    assert all(event == card("in", event[2], DID_GROUP) for event in ins), events
    call = only_call(world)
    assert call.manager_code == "200", "the call is credited to the manager who answered"
    check_history(world, call.call_id, result="answered", code="200", did=DID_GROUP, talk_s=3, recorded=True)


def test_blind_transfer_to_another_manager(world: World) -> None:
    # 100 answers, talks 2 s, transfers the customer to 200 (REFER); 200 answers after 1 s and
    # talks until the customer hangs up, 8 s after 100 answered.
    first = world.sipp.phone("100", "transfer", ring_ms=1000, transfer_to="200")
    second = world.sipp.phone("200", "answer", ring_ms=1000)
    customer = world.sipp.customer(DID_100, "talk", hold_ms=8000)
    customer.ok()
    first.ok()
    second.ok()

    world.wait_events(3)
    assert world.events() == [card("in", ["100"], DID_100), card("in", ["200"], DID_100),
                              card("hangup", ["100", "200"], DID_100, "answered")]
    call = only_call(world)
    assert call.manager_code == "200", "the call ends with, and is credited to, the manager it was transferred to"
    check_history(world, call.call_id, result="answered", code="200", did=DID_100, talk_s=8, recorded=True)


@pytest.mark.slow
@pytest.mark.parametrize("crash", [False, True], ids=["graceful-restart", "crash"])
def test_freeswitch_restarted_mid_call(world: World, crash: bool) -> None:
    if not world.fs.can_restart:
        world.fs.restart(crash)  # skips, saying why
    phone = world.sipp.phone("100", "answer", ring_ms=500)
    customer = world.sipp.customer(DID_100, "talk", hold_ms=120_000)
    world.wait_events(1)
    # Talking: both legs bridged.
    gevent.sleep(2.0)
    reconnects = world.bridge.listener.reconnects

    world.fs.restart(crash)
    customer.stop()
    phone.stop()

    world.wait_events(2, timeout=30)
    assert world.events() == [card("in", ["100"], DID_100), card("hangup", ["100"], DID_100, "answered")]
    call = only_call(world)
    assert call.answered and call.manager_code == "100"
    assert world.bridge.listener.reconnects > reconnects
    # A graceful stop closes the recording (RECORD_STOP arrives, the file is whole); after a crash
    # neither is sure, so only the history entry itself is checked.
    check_history(world, call.call_id, result="answered", code="100", did=DID_100,
                  talk_s=(call.end_us - call.answer_us) / 1e6, recorded=None if crash else True)

    # The next call goes through the new FreeSWITCH as usual.
    world.crm.events.clear()
    world.finished.clear()
    phone = world.sipp.phone("200", "busy", ring_ms=300)
    customer = world.sipp.customer(DID_200, "refused")
    customer.ok()
    phone.ok()
    world.wait_events(2)
    assert world.events() == [card("in", ["200"], DID_200), card("hangup", ["200"], DID_200, "busy")]


# -- click-to-call: GET /retailcrm/make-call -> bgapi originate (fsbridge/originate.py) ----------------

def click(world: World, monkeypatch: pytest.MonkeyPatch, code: str, phone: str,
          **extra: str) -> tuple[requests.Response, list[str]]:
    """The manager clicks the customer's number in the CRM: retailCRM calls fsbridge's makeCallUrl.
    Also returns the ids fsbridge gave the calls it originated (its origination_uuid)."""
    started: list[str] = []
    originator = world.bridge.originator
    assert originator is not None, "click-to-call is off: originate.* of the e2e config"
    real = originator.click

    def spy(c: Any) -> str:
        started.append(real(c))
        return started[-1]

    monkeypatch.setattr(originator, "click", spy)
    host, port = world.bridge.http.address
    params = {"clientId": CLIENT_ID, "code": code, "phone": phone, "userId": str(USER_IDS[code]), **extra}
    reply = requests.get(f"http://{host}:{port}/retailcrm/make-call", params=params, timeout=20)
    return reply, started


def invite_from(sipp: Any) -> str:
    """The caller id a phone shows: the user part of the From of the INVITE it received."""
    for line in sipp.messages().splitlines():
        if line.startswith("From:"):
            return line.split("<sip:", 1)[1].split("@", 1)[0]
    raise AssertionError(f"SIPp {sipp.name} received no INVITE")


def answered_click(world: World, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, dict[str, Any]]:
    """The manager picks up after 1 s; FreeSWITCH then calls the customer, who answers after 1 s, talks
    4 s and hangs up. Returns fsbridge's finished call and its history entry."""
    manager = world.sipp.phone("100", "answer", ring_ms=1000)
    customer = world.sipp.phone("customer", "talk", ring_ms=1000, hold_ms=4000)
    reply, started = click(world, monkeypatch, "100", CUSTOMER, externalPhone=DID_100)
    assert (reply.status_code, reply.text) == (200, ""), "retailCRM shows any other answer as a failure"
    assert len(started) == 1
    call_id = started[0]
    # The manager's leg is the channel fsbridge named with origination_uuid.
    assert world.fs.api(f"uuid_exists {call_id}").strip() == "true"
    customer.ok()
    manager.ok()
    assert invite_from(manager) == CUSTOMER, "the manager's phone shows whom they are calling"
    assert invite_from(customer) == DID_100, "the customer sees the company's number (externalPhone)"

    world.wait_events(2)
    assert world.events() == [card("out", ["100"], DID_100), card("hangup", ["100"], DID_100, "answered")]
    call = only_call(world)
    assert call.call_id == call_id, "the call's id in the CRM is the uuid fsbridge originated it with"
    assert call.direction == "out" and call.answered and call.manager_code == "100"
    cdr = check_history(world, call_id, kind="out", result="answered", code="100", did=DID_100, talk_s=4,
                        recorded=None)
    return call, cdr


def test_click_to_call_answered(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    answered_click(world, monkeypatch)


# FreeSWITCH 1.10 refuses a `{var=value}` of an originate whose value contains "${" unless
# origination_nested_vars=true (switch_ivr_originate.c, oglobals.check_vars), and logs
#   [CRIT] switch_channel.c:1508 Invalid data (${execute_on_answer} contains a variable)
# so fsbridge writes the call's uuid (its origination_uuid) into the record_session path itself.
def test_click_to_call_is_recorded(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    call, cdr = answered_click(world, monkeypatch)
    assert call.recording_path, "FreeSWITCH recorded the call (RECORD_STOP)"
    assert cdr.get("recordUrl"), "an answered call has a recording link"
    check_recording(world, cdr["recordUrl"], min_seconds=4)


CLICKED = "+" + CUSTOMER


def test_click_to_call_manager_does_not_answer(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = world.sipp.phone("100", "ring")
    customer = world.sipp.phone("customer", "talk")
    # The number as the CRM's customer card shows it: fsbridge dials (and reports) +75555555555.
    reply, started = click(world, monkeypatch, "100", "+7 (555) 555-55-55")
    # 200 as soon as the manager's phone rings: the click worked, whatever the manager does next.
    assert (reply.status_code, reply.text) == (200, "")
    assert len(started) == 1
    assert world.fs.api(f"uuid_exists {started[0]}").strip() == "true", "answered while the phone still rings"
    assert "INVITE" in manager.messages()
    manager.ok(timeout=CLICK_RING_TIMEOUT + 30)  # FreeSWITCH gives up after originate.ring_timeout (CANCEL)

    world.wait_events(2)
    assert world.events() == [card("out", ["100"], None, phone=CLICKED),
                              card("hangup", ["100"], None, "no answered", phone=CLICKED)]
    call = only_call(world)
    assert call.call_id == started[0]
    assert call.hangup_cause == "NO_ANSWER"
    check_history(world, call.call_id, kind="out", result="no answer", code="100", did=None, phone=CLICKED)
    assert "INVITE" not in customer.messages(), "the customer is called only once the manager answers"


# -- inbound routing: fsbridge_inbound.xml + fsbridge_route.lua -> GET /routing/manager ----------------

RESPONSIBLE_200 = {"id": 2, "firstName": "Manager", "lastName": "Two", "email": "m2@example.com", "code": "200"}


def routed(world: World) -> None:
    if not world.fs.routed_did:
        pytest.skip("the routed DID is installed only in a FreeSWITCH the suite starts itself "
                    "(FSBRIDGE_E2E_FREESWITCH): its dialplan is the shipped one, edited at start-up")


def manager_lookups(world: World) -> list[str]:
    """The numbers fsbridge asked the CRM about (GET /api/v5/telephony/manager), retries included."""
    return [r.params.get("phone", "") for r in world.crm.requests if r.path == "/api/v5/telephony/manager"]


def script_said(world: World, call_id: str) -> list[str]:
    """What fsbridge_route.lua logged about the customer's channel (its uuid is the call id)."""
    marker = f"fsbridge_route: {call_id}: "
    return [line.split(marker, 1)[1] for line in world.fs.log_tail(20000).splitlines() if marker in line]


def test_lua_routing_to_the_customers_manager(world: World) -> None:
    routed(world)
    # The customer's responsible manager in the CRM is 200; without one the DID would ring 100.
    world.crm.managers_by_phone[CUSTOMER] = RESPONSIBLE_200
    fallback = world.sipp.phone(ROUTED_FALLBACK, "answer")
    manager = world.sipp.phone("200", "answer", ring_ms=1000)
    customer = world.sipp.customer(DID_ROUTED, "talk", hold_ms=4000)
    customer.ok()
    manager.ok()
    assert "INVITE" not in fallback.messages(), "the fallback's phone must not ring"
    assert invite_from(manager) == CUSTOMER

    world.wait_events(2)
    assert world.events() == [card("in", ["200"], DID_ROUTED), card("hangup", ["200"], DID_ROUTED, "answered")]
    check_card_delay(world, manager, "200")
    call = only_call(world)
    assert call.manager_code == "200" and call.codes == ("200",)
    assert script_said(world, call.call_id) == ["ringing the responsible manager 200"]
    assert manager_lookups(world) == [CUSTOMER], "the script asked fsbridge, fsbridge asked the CRM, once"
    check_history(world, call.call_id, result="answered", code="200", did=DID_ROUTED, talk_s=4, recorded=True)


@pytest.mark.parametrize("down", ["crm-html503", "crm-timeout", "fsbridge-down"])
def test_lua_routing_falls_back_when_the_crm_is_down(world: World, down: str) -> None:
    routed(world)
    world.crm.managers_by_phone[CUSTOMER] = RESPONSIBLE_200  # what the CRM would say, were it up
    if down == "crm-html503":
        world.crm.outage = "html503"  # its nginx answers for it: fsbridge answers ""
    elif down == "crm-timeout":
        world.crm.outage = "timeout"  # no answer at all: fsbridge answers "" after routing.timeout
    else:
        # fsbridge's HTTP port closed: the script's own request fails (connection refused)
        world.fs.api(f"global_setvar e2e_fsbridge_port={free_port()}")
    manager = world.sipp.phone("200", "answer")
    fallback = world.sipp.phone(ROUTED_FALLBACK, "answer", ring_ms=1000)
    customer = world.sipp.customer(DID_ROUTED, "talk", hold_ms=4000)
    # Not dropped: the fallback answers and the customer talks until they hang up themselves.
    customer.ok()
    fallback.ok()
    assert "INVITE" not in manager.messages(), "the responsible manager's phone must not ring"
    assert invite_from(fallback) == CUSTOMER
    lookups = manager_lookups(world)
    world.crm.outage = None

    call = world.wait_finished()
    assert [c.call_id for c in world.finished] == [call.call_id]
    assert {e["callExternalId"] for e in world.crm.events} <= {call.call_id}
    assert call.manager_code == ROUTED_FALLBACK and call.answered
    said = script_said(world, call.call_id)
    if down == "fsbridge-down":
        assert lookups == []
        # e.g. "lookup failed: curl exit 7 (connection refused); ..." (curl: mod_lua has no LuaSocket here)
        assert len(said) == 1 and said[0].startswith("lookup failed: ") \
            and said[0].endswith(f"; transferring to {ROUTED_FALLBACK} XML public"), said
        # The CRM is up: the cards are as for any call.
        world.wait_events(2)
        assert world.events() == [card("in", [ROUTED_FALLBACK], DID_ROUTED),
                                  card("hangup", [ROUTED_FALLBACK], DID_ROUTED, "answered")]
    else:
        assert lookups and set(lookups) == {CUSTOMER}, "fsbridge asked the CRM (and retried within its deadline)"
        assert said == [f"no free responsible manager; transferring to {ROUTED_FALLBACK} XML public"]
        # Cards that could not reach the CRM while it rang are dropped, not shown late: whatever did
        # arrive is about the fallback.
        gevent.sleep(1.0)
        assert all(e in (card("in", [ROUTED_FALLBACK], DID_ROUTED),
                         card("hangup", [ROUTED_FALLBACK], DID_ROUTED, "answered")) for e in world.events())
    # The history waits the outage out.
    check_history(world, call.call_id, result="answered", code=ROUTED_FALLBACK, did=DID_ROUTED, talk_s=4,
                  recorded=True)
