"""fsbridge as a whole, in-process: the FreeSWITCH simulator replaying captured calls with
fresh ids, fsbridge following them over a real event socket, the strict fake retailCRM
receiving the call events."""

from __future__ import annotations

import json
import logging
import shutil

import gevent
import pytest

from fsbridge.calls.model import FinishedCall
from fsbridge.service import Bridge
from tests.waiting import until

CUSTOMER, CALLED = "75555555555", "79121234567"

EXPECTED = {
    # scenario: the call events retailCRM must receive (callExternalId = the first leg)
    "inbound_answered": [("in", CUSTOMER, ["100"], "74999999999", None),
                         ("hangup", CUSTOMER, ["100"], "74999999999", "answered")],
    "inbound_no_answer": [("in", CUSTOMER, ["100"], "74999999999", None),
                          ("hangup", CUSTOMER, ["100"], "74999999999", "cancel")],
    "inbound_busy": [("in", CUSTOMER, ["200"], "74999999998", None),
                     ("hangup", CUSTOMER, ["200"], "74999999998", "busy")],
    "inbound_ext_no_answer": [("in", CUSTOMER, ["200"], "74999999998", None),
                              ("hangup", CUSTOMER, ["200"], "74999999998", "no answered")],
    "outbound_ext_dial": [("out", CALLED, ["100"], None, None),
                          ("hangup", CALLED, ["100"], None, "answered")],
    "outbound_originate_answered": [("out", CALLED, ["100"], None, None),
                                    ("hangup", CALLED, ["100"], None, "answered")],
}


def received(crm, call_id: str | None = None) -> list[tuple]:
    return [(e["type"], e["phone"], e["codes"], e.get("externalPhone"), e.get("hangupStatus"))
            for e in crm.events if call_id is None or e.get("callExternalId") == call_id]


@pytest.fixture
def bridge(simulator, fake_crm, make_config):
    finished: list[FinishedCall] = []
    b = Bridge(make_config(fs_port=simulator.port, crm_url=fake_crm.url), on_finished=finished.append)
    b.finished = finished
    b.start()
    until(lambda: b.listener.connected, what="fsbridge to connect")
    simulator.wait_for_subscriber(timeout=5)
    yield b
    b.stop()


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_each_captured_scenario_reaches_the_crm_exactly(scenario, simulator, fake_crm, bridge) -> None:
    played = simulator.play(scenario)
    until(lambda: len(received(fake_crm)) >= len(EXPECTED[scenario]), what="the scenario's call events")
    gevent.sleep(0.1)   # and no more
    assert received(fake_crm) == EXPECTED[scenario]
    assert {e["callExternalId"] for e in fake_crm.events} == {played.a_leg}
    assert [c.call_id for c in bridge.finished] == [played.a_leg]


def test_subscribes_to_named_events_in_json(simulator, bridge) -> None:
    [sub] = simulator.subscriptions[-1:]
    assert sub.format == "json"
    assert "ALL" not in sub.events and {"CHANNEL_CREATE", "CHANNEL_BRIDGE", "CHANNEL_HANGUP_COMPLETE"} <= sub.events


def test_concurrent_calls_keep_their_own_ids(simulator, fake_crm, bridge) -> None:
    played = simulator.play_many(["inbound_answered", "inbound_busy", "outbound_ext_dial"], calls=30,
                                 rate=None, concurrency=30)
    until(lambda: len(fake_crm.events) >= 60, timeout=20, what="60 call events")
    by_call: dict[str, list[str]] = {}
    for e in fake_crm.events:
        by_call.setdefault(e["callExternalId"], []).append(e["type"])
    assert set(by_call) == {p.a_leg for p in played}
    assert all(types[-1] == "hangup" and len(types) == 2 for types in by_call.values())
    assert bridge.tracker.legs == {}


def test_forged_caller_name_cannot_change_the_call(simulator, fake_crm, bridge) -> None:
    forged = {'"Caller-Caller-ID-Name":"75555555555"':
              '"Caller-Caller-ID-Name":"Bob\\",\\"Unique-ID\\":\\"forged\\",\\"Event-Name\\":\\"CHANNEL_DESTROY"'}
    played = simulator.play("inbound_answered", wire_substitutions=forged)
    until(lambda: len(fake_crm.events) >= 2, what="two call events")
    assert received(fake_crm) == EXPECTED["inbound_answered"]
    assert {e["callExternalId"] for e in fake_crm.events} == {played.a_leg}


def test_connection_cut_mid_event_then_call_closed_by_reconciliation(simulator, fake_crm, bridge, caplog) -> None:
    caplog.set_level(logging.WARNING)
    # Cut inside the stream, after the card popped but long before the hangup.
    simulator.cut_after_bytes(60_000)
    played = simulator.play("inbound_answered")
    until(lambda: bridge.listener.reconnects >= 1 and bridge.listener.connected, what="a reconnect")
    until(lambda: len(fake_crm.events) >= 2, what="the hangup from reconciliation")
    assert received(fake_crm) == EXPECTED["inbound_answered"]
    assert any("cut in the middle of a frame" in r.getMessage() or "closed" in r.getMessage()
               for r in caplog.records)
    assert bridge.finished[0].call_id == played.a_leg and bridge.finished[0].answered


