"""The FreeSWITCH simulator against real sockets and the raw captures it replays.

The client here is a deliberately small Event Socket reader written for these tests (not fsbridge
code), so a bug in fsbridge's parser cannot hide a bug in the simulator.
"""

from __future__ import annotations

import calendar
import datetime
import json
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gevent
import pytest

from tests.fakes.freeswitch import ORIGINATE_USAGE, FreeSwitchSimulator, PlayedCall
from tests.waiting import until

ESL = Path(__file__).parent / "fixtures" / "esl"
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SCENARIOS = [
    "inbound_answered",
    "inbound_no_answer",
    "inbound_busy",
    "inbound_ext_no_answer",
    "outbound_originate_answered",
    "outbound_ext_dial",
]
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
ORIGINATE = (
    "{origination_caller_id_number=100}sofia/internal/100@127.0.0.1:5090 "
    "&bridge(sofia/internal/79121234567@127.0.0.1:5092)"
)


# ---------------------------------------------------------------------------------------------
# A minimal Event Socket client


@dataclass
class Frame:
    headers: dict[str, str]
    body: bytes

    @property
    def type(self) -> str:
        return self.headers.get("Content-Type", "")

    def event(self) -> dict[str, str]:
        """Event headers, values decoded; the plain body (if any) under '_body'."""
        text = self.body.decode()
        if self.type == "text/event-json":
            return json.loads(text)
        head, _, rest = text.partition("\n\n")
        out: dict[str, str] = {}
        for line in head.split("\n"):
            key, _, value = line.partition(": ")
            out.setdefault(key, urllib.parse.unquote(value))
        if "Content-Length" in out:
            out["_body"] = rest
        return out


def split_frames(data: bytes) -> list[Frame]:
    frames, pos = [], 0
    while pos < len(data):
        end = data.index(b"\n\n", pos)
        headers = dict(line.split(": ", 1) for line in data[pos:end].decode().split("\n"))
        start = end + 2
        stop = start + int(headers.get("Content-Length", "0"))
        frames.append(Frame(headers, data[start:stop]))
        pos = stop
    return frames


class Client:
    def __init__(self, sim: FreeSwitchSimulator, password: str | None = "ClueCon", rcvbuf: int = 0) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect((sim.host, sim.port))
        self.buf = b""
        self.events: list[Frame] = []
        if password is not None:
            assert self.frame().type == "auth/request"
            assert self.command(f"auth {password}") == "+OK accepted"

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        self.buf += data
        return bool(data)

    def frame(self) -> Frame | None:
        """The next frame, or None at EOF."""
        while b"\n\n" not in self.buf:
            if not self._fill():
                return None
        end = self.buf.index(b"\n\n")
        headers = dict(line.split(": ", 1) for line in self.buf[:end].decode().split("\n"))
        start = end + 2
        stop = start + int(headers.get("Content-Length", "0"))
        while len(self.buf) < stop:
            if not self._fill():
                return None
        frame = Frame(headers, self.buf[start:stop])
        self.buf = self.buf[stop:]
        return frame

    def send(self, cmd: str) -> None:
        self.sock.sendall(cmd.encode() + b"\n\n")

    def response(self) -> Frame:
        """The next reply (command/reply or api/response); events met on the way are kept."""
        while True:
            frame = self.frame()
            assert frame is not None, "connection closed before the reply"
            if frame.type.startswith("text/event"):
                self.events.append(frame)
            else:
                return frame

    def command(self, cmd: str) -> str:
        self.send(cmd)
        frame = self.response()
        return frame.headers.get("Reply-Text") or frame.body.decode()

    def subscribe(self, spec: str = "plain ALL") -> Client:
        fmt = spec.split()[0]
        assert self.command(f"event {spec}") == f"+OK event listener enabled {fmt}"
        return self

    def take(self, count: int) -> list[Frame]:
        while len(self.events) < count:
            frame = self.frame()
            assert frame is not None, f"EOF after {len(self.events)} of {count} events"
            assert frame.type.startswith("text/event"), frame
            self.events.append(frame)
        taken, self.events = self.events[:count], self.events[count:]
        return taken

    def read_all(self) -> bytes:
        """Everything until EOF."""
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data


