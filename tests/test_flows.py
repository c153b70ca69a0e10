"""The contact-center flows of issue 14, replayed from their real captures (tests/fixtures/esl/, made by
tests/e2e/test_flows.py on FreeSWITCH 1.10.12) with fresh ids over a real event socket, through fsbridge
to the strict fake retailCRM: the exact cards, and the exact call history record.

The rules each flow checks are written where the call model decides them (fsbridge/calls/) and in the
README's call-model section.
"""

from __future__ import annotations

from typing import Any

import gevent
import pytest

from tests.waiting import until

CUSTOMER = "75555555555"
DIDS = {"74999999999": "shop1", "74999999990": "shop1", "74999999989": "shop1", "74999999988": "shop1",
        "74999999987": "shop1", "74999999986": "shop1", "74999999985": "shop1", "74999999984": "shop1"}
UNASSIGNED = "200"  # history.unassigned_code, as in the e2e config


def card(kind: str, codes: list[str], did: str, status: str | None = None) -> tuple:
    return (kind, CUSTOMER, codes, did, status)


def history(did: str, result: str, code: str, duration: int, waiting: int, recorded: bool) -> dict[str, Any]:
    return {"type": "in", "phone": CUSTOMER, "result": result, "code": code, "userId": {"100": 1, "200": 2}[code],
            "duration": duration, "durationWaiting": waiting, "externalPhone": did, "site": "shop1",
            "recorded": recorded}


# capture: (the call events retailCRM receives, in order; the call's history record)
FLOWS: dict[str, tuple[list[tuple], dict[str, Any]]] = {
    # Both agents of a ring-all queue are offered the call at once: one card for both; 200 answers.
    "queue_ringall_answered": (
        [card("in", ["200", "100"], "74999999990"), card("hangup", ["200", "100"], "74999999990", "answered")],
        history("74999999990", "answered", "200", 4, 2, True)),
    # Longest idle agent: only the agent offered the call gets a card.
    "queue_idle_answered": (
        [card("in", ["100"], "74999999989"), card("hangup", ["100"], "74999999989", "answered")],
        history("74999999989", "answered", "100", 4, 1, True)),
    # The customer gave up in a queue no agent was offered from: no card, credited to unassigned_code.
    "queue_abandoned_unoffered": (
        [],
        history("74999999988", "no answer", UNASSIGNED, 0, 3, False)),
    # The customer gave up while both agents' phones rang: their cards close as "cancel".
    "queue_abandoned_rung": (
        [card("in", ["200", "100"], "74999999990"), card("hangup", ["200", "100"], "74999999990", "cancel")],
        history("74999999990", "no answer", "100", 0, 4, False)),
    # 200 intercepts (**100) the call ringing at 100: a new card for 200, credited to 200.
    "pickup": (
        [card("in", ["100"], "74999999984"), card("in", ["200"], "74999999984"),
         card("hangup", ["100", "200"], "74999999984", "answered")],
        history("74999999984", "answered", "200", 5, 1, True)),
    # 100 consults 200 (att_xfer), 200 answers, 100 hangs up: the customer is 200's.
    "attended_transfer": (
        [card("in", ["100"], "74999999999"), card("in", ["200"], "74999999999"),
         card("hangup", ["100", "200"], "74999999999", "answered")],
        history("74999999999", "answered", "200", 12, 1, True)),
    # 200 does not answer the consult: 100 takes the customer back and keeps the call.
    "attended_transfer_no_answer": (
        [card("in", ["100"], "74999999999"), card("in", ["200"], "74999999999"),
         card("hangup", ["100", "200"], "74999999999", "answered")],
        history("74999999999", "answered", "100", 12, 1, True)),
    # Hold and music on hold change nothing: one talk.
    "hold_moh": (
        [card("in", ["100"], "74999999999"), card("hangup", ["100"], "74999999999", "answered")],
        history("74999999999", "answered", "100", 6, 1, True)),
    # 100 parks the customer (REFER to 6001), 200 takes them from the lot: a card for 200, 200's call.
    "park_retrieve": (
        [card("in", ["100"], "74999999999"), card("in", ["200"], "74999999999"),
         card("hangup", ["100", "200"], "74999999999", "answered")],
        history("74999999999", "answered", "200", 10, 1, True)),
    # FreeSWITCH's voicemail answered the customer, no manager did: a missed call of 100.
    "voicemail": (
        [card("in", ["100"], "74999999987"), card("hangup", ["100"], "74999999987", "no answered")],
        history("74999999987", "no answer", "100", 0, 8, False)),
    # 100 forwards to a mobile through the "mobile" gateway: that leg is 100's, not a customer's.
    "forward_mobile": (
        [card("in", ["100"], "74999999986"), card("hangup", ["100"], "74999999986", "answered")],
        history("74999999986", "answered", "100", 4, 1, True)),
    # A ring group dialled through loopback/: the loopback halves are no one's, the phones behind them
    # ring (one card for both), the bridge is seen through the loopback pair: 200 answered.
    "loopback_ring_group": (
        [card("in", ["100", "200"], "74999999985"), card("hangup", ["100", "200"], "74999999985", "answered")],
        history("74999999985", "answered", "200", 4, 2, True)),
}


def received(crm) -> list[tuple]:
    return [(e["type"], e["phone"], e["codes"], e.get("externalPhone"), e.get("hangupStatus")) for e in crm.events]


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_flow_reaches_the_crm_exactly(flow: str, simulator, fake_crm, start_bridge) -> None:
    start_bridge(external_phones=DIDS, history={"unassigned_code": UNASSIGNED})
    cards, expected = FLOWS[flow]
    played = simulator.play(flow)
    until(lambda: played.a_leg in fake_crm.calls and len(received(fake_crm)) >= len(cards),
          what="the call in the history and its cards")
    gevent.sleep(0.1)   # and no more cards
    assert received(fake_crm) == cards
    assert {e["callExternalId"] for e in fake_crm.events} <= {played.a_leg}, "one call, one id: the customer's leg"
    assert list(fake_crm.calls) == [played.a_leg], "exactly one history record"
    got = dict(fake_crm.calls[played.a_leg])
    link = got.pop("recordUrl", "")
    got["recorded"] = bool(link)
    keys = ("type", "phone", "result", "code", "userId", "duration", "durationWaiting", "externalPhone", "site",
            "recorded")
    assert {k: got.get(k) for k in keys} == expected
    if link:
        assert link.endswith(f"/{played.a_leg}.wav"), "the customer's record_session is the call's recording"
