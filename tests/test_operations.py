"""What an admin running fsbridge for months relies on: metrics, health, logs, a clean stop."""

from __future__ import annotations

import json
import logging
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import requests
import yaml

from fsbridge import logs
from tests.conftest import API_KEY, CLIENT_ID, RECORD_SECRET, base_url, internal_url, settings
from tests.waiting import until

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def running(start_bridge):
    """fsbridge and its internal listener's URL (/metrics, /healthz)."""
    bridge = start_bridge()
    return bridge, internal_url(bridge)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{want}}}" if want else name):
            return float(value)
    raise AssertionError(f"{name}{labels} not in metrics")


def test_metrics_follow_calls_events_crm_and_history(running, simulator, fake_crm) -> None:
    _, base = running
    simulator.play("inbound_answered")
    until(lambda: len(fake_crm.calls) == 1, what="the call in the history")
    text = requests.get(f"{base}/metrics", timeout=5).text
    assert metric(text, "fsbridge_esl_events_total", event="CHANNEL_BRIDGE") == 1
    assert metric(text, "fsbridge_esl_events_total", event="CHANNEL_HANGUP_COMPLETE") == 2
    assert metric(text, "fsbridge_calls_finished_total") == 1
    assert metric(text, "fsbridge_call_events_done_total", outcome="sent") == 2
    assert metric(text, "fsbridge_crm_requests_total", method="POST", endpoint="telephony/call/event",
                  status="200") == 2
    assert metric(text, "fsbridge_crm_requests_total", method="POST", endpoint="telephony/calls/upload",
                  status="200") == 1
    assert metric(text, "fsbridge_outbox_calls", state="pending") == 0
    assert metric(text, "fsbridge_calls_tracked") == 0
    assert metric(text, "fsbridge_esl_connected") == 1
    assert metric(text, "fsbridge_esl_ingest_lag_seconds_count") >= 10
    for secret in (API_KEY, CLIENT_ID, RECORD_SECRET, "ClueCon"):
        assert secret not in text


def test_health_is_ready_when_calls_can_flow_and_says_why_not(running, simulator, fake_crm) -> None:
    bridge, base = running
    simulator.send_heartbeat()
    until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 200, what="readiness")
    report = requests.get(f"{base}/healthz", timeout=5).json()
    assert report["status"] == "ok" and set(report["checks"]) == {"workers", "freeswitch", "history", "crm", "activity"}
    simulator.stop()
    until(lambda: not bridge.listener.connected, what="the disconnect")
    reply = requests.get(f"{base}/healthz", timeout=5)
    assert reply.status_code == 503
    assert reply.json()["checks"]["freeswitch"] == {"ok": False, "detail": "event socket not connected"}
    # Liveness is not readiness: FreeSWITCH being away is no reason to restart fsbridge.
    assert requests.get(f"{base}/healthz/live", timeout=5).status_code == 200


def test_crm_outage_turns_readiness_red_after_the_grace(running, simulator, fake_crm) -> None:
    bridge, base = running
    bridge.health.crm_grace = 0.5
    fake_crm.outage = "html502"
    simulator.play("inbound_busy")
    until(lambda: requests.get(f"{base}/healthz", timeout=5).status_code == 503, timeout=10, what="red")
    assert "HTTP 502" in requests.get(f"{base}/healthz", timeout=5).json()["checks"]["crm"]["detail"]
    fake_crm.outage = None
    until(lambda: requests.get(f"{base}/healthz", timeout=5).json()["checks"]["crm"]["ok"], timeout=15,
          what="the CRM to be seen answering again")


def test_secrets_never_reach_the_log(caplog) -> None:
    handler_filter = logs.RedactSecrets([API_KEY, CLIENT_ID])
    record = logging.LogRecord("fsbridge", logging.ERROR, __file__, 1, "key %s in %s", (API_KEY, CLIENT_ID), None)
    handler_filter.filter(record)
    assert record.getMessage() == "key *** in ***"


def test_json_logs_are_one_object_per_line() -> None:
    record = logging.LogRecord("fsbridge.esl", logging.WARNING, __file__, 1, "lost %s", ("FreeSWITCH",), None)
    line = logs.JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["level"] == "warning" and entry["message"] == "lost FreeSWITCH" and "\n" not in line


