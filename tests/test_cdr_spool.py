"""FreeSWITCH's CDR documents (mod_json_cdr) as the ground truth: calls that end while fsbridge is away
reach the history once, with their true outcome, and no card.

The documents are the real pair in tests/fixtures/json_cdr/ (copied with fresh ids and times), or written
by the FreeSWITCH simulator for the calls it plays, in the same shape, from the captured events."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zoneinfo
from pathlib import Path

import gevent
import pytest

from fsbridge.calls.cdr_spool import DOC_NAME_RE, Incomplete, parse_document, replay
from fsbridge.calls.legs import Directory
from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.config import from_mapping
from fsbridge.history.cdr import crm_date
from fsbridge.history.outbox import Outbox
from fsbridge.service import CDR_LEDGER_FILE, Bridge
from tests import capture
from tests.conftest import settings
from tests.fakes.freeswitch import JSON_CDR_DIR, write_cdr_pairs
from tests.waiting import until

DIRECTORY = Directory(managers=frozenset({"100", "200"}),
                      external_phones={"74999999999": "shop1", "74999999998": "shop1"})
RECORDS = Path("/var/lib/freeswitch/recordings")
SCENARIOS = ("inbound_answered", "inbound_no_answer", "inbound_busy", "inbound_ext_no_answer",
             "outbound_ext_dial", "outbound_originate_answered")


def comparable(call: FinishedCall) -> FinishedCall:
    return dataclasses.replace(call, legs=tuple(sorted(call.legs)), source="", gap=False)


def live_call(scenario: str) -> FinishedCall:
    finished: list[FinishedCall] = []
    tracker = CallTracker(DIRECTORY, on_event=lambda e: None, on_finished=finished.append)
    for ev in capture.events(scenario, "plain"):
        tracker.handle(ev)
    [call] = finished
    return call


def read_docs(folder: Path) -> list:
    return [parse_document(p.read_text(), p.name, RECORDS) for p in sorted(folder.iterdir())
            if DOC_NAME_RE.fullmatch(p.name)]


# -- the documents themselves --


def test_the_real_pair_makes_the_call_the_live_path_made() -> None:
    """The real mod_json_cdr pair and the ESL capture of the same call give the same history entry."""
    [from_cdr] = replay(read_docs(JSON_CDR_DIR), DIRECTORY)
    live = live_call("inbound_answered")
    assert from_cdr.source == "cdr"
    # The recording's name is FreeSWITCH's; its directory is records.dir's.
    assert from_cdr.recording_path == str(RECORDS / "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.wav")
    assert comparable(from_cdr) == comparable(dataclasses.replace(live, recording_path=from_cdr.recording_path))
    assert (from_cdr.manager_code, from_cdr.result, from_cdr.duration) == ("100", "answered", 8)


def test_url_encoded_values_are_read_as_freeswitch_meant_them(tmp_path) -> None:
    """encode-values=true (mod_json_cdr's default) URL-encodes every variable: the record path too."""
    [(a, _)] = write_cdr_pairs(tmp_path, [1_700_000_000_000_000], encode_values=True)
    assert "%3A" in (tmp_path / f"{a}.cdr.json").read_text()
    [call] = replay(read_docs(tmp_path), DIRECTORY)
    assert call.recording_path == str(RECORDS / f"{a}.wav") and call.result == "answered"


def test_a_document_being_written_waits_and_a_foreign_recording_path_is_dropped(tmp_path) -> None:
    text = (JSON_CDR_DIR / "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.cdr.json").read_text()
    with pytest.raises(Incomplete):
        parse_document(text[:5000], "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.cdr.json", RECORDS)
    doc = json.loads(text)
    doc["app_log"]["applications"][-2]["app_data"] = "/etc/passwd"
    leg = parse_document(json.dumps(doc) + "\n", "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.cdr.json", RECORDS)
    assert leg.record_path is None


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_simulated_documents_replay_to_the_live_call(scenario, tmp_path) -> None:
    """The simulator's documents (built from the captured events) replay to what the live path builds from
    the same events, for every captured kind of call."""
    from tests.fakes.freeswitch import FreeSwitchSimulator

    with FreeSwitchSimulator(cdr_dir=tmp_path) as sim:
        played = sim.play(scenario)
    calls = replay(read_docs(tmp_path), DIRECTORY)
    [call] = calls
    live = live_call(scenario)
    from tests.fakes.esl_captures import load_scenario

    fresh = {played.uuids[orig]: orig for orig in load_scenario(scenario).plain.roles}
    assert call.call_id == played.a_leg
    shifted = dataclasses.replace(
        call, call_id=fresh[call.call_id], legs=tuple(fresh[u] for u in call.legs),
        start_us=live.start_us, answer_us=live.answer_us and call.answer_us and live.answer_us,
        end_us=live.end_us, recording_path=live.recording_path and call.recording_path and live.recording_path)
    assert comparable(shifted) == comparable(live)
    assert call.end_us - call.start_us == live.end_us - live.start_us


class ListSink:
    """The history, as the spool sees it."""

    def __init__(self) -> None:
        self.calls: dict[str, FinishedCall] = {}

    def known(self, call_ids: list[str]) -> set[str]:
        return set(call_ids) & set(self.calls)

    def record(self, calls: list[FinishedCall]) -> bool:
        for call in calls:
            assert call.call_id not in self.calls, "written twice"
            self.calls[call.call_id] = call
        return True


def test_the_spool_waits_for_a_half_written_document_reads_prefixed_names_and_skips_links(tmp_path) -> None:
    from fsbridge.calls.cdr_spool import CdrSpool
    from tests.fakes.freeswitch import FreeSwitchSimulator

    spool_dir = tmp_path / "json_cdr"
    spool_dir.mkdir()
    with FreeSwitchSimulator(cdr_dir=spool_dir) as sim:
        sim.cdr_prefix_a = True       # prefix-a-leg: a_<uuid>.cdr.json for a-legs
        played = sim.play("inbound_answered")
    a_name = f"a_{played.a_leg}.cdr.json"
    assert (spool_dir / a_name).exists()
    whole = (spool_dir / a_name).read_text()
    (spool_dir / a_name).write_text(whole[: len(whole) // 2])          # mod_json_cdr is still writing it
    secret = tmp_path / "secret.json"      # a well-formed document, but not one mod_json_cdr wrote there
    secret.write_text(whole.replace(played.a_leg, "4a1b7d0c-1111-4222-8333-944455556666"))
    (spool_dir / "4a1b7d0c-1111-4222-8333-944455556666.cdr.json").symlink_to(secret)

    def spool() -> CdrSpool:
        made = CdrSpool(spool_dir, tmp_path / "ledger.sqlite3", DIRECTORY, sink, records_dir=RECORDS,
                        live=lambda uuid: False, view_ready=lambda: True, grace=0.0)
        return made

    sink = ListSink()
    first = spool()
    assert first.reconcile() == 0 and sink.calls == {}, "half a document: its call waits"
    (spool_dir / a_name).write_text(whole)
    assert first.reconcile() == 1
    assert sink.calls[played.a_leg].result == "answered" and sink.calls[played.a_leg].manager_code == "100"
    assert first.stats.unreadable == 1 and list(sink.calls) == [played.a_leg], "the link is never followed"
    first.ledger.close()
    again = spool()
    assert again.reconcile() == 0 and again.stats.reads == 0, "accounted for: not read again"
    assert secret.exists() and (spool_dir / "4a1b7d0c-1111-4222-8333-944455556666.cdr.json").is_symlink()


# -- fsbridge with a CDR directory --


@pytest.fixture
def cdr_dir(tmp_path) -> Path:
    path = tmp_path / "json_cdr"
    path.mkdir()
    return path


@pytest.fixture
def bridges(simulator, fake_crm, tmp_path, cdr_dir):
    """Start fsbridge (in-process) as often as a test needs, on the same state and CDR directories."""
    made: list[Bridge] = []
    simulator.cdr_dir = cdr_dir          # FreeSWITCH writes its CDRs there

    def start(connected: bool = True, **sections) -> Bridge:
        raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, state_dir=str(tmp_path / "state"),
                       freeswitch={"cdr_dir": str(cdr_dir), **sections.pop("freeswitch", {})},
                       history={"strategy": "immediate"}, **sections)
        finished: list[FinishedCall] = []
        bridge = Bridge(from_mapping(raw, env={}), on_finished=finished.append)
        bridge.finished = finished
        assert bridge.spool is not None
        bridge.spool.poll_interval = 0.2
        bridge.spool.grace = 0.5
        bridge.history.linger = 0.02
        bridge.start()
        made.append(bridge)
        if connected:
            until(lambda: bridge.listener.connected, what="fsbridge to connect")
        return bridge

    yield start
    for bridge in made:
        if not getattr(bridge, "stopped", False):
            bridge.stop()


def stop(bridge: Bridge) -> None:
    bridge.stop()
    bridge.stopped = True


def history(fake_crm, call_id: str) -> tuple:
    call = fake_crm.calls[call_id]
    return call["type"], call["result"], call.get("code"), call["duration"], "recordUrl" in call


def stored_once(fake_crm) -> bool:
    ids = [c["externalId"] for u in fake_crm.uploads for c in u.calls if c["externalId"] not in u.duplicates]
    return len(ids) == len(set(ids))


def test_calls_that_end_while_fsbridge_is_stopped_reach_the_history_once(bridges, simulator, fake_crm) -> None:
    first = bridges()
    simulator.wait_for_subscriber()
    before = simulator.play("inbound_answered")
    until(lambda: before.a_leg in fake_crm.calls, what="the live call in the history")
    # fsbridge restarts (SIGTERM) while one call talks and one rings; both end before it is back.
    talking = simulator.play("inbound_answered", until="CALL_UPDATE")
    ringing = simulator.play("inbound_busy", until="CHANNEL_PROGRESS")
    until(lambda: first.spool.stats.accounted == 2, what="the live call's documents accounted for")
    stop(first)
    simulator.resume(talking)
    simulator.resume(ringing)
    away = simulator.play_many(["inbound_answered", "inbound_no_answer", "outbound_ext_dial"], calls=3)
    second = bridges()
    ids = [talking.a_leg, ringing.a_leg, *(p.a_leg for p in away)]
    until(lambda: all(i in fake_crm.calls for i in ids), timeout=10, what="every call in the history")
    assert history(fake_crm, talking.a_leg) == ("in", "answered", "100", 8, True)
    assert history(fake_crm, ringing.a_leg) == ("in", "busy", "200", 0, False)
    assert history(fake_crm, away[0].a_leg) == ("in", "answered", "100", 8, True)
    assert history(fake_crm, away[1].a_leg)[:3] == ("in", "no answer", "100")
    assert history(fake_crm, away[2].a_leg)[:3] == ("out", "answered", "100")
    gevent.sleep(0.3)
    late = [e for e in fake_crm.events if e["callExternalId"] in ids and (e["type"] == "hangup" or e["callExternalId"]
                                                                          in {p.a_leg for p in away})]
    assert late == [] and second.cards.sent == 0, "no card for calls that ended while fsbridge was away"
    assert stored_once(fake_crm) and len(fake_crm.calls) == 6
    assert {c.source for c in second.finished} == {"cdr"}
    # The live call's documents were accounted for by the first run: the second never read them.
    assert second.spool.stats.reads == 2 * len(ids)


def test_an_hour_of_downtime_is_recovered_with_its_dates(bridges, simulator, fake_crm, cdr_dir) -> None:
    now_us = int(time.time()) * 1_000_000
    pairs = write_cdr_pairs(cdr_dir, [now_us - 3600_000_000 + n * 60_000_000 for n in range(60)])
    bridges()
    until(lambda: len(fake_crm.calls) == 60, timeout=15, what="an hour of calls in the history")
    first, last = fake_crm.calls[pairs[0][0]], fake_crm.calls[pairs[-1][0]]
    assert (first["result"], first["code"], first["duration"], first["userId"]) == ("answered", "100", 8, 1)
    zone = zoneinfo.ZoneInfo("Europe/Moscow")
    assert first["date"] == crm_date(now_us - 3600_000_000 + 95123, zone)
    assert last["date"] == crm_date(now_us - 60_000_000 + 95123, zone)
    assert fake_crm.events == [] and stored_once(fake_crm)


def test_accounted_documents_are_not_read_again_and_only_they_are_deleted(bridges, simulator, fake_crm,
                                                                          cdr_dir, tmp_path) -> None:
    old_us = int((time.time() - 10 * 86400) * 1e6)
    pairs = write_cdr_pairs(cdr_dir, [old_us + n * 60_000_000 for n in range(5)])
    # Never accounted for: a document that is not mod_json_cdr's, and a leg whose partner is still up.
    junk = cdr_dir / "0b8c1a3e-0000-4000-8000-000000000001.cdr.json"
    junk.write_text('{"not": "a cdr"}\n')
    talking = simulator.play("inbound_answered", until="CALL_UPDATE")
    first = bridges(freeswitch={"cdr_keep_days": 3})
    until(lambda: len(fake_crm.calls) == 5, timeout=10, what="the old calls in the history")
    first.spool.cleanup()
    assert not any((cdr_dir / f"{a}.cdr.json").exists() for a, _ in pairs), "accounted and old: deleted"
    assert junk.exists(), "never accounted for: kept"
    # A leg of the talking call ended (a transfer, say): its document waits for its call.
    half = cdr_dir / f"{talking.uuids['95bf58e2-2fa0-4370-8553-0d97a378255b']}.cdr.json"
    write_cdr_pairs(cdr_dir, [old_us])  # one more old call, to see the second start read it
    half.write_text((JSON_CDR_DIR / "95bf58e2-2fa0-4370-8553-0d97a378255b.cdr.json").read_text().replace(
        "95bf58e2-2fa0-4370-8553-0d97a378255b", half.name[:36]).replace(
        "31ff8abf-a4ac-4f83-a050-5a0db45e0c55", talking.a_leg))
    os.utime(half, (time.time() - 30 * 86400,) * 2)
    stop(first)
    reads = first.spool.stats.reads
    second = bridges(freeswitch={"cdr_keep_days": 3})
    until(lambda: len(fake_crm.calls) == 6, timeout=10, what="the new old call")
    gevent.sleep(0.5)
    assert second.spool.stats.reads <= 3, f"only the new documents were read ({second.spool.stats.reads})"
    assert reads >= 11
    second.spool._next_cleanup = 0
    second.spool.cleanup()
    assert junk.exists() and half.exists(), "documents not accounted for are never deleted"
    assert talking.a_leg not in fake_crm.calls


def test_a_day_of_documents_does_not_hold_up_live_calls(bridges, simulator, fake_crm, cdr_dir, tmp_path) -> None:
    """50 000 legs of yesterday's calls reconcile while today's calls flow: every live event is handled and
    every live call gets its cards, during the catch-up."""
    day_us = int((time.time() - 86400) * 1e6)
    write_cdr_pairs(cdr_dir, [day_us + n * 3_456_000 for n in range(25_000)])
    # The uploads of the recovered day share the CRM's rate limit with the cards: unpaced here, so that what
    # is measured is the event path, not the CRM's 40 requests/s.
    fake_crm.telephony_rate_limit = None
    started = time.monotonic()
    bridge = bridges(crm={"telephony_rate": 0})
    simulator.wait_for_subscriber()
    played, during = [], 0
    while bridge.spool.stats.accounted < 50_000 and time.monotonic() - started < 120 and len(played) < 100:
        played += simulator.play_many(["inbound_answered", "inbound_busy"], calls=2, concurrency=2)
        during += bridge.spool.stats.accounted < 50_000
        gevent.sleep(0.2)
    print(f"{len(played)} live calls played while 50 000 legs were reconciled in {time.monotonic() - started:.1f} s")
    assert during >= 1, "live calls were played during the catch-up"
    until(lambda: bridge.spool.stats.accounted >= 50_000 + 2 * len(played) - 8, timeout=120,
          what="the day accounted for")
    live_ids = {p.a_leg for p in played}
    until(lambda: live_ids <= {e["callExternalId"] for e in fake_crm.events if e["type"] == "hangup"},
          timeout=20, what="the live calls' hangup cards")
    assert simulator.dropped == 0 and bridge.listener.lost_listener == 0 and bridge.cards.dropped_stale == 0
    with Outbox(tmp_path / "state" / "calls-outbox.sqlite3") as box:
        stats = box.stats()
    assert stats.pending + stats.sent == 25_000 + len(played)
    assert {c.call_id for c in bridge.finished if c.source == "events"} == live_ids
    assert (tmp_path / "state" / CDR_LEDGER_FILE).exists()


def through_a_socket_gap(bridges, simulator, fake_crm, scenario: str, in_the_gap: str | None):
    """A call rings with fsbridge listening; the event socket goes away while the call plays on until
    `in_the_gap` (None: its end); the socket comes back."""
    bridge = bridges()
    simulator.wait_for_subscriber()
    played = simulator.play(scenario, until="CHANNEL_PROGRESS")
    until(lambda: fake_crm.events, what="the card")
    simulator.refuse_connections()
    simulator.resume(played, until=in_the_gap)          # nobody listening
    simulator.accept_connections()
    return bridge, played


def test_a_call_answered_in_a_socket_gap_gets_its_true_outcome(bridges, simulator, fake_crm) -> None:
    bridge, played = through_a_socket_gap(bridges, simulator, fake_crm, "inbound_answered", "CALL_UPDATE")
    until(lambda: bridge.listener.reconnects == 1 and bridge.spool.view_ready(), what="the reconnection")
    simulator.resume(played)
    until(lambda: played.a_leg in fake_crm.calls, timeout=10, what="the call in the history")
    assert history(fake_crm, played.a_leg) == ("in", "answered", "100", 8, True)
    assert bridge.tracker.refreshed == 1
    assert [e["type"] for e in fake_crm.events] == ["in", "hangup"]


def test_a_call_that_hung_up_in_a_socket_gap_gets_its_true_outcome(bridges, simulator, fake_crm) -> None:
    bridge, played = through_a_socket_gap(bridges, simulator, fake_crm, "inbound_busy", None)
    until(lambda: played.a_leg in fake_crm.calls, timeout=10, what="the call in the history")
    assert history(fake_crm, played.a_leg) == ("in", "busy", "200", 0, False)
    assert bridge.spool.stats.completed == 1 and stored_once(fake_crm)


def test_a_call_taken_over_after_a_restart_is_completed_from_its_cdrs(bridges, simulator, fake_crm) -> None:
    """fsbridge started mid-call saw none of the call's beginning: its history entry comes from FreeSWITCH's
    record, under the id its hangup card carried."""
    played = simulator.play("inbound_answered", until="CALL_UPDATE")
    bridge = bridges()
    until(lambda: bridge.tracker.adopted == 2, what="both channels to be taken over")
    simulator.resume(played)
    until(lambda: played.a_leg in fake_crm.calls, timeout=10, what="the call in the history")
    assert history(fake_crm, played.a_leg) == ("in", "answered", "100", 8, True)
    assert [c.source for c in bridge.finished] == ["cdr"] and bridge.spool.stats.completed == 1
    assert [(e["type"], e["callExternalId"]) for e in fake_crm.events] == [("hangup", played.a_leg)]


# -- the real `fsbridge run`, killed or restarted --


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM restart"])
def test_calls_ending_while_the_process_is_down_reach_the_history_once(how, tmp_path, simulator, fake_crm,
                                                                       cdr_dir) -> None:
    import signal

    from tests.test_operations import start_fsbridge

    simulator.cdr_dir = cdr_dir
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, state_dir=str(tmp_path / "state"),
                   freeswitch={"cdr_dir": str(cdr_dir)})
    proc = start_fsbridge(tmp_path, raw)
    try:
        simulator.wait_for_subscriber(timeout=15)
        done = simulator.play_many(["inbound_answered", "inbound_busy", "outbound_ext_dial"], calls=6)
        talking = [simulator.play("inbound_answered", until="CALL_UPDATE") for _ in range(2)]
        ringing = simulator.play("inbound_ext_no_answer", until="CHANNEL_PROGRESS")
        until(lambda: len(fake_crm.calls) == 6, timeout=15, what="the calls that ended while it ran")
        if how == "kill -9":
            proc.kill()
        else:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    simulator.cut()     # the dead process's connection
    cards = len(fake_crm.events)
    for played in (*talking, ringing):
        simulator.resume(played)
    away = simulator.play_many(["inbound_answered", "inbound_no_answer", "outbound_originate_answered"], calls=3)
    proc = start_fsbridge(tmp_path, raw)
    try:
        ids = [p.a_leg for p in (*talking, ringing, *away)]
        until(lambda: all(i in fake_crm.calls for i in ids), timeout=45, what="every call in the history")
        for played in talking:
            assert history(fake_crm, played.a_leg) == ("in", "answered", "100", 8, True)
        assert history(fake_crm, ringing.a_leg) == ("in", "no answer", "200", 0, False)
        assert history(fake_crm, away[0].a_leg) == ("in", "answered", "100", 8, True)
        assert history(fake_crm, away[1].a_leg)[:3] == ("in", "no answer", "100")
        assert history(fake_crm, away[2].a_leg)[:3] == ("out", "answered", "100")
        assert set(fake_crm.calls) == {p.a_leg for p in done} | set(ids)
        assert stored_once(fake_crm), "each call stored once"
        time.sleep(1.0)
        assert len(fake_crm.events) == cards, "no card for calls that ended while fsbridge was down"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def _spool(spool_dir: Path, ledger: Path, sink: ListSink, **kw: object):
    from fsbridge.calls.cdr_spool import CdrSpool

    return CdrSpool(spool_dir, ledger, DIRECTORY, sink, records_dir=RECORDS, live=lambda uuid: False,
                    view_ready=lambda: True, grace=0.0, **kw)


def test_a_document_of_an_odd_shape_is_set_aside_and_the_others_are_still_recovered(tmp_path) -> None:
    spool_dir = tmp_path / "json_cdr"
    spool_dir.mkdir()
    before = write_cdr_pairs(spool_dir, [int((time.time() - 3600) * 1e6)])
    sample = json.loads((JSON_CDR_DIR / "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.cdr.json").read_text())
    odd = {
        # channel_data not an object, and no direction among the variables to take first
        "0b8c1a3e-0000-4000-8000-00000000000a": {**sample, "channel_data": "x", "variables": {
            k: v for k, v in sample["variables"].items() if k != "direction"}},
        # a "digit" int() refuses
        "0b8c1a3e-0000-4000-8000-00000000000b": {**sample, "variables": {**sample["variables"],
                                                                         "record_ms": "²", "start_epoch": "²"}},
    }
    for uuid, doc in odd.items():
        (spool_dir / f"{uuid}.cdr.json").write_text(json.dumps(doc).replace(sample["variables"]["uuid"], uuid)
                                                    + "\n")
    (spool_dir / "0b8c1a3e-0000-4000-8000-00000000000c.cdr.json").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    after = write_cdr_pairs(spool_dir, [int((time.time() - 1800) * 1e6)])
    sink = ListSink()
    spool = _spool(spool_dir, tmp_path / "ledger.sqlite3", sink)
    spool.reconcile()
    assert {a for a, _ in before + after} <= set(sink.calls), "the good documents' calls are recovered"
    assert spool.stats.unreadable >= 1
    again = _spool(spool_dir, tmp_path / "ledger.sqlite3", ListSink())
    again.reconcile()
    assert again.stats.reads == 0, "every document is accounted for, the odd ones set aside"
    assert all((spool_dir / f"{uuid}.cdr.json").exists() for uuid in odd), "never deleted"


def test_cleanup_gets_past_old_documents_it_keeps(tmp_path) -> None:
    spool_dir = tmp_path / "json_cdr"
    spool_dir.mkdir()
    junk = spool_dir / "0b8c1a3e-0000-4000-8000-000000000001.cdr.json"
    junk.write_text('{"not": "a cdr"}\n')     # unreadable, and older than everything: the first row of a page
    os.utime(junk, (time.time() - 40 * 86400,) * 2)
    pairs = write_cdr_pairs(spool_dir, [int((time.time() - 10 * 86400 + n) * 1e6) for n in range(400)])
    sink = ListSink()
    spool = _spool(spool_dir, tmp_path / "ledger.sqlite3", sink, keep_days=3)
    spool.reconcile()
    assert len(sink.calls) == 400
    spool.cleanup()
    assert not any((spool_dir / f"{a}.cdr.json").exists() or (spool_dir / f"{b}.cdr.json").exists()
                   for a, b in pairs), "all 800 accounted documents deleted in one cleanup"
    assert junk.exists()
