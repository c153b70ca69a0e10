"""The uploader against the strict fake retailCRM over real HTTP: strategies, outages, refusals, recovery."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.crm import RetailCRM
from fsbridge.history.cdr import CdrBuilder
from fsbridge.history.outbox import Outbox
from fsbridge.history.uploader import Uploader, attribute_errors
from tests import capture
from tests.fakes.retailcrm import FakeRetailCRM, _error, _html, _Invalid, _Reply
from tests.test_history_cdr import DIRECTORY, MANAGERS
from tests.test_history_outbox import make_call
from tests.waiting import until, waited

KEY = "history-test-key"
BUILDER = CdrBuilder.create("Europe/Moscow", MANAGERS)
UPLOAD_PATH = "/api/v5/telephony/calls/upload"


class ScriptedCRM(FakeRetailCRM):
    """The fake, answering the first uploads from a script (429s, 500s, odd error formats)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script: list[_Reply] = []
        self.opaque_errors = False

    def _handle(self, environ: dict[str, Any], method: str, path: str, params: dict[str, str], body: bytes,
                record: Any) -> _Reply:
        if path == UPLOAD_PATH and self.script:
            return self.script.pop(0)
        return super()._handle(environ, method, path, params, body, record)

    def _calls_upload(self, params: dict[str, str], form: dict[str, str]) -> _Reply:
        try:
            return super()._calls_upload(params, form)
        except _Invalid as exc:
            if not self.opaque_errors or not isinstance(exc.errors, dict):
                raise
            # A CRM that names the problem but not the call (the real format is unconfirmed).
            raise _Invalid(exc.message, sorted(set(exc.errors.values()))) from None


@pytest.fixture
def fake() -> Iterator[ScriptedCRM]:
    with ScriptedCRM(api_key=KEY) as server:
        yield server


@pytest.fixture
def crm(fake: FakeRetailCRM) -> Iterator[RetailCRM]:
    with RetailCRM(fake.url, KEY, connect_timeout=1.0, timeout=2.0) as client:
        yield client


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        yield box


@pytest.fixture
def make_uploader(outbox: Outbox, crm: RetailCRM) -> Iterator[Callable[..., Uploader]]:
    started: list[Uploader] = []

    def make(**over: Any) -> Uploader:
        options: dict[str, Any] = dict(linger=0.1, retry_base=0.05, retry_max=0.3, request_window=2.0)
        options.update(over)
        uploader = Uploader(outbox, crm, BUILDER, **options)
        uploader.start()
        started.append(uploader)
        return uploader

    yield make
    for uploader in started:
        uploader.stop(timeout=1.0)


def uploads_of(fake: FakeRetailCRM) -> list[list[str]]:
    return [[c["externalId"] for c in u.calls] for u in fake.uploads]


def stored_once(fake: FakeRetailCRM, ids: list[str]) -> None:
    """Each call stored exactly once, as built, and nothing else."""
    assert sorted(fake.calls) == sorted(ids)
    processed = collections.Counter(
        cid for u in fake.uploads for cid in (c["externalId"] for c in u.calls) if cid not in u.duplicates)
    assert set(processed.values()) == {1}


def max_per_second(fake: FakeRetailCRM) -> int:
    times = sorted(r.received for r in fake.requests if r.path.startswith("/api/v5/telephony/"))
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


# -- strategies ------------------------------------------------------------------------------------


def test_immediate_sends_within_a_second_and_coalesces(fake: FakeRetailCRM, outbox: Outbox,
                                                      make_uploader: Callable[..., Uploader]) -> None:
    uploader = make_uploader(linger=0.3)
    uploader.on_finished(make_call(0))
    assert waited(lambda: "call-00000" in fake.calls, timeout=10.0) < 1.0
    assert fake.calls["call-00000"] == BUILDER.build(make_call(0))

    # 120 calls end within the linger: three requests, none over 50.
    for n in range(1, 121):
        uploader.on_finished(make_call(n))
    until(lambda: len(fake.calls) == 121, timeout=10.0)
    assert sorted(len(ids) for ids in uploads_of(fake)[1:]) == [20, 50, 50]
    stored_once(fake, [f"call-{n:05d}" for n in range(121)])
    # Stored by the CRM, then marked sent once the uploader has read its reply.
    until(lambda: outbox.stats().sent == 121, what="every call marked sent")
    assert outbox.stats().pending == 0


