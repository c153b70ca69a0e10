"""Event Socket wire format: frames in, events out. No I/O here.

Two of greenswitch's traps live at this level (freeswitch-notes.md): it URL-decodes a
whole frame before splitting it into lines, so a caller-controlled `%0A` forges headers,
and it folds bodies into the Content-Length header. Here lines are split first and each
value is decoded on its own, and a body stays a body.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024

Event = Mapping[str, str]
"""An event: header name -> decoded value; a body, if any, under "_body" (FreeSWITCH's JSON key)."""


def digits(text: str) -> bool:
    """ASCII digits only, as FreeSWITCH writes numbers: str.isdigit() also takes '²' and other characters
    int() refuses (a ValueError that would drop the whole event)."""
    return text.isascii() and text.isdigit()


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
    if block.startswith(b"Content-Length: ") and block.count(b"\n") == 1:
        # The envelope of nearly every event frame; worth a fast path at 100k events/s.
        first, _, second = block.partition(b"\n")
        name, sep, value = second.partition(b": ")
        if sep:
            return {"Content-Length": first[16:].decode("ascii", "replace").strip(),
                    name.decode("utf-8", "replace"): value.decode("utf-8", "replace").strip()}
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
        body = frame.body.strip()
        if not (body.startswith(b"{") and body.endswith(b"}")):
            raise ProtocolError("event-json body is not a JSON object")
        return JsonEvent(body)
    if frame.content_type == "text/event-plain":
        return PlainEvent(frame.body)
    raise ProtocolError(f"not an event frame: {frame.content_type[:40]!r}")


class _LazyEvent(Mapping[str, str]):
    """An event whose headers are decoded only when asked for.

    A channel event has ~150 headers and fsbridge reads about five of them, so finding
    those few in the raw body is several times cheaper than decoding all of them (the
    ingest benchmark measures it). Lookups are anchored so that they can only match a
    real header (see the subclasses); iterating decodes everything, strictly.
    """

    __slots__ = ("_body", "_cache", "_full")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._cache: dict[str, str | None] = {}
        self._full: dict[str, str] | None = None

    def _find(self, key: str) -> str | None:
        raise NotImplementedError

    def _parse_all(self) -> dict[str, str]:
        raise NotImplementedError

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        try:
            value = self._cache[key]
        except KeyError:
            value = self._cache[key] = self._find(key)
        return default if value is None else value

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def full(self) -> dict[str, str]:
        if self._full is None:
            self._full = self._parse_all()
        return self._full

    def __iter__(self) -> Iterator[str]:
        return iter(self.full())

    def __len__(self) -> int:
        return len(self.full())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get('Event-Name')!r}, {self.get('Unique-ID')!r})"


class PlainEvent(_LazyEvent):
    """text/event-plain: 'Name: url-encoded value' lines. FreeSWITCH encodes every value,
    so a raw newline never occurs inside one and a lookup anchored at a line start can
    only find a real header, however a caller spells its caller-id name."""

    __slots__ = ("_head_end",)

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        end = body.find(b"\n\n")
        self._head_end = len(body) if end < 0 else end

    def _find(self, key: str) -> str | None:
        body = self._body
        if key == "_body":
            length = self.get("Content-Length")
            if length is None or not length.isdigit():
                return None
            start = self._head_end + 2
            return body[start:start + int(length)].decode("utf-8", "replace")
        needle = key.encode() + b": "
        if body.startswith(needle):
            pos = 0
        else:
            pos = body.find(b"\n" + needle, 0, self._head_end)
            if pos < 0:
                return None
            pos += 1
        start = pos + len(needle)
        end = body.find(b"\n", start, self._head_end + 1)
        raw = body[start:end if end >= 0 else self._head_end].decode("utf-8", "replace")
        return unquote(raw) if "%" in raw else raw

    def _parse_all(self) -> dict[str, str]:
        return parse_plain_event(self._body)


class JsonEvent(_LazyEvent):
    """text/event-json: one object of string values. Inside a JSON string every '"' is
    escaped, so '"Name":"' can only occur where a key really is."""

    __slots__ = ("_compact",)

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        # FreeSWITCH prints JSON unformatted; anything else gets the strict full parse.
        self._compact = body.startswith(b'{"') and b'":"' in body[:80]

    def _find(self, key: str) -> str | None:
        body = self._body
        if not self._compact:
            return self.full().get(key)
        needle = b'"' + key.encode() + b'":"'
        pos = body.find(needle)
        if pos < 0:
            # Not a string-valued key: absent, or a list/number; the full parse decides.
            return self.full().get(key) if body.find(b'"' + key.encode() + b'":') >= 0 else None
        start = end = pos + len(needle)
        while True:
            end = body.find(b'"', end)
            if end < 0:
                raise ProtocolError(f"event-json value of {key} is not terminated")
            backslashes = 0
            while body[end - 1 - backslashes] == 0x5C:  # count the backslashes before the quote
                backslashes += 1
            if backslashes % 2 == 0:
                break
            end += 1
        raw = body[start:end]
        if b"\\" in raw:
            try:
                return json.loads(b'"' + raw + b'"')
            except ValueError:
                raise ProtocolError(f"event-json value of {key} is not valid JSON") from None
        return raw.decode("utf-8", "replace")

    def _parse_all(self) -> dict[str, str]:
        return parse_json_event(self._body)


def parse_json_event(body: bytes) -> dict[str, str]:
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


def parse_plain_event(body: bytes) -> dict[str, str]:
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
