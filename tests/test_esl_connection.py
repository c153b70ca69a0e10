"""The event socket client cannot be stalled: every wait is bounded and every failure says why."""

from __future__ import annotations

import gevent
import gevent.server
import pytest

from fsbridge.esl.connection import EslAuthError, EslConnection, EslDisconnected, EslTimeout
from tests.waiting import until


class MutePeer:
    """A peer that says what it is told to and then nothing: FreeSWITCH hung, or not FreeSWITCH."""

    def __init__(self, greeting: bytes = b"Content-Type: auth/request\n\n", reply_auth: bool = True) -> None:
        self.greeting = greeting
        self.reply_auth = reply_auth
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self.handle)
        self.server.start()
        self.port = self.server.server_port

    def handle(self, sock, addr) -> None:
        sock.sendall(self.greeting)
        f = sock.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return
            if line.startswith(b"auth ") and self.reply_auth:
                f.readline()
                sock.sendall(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")

    def stop(self) -> None:
        self.server.stop()


def connect(port: int, **kw) -> EslConnection:
    conn = EslConnection("127.0.0.1", port, "ClueCon", connect_timeout=kw.pop("connect_timeout", 1.0),
                         command_timeout=kw.pop("command_timeout", 0.5), idle_timeout=kw.pop("idle_timeout", 5.0),
                         **kw)
    conn.connect()
    return conn


def test_unanswered_command_times_out_and_closes_the_connection() -> None:
    peer = MutePeer()
    try:
        conn = connect(peer.port)
        with pytest.raises(EslTimeout, match=r"did not answer 'api' within 0\.5 s"):
            conn.api("status")
        assert conn.closed.is_set()
        with pytest.raises(EslDisconnected):
            conn.api("status")
    finally:
        peer.stop()


def test_peer_that_never_asks_for_auth() -> None:
    peer = MutePeer(greeting=b"")
    try:
        with pytest.raises(EslTimeout, match="sent no auth request"):
            connect(peer.port)
    finally:
        peer.stop()


def test_auth_without_reply_is_bounded() -> None:
    peer = MutePeer(reply_auth=False)
    try:
        with pytest.raises(EslTimeout):
            connect(peer.port)
    finally:
        peer.stop()


def test_silence_longer_than_heartbeats_closes_the_connection() -> None:
    peer = MutePeer()
    try:
        conn = connect(peer.port, idle_timeout=0.3)
        until(conn.closed.is_set, timeout=3, what="the idle timeout")
        assert "heartbeats stopped" in conn.close_reason
    finally:
        peer.stop()


def test_wrong_password(simulator) -> None:
    conn = EslConnection("127.0.0.1", simulator.port, "nope", connect_timeout=2, command_timeout=2)
    with pytest.raises(EslAuthError, match="rejected the event socket password"):
        conn.connect()


def test_api_and_bgapi_against_the_simulator(simulator) -> None:
    conn = connect(simulator.port, command_timeout=3)
    try:
        assert '"row_count":0' in conn.api("show channels as json").replace(" ", "")
        # Job results travel as BACKGROUND_JOB events: only to subscribers, as in FreeSWITCH.
        conn.subscribe(["BACKGROUND_JOB"])
        job = conn.bgapi("originate {origination_uuid=5b4c8a8e-0000-4000-8000-000000000001}user/100 &park()")
        assert job.get(timeout=3).startswith("+OK 5b4c8a8e-0000-4000-8000-000000000001")
    finally:
        conn.stop()


def test_a_pending_command_fails_at_once_when_the_socket_drops(simulator) -> None:
    peer = MutePeer()
    try:
        conn = connect(peer.port, command_timeout=10)
        waiter = gevent.spawn(conn.api, "status")
        gevent.sleep(0.1)
        peer.stop()
        conn.sock.close()
        with pytest.raises(EslDisconnected):
            waiter.get(timeout=2)
    finally:
        peer.stop()


def test_commands_cannot_smuggle_a_second_command(simulator) -> None:
    conn = connect(simulator.port)
    try:
        with pytest.raises(ValueError):
            conn.api("status\n\nbgapi originate user/100 &park")
        assert not any("originate" in c for c in simulator.commands)
    finally:
        conn.stop()


def test_live_channel_uuids_from_the_captured_listing(fixtures_dir) -> None:
    """The uuids of `show channels as json` as a real FreeSWITCH answered it, busy and idle."""
    import json as jsonlib

    from fsbridge.esl.protocol import FrameReader
    from fsbridge.service import live_channel_uuids

    for name, expected in (("show_channels_calls_json.raw", 2), ("show_channels_calls_json_idle.raw", 0)):
        frames = FrameReader().feed((fixtures_dir / "esl" / name).read_bytes())
        body = next(f.body.decode() for f in frames if f.content_type == "api/response")

        class Conn:
            def __init__(self, answer: str) -> None:
                self.answer = answer

            def api(self, command: str) -> str:
                assert command == "show channels as json"
                return self.answer

        uuids = live_channel_uuids(Conn(body))  # type: ignore[arg-type]
        rows = jsonlib.loads(body).get("rows", [])
        assert uuids == {row["uuid"] for row in rows} and len(uuids) == expected
        if rows:
            # An origination_uuid set by a dialplan keeps its case: that channel is live all the same.
            upper = rows[0]["uuid"].upper()
            assert upper in live_channel_uuids(Conn(body.replace(rows[0]["uuid"], upper)))  # type: ignore[arg-type]