def start_fsbridge(tmp_path: pathlib.Path, raw: dict) -> subprocess.Popen:
    path = tmp_path / "fsbridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.Popen([sys.executable, "-m", "fsbridge", "run", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_stops_cleanly_and_keeps_undelivered_calls(tmp_path, simulator, fake_crm) -> None:
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, state_dir=str(tmp_path / "state"),
                   log={"format": "json"})
    proc = start_fsbridge(tmp_path, raw)
    try:
        simulator.wait_for_subscriber(timeout=15)
        fake_crm.outage = "html503"          # the history cannot go out
        simulator.play("inbound_answered")
        simulator.play("inbound_busy")
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert time.monotonic() - started < 15, "the stop is bounded"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert any("2 call(s) wait in the outbox" in e["message"] for e in lines), out[-2000:]
        assert API_KEY not in out and CLIENT_ID not in out
    finally:
        if proc.poll() is None:
            proc.kill()
    # The next start delivers them.
    fake_crm.outage = None
    proc = start_fsbridge(tmp_path, raw)
    try:
        until(lambda: len(fake_crm.calls) == 2, timeout=20, what="the kept calls to be uploaded")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_kill_9_mid_stream_loses_no_finished_call(tmp_path, simulator, fake_crm) -> None:
    """The real `fsbridge run`, SIGKILLed while calls finish: every finished call reaches the CRM once."""
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, state_dir=str(tmp_path / "state"))
    played = []
    for round_ in range(3):
        proc = start_fsbridge(tmp_path, raw)
        try:
            simulator.wait_for_subscriber(timeout=15)
            fake_crm.outage = "html503" if round_ == 1 else None
            played += simulator.play_many(["inbound_answered", "inbound_busy", "outbound_ext_dial"], calls=12,
                                          rate=None, concurrency=12)
            time.sleep(0.3)
        finally:
            proc.kill()
            proc.wait()
        simulator.restart()     # forget the dead process's connection
    fake_crm.outage = None
    proc = start_fsbridge(tmp_path, raw)
    try:
        until(lambda: len(fake_crm.calls) == len(played), timeout=30, what="every call in the history")
        assert set(fake_crm.calls) == {p.a_leg for p in played}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)


def test_metrics_count_http_answers_by_route_and_malformed_events(running, simulator) -> None:
    bridge, base = running
    public = base_url(bridge)
    requests.get(f"{public}/records/forged-signature/31ff8abf-a4ac-4f83-a050-5a0db45e0c55.wav", timeout=5)
    requests.get(f"{public}/no/such/path/{'x' * 40}", timeout=5)
    body = b'{"Event-Name":"CHANNEL_CREATE","Unique-ID":"unterminated}'
    simulator.send_raw(b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body)
    until(lambda: bridge.listener.malformed_events == 1, what="the malformed event to be counted")
    text = requests.get(f"{base}/metrics", timeout=5).text
    assert metric(text, "fsbridge_http_responses_total", route="records", status="403") == 1
    assert metric(text, "fsbridge_http_responses_total", route="other", status="404") == 1
    assert metric(text, "fsbridge_http_sent_bytes_total", route="records") > 0
    assert metric(text, "fsbridge_esl_events_malformed_total") == 1
    assert "forged-signature" not in text and "x" * 40 not in text, "paths never become labels"
    assert bridge.listener.connected, "a malformed event is skipped, not a reason to reconnect"


def test_clients_cut_off_by_the_timeout_are_counted(start_bridge) -> None:
    import socket

    bridge = start_bridge(http={"timeout": 1})
    host, port = bridge.http.address
    for data in (b"GET /logo.svg HTTP/1.1\r\nHost: x\r\n", b"GET /lo"):  # heads that never end
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(data)
            assert s.recv(100).startswith(b"HTTP/1.1 408 ")
    text = requests.get(f"{internal_url(bridge)}/metrics", timeout=5).text
    assert metric(text, "fsbridge_http_responses_total", route="logo.svg", status="408") == 1
    assert metric(text, "fsbridge_http_responses_total", route="other", status="408") == 1


def test_a_scrape_does_not_hold_up_the_other_greenlets(running) -> None:
    import gevent
    from prometheus_client import generate_latest

    bridge, _ = running
    ran_during: list[bool] = []
    rendering = [False]
    render = bridge.metrics.render

    def other() -> None:  # e.g. a card sender woken while /metrics is being written
        ran_during.append(rendering[0])

    rendering[0] = True
    gevent.spawn(other)
    text = render()
    rendering[0] = False
    assert ran_during == [True]  # it ran before the rendering was over, not after
    # ... and the text is what prometheus_client renders itself (gauges read at scrape time aside).
    ours = [line for line in text.decode().splitlines() if line.startswith("#")]
    theirs = [line for line in generate_latest(bridge.metrics.registry).decode().splitlines() if line.startswith("#")]
    assert ours == theirs and len(ours) > 20


def test_metrics_show_a_blocked_hub_and_the_collectors_pauses(running) -> None:
    import gc

    import gevent

    _, base = running

    def over_25ms(text: str) -> float:
        return (metric(text, "fsbridge_hub_blocked_seconds_count")
                - metric(text, "fsbridge_hub_blocked_seconds_bucket", le="0.025"))

    before = requests.get(f"{base}/metrics", timeout=5).text
    end = time.perf_counter() + 0.08
    while time.perf_counter() < end:  # e.g. a slow SQLite write on the reading path: nothing else runs
        pass
    gc.collect()
    gevent.sleep(0.05)
    after = requests.get(f"{base}/metrics", timeout=5).text
    assert over_25ms(after) - over_25ms(before) >= 1
    assert (metric(after, "fsbridge_gc_pause_seconds_count", generation="2")
            > metric(before, "fsbridge_gc_pause_seconds_count", generation="2"))