@pytest.fixture
def sim() -> Iterator[FreeSwitchSimulator]:
    with FreeSwitchSimulator(tz=datetime.UTC) as simulator:
        yield simulator


def capture_events(scenario: str, fmt: str) -> list[Frame]:
    return [f for f in split_frames((ESL / f"{scenario}.{fmt}.raw").read_bytes()) if f.type.startswith("text/event")]


# ---------------------------------------------------------------------------------------------
# Authentication


def test_auth_accepted_and_commands_need_it(sim: FreeSwitchSimulator) -> None:
    raw = Client(sim, password=None)
    assert raw.frame() == Frame({"Content-Type": "auth/request"}, b"")
    assert raw.command("api uuid_exists x") == "-ERR command not found"
    assert raw.command("auth ClueCon") == "+OK accepted"
    unknown = "api uuid_exists 1b7a2b1e-0d4c-4b5e-9a51-0f5f0d2b3c4d"
    assert raw.command(unknown) == "false"
    assert sim.commands[-3:] == ["api uuid_exists x", "auth ClueCon", unknown]


def test_wrong_password_is_refused_and_disconnected(sim: FreeSwitchSimulator) -> None:
    raw = Client(sim, password=None)
    raw.frame()
    assert raw.command("auth nope") == "-ERR invalid"
    notice = raw.frame()
    assert notice == Frame({"Content-Type": "text/disconnect-notice", "Content-Length": "67"}, GOODBYE)
    assert raw.frame() is None


def test_rude_rejection_like_an_acl() -> None:
    with FreeSwitchSimulator(reject=True) as sim:
        raw = Client(sim, password=None)
        rude = raw.frame()
        assert rude == Frame(
            {"Content-Type": "text/rude-rejection", "Content-Length": "24"}, b"Access Denied, go away.\n"
        )
        assert raw.frame().type == "text/disconnect-notice"
        assert raw.frame() is None


def test_exit_says_bye_then_goodbye(sim: FreeSwitchSimulator) -> None:
    client = Client(sim)
    assert client.command("exit") == "+OK bye"
    assert client.frame().body == GOODBYE
    assert client.frame() is None


# ---------------------------------------------------------------------------------------------
# Replays: byte identity apart from the documented rewrites


_PAIR_RE = re.compile(r'"((?:[^"\\]|\\.)*)":"((?:[^"\\]|\\.)*)"')
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _epoch_of_date(text: str) -> int:
    if text.endswith("GMT"):  # "Thu, 26 Nov 2026 19:37:38 GMT"
        _, d, mon, y, hms, _ = text.replace(",", "").split(" ")
        h, m, s = hms.split(":")
        return calendar.timegm((int(y), _MONTHS.index(mon) + 1, int(d), int(h), int(m), int(s)))
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


class Rewrites:
    """Checks one changed header value against the rewrites the simulator may make."""

    def __init__(self, played: PlayedCall, sim: FreeSwitchSimulator, fmt: str, core: str) -> None:
        self.uuids = played.uuids
        self.sim = sim
        self.fmt = fmt
        self.core = core
        self.offset_s: int | None = None
        self.sequences: list[int] = []

    def shift(self, delta_us: int) -> None:
        assert delta_us % 1_000_000 == 0, "times shift by whole seconds"
        if self.offset_s is None:
            self.offset_s = delta_us // 1_000_000
        assert delta_us == self.offset_s * 1_000_000, "every time shifts by the same amount"

    def check(self, key: str, orig: str, got: str) -> None:
        decode = urllib.parse.unquote if self.fmt == "plain" else (lambda v: v)
        if key == "Event-Sequence":
            self.sequences.append(int(got))
        elif key == "Core-UUID":
            assert (orig, got) == (self.core, self.sim.core_uuid)
        elif orig.isdigit() and (key == "Event-Date-Timestamp" or key.endswith(("-Time", "_uepoch", "_stamp"))):
            self.shift(int(got) - int(orig))
        elif orig.isdigit() and (key.endswith("_epoch") or key == "Task-Runtime"):
            self.shift((int(got) - int(orig)) * 1_000_000)
        elif key in ("Event-Date-Local", "Event-Date-GMT") or key.endswith("_stamp"):
            assert (self.fmt == "plain") == ("%20" in got), "plain keeps the URL encoding"
            self.shift((_epoch_of_date(decode(got)) - _epoch_of_date(decode(orig))) * 1_000_000)
        else:
            expected = UUID_RE.sub(lambda m: self.uuids[m.group(0)], orig)
            assert got == expected, f"{key}: {got!r} is not {orig!r} with fresh uuids"


