"""The real FreeSWITCH Event Socket captures, pre-compiled into replay templates.

Everything the simulator sends about calls comes from tests/fixtures/esl/*.raw (bytes a real
FreeSWITCH 1.10.12 sent).  Each event is compiled once per process into literal pieces around
slots, and the slots are the only things a replay may change: uuids, Core-UUID, times,
Event-Sequence and, for API / BACKGROUND_JOB events, the command echo and job result.  A replay
then costs one gather-and-join per event, which keeps the simulator far ahead of its client.
"""

from __future__ import annotations

import calendar
import functools
import json
import operator
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CAPTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "esl"

# FreeSWITCH prints uuids in lower case; matching upper case too would eat the "A" of an
# url-encoded ":" (%3A) sitting in front of a uuid.
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_PLAIN_HEADER_RE = re.compile(r"^([^:\n]+): ([^\n]*)$", re.M)
_JSON_PAIR_RE = re.compile(r'"((?:[^"\\]|\\.)*)":"((?:[^"\\]|\\.)*)"')
_DIGITS_RE = re.compile(r"\d+")

# switch_utils.h SWITCH_URL_UNSAFE; switch_url_encode also escapes bytes outside ' '..'~' and
# leaves an existing %XX alone (the reason a caller-id of "Bob%0AUnique-ID: x" reaches the wire).
_URL_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
_HEX = b"0123456789ABCDEF"

# switch_event.c EVENT_NAMES, in enum order: what `event` / `nixevent` accept.
EVENT_NAMES: tuple[str, ...] = (
    "CUSTOM", "CLONE", "CHANNEL_CREATE", "CHANNEL_DESTROY", "CHANNEL_STATE", "CHANNEL_CALLSTATE",
    "CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE",
    "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HOLD", "CHANNEL_UNHOLD", "CHANNEL_BRIDGE",
    "CHANNEL_UNBRIDGE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_OUTGOING",
    "CHANNEL_PARK", "CHANNEL_UNPARK", "CHANNEL_APPLICATION", "CHANNEL_ORIGINATE", "CHANNEL_UUID",
    "API", "LOG", "INBOUND_CHAN", "OUTBOUND_CHAN", "STARTUP", "SHUTDOWN", "PUBLISH", "UNPUBLISH",
    "TALK", "NOTALK", "SESSION_CRASH", "MODULE_LOAD", "MODULE_UNLOAD", "DTMF", "MESSAGE",
    "PRESENCE_IN", "NOTIFY_IN", "PRESENCE_OUT", "PRESENCE_PROBE", "MESSAGE_WAITING",
    "MESSAGE_QUERY", "ROSTER", "CODEC", "BACKGROUND_JOB", "DETECTED_SPEECH", "DETECTED_TONE",
    "PRIVATE_COMMAND", "HEARTBEAT", "TRAP", "ADD_SCHEDULE", "DEL_SCHEDULE", "EXE_SCHEDULE",
    "RE_SCHEDULE", "RELOADXML", "NOTIFY", "PHONE_FEATURE", "PHONE_FEATURE_SUBSCRIBE",
    "SEND_MESSAGE", "RECV_MESSAGE", "REQUEST_PARAMS", "CHANNEL_DATA", "GENERAL", "COMMAND",
    "SESSION_HEARTBEAT", "CLIENT_DISCONNECTED", "SERVER_DISCONNECTED", "SEND_INFO", "RECV_INFO",
    "RECV_RTCP_MESSAGE", "SEND_RTCP_MESSAGE", "CALL_SECURE", "NAT", "RECORD_START", "RECORD_STOP",
    "PLAYBACK_START", "PLAYBACK_STOP", "CALL_UPDATE", "FAILURE", "SOCKET_DATA", "MEDIA_BUG_START",
    "MEDIA_BUG_STOP", "CONFERENCE_DATA_QUERY", "CONFERENCE_DATA", "CALL_SETUP_REQ",
    "CALL_SETUP_RESULT", "CALL_DETAIL", "DEVICE_STATE", "TEXT", "SHUTDOWN_REQUESTED", "ALL",
)  # fmt: skip
_EVENT_NAMES_UPPER = {name: name for name in EVENT_NAMES}

