"""Card delivery when the CRM falls behind: fresh cards first, no card of a call after a newer one."""

from __future__ import annotations

import gc
import time

import gevent
import greenlet
import pytest

from fsbridge.calls.model import CallEvent
from fsbridge.crm import card_sender, client
from fsbridge.crm.card_sender import CardSender
from fsbridge.crm.client import RetailCRM
from tests.conftest import API_KEY
from tests.waiting import until


def card(kind: str, call: str) -> CallEvent:
    return CallEvent(kind, "79001234567", ("100",), call, hangup_status="answered" if kind == "hangup" else None)


def delivered(fake) -> list[tuple[str, str]]:
    return [(e["type"], e["callExternalId"]) for e in fake.events]


def test_first_come_first_served_while_the_crm_keeps_up(fake_crm) -> None:
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY, telephony_rate=0), workers=1)
    sender.start()
    try:
        for call in "abc":
            sender.submit(card("in", call))
        sender.submit(card("hangup", "a"))
        until(lambda: sender.sent == 4, what="all four cards")
        assert delivered(fake_crm) == [("in", "a"), ("in", "b"), ("in", "c"), ("hangup", "a")]
    finally:
        sender.stop()


def test_backlogged_crm_gets_the_newest_cards_first(fake_crm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(card_sender, "BACKLOG_AFTER", 0.2)
    fake_crm.latency = 0.3
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY, telephony_rate=0), workers=1)
    sender.start()
    try:
        sender.submit(card("in", "a"))  # taken at once: 0.3 s in the CRM
        gevent.sleep(0.05)
        for event in (card("in", "b"), card("in", "c"), card("hangup", "b")):
            sender.submit(event)
        until(lambda: sender.sent + sender.dropped_stale == 4, timeout=5, what="every card settled")
        # b's in and c's in waited 0.25 s+ behind a: the newest went first, and b's in, older than b's
        # hangup that was already sent, was dropped rather than opening a card for a call that is over.
        assert delivered(fake_crm) == [("in", "a"), ("hangup", "b"), ("in", "c")]
        assert (sender.sent, sender.dropped_stale) == (3, 1)
    finally:
        fake_crm.latency = 0.0
        sender.stop()


def test_slow_crm_gets_no_card_it_would_answer_too_late(fake_crm) -> None:
    # The CRM takes 0.22 s a request; five cards wait for one worker with a 1 s limit. The fourth and fifth
    # would start with less than twice 0.22 s left: dropped and counted without spending a request, where
    # the fifth used to reach the CRM after its limit and be counted stale all the same.
    fake_crm.latency = 0.22
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY), workers=1, max_age=1.0)
    for n in range(5):
        sender.submit(card("in", f"call-{n}"))
    sender.start()
    try:
        until(lambda: sender.sent + sender.dropped_stale == 5, timeout=5, what="every card settled")
        assert (sender.sent, sender.dropped_stale) == (3, 2)
        assert len(fake_crm.requests) == 3
    finally:
        fake_crm.latency = 0.0
        sender.stop()


def test_full_queue_makes_room_with_its_oldest_card(fake_crm) -> None:
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY), workers=1, queue_size=10)  # not started
    for n in range(12):
        sender.submit(card("in", f"call-{n}"))
    assert sender.dropped_full == 2 and sender.pending == 10
    sender.start()
    try:
        until(lambda: sender.sent == 10, what="the ten newest")
        assert [call for _, call in delivered(fake_crm)] == [f"call-{n}" for n in range(2, 12)]
    finally:
        sender.stop()


def test_memory_of_taken_calls_is_bounded_by_the_age_limit(fake_crm) -> None:
    fake_crm.telephony_rate_limit = None
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY, telephony_rate=0), workers=2, max_age=0.3)
    sender.start()
    try:
        for n in range(50):
            sender.submit(card("in", f"old-{n}"))
        until(lambda: sender.sent == 50, what="the first fifty")
        time.sleep(0.35)
        sender.submit(card("in", "new"))
        until(lambda: sender.sent == 51, what="one more")
        assert list(sender._taken) == ["new"]
    finally:
        sender.stop()


def test_one_slow_delivery_does_not_shut_out_the_cards_after_it(fake_crm) -> None:
    # The first delivery takes longer than half the age limit (a CRM hiccup, retries): later cards, fresh
    # from the queue, must still go out once the CRM is quick again.
    fake_crm.latency = 0.6
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY), workers=1, max_age=1.0)
    sender.start()
    try:
        sender.submit(card("in", "slow"))
        until(lambda: sender.sent == 1, what="the slow card")
        fake_crm.latency = 0.0
        for n in range(3):
            sender.submit(card("in", f"fresh-{n}"))
        until(lambda: sender.sent == 4, what="the fresh cards")
        assert sender.dropped_stale == 0
    finally:
        sender.stop()