def assert_same_apart_from_rewrites(orig: bytes, got: bytes, rw: Rewrites) -> None:
    o, g = orig.decode(), got.decode()
    if rw.fmt == "plain":
        olines, glines = o.split("\n"), g.split("\n")
        assert len(olines) == len(glines)
        for ol, gl in zip(olines, glines, strict=True):
            if ol != gl:
                okey, sep, oval = ol.partition(": ")
                gkey, _, gval = gl.partition(": ")
                if not sep:  # a body line (BACKGROUND_JOB result)
                    okey, oval, gkey, gval = "_body", ol, "_body", gl
                assert okey == gkey, (ol, gl)
                rw.check(okey, oval, gval)
    else:
        opairs, gpairs = list(_PAIR_RE.finditer(o)), list(_PAIR_RE.finditer(g))
        assert len(opairs) == len(gpairs)
        opos = gpos = 0
        for om, gm in zip(opairs, gpairs, strict=True):
            assert o[opos : om.start()] == g[gpos : gm.start()]  # the JSON around the pairs
            assert om.group(1) == gm.group(1)
            if om.group(2) != gm.group(2):
                rw.check(om.group(1), om.group(2), gm.group(2))
            opos, gpos = om.end(), gm.end()
        assert o[opos:] == g[gpos:]