# Slot 0 of every template is Event-Sequence: set per event, everything else is set per call.
SEQ_SLOT = 0

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def event_type(name: str) -> str | None:
    """switch_name_event(): case-insensitive, with or without the SWITCH_EVENT_ prefix."""
    upper = name.upper()
    if len(upper) > 13 and upper.startswith("SWITCH_EVENT_"):
        upper = upper[13:]
    return _EVENT_NAMES_UPPER.get(upper)


def fs_url_encode(value: str) -> str:
    """switch_url_encode() exactly, so encoded values match what FreeSWITCH puts on the wire."""
    raw = value.encode("utf-8")
    out = bytearray()
    n = len(raw)
    for i, byte in enumerate(raw):
        if byte == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            out.append(byte)
        elif byte < 0x20 or byte > 0x7E or byte in _URL_UNSAFE:
            out += b"%" + _HEX[byte >> 4 : (byte >> 4) + 1] + _HEX[byte & 15 : (byte & 15) + 1]
        else:
            out.append(byte)
    return out.decode("ascii")



def json_escape(value: str) -> str:
    """A JSON string body as cJSON prints it (UTF-8 kept, control characters escaped)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def gmt_date(epoch_s: int) -> str:
    """apr_rfc822_date(), which FreeSWITCH uses for Event-Date-GMT; locale independent."""
    t = time.gmtime(epoch_s)
    return (
        f"{_WEEKDAYS[t[6]]}, {t[2]:02d} {_MONTHS[t[1] - 1]} {t[0]} {t[3]:02d}:{t[4]:02d}:{t[5]:02d} GMT"
    )


# ---------------------------------------------------------------------------------------------
# Framing


@dataclass(frozen=True)
class Frame:
    headers: dict[str, str]
    body: bytes
    raw: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def split_frames(data: bytes) -> list[Frame]:
    """Cut an Event Socket byte stream into frames (headers, blank line, Content-Length body)."""
    frames: list[Frame] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\n\n", pos)
        headers = dict(line.split(": ", 1) for line in data[pos:end].decode("utf-8").split("\n"))
        start = end + 2
        stop = start + int(headers.get("Content-Length", "0"))
        if stop > len(data):
            raise ValueError(f"truncated frame at byte {pos}")
        frames.append(Frame(headers, data[start:stop], data[pos:stop]))
        pos = stop
    return frames


def event_frame(body: bytes, fmt: str) -> bytes:
    """The frame mod_event_socket writes around a serialized event."""
    return b"Content-Length: %d\nContent-Type: text/event-%s\n\n%s" % (len(body), fmt.encode(), body)


# ---------------------------------------------------------------------------------------------
# Header parsing (original values, decoded, for filters and the core-db model)


def plain_headers(text: str) -> list[tuple[str, str]]:
    head = text.split("\n\n", 1)[0]
    return [
        (m.group(1), urllib.parse.unquote(m.group(2), errors="surrogateescape"))
        for m in _PLAIN_HEADER_RE.finditer(head)
    ]


def json_headers(text: str) -> list[tuple[str, str]]:
    # object_pairs_hook keeps duplicates (CODEC events repeat a key); FreeSWITCH's header lookup
    # returns the first one, so callers use setdefault.
    pairs: list[tuple[str, str]] = []

    def hook(items: list[tuple[str, object]]) -> dict[str, object]:
        for k, v in items:
            pairs.append((k, v if isinstance(v, str) else "|".join(map(str, v))))  # type: ignore[arg-type]
        return {}

    json.loads(text, object_pairs_hook=hook)
    return pairs


# ---------------------------------------------------------------------------------------------
# Templates

# A slot key says how to compute a value per call:
#   ("seq",) ("core",) ("uuid", role) ("us", µs) ("s", seconds) ("local", seconds, encoded)
#   ("gmt", seconds, encoded) ("named", event index, name)
SlotKey = tuple[object, ...]
Token = str | int  # literal text or a slot index


class SlotTable:
    def __init__(self) -> None:
        self.keys: list[SlotKey] = [("seq",)]
        self._index: dict[SlotKey, int] = {("seq",): SEQ_SLOT}

    def __call__(self, key: SlotKey) -> int:
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self.keys)
            self.keys.append(key)
        return idx


class Template:
    """Literal pieces around slot indices; rendering is one C-level gather and one join."""

    __slots__ = ("_buf", "_get", "lits", "slots")

    def __init__(self, tokens: list[Token]) -> None:
        lits: list[str] = []
        slots: list[int] = []
        current: list[str] = []
        for tok in tokens:
            if isinstance(tok, int):
                lits.append("".join(current))
                slots.append(tok)
                current = []
            else:
                current.append(tok)
        lits.append("".join(current))
        self.lits = tuple(lits)
        self.slots = tuple(slots)
        if len(slots) > 1:
            self._get: Callable[[list[str]], tuple[str, ...]] = operator.itemgetter(*slots)
        elif slots:
            only = slots[0]
            self._get = lambda vals: (vals[only],)
        else:
            self._get = lambda vals: ()
        # Reused between renders: the simulator renders from one greenlet and never yields here.
        self._buf: list[str] = [""] * (2 * len(lits) - 1)
        self._buf[0::2] = lits

    def render(self, vals: list[str]) -> str:
        buf = self._buf
        if len(buf) > 1:
            buf[1::2] = self._get(vals)
        return "".join(buf)


@dataclass
class EventTemplate:
    index: int
    name: str
    template: Template
    # Named slots (API echo, job result): slot index by name; defaults are rendered per call.
    named: dict[str, int]
    rel_us: int  # since the first event of the capture, never decreasing
    headers: dict[str, str]  # first value of each header, lower-cased names, decoded
    unique_role: int | None
    subclass: str | None = None


@dataclass(frozen=True)
class DbSnapshot:
    channels: tuple[tuple[str, tuple[tuple[str, object], ...]], ...]
    calls: tuple[tuple[str, str, int], ...]  # caller uuid, callee uuid, call_created_epoch


CHANNEL_COLUMNS = (
    "uuid", "direction", "created", "created_epoch", "name", "state", "cid_name", "cid_num",
    "ip_addr", "dest", "application", "application_data", "dialplan", "context", "read_codec",
    "read_rate", "read_bit_rate", "write_codec", "write_rate", "write_bit_rate", "secure",
    "hostname", "presence_id", "presence_data", "accountcode", "callstate", "callee_name",
    "callee_num", "callee_direction", "call_uuid", "sent_callee_name", "sent_callee_num",
    "initial_cid_name", "initial_cid_num", "initial_ip_addr", "initial_dest", "initial_dialplan",
    "initial_context",
)  # fmt: skip
_BASIC_CALLS_A = (
    "uuid", "direction", "created", "created_epoch", "name", "state", "cid_name", "cid_num",
    "ip_addr", "dest", "presence_id", "presence_data", "accountcode", "callstate", "callee_name",
    "callee_num", "callee_direction", "call_uuid", "hostname", "sent_callee_name", "sent_callee_num",
)  # fmt: skip
_BASIC_CALLS_B = (
    "uuid", "direction", "created", "created_epoch", "name", "state", "cid_name", "cid_num",
    "ip_addr", "dest", "presence_id", "presence_data", "accountcode", "callstate", "callee_name",
    "callee_num", "callee_direction", "sent_callee_name", "sent_callee_num",
)  # fmt: skip

_CCS_DOWN, _CCS_HANGUP = 0, 7
_CS_NEW, _CS_INIT, _CS_ROUTING, _CS_EXECUTE = 0, 1, 2, 4
_CS_HANGUP, _CS_REPORTING, _CS_DESTROY = 10, 11, 12


class CoreDb:
    """The part of core_event_handler() (switch_core_sqldb.c, 1.10.12) that feeds `show channels`
    and `show calls`; values are ('local'|'s', epoch) for times, str otherwise."""

    def __init__(self) -> None:
        self.channels: dict[str, dict[str, object]] = {}
        self.calls: list[tuple[str, str, int]] = []

    def snapshot(self) -> DbSnapshot:
        return DbSnapshot(
            tuple((u, tuple(row.items())) for u, row in self.channels.items()), tuple(self.calls)
        )

    def _update(self, uuid: str, **cols: object) -> None:
        row = self.channels.get(uuid)
        if row is not None:
            row.update(cols)

    def apply(self, name: str, h: dict[str, str], epoch_s: int) -> None:
        def g(key: str) -> str:
            return h.get(key, "")

        uuid = g("unique-id")
        if name == "CHANNEL_DESTROY":
            self.channels.pop(uuid, None)
            self.calls = [c for c in self.calls if uuid not in (c[0], c[1])]
        elif name == "CHANNEL_UUID":
            old = g("old-unique-id")
            if old in self.channels:
                row = self.channels.pop(old)
                row["uuid"] = uuid
                self.channels[uuid] = row
            for row in self.channels.values():
                if row["call_uuid"] == old:
                    row["call_uuid"] = uuid
        elif name == "CHANNEL_CREATE":
            row: dict[str, object] = dict.fromkeys(CHANNEL_COLUMNS, "")
            row.update(
                uuid=uuid, direction=g("call-direction"), created=("local", epoch_s),
                created_epoch=("s", epoch_s), name=g("channel-name"), state=g("channel-state"),
                callstate=g("channel-call-state"), dialplan=g("caller-dialplan"),
                context=g("caller-context"), hostname=g("freeswitch-switchname"),
                initial_cid_name=g("caller-caller-id-name"), initial_cid_num=g("caller-caller-id-number"),
                initial_ip_addr=g("caller-network-addr"), initial_dest=g("caller-destination-number"),
                initial_dialplan=g("caller-dialplan"), initial_context=g("caller-context"),
            )  # fmt: skip
            self.channels[uuid] = row
        elif name in ("CHANNEL_ANSWER", "CHANNEL_PROGRESS_MEDIA", "CODEC"):
            self._update(
                uuid, read_codec=g("channel-read-codec-name"), read_rate=g("channel-read-codec-rate"),
                read_bit_rate=g("channel-read-codec-bit-rate"), write_codec=g("channel-write-codec-name"),
                write_rate=g("channel-write-codec-rate"), write_bit_rate=g("channel-write-codec-bit-rate"),
            )  # fmt: skip
        elif name in ("CHANNEL_HOLD", "CHANNEL_UNHOLD", "CHANNEL_EXECUTE"):
            self._update(
                uuid, application=g("application"), application_data=g("application-data"),
                presence_id=g("channel-presence-id"), presence_data=g("channel-presence-data"),
                accountcode=g("variable_accountcode"),
            )  # fmt: skip
        elif name == "CHANNEL_ORIGINATE":
            self._update(
                uuid, presence_id=g("channel-presence-id"), presence_data=g("channel-presence-data"),
                accountcode=g("variable_accountcode"), call_uuid=g("channel-call-uuid"),
            )  # fmt: skip
        elif name == "CALL_UPDATE":
            self._update(
                uuid, callee_name=g("caller-callee-id-name"), callee_num=g("caller-callee-id-number"),
                sent_callee_name=g("sent-callee-id-name"), sent_callee_num=g("sent-callee-id-number"),
                callee_direction=g("direction"), cid_name=g("caller-caller-id-name"),
                cid_num=g("caller-caller-id-number"),
            )  # fmt: skip
        elif name == "CHANNEL_CALLSTATE":
            callstate = _atoi(g("channel-call-state-number"))
            if callstate not in (_CCS_DOWN, _CCS_HANGUP):
                self._update(uuid, callstate=g("channel-call-state"))
        elif name == "CHANNEL_STATE":
            raw = g("channel-state-number")
            state = _atoi(raw) if raw else _CS_DESTROY
            if state in (_CS_NEW, _CS_DESTROY, _CS_REPORTING, _CS_HANGUP, _CS_INIT):
                pass
            elif state == _CS_ROUTING:
                self._update(
                    uuid, state=g("channel-state"), cid_name=g("caller-caller-id-name"),
                    cid_num=g("caller-caller-id-number"), callee_name=g("caller-callee-id-name"),
                    callee_num=g("caller-callee-id-number"), sent_callee_name=g("sent-callee-id-name"),
                    sent_callee_num=g("sent-callee-id-number"), ip_addr=g("caller-network-addr"),
                    dest=g("caller-destination-number"), dialplan=g("caller-dialplan"),
                    context=g("caller-context"), presence_id=g("channel-presence-id"),
                    presence_data=g("channel-presence-data"), accountcode=g("variable_accountcode"),
                )  # fmt: skip
            else:
                self._update(uuid, state=g("channel-state"))
        elif name == "CHANNEL_BRIDGE":
            a_uuid, b_uuid = g("bridge-a-unique-id"), g("bridge-b-unique-id")
            if not a_uuid or not b_uuid:
                a_uuid, b_uuid = g("caller-unique-id"), g("other-leg-unique-id")
            for leg in (a_uuid, b_uuid):
                self._update(leg, call_uuid=g("channel-call-uuid"))
            self.calls.append((a_uuid, b_uuid, epoch_s))
        elif name == "CHANNEL_UNBRIDGE":
            call_uuid = g("channel-call-uuid")
            for row in self.channels.values():
                if row["call_uuid"] == call_uuid:
                    row["call_uuid"] = row["uuid"]
            cuuid = g("caller-unique-id")
            self.calls = [c for c in self.calls if cuuid not in (c[0], c[1])]


def _atoi(text: str) -> int:
    m = re.match(r"\s*[-+]?\d+", text)
    return int(m.group(0)) if m else 0


def channel_rows(snap: DbSnapshot) -> list[dict[str, object]]:
    return [dict(cols) for _, cols in snap.channels]


def call_rows(snap: DbSnapshot) -> list[dict[str, object]]:
    """The basic_calls view: callers joined with their callee, plus channels in no call."""
    channels = {u: dict(cols) for u, cols in snap.channels}
    callees = {c[1] for c in snap.calls}
    rows: list[tuple[int, dict[str, object]]] = []
    for uuid, a in channels.items():
        call = next((c for c in snap.calls if c[0] == uuid), None)
        if call is None and uuid in callees:
            continue
        row = {k: a[k] for k in _BASIC_CALLS_A}
        b = channels.get(call[1]) if call else None
        for k in _BASIC_CALLS_B:
            row["b_" + k] = b[k] if b else ""
        row["call_created_epoch"] = ("s", call[2]) if call else ""
        # ORDER BY call_created_epoch: NULLs first, then insertion order.
        rows.append((call[2] if call else -1, row))
    rows.sort(key=lambda item: item[0])
    return [row for _, row in rows]


# ---------------------------------------------------------------------------------------------
# Compilation


def _time_kind(key: str, value: str) -> str | None:
    """Which per-call time rewrite a header needs, decided from the FreeSWITCH naming scheme."""
    if key in ("Event-Date-Local",):
        return "local"
    if key == "Event-Date-GMT":
        return "gmt"
    if not value or value == "0":
        return None
    if value.isdigit():
        if key == "Event-Date-Timestamp" or key.endswith(("-Time", "_uepoch", "_stamp")):
            return "us"  # variable_sip_invite_stamp is µs despite its name
        if key.endswith("_epoch") or key == "Task-Runtime":
            return "s"
        return None
    if key.endswith("_stamp"):
        return "local"
    return None


def _parse_local(text: str) -> int:
    """'2026-11-26 19:37:38' (as if UTC) -> epoch seconds."""
    y, mo, d, hh, mm, ss = (int(x) for x in _DIGITS_RE.findall(text)[:6])
    return calendar.timegm((y, mo, d, hh, mm, ss, 0, 0, 0))


def _parse_gmt(text: str) -> int:
    parts = text.replace(",", " ").split()
    d, mon, y = int(parts[1]), _MONTHS.index(parts[2]) + 1, int(parts[3])
    hh, mm, ss = (int(x) for x in parts[4].split(":"))
    return calendar.timegm((y, mon, d, hh, mm, ss, 0, 0, 0))


@dataclass
class CompiledCapture:
    scenario: str
    fmt: str  # 'plain' | 'json'
    path: Path
    events: list[EventTemplate]
    slots: list[SlotKey]
    roles: list[str]  # original uuids, by role (role 0 = first channel)
    core_uuid: str
    t0_us: int
    live_at: list[tuple[int, ...]]  # roles of live channels after the first i events
    db_at: list[DbSnapshot]  # core db after the first i events (original values)
    job_index: int | None = None  # the BACKGROUND_JOB event, if captured
    job_role: int | None = None  # role of its Job-UUID
    api_index: int | None = None  # the API event right before it
    names: set[str] = field(default_factory=set)
    # Pre-split slot lists so that per-call value computation is a few tight loops.
    uuid_slots: list[tuple[int, int]] = field(default_factory=list)
    us_slots: list[tuple[int, int]] = field(default_factory=list)
    s_slots: list[tuple[int, int]] = field(default_factory=list)
    local_slots: list[tuple[int, int, bool]] = field(default_factory=list)
    gmt_slots: list[tuple[int, int, bool]] = field(default_factory=list)
    core_slots: list[int] = field(default_factory=list)
    named_defaults: list[tuple[int, Template]] = field(default_factory=list)

    @property
    def duration_us(self) -> int:
        return self.events[-1].rel_us if self.events else 0

    def index_after(self, name: str, occurrence: int = 1) -> int | None:
        """Number of events up to and including the n-th event called `name`."""
        seen = 0
        for ev in self.events:
            if ev.name == name:
                seen += 1
                if seen == occurrence:
                    return ev.index + 1
        return None

    def values(
        self,
        fresh: list[str],
        core_uuid: str,
        offset_s: int,
        stamp: Callable[[str, int, bool], str],
    ) -> list[str]:
        """Slot values for one played call: fresh uuids by role, times shifted by offset_s."""
        vals = [""] * len(self.slots)
        for idx, role in self.uuid_slots:
            vals[idx] = fresh[role]
        for idx in self.core_slots:
            vals[idx] = core_uuid
        off_us = offset_s * 1_000_000
        for idx, us in self.us_slots:
            vals[idx] = str(us + off_us)
        for idx, s in self.s_slots:
            vals[idx] = str(s + offset_s)
        for idx, s, enc in self.local_slots:
            vals[idx] = stamp("local", s + offset_s, enc)
        for idx, s, enc in self.gmt_slots:
            vals[idx] = stamp("gmt", s + offset_s, enc)
        # Last: the captured API echo / job result, rendered with this call's uuids and times.
        for idx, sub in self.named_defaults:
            vals[idx] = sub.render(vals)
        return vals


class _Compiler:
    def __init__(self, fmt: str, roles: dict[str, int], core: str, tz_offset_s: int) -> None:
        self.fmt = fmt
        self.roles = roles
        self.core = core
        self.tz_offset_s = tz_offset_s
        self.slots = SlotTable()

    def _uuids(self, text: str) -> list[Token]:
        out: list[Token] = []
        pos = 0
        for m in UUID_RE.finditer(text):
            out.append(text[pos : m.start()])
            u = m.group(0)
            out.append(self.slots(("core",)) if u == self.core else self.slots(("uuid", self.roles[u])))
            pos = m.end()
        out.append(text[pos:])
        return out

    def _value(self, key: str, raw: str) -> int | None:
        """The slot of one header value, or None when it is copied verbatim (modulo uuids)."""
        enc = self.fmt == "plain"
        value = urllib.parse.unquote(raw) if enc else raw
        if key == "Event-Sequence":
            return SEQ_SLOT
        kind = _time_kind(key, value)
        if kind == "us":
            return self.slots(("us", int(value)))
        if kind == "s":
            return self.slots(("s", int(value)))
        if kind == "local" and _DIGITS_RE.match(value):
            return self.slots(("local", _parse_local(value) - self.tz_offset_s, enc))
        if kind == "gmt":
            return self.slots(("gmt", _parse_gmt(value), enc))
        return None

    def segment(self, text: str) -> list[Token]:
        """Tokens of a run of event text: header values by name, uuids wherever they are."""
        pattern = _PLAIN_HEADER_RE if self.fmt == "plain" else _JSON_PAIR_RE
        out: list[Token] = []
        pos = 0
        for m in pattern.finditer(text):
            slot = self._value(m.group(1), m.group(2))
            if slot is None:
                continue
            out += self._uuids(text[pos : m.start(2)])
            out.append(slot)
            pos = m.end(2)
        out += self._uuids(text[pos:])
        return out


def _named_spans(name: str, text: str, fmt: str) -> list[tuple[str, int, int]]:
    """Spans of an API or BACKGROUND_JOB event that a simulated command replaces."""
    if name == "API":
        if fmt == "plain":
            m = re.search(r"^API-Command: .*\n(?:API-Command-Argument: .*\n)?", text, re.M)
        else:
            m = re.search(r',"API-Command":"(?:[^"\\]|\\.)*"(?:,"API-Command-Argument":"(?:[^"\\]|\\.)*")?', text)
        return [("api", m.start(), m.end())] if m else []
    if name == "BACKGROUND_JOB":
        m = re.search(r"^Job-Command: " if fmt == "plain" else r',"Job-Command":', text, re.M)
        if not m:
            return []
        end = len(text) if fmt == "plain" else text.rindex("}")
        return [("job", m.start(), end)]
    return []


def compile_capture(path: Path) -> CompiledCapture:
    fmt = "json" if path.name.endswith(".json.raw") else "plain"
    scenario = path.name.split(".")[0]
    frames = [f for f in split_frames(path.read_bytes()) if f.content_type.startswith("text/event-")]
    texts = [f.body.decode("utf-8") for f in frames]
    parsed = [plain_headers(t) if fmt == "plain" else json_headers(t) for t in texts]
    heads: list[dict[str, str]] = []
    for pairs in parsed:
        h: dict[str, str] = {}
        for k, v in pairs:
            h.setdefault(k.lower(), v)
        heads.append(h)
    if not heads:
        raise ValueError(f"{path} holds no events")

    core = heads[0]["core-uuid"]
    # Role 0 is the first channel, so an originate can hand its origination_uuid to it.
    first_channel = next(h["unique-id"] for h in heads if "unique-id" in h)
    order = [first_channel]
    for t in texts:
        for u in UUID_RE.findall(t):
            if u != core and u not in order:
                order.append(u)
    roles = {u: i for i, u in enumerate(order)}

    local0 = _parse_local(heads[0]["event-date-local"])
    t0_us = int(heads[0]["event-date-timestamp"])
    comp = _Compiler(fmt, roles, core, tz_offset_s=local0 - t0_us // 1_000_000)

    events: list[EventTemplate] = []
    db = CoreDb()
    live: list[int] = []
    live_at: list[tuple[int, ...]] = [()]
    db_at: list[DbSnapshot] = [db.snapshot()]
    last_rel = 0
    job_index = job_role = api_index = None
    named_defaults: list[tuple[int, Template]] = []
    for i, (text, h) in enumerate(zip(texts, heads, strict=True)):
        name = h.get("event-name", "")
        ts_us = int(h.get("event-date-timestamp", t0_us))
        last_rel = max(last_rel, ts_us - t0_us)  # keeps replay order when clocks step back
        named: dict[str, int] = {}
        tokens: list[Token] = []
        pos = 0
        for key, start, end in _named_spans(name, text, fmt):
            tokens += comp.segment(text[pos:start])
            named[key] = comp.slots(("named", i, key))
            tokens.append(named[key])
            named_defaults.append((named[key], Template(comp.segment(text[start:end]))))
            pos = end
        tokens += comp.segment(text[pos:])
        uid = h.get("unique-id")
        events.append(
            EventTemplate(
                index=i, name=name, template=Template(tokens), named=named, rel_us=last_rel, headers=h,
                unique_role=roles.get(uid) if uid else None, subclass=h.get("event-subclass"),
            )
        )  # fmt: skip
        if name == "BACKGROUND_JOB" and job_index is None:
            job_index, job_role = i, roles.get(h.get("job-uuid", ""))
            if i > 0 and events[i - 1].name == "API":
                api_index = i - 1
        db.apply(name, h, ts_us // 1_000_000)
        if name == "CHANNEL_CREATE" and uid in roles and roles[uid] not in live:
            live.append(roles[uid])
        elif name == "CHANNEL_DESTROY" and uid in roles and roles[uid] in live:
            live.remove(roles[uid])
        live_at.append(tuple(live))
        db_at.append(db.snapshot())

    cap = CompiledCapture(
        scenario=scenario, fmt=fmt, path=path, events=events, slots=comp.slots.keys, roles=order,
        core_uuid=core, t0_us=t0_us, live_at=live_at, db_at=db_at, job_index=job_index,
        job_role=job_role, api_index=api_index, names={e.name for e in events},
        named_defaults=named_defaults,
    )  # fmt: skip
    for idx, key in enumerate(cap.slots):
        kind = key[0]
        if kind == "uuid":
            cap.uuid_slots.append((idx, int(key[1])))  # type: ignore[call-overload]
        elif kind == "core":
            cap.core_slots.append(idx)
        elif kind == "us":
            cap.us_slots.append((idx, int(key[1])))  # type: ignore[call-overload]
        elif kind == "s":
            cap.s_slots.append((idx, int(key[1])))  # type: ignore[call-overload]
        elif kind == "local":
            cap.local_slots.append((idx, int(key[1]), bool(key[2])))  # type: ignore[call-overload]
        elif kind == "gmt":
            cap.gmt_slots.append((idx, int(key[1]), bool(key[2])))  # type: ignore[call-overload]
    return cap


@dataclass
class Scenario:
    """Both captures of one scenario; their uuids are aligned by role (first appearance)."""

    name: str
    plain: CompiledCapture
    json: CompiledCapture | None

    def captures(self) -> Iterator[CompiledCapture]:
        yield self.plain
        if self.json is not None:
            yield self.json


def scenario_names() -> list[str]:
    return sorted(
        p.name.split(".")[0]
        for p in CAPTURE_DIR.glob("*.plain.raw")
        if any(f.content_type.startswith("text/event-") for f in split_frames(p.read_bytes()))
    )


@functools.cache
def load_scenario(name: str) -> Scenario:
    plain_path = CAPTURE_DIR / f"{name}.plain.raw"
    if not plain_path.exists():
        raise KeyError(f"no capture {plain_path.name}; known: {', '.join(scenario_names())}")
    plain = compile_capture(plain_path)
    json_path = CAPTURE_DIR / f"{name}.json.raw"
    js = compile_capture(json_path) if json_path.exists() else None
    if js is not None and len(js.roles) != len(plain.roles):
        raise ValueError(f"{name}: plain and json captures have different uuid roles")
    return Scenario(name, plain, js)


@functools.cache
def show_capture(idle: bool) -> list[bytes]:
    """The api/response bodies of the captured `show channels/calls as json` (for tests)."""
    name = "show_channels_calls_json_idle.raw" if idle else "show_channels_calls_json.raw"
    return [f.body for f in split_frames((CAPTURE_DIR / name).read_bytes()) if f.content_type == "api/response"]