def test_periodic_sends_what_accumulated_each_period(fake: FakeRetailCRM, outbox: Outbox,
                                                    make_uploader: Callable[..., Uploader]) -> None:
    for n in range(3):   # left over from the previous run: sent at start, not a period later
        outbox.add(make_call(n))
    # A 2 s period: the calls below are written and checked well inside it, also on a loaded machine.
    started = time.monotonic()
    uploader = make_uploader(strategy="periodic", period=2.0)
    until(lambda: len(fake.calls) == 3, timeout=1.0)
    for n in range(3, 73):
        uploader.on_finished(make_call(n))
        gevent.sleep(0.005)
    gevent.sleep(0.3)
    assert len(fake.calls) == 3, "nothing goes out before the period ends"
    assert outbox.stats().pending == 70
    until(lambda: len(fake.calls) == 73, timeout=4.0)
    assert 1.9 < time.monotonic() - started < 3.5
    assert sorted(len(ids) for ids in uploads_of(fake)) == [3, 20, 50]
    stored_once(fake, [f"call-{n:05d}" for n in range(73)])


# -- the CRM unavailable ---------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["html503", "html502", "timeout", "reset"])
def test_outage_then_recovery_delivers_each_call_once(outage: str, fake: FakeRetailCRM, outbox: Outbox,
                                                     make_uploader: Callable[..., Uploader]) -> None:
    fake.outage = outage
    # Each attempt (the client's own quick retries included) gives up after 0.3 s; the uploader then
    # backs off and tries again, forever.
    uploader = make_uploader(concurrency=2, request_window=0.3)
    for n in range(70):
        uploader.on_finished(make_call(n))
    gevent.sleep(1.0)
    assert fake.calls == {}
    assert outbox.stats().pending == 70
    assert uploader.stats.failures >= 2, "retried, not given up"
    assert outbox.stats().quarantined == 0, "an outage is never the calls' fault"
    fake.outage = None
    # Back within one attempt window plus the capped backoff (0.3 s).
    assert waited(lambda: outbox.stats().pending == 0, timeout=4.0) < 1.0
    stored_once(fake, [f"call-{n:05d}" for n in range(70)])
    assert outbox.stats().sent == 70
    assert max_per_second(fake) <= 40


def test_overload_answers_are_retried(fake: ScriptedCRM, outbox: Outbox,
                                      make_uploader: Callable[..., Uploader]) -> None:
    fake.script = [
        _error(429, "Too many requests"),
        _error(500, "Internal server error"),
        _html(502),
        _Reply(504, b"<html><body>Gateway Time-out</body></html>", "text/html"),
        _Reply(200, b"", "text/html"),           # a proxy's empty page is not a confirmation
    ]
    uploader = make_uploader()
    uploader.on_finished(make_call(1))
    until(lambda: outbox.stats().sent == 1, timeout=10.0)
    assert fake.script == [] and outbox.stats().quarantined == 0 and "call-00001" in fake.calls