def test_freeswitch_restart_mid_call_closes_the_call(simulator, fake_crm, bridge) -> None:
    simulator.cut_after_bytes(60_000)
    simulator.play("inbound_no_answer")
    simulator.restart()
    until(lambda: len(fake_crm.events) >= 2, timeout=10, what="the hangup after the restart")
    types = [e[0] for e in received(fake_crm)]
    assert types == ["in", "hangup"]
    # Later calls flow again over the new connection.
    simulator.wait_for_subscriber(timeout=5)
    simulator.play("inbound_busy")
    until(lambda: len(fake_crm.events) >= 4, what="the next call's events")


def test_malformed_frame_reconnects_and_loses_nothing_after(simulator, fake_crm, bridge, caplog) -> None:
    caplog.set_level(logging.WARNING)
    simulator.send_raw(b"Content-Length: banana\nContent-Type: text/event-json\n\n")
    until(lambda: bridge.listener.reconnects >= 1 and bridge.listener.connected, what="a reconnect")
    simulator.wait_for_subscriber(timeout=5)
    simulator.play("inbound_busy")
    until(lambda: len(fake_crm.events) >= 2, what="call events after the bad frame")
    assert "bad Content-Length" in caplog.text


def test_crm_html_502_drops_stale_cards_and_recovers(simulator, fake_crm, bridge, caplog) -> None:
    caplog.set_level(logging.WARNING)
    fake_crm.outage = "html502"
    simulator.play("inbound_busy")
    until(lambda: bridge.cards.dropped_stale >= 2, timeout=15, what="both cards to be given up")
    assert "HTML page" in caplog.text
    assert fake_crm.events == []
    fake_crm.outage = None
    simulator.play("inbound_answered")
    until(lambda: len(fake_crm.events) >= 2, what="cards after the outage")
    assert received(fake_crm) == EXPECTED["inbound_answered"]


def test_cards_are_never_delivered_late(simulator, fake_crm, make_config) -> None:
    """A CRM that comes back after the age limit gets none of the cards that piled up."""
    b = Bridge(make_config(fs_port=simulator.port, crm_url=fake_crm.url, crm={"card_max_age": 1.0}))
    b.start()
    try:
        simulator.wait_for_subscriber(timeout=5)
        fake_crm.outage = "html503"
        simulator.play("inbound_busy")
        gevent.sleep(2.0)
        fake_crm.outage = None
        gevent.sleep(1.0)
        assert fake_crm.events == []
        assert b.cards.dropped_stale == 2
        simulator.play("inbound_answered")
        until(lambda: len(fake_crm.events) >= 2, what="fresh cards")
    finally:
        b.stop()


def test_wrong_password_is_reported_and_retried(simulator, fake_crm, make_config, caplog) -> None:
    caplog.set_level(logging.WARNING)
    b = Bridge(make_config(fs_port=simulator.port, crm_url=fake_crm.url, freeswitch={"password": "wrong"}))
    b.start()
    try:
        until(lambda: "rejected the event socket password" in b.listener.last_error, what="the auth error")
        assert not b.listener.connected
        assert caplog.text.count("rejected the event socket password") == 1, "said once, not per retry"
    finally:
        b.stop()


def test_rude_rejection_names_the_acl(fake_crm, make_config) -> None:
    from tests.fakes.freeswitch import FreeSwitchSimulator

    with FreeSwitchSimulator(password="ClueCon", reject=True) as sim:
        b = Bridge(make_config(fs_port=sim.port, crm_url=fake_crm.url))
        b.start()
        try:
            until(lambda: "acl" in b.listener.last_error.lower(), what="the rejection")
        finally:
            b.stop()


def test_nothing_listening_is_reported(fake_crm, make_config) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    b = Bridge(make_config(fs_port=port, crm_url=fake_crm.url))
    b.start()
    try:
        until(lambda: "cannot connect to FreeSWITCH" in b.listener.last_error, what="the connect error")
    finally:
        b.stop()