@pytest.mark.parametrize("fmt", ["plain", "json"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_replay_is_the_capture_apart_from_rewrites(sim: FreeSwitchSimulator, scenario: str, fmt: str) -> None:
    client = Client(sim).subscribe(f"{fmt} ALL")
    before = time.time()
    played = sim.play(scenario)
    original = capture_events(scenario, fmt)
    received = client.take(len(original))
    assert played.events == len(original)

    core = original[0].event()["Core-UUID"]
    rw = Rewrites(played, sim, fmt, core)
    for orig, got in zip(original, received, strict=True):
        assert got.type == orig.type == f"text/event-{fmt}"
        assert int(got.headers["Content-Length"]) == len(got.body)
        assert_same_apart_from_rewrites(orig.body, got.body, rw)
    # Every uuid is fresh, and the call starts now.
    assert not set(UUID_RE.findall(b"".join(f.body for f in received).decode())) & set(played.uuids)
    first = int(received[0].event()["Event-Date-Timestamp"]) / 1e6
    assert before - 1.5 <= first <= time.time() + 1.5
    assert rw.sequences == sorted(rw.sequences) and len(set(rw.sequences)) == len(rw.sequences)


def test_heartbeat_and_re_schedule_are_kept(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe("json HEARTBEAT RE_SCHEDULE")
    played = sim.play("inbound_answered")
    names = [f.event()["Event-Name"] for f in client.take(played.events)]
    assert names == ["HEARTBEAT", "RE_SCHEDULE"]


# ---------------------------------------------------------------------------------------------
# Freshness and consistency


def test_ids_are_fresh_and_consistent_between_legs(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe()
    calls = [sim.play("inbound_answered"), sim.play("inbound_answered")]
    frames = client.take(sum(p.events for p in calls))
    seen: list[set[str]] = []
    sequences: list[int] = []
    for played in calls:
        events = [f.event() for f in frames[: played.events]]
        frames = frames[played.events :]
        sequences += [int(e["Event-Sequence"]) for e in events]
        legs = list(dict.fromkeys(e["Unique-ID"] for e in events if "Unique-ID" in e))
        assert len(legs) == 2 and legs[0] == played.a_leg
        a_leg, b_leg = legs
        assert all(e["Core-UUID"] == sim.core_uuid for e in events)
        for e in events:
            if e.get("Unique-ID") == b_leg and "Other-Leg-Unique-ID" in e:
                assert e["Other-Leg-Unique-ID"] == a_leg
            if e.get("Unique-ID") == a_leg and "Other-Leg-Unique-ID" in e:
                assert e["Other-Leg-Unique-ID"] == b_leg
        bridge = next(e for e in events if e["Event-Name"] == "CHANNEL_BRIDGE")
        assert (bridge["Bridge-A-Unique-ID"], bridge["Bridge-B-Unique-ID"]) == (a_leg, b_leg)
        record = next(e for e in events if e["Event-Name"] == "RECORD_STOP")
        assert record["Record-File-Path"].endswith(f"/recordings/{a_leg}.wav")
        b_create = next(e for e in events if e["Event-Name"] == "CHANNEL_CREATE" and e["Unique-ID"] == b_leg)
        assert b_create["variable_originating_leg_uuid"] == a_leg
        ids = set(UUID_RE.findall(json.dumps(events))) - {sim.core_uuid}
        assert ids == set(played.uuids.values())
        seen.append(ids)
    assert not seen[0] & seen[1]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


def test_plain_and_json_clients_see_the_same_call(sim: FreeSwitchSimulator) -> None:
    plain = Client(sim).subscribe("plain CHANNEL_CREATE CHANNEL_DESTROY")
    js = Client(sim).subscribe("json CHANNEL_CREATE CHANNEL_DESTROY")
    played = sim.play("inbound_busy")
    got = {c: [(e["Event-Name"], e["Unique-ID"]) for e in (f.event() for f in c.take(4))] for c in (plain, js)}
    assert got[plain] == got[js]
    assert got[plain][0] == ("CHANNEL_CREATE", played.a_leg)
    assert played.events == 8  # four per format


def test_wire_substitutions_forge_values_before_content_length(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe("plain CHANNEL_CREATE")
    forged = "Caller-Caller-ID-Name: Bob%0AUnique-ID: x"
    played = sim.play("inbound_answered", wire_substitutions={"Caller-Caller-ID-Name: 75555555555": forged})
    a_create = client.take(played.events)[0]
    assert forged.encode() + b"\n" in a_create.body
    assert int(a_create.headers["Content-Length"]) == len(a_create.body)
    assert a_create.event()["Unique-ID"] == played.a_leg  # the first one, line-wise, is genuine


# ---------------------------------------------------------------------------------------------
# Subscriptions


def test_event_names_filters_and_formats(sim: FreeSwitchSimulator) -> None:
    client = Client(sim)
    assert client.command("event plain NOT_AN_EVENT") == "-ERR no keywords supplied"
    client.subscribe("plain CHANNEL_CREATE channel_destroy")
    (sub,) = sim.subscriptions
    assert (sub.format, sub.events) == ("plain", frozenset({"CHANNEL_CREATE", "CHANNEL_DESTROY"}))
    played = sim.play("inbound_answered")
    names = [f.event()["Event-Name"] for f in client.take(played.events)]
    assert names == ["CHANNEL_CREATE", "CHANNEL_CREATE", "CHANNEL_DESTROY", "CHANNEL_DESTROY"]

    assert client.command("nixevent CHANNEL_CREATE") == "+OK events nixed"
    a_leg = str(uuid.uuid4())
    assert client.command(f"filter Unique-ID {a_leg}") == f"+OK filter added. [Unique-ID]=[{a_leg}]"
    played = sim.play("inbound_answered", a_leg=a_leg)
    (only,) = client.take(played.events)
    assert only.event()["Unique-ID"] == a_leg and only.event()["Event-Name"] == "CHANNEL_DESTROY"
    assert client.command("filter delete all") == "+OK filter deleted. [all][]"

    client.subscribe("json ALL")
    assert sim.subscriptions[0].format == "json"
    assert client.command("noevents") == "+OK no longer listening for events"
    assert client.command("noevents") == "-ERR not listening for events"
    assert sim.subscriptions == []
    assert sim.play("inbound_busy").events == 0
    assert client.command("hello") == "-ERR command not found"


# ---------------------------------------------------------------------------------------------
# api / bgapi


def _unfresh_show(body: bytes, played: PlayedCall, shifted: tuple[str, ...]) -> bytes:
    """A `show ... as json` answer with the capture's uuids and times put back."""
    plain_ids = set(UUID_RE.findall((ESL / f"{played.scenario}.plain.raw").read_text()))
    back = {fresh: orig for orig, fresh in played.uuids.items() if orig in plain_ids}
    data = json.loads(body)
    offset = None
    for row in data["rows"]:
        for key, value in row.items():
            if key.endswith("_epoch") and value:
                offset = int(value) - int(CAPTURED_EPOCHS[key])
    for row in data["rows"]:
        for key in shifted:
            if key.endswith("_epoch"):
                row[key] = str(int(row[key]) - offset)
            else:
                t = _epoch_of_date(row[key]) - offset
                row[key] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
    text = json.dumps(data, separators=(",", ":"))
    return UUID_RE.sub(lambda m: back.get(m.group(0), m.group(0)), text).encode()


CAPTURED_EPOCHS = {"created_epoch": "1795721858", "b_created_epoch": "1795721858", "call_created_epoch": "1795721859"}


def test_show_channels_and_calls_follow_the_live_calls(sim: FreeSwitchSimulator) -> None:
    client = Client(sim)
    idle = [f.body for f in split_frames((ESL / "show_channels_calls_json_idle.raw").read_bytes())[2:]]
    assert client.command("api show channels as json").encode() == idle[0] == b'{"row_count": 0}\n'
    assert client.command("api show calls as json").encode() == idle[1]

    # The captured `show` ran at the capture's first API event: pause there and compare.
    played = sim.play("inbound_answered", until="API")
    assert played.paused and sim.live_channels == {played.a_leg, played.uuids["95bf58e2-2fa0-4370-8553-0d97a378255b"]}
    busy = [f.body for f in split_frames((ESL / "show_channels_calls_json.raw").read_bytes())[2:]]
    channels = client.command("api show channels as json").encode()
    assert _unfresh_show(channels, played, ("created", "created_epoch")) == busy[0]
    calls = client.command("api show calls as json").encode()
    shifted = ("created", "created_epoch", "b_created", "b_created_epoch", "call_created_epoch")
    assert _unfresh_show(calls, played, shifted) == busy[1]
    assert client.command(f"api uuid_exists {played.a_leg}") == "true"

    finished = sim.resume(played)
    assert not finished.paused and sim.live_channels == set()
    assert client.command(f"api uuid_exists {played.a_leg}") == "false"
    assert client.command("api show channels as json") == '{"row_count": 0}\n'


def test_api_unknown_commands_and_api_event(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe("plain API")
    assert client.command("api foo bar baz") == "-ERR foo Command not found!\n"
    sim.api_responses["status"] = "UP 0 years, 0 days\n"
    assert client.command("api status") == "UP 0 years, 0 days\n"
    (foo, status) = client.take(2)
    assert foo.event()["API-Command"] == "foo" and foo.event()["API-Command-Argument"] == "bar baz"
    assert status.event()["API-Command"] == "status" and "API-Command-Argument" not in status.event()


def test_bgapi_originate_replays_the_capture_with_origination_uuid(sim: FreeSwitchSimulator) -> None:
    sim.originate_plays = "outbound_originate_answered"
    client = Client(sim).subscribe()
    leg, job = str(uuid.uuid4()), str(uuid.uuid4())
    args = ORIGINATE.replace("{", "{origination_uuid=" + leg + ",")
    client.send(f"bgapi originate {args}\nJob-UUID: {job}")
    reply = client.response()
    assert reply.headers == {
        "Content-Type": "command/reply",
        "Reply-Text": f"+OK Job-UUID: {job}",
        "Job-UUID": job,
    }
    played = sim.originates[-1].play.get(timeout=5)
    assert played.a_leg == leg and played.job_uuid == job
    events = [f.event() for f in client.take(played.events)]
    assert events[0]["Unique-ID"] == leg
    names = [e["Event-Name"] for e in events]
    assert names.index("CHANNEL_ANSWER") < names.index("BACKGROUND_JOB")  # as captured: after answer
    job_event = events[names.index("BACKGROUND_JOB")]
    assert job_event["Job-UUID"] == job and job_event["Job-Command"] == "originate"
    assert job_event["Job-Command-Arg"] == args
    assert job_event["_body"] == f"+OK {leg}\n" and job_event["Content-Length"] == str(len(f"+OK {leg}\n"))
    api_event = events[names.index("API")]
    assert api_event["API-Command-Argument"] == args


def test_bgapi_encodes_job_arg_like_freeswitch(sim: FreeSwitchSimulator) -> None:
    sim.originate_plays = "outbound_originate_answered"
    client = Client(sim).subscribe("plain BACKGROUND_JOB")
    client.send(f"bgapi originate {ORIGINATE}")
    client.response()
    captured = next(f for f in capture_events("outbound_originate_answered", "plain") if b"BACKGROUND_JOB" in f.body)
    (got,) = client.take(1)
    line = re.compile(rb"^Job-Command-Arg: .*$", re.M)
    assert line.search(got.body).group(0) == line.search(captured.body).group(0)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_bgapi_originate_failure_reports_the_cause(sim: FreeSwitchSimulator, fmt: str) -> None:
    sim.originate_result = "-ERR USER_BUSY"
    sim.originate_plays = "outbound_originate_answered"  # not played: the originate failed
    client = Client(sim).subscribe(f"{fmt} ALL")
    client.send("bgapi originate sofia/internal/100@127.0.0.1:5090 &park()")
    reply = client.response()
    job = reply.headers["Job-UUID"]
    assert reply.headers["Reply-Text"] == f"+OK Job-UUID: {job}"
    api, background = (f.event() for f in client.take(2))
    assert api["Event-Name"] == "API" and api["API-Command"] == "originate"
    assert background["Event-Name"] == "BACKGROUND_JOB" and background["Job-UUID"] == job
    assert background["_body"] == "-ERR USER_BUSY\n"
    assert background["Core-UUID"] == sim.core_uuid
    assert sim.live_channels == set()


def test_api_originate_answers_inline(sim: FreeSwitchSimulator) -> None:
    leg = str(uuid.uuid4())
    client = Client(sim)
    assert client.command(f"api originate {{origination_uuid={leg}}}user/100 &park()") == f"+OK {leg}\n"


# ---------------------------------------------------------------------------------------------
# Faults


def test_cut_closes_every_connection_and_clients_can_come_back(sim: FreeSwitchSimulator) -> None:
    first = Client(sim).subscribe()
    assert sim.cut() == 1
    assert first.read_all() == b""
    assert sim.subscriptions == []
    second = Client(sim).subscribe("plain CHANNEL_CREATE")
    sim.wait_for_subscriber(timeout=1)
    played = sim.play("inbound_busy")
    assert len(second.take(played.events)) == 2


def test_cut_after_bytes_truncates_a_frame(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe()
    sim.cut_after_bytes(1000)
    played = sim.play("inbound_answered")
    data = client.read_all()
    assert len(data) == 1000
    assert data.startswith(b"Content-Length: ") and played.events > 1
    assert sim.subscriptions == []
    # Only the next play was affected.
    again = Client(sim).subscribe("plain CHANNEL_CREATE")
    assert len(again.take(sim.play("inbound_busy").events)) == 2


def test_send_raw_reaches_every_client_in_stream_order(sim: FreeSwitchSimulator) -> None:
    a, b = Client(sim).subscribe("plain CHANNEL_CREATE"), Client(sim)
    sim.send_raw(b"Content-Length: 3\nContent-Type: text/event-plain\n\nabc")
    assert a.frame().body == b"abc"
    assert b.frame().body == b"abc"


def test_restart_forgets_calls_and_changes_core_uuid(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe()
    old_core = sim.core_uuid
    played = sim.play("inbound_answered", until="CHANNEL_ANSWER")
    assert sim.live_channels
    sim.restart()
    assert client.take(played.events) and client.frame() is None
    assert sim.core_uuid != old_core and sim.live_channels == set()
    with pytest.raises(ValueError):
        sim.resume(played)
    client = Client(sim).subscribe("plain CHANNEL_CREATE")
    (create, _) = client.take(sim.play("inbound_busy").events)
    assert create.event()["Core-UUID"] == sim.core_uuid and create.event()["Event-Sequence"] == "1"


def test_slow_reader_loses_events_instead_of_growing_a_queue() -> None:
    with FreeSwitchSimulator(max_queue=16, sndbuf=4096) as sim:
        client = Client(sim, rcvbuf=4096).subscribe()
        runner = gevent.spawn(sim.play_many, ["inbound_answered"], 20, speed=1000.0)
        until(lambda: sim.dropped > 0, what="the simulator dropping events for the slow reader")
        assert all(s.queued <= 16 for s in sim.subscriptions)
        reader = gevent.spawn(client.read_all)  # also ends if killed after 500 losses in a row
        played = runner.get(timeout=10)
        reader.kill()
        assert sum(p.dropped for p in played) > 0


# ---------------------------------------------------------------------------------------------
# Scale and pacing


def test_play_many_interleaves_calls_with_unique_ids(sim: FreeSwitchSimulator) -> None:
    client = Client(sim).subscribe("json ALL")
    expected = 20 * (len(capture_events("inbound_answered", "json")) + len(capture_events("inbound_busy", "json")))
    # play_many returns once everything was written, so the client must read meanwhile.
    reader = gevent.spawn(client.take, expected)
    played = sim.play_many(["inbound_answered", "inbound_busy"], 40)
    assert sum(p.events for p in played) == expected
    assert len({p.a_leg for p in played}) == 40
    all_ids = [u for p in played for u in set(p.uuids.values())]
    assert len(all_ids) == len(set(all_ids))
    events = [f.event() for f in reader.get(timeout=5)]
    owners = [e.get("Unique-ID") for e in events if e.get("Unique-ID")]
    first_call = {u for u in played[0].uuids.values()}
    last_of_first = max(i for i, u in enumerate(owners) if u in first_call)
    assert any(u not in first_call for u in owners[:last_of_first]), "calls were not interleaved"


def test_rate_and_recorded_speed(sim: FreeSwitchSimulator) -> None:
    Client(sim).subscribe("plain CHANNEL_CREATE")
    started = time.monotonic()
    sim.play_many(["inbound_busy"], 5, rate=50)
    assert time.monotonic() - started >= 4 / 50
    started = time.monotonic()
    sim.play("inbound_busy", speed=10.0)  # 1.94 s recorded
    assert 0.15 <= time.monotonic() - started < 1.0


@pytest.mark.parametrize(("args", "answer"), [
    ("user/100", ORIGINATE_USAGE),  # no destination
    ("user/100 &park() XML default a b 30 extra", ORIGINATE_USAGE),  # more than 7 words
    ("{origination_uuid=x}nosuch/100 &park()", "-ERR CHAN_NOT_IMPLEMENTED\n"),
])
def test_originate_refuses_arguments_freeswitch_would_refuse(sim: FreeSwitchSimulator, args: str,
                                                             answer: str) -> None:
    sim.originate_plays = "outbound_originate_answered"  # not played: nothing was started
    client = Client(sim)
    assert client.command(f"api originate {args}") == answer
    assert sim.live_channels == set()


def test_originate_words_in_quotes_stay_one_word(sim: FreeSwitchSimulator) -> None:
    leg = str(uuid.uuid4())
    args = (f"{{origination_uuid={leg},execute_on_answer='record_session /tmp/{leg}.wav'}}user/100 "
            "&bridge({fsbridge_click=true}sofia/gateway/gw/79121234567)")
    assert Client(sim).command(f"api originate {args}") == f"+OK {leg}\n"
