"""Parsing what FreeSWITCH sends, including what a hostile caller can make it send."""

from __future__ import annotations

import json
import pathlib
from collections import Counter

import pytest
from greenswitch.esl import ESLEvent

from fsbridge.esl.protocol import (
    FrameReader,
    ProtocolError,
    command_line,
    parse_event,
    parse_plain_event,
)

ESL = pathlib.Path(__file__).parent / "fixtures" / "esl"


def events_of(raw: bytes, chunk: int | None = None) -> list[dict]:
    reader = FrameReader()
    frames = []
    if chunk is None:
        frames = reader.feed(raw)
    else:
        for i in range(0, len(raw), chunk):
            frames += reader.feed(raw[i:i + chunk])
    return [parse_event(f) for f in frames if f.content_type.startswith("text/event-")]


@pytest.mark.parametrize("name", ["inbound_answered", "outbound_originate_answered", "inbound_busy"])
def test_plain_and_json_captures_give_the_same_events(name: str) -> None:
    plain = events_of((ESL / f"{name}.plain.raw").read_bytes())
    js = events_of((ESL / f"{name}.json.raw").read_bytes())
    noise = ("HEARTBEAT", "RE_SCHEDULE", "API")  # timers and the capturing client's own commands
    # Two real calls: the same events, not always in the same order across legs.
    assert Counter(e["Event-Name"] for e in js if e["Event-Name"] not in noise) == \
        Counter(e["Event-Name"] for e in plain if e["Event-Name"] not in noise)
    # Same decoded values in both formats (the channel names were URL-encoded in plain).
    assert plain[0]["Channel-Name"] == js[0]["Channel-Name"]
    assert "%" not in plain[0]["Channel-Name"]


def test_byte_by_byte_feeding_gives_the_same_events() -> None:
    raw = (ESL / "inbound_busy.plain.raw").read_bytes()
    whole = events_of(raw)
    assert events_of(raw, chunk=997) == whole
    assert events_of(raw[:60000], chunk=1)[:5] == whole[:5]


def test_bodies_stay_bodies() -> None:
    raw = (ESL / "outbound_originate_answered.plain.raw").read_bytes()
    job = next(e for e in events_of(raw) if e["Event-Name"] == "BACKGROUND_JOB")
    assert job["_body"].startswith("+OK ")
    assert job["Content-Length"].isdigit()
    js = events_of((ESL / "outbound_originate_answered.json.raw").read_bytes())
    assert next(e for e in js if e["Event-Name"] == "BACKGROUND_JOB")["_body"].startswith("+OK ")


def forged_plain() -> bytes:
    body = (b"Event-Name: CHANNEL_CREATE\nUnique-ID: real-uuid\n"
            b"Caller-Caller-ID-Name: Bob%0AUnique-ID: forged%0AEvent-Name: HEARTBEAT\n"
            b"Caller-Caller-ID-Number: 75555555555\n\n")
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(body) + body


def test_percent_0a_in_a_value_cannot_forge_headers() -> None:
    event = events_of(forged_plain())[0]
    assert event["Unique-ID"] == "real-uuid"
    assert event["Event-Name"] == "CHANNEL_CREATE"
    assert event["Caller-Caller-ID-Name"] == "Bob\nUnique-ID: forged\nEvent-Name: HEARTBEAT"
    # The trap we avoid: stock greenswitch lets the caller overwrite Unique-ID.
    body = forged_plain().split(b"\n\n", 1)[1].decode()
    assert ESLEvent(body).headers["Unique-ID"] == "forged"


def test_json_events_are_immune_and_non_string_values_are_normalised() -> None:
    body = json.dumps({"Event-Name": "CHANNEL_CREATE", "Unique-ID": "u1",
                       "Caller-Caller-ID-Name": "Bob\nUnique-ID: forged", "Dup": ["a", "b"]}).encode()
    frame = b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body
    event = events_of(frame)[0]
    assert event["Unique-ID"] == "u1" and event["Dup"] == "a"


@pytest.mark.parametrize("raw", [
    b"Content-Length: abc\nContent-Type: text/event-plain\n\n",
    b"Content-Length: -5\nContent-Type: text/event-plain\n\n",
    b"Content-Length: 99999999999\nContent-Type: text/event-plain\n\n",
    b"this is not a header\n\n",
    b"X" * (70 * 1024),
])
def test_malformed_framing_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(raw)


def test_truncated_frame_waits_for_the_rest() -> None:
    raw = (ESL / "inbound_answered.plain.raw").read_bytes()
    reader = FrameReader()
    frames = reader.feed(raw[:5000])
    assert reader.buffered > 0
    frames += reader.feed(raw[5000:])
    assert reader.buffered == 0
    assert len([f for f in frames if f.content_type == "text/event-plain"]) == \
        raw.count(b"\nContent-Type: text/event-plain\n")


def json_frame(body: bytes):
    return FrameReader().feed(b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body)[0]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"plain text"])
def test_json_event_that_is_not_an_object_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_event(json_frame(body))


@pytest.mark.parametrize("body", [b'{"Event-Name":"X","Unique-ID":"unterminated}',
                                  b'{"Event-Name":"X","Unique-ID":"bad \\u12 escape"}',
                                  b'{ "Event-Name": "X", "Unique-ID": oops }'])
def test_broken_json_values_are_protocol_errors_when_read(body: bytes) -> None:
    event = parse_event(json_frame(body))
    with pytest.raises(ProtocolError):
        event.get("Unique-ID")


def test_lazy_lookups_agree_with_the_strict_full_parse() -> None:
    for fmt in ("plain", "json"):
        raw = (ESL / f"inbound_answered.{fmt}.raw").read_bytes()
        for event in events_of(raw):
            full = dict(event)  # iterating decodes every header strictly
            for key, value in full.items():
                assert event.get(key) == value, (fmt, key)
            assert event.get("No-Such-Header") is None


def test_plain_event_line_without_separator_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        parse_plain_event(b"Event-Name: X\ngarbage line\n\n")


@pytest.mark.parametrize("bad", ["api status\nexit", "api x\r", "", "a\x00b"])
def test_command_lines_cannot_carry_a_second_command(bad: str) -> None:
    with pytest.raises(ValueError):
        command_line(bad)