def uuid_dumps_for(simulator, played, scenario: str, pause: str):
    """`uuid_dump <uuid> json` answers for a paused call: each channel's data as its last captured
    event carried it (what uuid_dump prints), with the played call's fresh ids and shifted times."""
    from tests import capture

    evs = capture.events(scenario, "json")
    stop = next(i for i, e in enumerate(evs) if e["Event-Name"] == pause)
    created = {e["Unique-ID"]: int(e["Caller-Channel-Created-Time"])
               for e in evs if e["Event-Name"] == "CHANNEL_CREATE"}
    first = capture.legs(evs)[0]
    row = next(r for r in json.loads(simulator._api("show", "channels as json"))["rows"]
               if r["uuid"] == played.uuids[first])
    shift_us = (int(row["created_epoch"]) - created[first] // 1_000_000) * 1_000_000
    last: dict[str, dict] = {}
    for e in evs[:stop + 1]:
        if e.get("Unique-ID") and "variable_uuid" in e:
            last[e["Unique-ID"]] = e
    dumps = {}
    for old, e in last.items():
        dump = {}
        for key, value in e.items():
            for o, n in played.uuids.items():
                value = value.replace(o, n)
            if (key.endswith("-Time") or key == "Event-Date-Timestamp") and value.isdigit() and int(value):
                value = str(int(value) + shift_us)
            dump[key] = value
        dump["Event-Name"] = "CHANNEL_DATA"
        dumps[played.uuids[old]] = json.dumps(dump)
    return lambda arg: dumps.get(arg.split()[0], "-ERR No such channel!\n")


def test_fsbridge_restarted_mid_call_takes_the_call_over(simulator, fake_crm, make_config) -> None:
    """A call already talking when fsbridge starts still gets its hangup card and its history."""
    played = simulator.play("inbound_answered", until="CALL_UPDATE")   # bridged, nobody listening
    simulator.api_responses["uuid_dump"] = uuid_dumps_for(simulator, played, "inbound_answered", "CALL_UPDATE")
    b = Bridge(make_config(fs_port=simulator.port, crm_url=fake_crm.url))
    b.start()
    try:
        simulator.wait_for_subscriber()
        until(lambda: b.tracker.adopted == 2, what="both channels to be taken over")
        assert fake_crm.events == [], "the card was shown by the fsbridge before us"
        simulator.resume(played)
        until(lambda: len(fake_crm.calls) == 1, what="the call in the history")
        assert received(fake_crm) == [("hangup", CUSTOMER, ["100"], "74999999999", "answered")]
        call = fake_crm.calls[played.a_leg]
        assert (call["type"], call["result"], call["code"]) == ("in", "answered", "100")
        assert 7 <= call["duration"] <= 9, "talk time counted from the real bridge, not from the restart"
    finally:
        b.stop()


@pytest.mark.skipif(not (shutil.which("lame") or shutil.which("ffmpeg")), reason="no MP3 encoder (lame or ffmpeg)")
def test_prefer_mp3_converts_the_recording_after_the_call(start_bridge, fixtures_dir, tmp_path) -> None:
    from tests.test_history_outbox import make_call

    record_id = "31ff8abf-a4ac-4f83-a050-5a0db45e0c55"
    shutil.copy(fixtures_dir / "recordings" / f"{record_id}.wav", tmp_path)
    b = start_bridge(records={"dir": str(tmp_path), "prefer_mp3": True})
    # The path as FreeSWITCH reported it: only the id in its name is used.
    b._finished(make_call(1, recording_path=f"/elsewhere/{record_id}.wav", recording_ms=5000))
    until(lambda: (tmp_path / f"{record_id}.mp3").exists(), timeout=30, what="the MP3")
    head = (tmp_path / f"{record_id}.mp3").read_bytes()[:3]
    assert head == b"ID3" or (head[0] == 0xFF and head[1] & 0xE0 == 0xE0), head  # an ID3 tag or MPEG frame sync
    assert (tmp_path / f"{record_id}.wav").exists()  # the WAV is kept


def test_freeswitch_dropping_a_slow_reader_is_counted_as_lost_events(simulator, bridge) -> None:
    from tests.fakes.freeswitch import LOST_EVENTS_NOTICE

    reconnects = bridge.listener.reconnects
    [conn] = simulator._event_conns
    conn.kill(LOST_EVENTS_NOTICE)  # what mod_event_socket sends a listener whose queue overflowed
    until(lambda: bridge.listener.reconnects == reconnects + 1, what="the reconnection")
    assert bridge.listener.lost_listener == 1
    simulator.wait_for_subscriber(timeout=5)
    simulator._event_conns[-1].kill("bye\n")  # any other disconnect notice is a lost connection, not lost events
    until(lambda: bridge.listener.reconnects == reconnects + 2, what="the second reconnection")
    assert bridge.listener.lost_listener == 1


def test_recordings_waiting_for_the_encoder_never_hold_up_the_reader(start_bridge, tmp_path, monkeypatch) -> None:
    import time
    import uuid

    from tests.test_history_outbox import make_call

    b = start_bridge(records={"dir": str(tmp_path), "prefer_mp3": True})
    running: list[str] = []

    def slow_encoder(wav) -> None:
        running.append(str(wav))
        gevent.sleep(0.5)

    monkeypatch.setattr(b.recordings, "to_mp3", slow_encoder)
    started = time.monotonic()
    for n in range(5):  # _finished runs on the ESL reading path
        b._finished(make_call(n, recording_path=f"/rec/{uuid.uuid4()}.wav", recording_ms=5000))
    b._finished(make_call(9, recording_path=f"/rec/{uuid.uuid4()}.wav", recording_ms=0))  # silence: not encoded
    assert time.monotonic() - started < 0.45   # less than one encoding: nothing waited for an encoder
    gevent.sleep(0.1)
    assert len(running) == 2  # two encoders at a time
    until(lambda: len(running) == 5, timeout=5, what="every recording encoded in turn")