def test_card_held_through_an_outage_goes_out_soon_after_the_crm_returns(
        fake_crm, monkeypatch: pytest.MonkeyPatch) -> None:
    # A steeper ramp than the real 25 ms start: tries at 0, 0.2, 0.6 and 1.4 s, then (with the general 5 s
    # cap) at 3.0 s, long after the CRM is back at 1.5 s; with the cards' cap, at 1.6 s.
    monkeypatch.setattr(client, "TELEPHONY_BACKOFF_BASE", 0.2)
    # Every wait its full ceiling (no jitter), so that the timing below is exact.
    monkeypatch.setattr(client, "backoff_delay", lambda base, failures, cap: min(cap, base * 2 ** (failures - 1)))
    fake_crm.outage = "html503"
    sender = CardSender(RetailCRM(fake_crm.url, API_KEY, telephony_rate=0), workers=1)
    sender.start()
    try:
        sender.submit(card("in", "a"))
        gevent.sleep(1.5)
        assert sender.sent == 0
        fake_crm.outage = None
        back = time.monotonic()
        until(lambda: sender.sent == 1, timeout=5, what="the card after the outage")
        assert time.monotonic() - back < 0.75  # at most one capped sleep (0.5 s) and a request
        assert delivered(fake_crm) == [("in", "a")]
    finally:
        fake_crm.outage = None
        sender.stop()


class _Answering:
    """A CRM client answering every card with a fixed reply (what the CRM says is the point here)."""

    def __init__(self, reply: dict) -> None:
        self.reply = reply

    def send_call_event(self, event: dict, *, deadline: float | None = None) -> dict:
        return self.reply


def test_an_odd_not_exist_codes_reply_neither_stops_the_worker_nor_reaches_the_log(caplog) -> None:
    sender = CardSender(_Answering({"success": True, "notExistCodes": ["100", 101, {"x": 1}, "1\nFAKE"]}),
                        workers=1)
    sender.start()
    try:
        sender.submit(card("in", "a"))
        sender.submit(card("hangup", "a"))
        until(lambda: sender.sent == 2, what="both cards")
        assert sender.running
        assert sender.not_exist_codes == {"100"}
        assert "FAKE" not in caplog.text
    finally:
        sender.stop()


def _live_greenlets() -> list[greenlet.greenlet]:
    return [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o and not o.dead]


def _live_card_workers() -> int:
    # Card workers only: the fake CRM's server also keeps a greenlet per keep-alive connection, and how many
    # connections eight parallel workers open is up to the scheduler (CI once counted ten in all).
    return sum(1 for o in _live_greenlets() if getattr(getattr(o, "_run", None), "__func__", None) is CardSender._work)


def test_idle_companies_hold_no_card_workers_and_cards_still_go_out(fake_crm) -> None:
    # A virtual PBX runs one sender per company: a thousand idle companies' eight workers each were eight
    # thousand suspended greenlets (~100 MB). Workers exist while a company has cards to deliver.
    before = len(_live_greenlets())
    senders = [CardSender(RetailCRM(fake_crm.url, API_KEY, telephony_rate=0), workers=8) for _ in range(50)]
    early = senders[3]
    early.submit(card("in", "early"))   # before the start: goes out at the start
    for sender in senders:
        sender.start()
    try:
        until(lambda: early.sent == 1, what="the card queued before the start")
        until(lambda: _live_card_workers() == 0, what="the early card's worker to end")
        assert len(_live_greenlets()) - before < len(senders)   # nothing else per company either
        assert all(s.running for s in senders)
        busy = senders[7]
        for call in "abcdefgh":
            busy.submit(card("in", call))
        busy.submit(card("hangup", "a"))
        until(lambda: busy.sent == 9, what="the busy company's nine cards")
        assert sorted(delivered(fake_crm)) == sorted([("in", c) for c in "abcdefgh"] + [("hangup", "a"),
                                                                                          ("in", "early")])
        # Delivered: its workers ended too, and the next card starts one again.
        until(lambda: _live_card_workers() == 0, what="the workers to end once idle")
        busy.submit(card("hangup", "b"))
        until(lambda: busy.sent == 10, what="a card after the workers ended")
        assert delivered(fake_crm)[-1] == ("hangup", "b")
    finally:
        for sender in senders:
            sender.stop()

