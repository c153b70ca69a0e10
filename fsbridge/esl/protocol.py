"""Event Socket wire format: frames in, events out. No I/O here.

Two of greenswitch's traps live at this level (freeswitch-notes.md): it URL-decodes a
whole frame before splitting it into lines, so a caller-controlled `%0A` forges headers,
and it folds bodies into the Content-Length header. Here lines are split first and each
value is decoded on its own, and a body stays a body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import unquote

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024

Event = dict[str, str]
"""An event: header name -> decoded value; a body, if any, under "_body" (FreeSWITCH's JSON key)."""


class ProtocolError(Exception):
    """The peer sent something that is not Event Socket framing."""


@dataclass(slots=True)
class Frame:
    headers: dict[str, str]
    body: bytes = b""
    content_type: str = field(init=False)

    def __post_init__(self) -> None:
        self.content_type = self.headers.get("Content-Type", "")


class FrameReader:
    """Incremental framer: feed it whatever the socket returned, get whole frames back."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pending: dict[str, str] | None = None
        self._need = 0

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        while True:
            if self._pending is not None:
                if len(buf) - pos < self._need:
                    break
                body = bytes(buf[pos:pos + self._need])
                pos += self._need
                frames.append(Frame(self._pending, body))
                self._pending = None
                continue
            end = buf.find(b"\n\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_HEADER_BYTES:
                    raise ProtocolError(f"no end of headers within {MAX_HEADER_BYTES} bytes")
                break
            # FreeSWITCH sometimes sends a stray newline between frames; skip empty header blocks.
            if end == pos:
                pos += 1
                continue
            headers = parse_header_block(bytes(buf[pos:end]))
            pos = end + 2
            length_text = headers.get("Content-Length")
            if length_text is None:
                frames.append(Frame(headers))
                continue
            if not length_text.isdigit():
                raise ProtocolError(f"bad Content-Length {length_text[:20]!r}")
            length = int(length_text)
            if length > MAX_BODY_BYTES:
                raise ProtocolError(f"Content-Length {length} is over {MAX_BODY_BYTES}")
            self._pending, self._need = headers, length
        del buf[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


def parse_header_block(block: bytes) -> dict[str, str]:
    """'Name: value' lines of a frame's envelope (values are not URL-encoded here)."""
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition(": ")
        if not sep:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"header line without ':' {line[:40]!r}")
        headers[name.strip()] = value.strip()
    return headers


def parse_event(frame: Frame) -> Event:
    """The event carried by a text/event-json or text/event-plain frame."""
    if frame.content_type == "text/event-json":
        return parse_json_event(frame.body)
    if frame.content_type == "text/event-plain":
        return parse_plain_event(frame.body)
    raise ProtocolError(f"not an event frame: {frame.content_type[:40]!r}")


def parse_json_event(body: bytes) -> Event:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"event-json body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("event-json body is not an object")
    # FreeSWITCH emits every value as a string except repeated headers (a list); keep
    # the first so that callers can rely on str.
    for key, value in data.items():
        if not isinstance(value, str):
            data[key] = value[0] if isinstance(value, list) and value else str(value)
    return data


def parse_plain_event(body: bytes) -> Event:
    text = body.decode("utf-8", "replace")
    head, sep, rest = text.partition("\n\n")
    event: Event = {}
    for line in head.split("\n"):
        if not line:
            continue
        name, colon, value = line.partition(": ")
        if not colon:
            raise ProtocolError(f"event header line without ': ' {line[:40]!r}")
        # Split first, decode each value on its own: a decoded %0A stays inside its value.
        event[name] = unquote(value) if "%" in value else value
    length = event.get("Content-Length")
    if length is not None and length.isdigit():
        raw_body = rest.encode("utf-8")[: int(length)] if sep else b""
        event["_body"] = raw_body.decode("utf-8", "replace")
    return event


def command_line(text: str) -> str:
    """One ESL command line, refusing anything that could end it early and start another."""
    if not text or any(c in text for c in "\r\n\x00"):
        raise ValueError("an ESL command must be one line without CR, LF or NUL")
    return text