def test_refusal_of_the_whole_account_is_retried_not_quarantined(fake: FakeRetailCRM, outbox: Outbox,
                                                                 make_uploader: Callable[..., Uploader],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    fake.api_key = "rotated-key"          # 403 Wrong "apiKey" value.
    uploader = make_uploader()
    for n in range(5):
        uploader.on_finished(make_call(n))
    gevent.sleep(1.0)
    assert fake.calls == {} and outbox.stats().quarantined == 0
    assert "apiKey" in caplog.text  # the admin is told what the CRM says
    fake.api_key = KEY                    # the admin fixed the key
    until(lambda: outbox.stats().sent == 5, timeout=3.0)
    assert len(fake.calls) == 5


def test_telephony_disabled_is_not_the_calls_fault(fake: ScriptedCRM, outbox: Outbox,
                                                  make_uploader: Callable[..., Uploader]) -> None:
    fake.script = [_error(400, "Telephony not enabled or not supports calls upload")] * 3
    uploader = make_uploader()
    uploader.on_finished(make_call(1))
    until(lambda: "call-00001" in fake.calls, timeout=3.0)
    assert outbox.stats().quarantined == 0


# -- the CRM refusing calls ------------------------------------------------------------------------


def test_validation_quarantines_only_the_offending_calls(fake: FakeRetailCRM, outbox: Outbox,
                                                        make_uploader: Callable[..., Uploader]) -> None:
    calls = [make_call(n) for n in range(10)]
    calls[3] = make_call(3, site="closed-shop")
    calls[7] = make_call(7, result="voicemail")
    for call in calls:
        outbox.add(call)
    uploader = make_uploader()
    until(lambda: outbox.stats().pending == 0, timeout=10.0)
    stored_once(fake, [c.call_id for c in calls if c.call_id not in ("call-00003", "call-00007")])
    assert len(fake.requests) == 2, "one refusal, then the rest in one request"
    reasons = {q.external_id: q.reason for q in outbox.quarantined()}
    assert reasons == {
        "call-00003": "retailCRM refused it (HTTP 400): site: The value you selected is not a valid choice. "
                      "(sent 'closed-shop')",
        "call-00007": "retailCRM refused it (HTTP 400): result: The value you selected is not a valid choice. "
                      "(sent 'voicemail')",
    }
    assert uploader.stats.quarantined == 2 and uploader.stats.sent == 8


def test_refusal_naming_no_call_is_bisected(fake: ScriptedCRM, outbox: Outbox,
                                           make_uploader: Callable[..., Uploader]) -> None:
    fake.opaque_errors = True
    bad = {"call-00005", "call-00031"}
    for n in range(40):
        outbox.add(make_call(n, site="closed-shop") if f"call-{n:05d}" in bad else make_call(n))
    make_uploader()
    until(lambda: outbox.stats().pending == 0, timeout=10.0)
    stored_once(fake, [f"call-{n:05d}" for n in range(40) if f"call-{n:05d}" not in bad])
    reasons = {q.external_id: q.reason for q in outbox.quarantined()}
    assert set(reasons) == bad
    assert all("The value you selected is not a valid choice." in r for r in reasons.values())
    # 40 calls, 2 bad: about 2 requests per bad call and halving (log2 40 < 6), not one per call.
    assert len(fake.requests) <= 25


def test_duplicates_count_as_delivered(fake: FakeRetailCRM, outbox: Outbox,
                                       make_uploader: Callable[..., Uploader]) -> None:
    # The previous run's batch reached the CRM but the process died before marking it sent.
    for n in range(0, 10, 2):
        fake.calls[f"call-{n:05d}"] = BUILDER.build(make_call(n))
    for n in range(10):
        outbox.add(make_call(n))
    uploader = make_uploader()
    until(lambda: outbox.stats().pending == 0, timeout=10.0)
    assert fake.uploads[0].duplicates == [f"call-{n:05d}" for n in range(0, 10, 2)]
    assert (outbox.stats().sent, outbox.stats().quarantined) == (10, 0)
    assert (uploader.stats.sent, uploader.stats.duplicates) == (10, 5)


def test_requeued_call_goes_out_after_the_fix(fake: FakeRetailCRM, outbox: Outbox,
                                              make_uploader: Callable[..., Uploader]) -> None:
    outbox.add(make_call(1, site="shop2"))
    uploader = make_uploader(poll_interval=0.2)
    until(lambda: outbox.stats().quarantined == 1, timeout=10.0)
    fake.known_sites.add("shop2")          # the shop was created in the CRM
    assert outbox.requeue(["call-00001"]) == 1
    until(lambda: uploader.stats.sent == 1, timeout=2.0)
    assert "call-00001" in fake.calls


@pytest.mark.parametrize(("errors", "expected"), [
    ({"calls[3][result]": "bad"}, {3: [("result", "bad")]}),
    ({"calls[0][source][medium]": "bad", "calls[0][site]": "x"}, {0: [("source.medium", "bad"), ("site", "x")]}),
    ({"calls.2.phone": "blank"}, {2: [("phone", "blank")]}),
    ({"calls[1]": "This value is not valid."}, {1: [("", "This value is not valid.")]}),
    ({"calls[50][result]": "bad"}, None),          # not in this batch
    ({"calls": "too many"}, None),
    ({"calls[1][result]": "bad", "date": "?"}, None),
    (["This value is not valid."], None),
    (None, None),
])
def test_attribute_errors(errors: Any, expected: Any) -> None:
    assert attribute_errors(errors, 50) == expected


# -- rate ------------------------------------------------------------------------------------------


def test_backlog_drains_under_the_rate_limit(fake: FakeRetailCRM, outbox: Outbox,
                                             make_uploader: Callable[..., Uploader]) -> None:
    for n in range(2000):
        outbox.add(make_call(n))
    started = time.monotonic()
    make_uploader(concurrency=4)
    until(lambda: outbox.stats().pending == 0, timeout=10.0)
    elapsed = time.monotonic() - started
    assert fake.rate_limited == 0, "the CRM never had to refuse us for rate"
    assert max_per_second(fake) <= 40
    assert len(fake.uploads) == 40 and elapsed < 2.0   # ~38 requests/s
    assert len(fake.calls) == 2000


# -- the outbox refusing a write -------------------------------------------------------------------


def test_outbox_write_failure_keeps_the_call_and_the_reader_alive(
        fake: FakeRetailCRM, outbox: Outbox, make_uploader: Callable[..., Uploader],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    uploader = make_uploader(poll_interval=0.1)
    real_add = outbox.add
    failing = True

    def add(call: FinishedCall) -> bool:
        if failing:
            raise sqlite3.OperationalError("database or disk is full")
        return real_add(call)

    monkeypatch.setattr(outbox, "add", add)
    uploader.on_finished(make_call(1))     # must not raise into the ESL reader
    assert uploader.stats.unwritten == 1
    failing = False
    until(lambda: "call-00001" in fake.calls, timeout=3.0)
    assert uploader.stats.unwritten == 0


# -- ESL cut, FreeSWITCH restart: whatever the call model reports goes out once --------------------


def run_tracker(uploader: Uploader, events: list[dict]) -> CallTracker:
    tracker = CallTracker(DIRECTORY, lambda event: None, uploader.on_finished)
    for event in events:
        tracker.handle(event)
    return tracker


def test_esl_cut_during_a_call_that_ended_meanwhile(fake: FakeRetailCRM, outbox: Outbox,
                                                   make_uploader: Callable[..., Uploader]) -> None:
    fake.known_sites.add("shop2")
    uploader = make_uploader()
    events = capture.events("inbound_answered")
    bridged = next(i for i, e in enumerate(events) if e["Event-Name"] == "CHANNEL_BRIDGE")
    tracker = run_tracker(uploader, events[:bridged + 1])
    # Reconnected: FreeSWITCH no longer has the channels, the call is closed from what was known.
    tracker.reconcile(live=set(), snapshot=tracker.seen)
    # Late events of the same call (a replay, a second connection) change nothing.
    for event in events[bridged + 1:]:
        tracker.handle(event)
    run_tracker(uploader, events)          # even a fresh model reporting the whole call again
    call_id = capture.legs(events)[0]
    until(lambda: call_id in fake.calls, timeout=10.0)
    gevent.sleep(0.3)
    stored_once(fake, [call_id])
    assert fake.calls[call_id]["result"] == "answered" and fake.calls[call_id]["code"] == "100"


def test_esl_cut_during_a_call_that_is_still_up(fake: FakeRetailCRM, outbox: Outbox,
                                               make_uploader: Callable[..., Uploader]) -> None:
    uploader = make_uploader()
    events = capture.events("inbound_answered")
    legs = capture.legs(events)
    bridged = next(i for i, e in enumerate(events) if e["Event-Name"] == "CHANNEL_BRIDGE")
    tracker = run_tracker(uploader, events[:bridged + 1])
    assert tracker.reconcile(live=set(legs), snapshot=tracker.seen) == 0
    for event in events[bridged + 1:]:
        tracker.handle(event)
    until(lambda: legs[0] in fake.calls, timeout=10.0)
    gevent.sleep(0.3)
    stored_once(fake, [legs[0]])
    assert {k: fake.calls[legs[0]][k] for k in ("duration", "durationWaiting", "result")} == \
        {"duration": 8, "durationWaiting": 1, "result": "answered"}


def test_freeswitch_restart_closes_every_call_once(fake: FakeRetailCRM, outbox: Outbox,
                                                  make_uploader: Callable[..., Uploader]) -> None:
    fake.known_sites.add("shop2")
    uploader = make_uploader()
    tracker = CallTracker(DIRECTORY, lambda event: None, uploader.on_finished)
    ids = []
    for name in ("inbound_answered", "inbound_busy", "outbound_ext_dial"):
        events = capture.events(name)
        ringing = next(i for i, e in enumerate(events) if e["Event-Name"] == "CHANNEL_PROGRESS")
        for event in events[:ringing + 1]:
            tracker.handle(event)
        ids.append(capture.legs(events)[0])
    # FreeSWITCH came back with a new Core-UUID and no channels.
    assert tracker.reconcile(live=set(), snapshot=tracker.seen) == 6
    until(lambda: len(fake.calls) == 3, timeout=10.0)
    gevent.sleep(0.3)
    stored_once(fake, ids)
    assert all(c["result"] != "answered" for c in fake.calls.values()), "nobody talked before the restart"


def test_from_config(tmp_path: Path, crm: RetailCRM, make_config) -> None:
    from fsbridge.history import from_config

    cfg = make_config(state_dir=str(tmp_path / "state"), crm={"timezone": "America/New_York"},
                      records={"prefer_mp3": True},
                      history={"strategy": "periodic", "period": 10.0, "concurrency": 2, "unassigned_code": "100"})
    uploader = from_config(cfg, crm)
    try:
        # The settings given are used, the others keep their documented defaults.
        assert (uploader.strategy, uploader.period, uploader.concurrency, uploader.retry_max) == \
            ("periodic", 600.0, 2, 60.0)
        assert uploader.keep_sent == 30 * 86400
        entry = uploader.builder.build(make_call(1, manager_code=None, recording_path=(
            "/rec/31ff8abf-a4ac-4f83-a050-5a0db45e0c55.wav"), recording_ms=5000))
        assert entry["date"] == "2024-01-23 03:53:21"          # New York, UTC-5
        assert (entry["code"], entry["userId"]) == ("100", 1)
        assert entry["recordUrl"].startswith("https://pbx.example.com/records/")
        assert entry["recordUrl"].endswith("/31ff8abf-a4ac-4f83-a050-5a0db45e0c55.mp3"), "prefer_mp3 links the MP3"
        assert (tmp_path / "state" / "calls-outbox.sqlite3").exists()
    finally:
        uploader.close()


def test_health_hooks(fake: FakeRetailCRM, outbox: Outbox, make_uploader: Callable[..., Uploader]) -> None:
    fake.outage = "html503"
    uploader = make_uploader(request_window=0.1)
    assert uploader.alive and uploader.oldest_pending_age() is None
    uploader.on_finished(make_call(1))
    gevent.sleep(0.3)
    age = uploader.oldest_pending_age()
    assert age is not None and 0.2 < age < 2
    assert (*outbox.levels(), uploader.stats.sent) == (1, 0, 0)
    fake.outage = None
    until(lambda: uploader.oldest_pending_age() is None, timeout=3.0)
    uploader.stop()
    assert not uploader.alive


def test_the_log_says_once_when_the_history_waits_on_the_crm_and_once_when_it_drained(
        fake: FakeRetailCRM, outbox: Outbox, make_uploader: Callable[..., Uploader], caplog) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="fsbridge.history")
    fake.outage = "html503"
    uploader = make_uploader()
    uploader.waiting_after = 0.5
    for n in range(3):
        uploader.on_finished(make_call(n))
    until(lambda: "waiting on the CRM" in caplog.text, timeout=10, what="the waiting line")
    failures = uploader.stats.failures
    until(lambda: uploader.stats.failures >= failures + 2, timeout=10, what="more retries")
    fake.outage = None
    until(lambda: len(fake.calls) == 3, timeout=10, what="the calls after the outage")
    gevent.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records]
    waiting = [line for line in lines if "waiting on the CRM" in line]
    assert len(waiting) == 1 and "3 call(s) wait in the outbox" in waiting[0]
    assert len([line for line in lines if "drained" in line]) == 1
    assert len([line for line in lines if "upload of" in line]) == 1, "one line per problem, not per retry"
