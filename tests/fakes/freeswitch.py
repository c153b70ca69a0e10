"""A FreeSWITCH Event Socket simulator built only from real captures.

A real TCP server speaking mod_event_socket's inbound protocol (reply texts copied from
mod_event_socket.c of FreeSWITCH 1.10.12).  It replays the captured calls in
tests/fixtures/esl/ with fresh uuids and times, at recorded speed or as fast as possible, one call
or thousands at once, and answers the commands fsbridge needs (`api show channels/calls as json`,
`uuid_exists`, `bgapi originate`, ...) from the state of the calls it is playing.

    with FreeSwitchSimulator() as sim:
        ...connect a client to sim.host:sim.port...
        sim.wait_for_subscriber()
        played = sim.play("inbound_answered")

Everything runs on the gevent hub; tests/conftest.py monkey-patches, the standalone entry point
(`python -m tests.fakes.freeswitch`) does not need to.

Like FreeSWITCH: every `api`/`bgapi` fires an API event; a wrong `auth`, `exit` and an ACL
rejection end with the "Disconnected, goodbye" notice; a listener's queue holds 100 000 events,
overflow is dropped and 500 losses in a row kill the listener; replies overtake queued events.
With `cdr_dir` set it also plays mod_json_cdr (file mode): when a channel's CHANNEL_HANGUP_COMPLETE is
played, whether a client listens or not, `<uuid>.cdr.json` is written there in the shape of the real pair
in tests/fixtures/json_cdr/, from what that event carries (variables, caller profile, times, the other
leg) and the leg's CHANNEL_EXECUTE events (app_log). A call cut short by restart() leaves no document, as
a crash of FreeSWITCH does. `uuid_dump <uuid> json` answers with the channel's data as its last played
event carried it.
Not like FreeSWITCH (nothing was captured to build them from): `event xml` is accepted but gets
no events; `show` answers only `channels|calls as json`; `userauth`, `sendevent`, `myevents` are
not implemented; as-fast-as-possible plays wait for a slow (not stalled) reader instead of
dropping; filters see fresh uuids but captured times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import itertools
import json
import os
import re
import socket
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.event
import gevent.pool
import gevent.server

from tests.fakes.esl_captures import (
    EVENT_NAMES,
    UUID_RE,
    CompiledCapture,
    DbSnapshot,
    EventTemplate,
    Scenario,
    call_rows,
    channel_rows,
    event_type,
    fs_url_encode,
    gmt_date,
    json_escape,
    load_scenario,
    plain_headers,
    scenario_names,
)

__all__ = ["FreeSwitchSimulator", "Originate", "PlayedCall", "Subscription", "scenario_names"]

# mod_event_socket.c: MAX_QUEUE_LEN events per listener, killed after MAX_MISSED lost in a row.
MAX_QUEUE_LEN = 100_000
MAX_MISSED = 500

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
GOODBYE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
SHUTDOWN_NOTICE = "The system is being shut down.\n"
LOST_EVENTS_NOTICE = "killed listener because of lost events\n"
ACL_MESSAGE = "Access Denied, go away.\n"

# As-fast-as-possible plays wait for a client whose queue is this long (see _run_fast).
_HIGH_WATER = 2_000
# A client whose socket has not taken a byte for this long no longer holds the fast plays back.
_STALL_S = 2.0
_BATCH_BYTES = 256 * 1024

# switch_log.c levels, for the `log` command.
_LOG_LEVELS = {
    "console": 0, "alert": 1, "crit": 2, "err": 3, "error": 3, "warning": 4, "notice": 5,
    "info": 6, "debug": 7,
}  # fmt: skip
_ORIGINATION_UUID_RE = re.compile(r"origination_uuid\s*=\s*'?([0-9A-Za-z-]+)")
# mod_commands.c: what `originate` answers when its arguments do not split into 2 to 7 words.
ORIGINATE_USAGE = ("-USAGE: <call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>] "
                   "[<cid_name>] [<cid_num>] [<timeout_sec>]\n")
# Endpoints the lab PBX has loaded; any other dial string fails as FreeSWITCH fails it.
_ENDPOINTS = ("user/", "sofia/", "loopback/", "error/")
_LEADING_VARS_RE = re.compile(r"^(?:\{[^{}]*\}|<[^<>]*>|\[[^\[\]]*\])*")


def _split_words(text: str) -> list[str]:
    """switch_separate_string(.., ' ', ..): words split on spaces, except inside single quotes; a backslash
    keeps the next character from counting."""
    words: list[str] = []
    word: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            word.append(ch)
            escaped = True
        elif ch == "'":
            word.append(ch)
            quoted = not quoted
        elif ch == " " and not quoted:
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    return words


def _originate_refusal(args: str) -> str | None:
    """What FreeSWITCH answers instead of starting a call, for arguments it cannot use; None if usable."""
    words = _split_words(args)
    if not 2 <= len(words) <= 7:
        return ORIGINATE_USAGE
    if not _LEADING_VARS_RE.sub("", words[0]).startswith(_ENDPOINTS):
        return "-ERR CHAN_NOT_IMPLEMENTED\n"
    return None
_PACKET_END_RE = re.compile(rb"\n\r*\n")


def _reply(text: str) -> bytes:
    return f"Content-Type: command/reply\nReply-Text: {text}\n\n".encode()


def _disconnect_notice(message: str) -> bytes:
    body = message.encode()
    return b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n%s" % (len(body), body)


def _api_response(body: str) -> bytes:
    data = body.encode() or b"-ERR no reply\n"
    return b"Content-Type: api/response\nContent-Length: %d\n\n%s" % (len(data), data)


# ---------------------------------------------------------------------------------------------
# Public records


@dataclass
class PlayedCall:
    scenario: str
    uuids: dict[str, str]  # original uuid (plain and json captures) -> fresh uuid
    a_leg: str  # fresh uuid of the first channel in the capture
    events: int  # events of this call sent to at least one client (each format counted)
    frames: int = 0  # frames queued for clients (an event sent to two clients counts twice)
    dropped: int = 0  # frames lost because a client's queue was full (FreeSWITCH drops too)
    paused: bool = False  # stopped by `until`; `resume()` plays the rest
    interrupted: bool = False  # ended early by restart() / stop()
    flushed: bool = True  # False: a client stopped reading before all of it was written
    job_uuid: str | None = None  # Job-UUID when the call was started by a bgapi originate


@dataclass(frozen=True)
class Subscription:
    peer: tuple[str, int]
    format: str  # 'plain' | 'json' | 'xml'
    events: frozenset[str]  # event names asked for; 'ALL' when all were
    custom: frozenset[str]  # CUSTOM subclasses asked for
    filters: tuple[tuple[str, str], ...]
    queued: int  # event frames waiting to be written
    dropped: int  # event frames lost because the queue was full


@dataclass
class Originate:
    """One originate the simulator answered (`bgapi originate` or `api originate`)."""

    job_uuid: str | None  # None for `api originate`
    args: str  # everything after `originate `
    uuid: str  # origination_uuid, or the uuid the simulator chose
    result: str  # the body FreeSWITCH would give: "+OK <uuid>\n" or "-ERR <cause>\n"
    play: gevent.Greenlet | None = None  # the replay it started; .get() -> PlayedCall


# ---------------------------------------------------------------------------------------------
# Connections


class _CutMarker:
    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class _Conn:
    """One Event Socket client: its subscription, and a bounded queue drained by a writer."""

    _ids = itertools.count(1)

    def __init__(self, sim: FreeSwitchSimulator, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.id = next(self._ids)
        self.sim = sim
        self.sock = sock
        self.peer = peer
        self.authed = False
        self.events_on = False
        self.format = "plain"
        self.names: set[str] = set()
        self.custom: set[str] = set()
        self.custom_all = False
        self.filters: list[tuple[str, str]] = []
        self.log_level: int | None = None
        # Replies jump ahead of queued events, as mod_event_socket writes them from the listener
        # thread directly; both are written by one greenlet so frames never interleave.
        self.urgent: deque[bytes] = deque()
        self.queue: deque[bytes | _CutMarker] = deque()
        self.max_queue = sim.max_queue
        self.enqueued = 0  # event frames ever queued
        self.sent = 0  # event frames ever written
        self.dropped = 0
        self.lost_in_row = 0
        self.cut_budget: int | None = None
        self.send_started: float | None = None
        self.closing = False
        self.closed = False
        self._wake = gevent.event.Event()
        self._waiters: list[tuple[int, int, gevent.event.AsyncResult]] = []
        self._waiter_ids = itertools.count()
        self.writer = gevent.spawn(self._write_loop)

    # -- queueing ------------------------------------------------------------------------------

    def send_urgent(self, data: bytes) -> None:
        if not self.closed:
            self.urgent.append(data)
            self._wake.set()

    def push_event(self, frame: bytes) -> bool:
        if self.closed or self.closing:
            return False
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            self.lost_in_row += 1
            if self.lost_in_row > MAX_MISSED:
                self.kill(LOST_EVENTS_NOTICE)
            return False
        self.lost_in_row = 0
        self.queue.append(frame)
        self.enqueued += 1
        self._wake.set()
        return True

    def push_raw(self, data: bytes) -> None:
        # Raw bytes keep their place in the event stream and are never dropped.
        if not self.closed and not self.closing:
            self.queue.append(data)
            self.enqueued += 1
            self._wake.set()

    def push_cut(self, nbytes: int) -> None:
        if not self.closed and not self.closing:
            self.queue.append(_CutMarker(nbytes))
            self._wake.set()

    def wait_sent(self, target: int) -> bool:
        """Until the first `target` event frames were written or the connection died; False when
        the client stopped reading for `stall_timeout` seconds (a hung client fails a test
        instead of hanging it)."""
        if self.closed or self.sent >= target:
            return True
        result = gevent.event.AsyncResult()
        heapq.heappush(self._waiters, (target, next(self._waiter_ids), result))
        while not result.wait(1.0):
            started = self.send_started
            if started is not None and time.monotonic() - started > self.sim.stall_timeout:
                return False
        return True

    def discard_queued(self) -> None:
        """Drop queued events (flush_listener); they count as written for whoever waits."""
        self.sent += sum(not isinstance(item, _CutMarker) for item in self.queue)
        self.queue.clear()
        self._notify()

    def _notify(self) -> None:
        while self._waiters and (self.closed or self._waiters[0][0] <= self.sent):
            heapq.heappop(self._waiters)[2].set(True)

    # -- writing -------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while True:
                while not self.urgent and not (self.queue and not self.closing):
                    if self.closing or self.closed:
                        return
                    self._wake.clear()
                    self._wake.wait()
                chunks: list[bytes] = []
                frames = size = 0
                while self.urgent:
                    chunks.append(self.urgent.popleft())
                while self.queue and size < _BATCH_BYTES and not self.closing:
                    item = self.queue[0]
                    if isinstance(item, _CutMarker):
                        if chunks:
                            break  # the budget counts from the first byte after the marker
                        self.queue.popleft()
                        self.cut_budget = item.nbytes
                        continue
                    self.queue.popleft()
                    chunks.append(item)
                    size += len(item)
                    frames += 1
                if not chunks:
                    continue
                data = b"".join(chunks)
                budget = self.cut_budget
                self.send_started = time.monotonic()
                if budget is not None and len(data) >= budget:
                    if budget:
                        self.sock.sendall(data[:budget])
                    self.close()
                    return
                if budget is not None:
                    self.cut_budget = budget - len(data)
                self.sock.sendall(data)
                self.send_started = None
                self.sent += frames
                self._notify()
                if len(self.queue) < _HIGH_WATER // 2:
                    self.sim._drained.set()
        except OSError:
            pass
        finally:
            self.close()

    # -- closing -------------------------------------------------------------------------------

    def finish(self, *last: bytes) -> None:
        """Write `last` after anything urgent, drop queued events, close (FreeSWITCH's goodbye)."""
        for data in last:
            self.send_urgent(data)
        self.closing = True
        self.discard_queued()
        self._wake.set()

    def kill(self, message: str) -> None:
        # kill_listener(): notice, then shutdown; the notice may not fit in a full socket.
        self.finish(_disconnect_notice(message))
        gevent.spawn_later(1.0, self.close)

    def close(self, reset: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.urgent.clear()
        self._notify()
        self._wake.set()
        self.sim._forget(self)
        with contextlib.suppress(OSError):
            if reset:
                # SO_LINGER 0: the peer gets a RST instead of a FIN.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.writer is not gevent.getcurrent():
            self.writer.kill(block=False)
        self.sim._drained.set()

    # -- subscription --------------------------------------------------------------------------

    def wants(self, ev: EventTemplate, fresh: dict[str, str]) -> bool:
        names = self.names
        if "ALL" not in names:
            if ev.name not in names:
                return False
            if ev.name == "CUSTOM" and ev.subclass and not (self.custom_all or ev.subclass in self.custom):
                return False
        if self.filters:
            return self._filter_pass(ev, fresh)
        return True

    def _filter_pass(self, ev: EventTemplate, fresh: dict[str, str]) -> bool:
        # mod_event_socket.c event_handler(): '+'/'-' prefixes, '/regex/' or case-insensitive
        # equality; a negative match wins.  Values are compared after uuid freshening.
        send = False
        for name, value in self.filters:
            hval = ev.headers.get(name.lower())
            if hval is None:
                continue
            hval = UUID_RE.sub(lambda m: fresh.get(m.group(0), m.group(0)), hval)
            comp, pos = value, True
            while comp and comp[0] in "+- ":
                if comp[0] == "+":
                    pos = True
                elif comp[0] == "-":
                    pos = False
                comp = comp[1:]
            if send and pos:
                continue
            if value.startswith("/"):
                pattern = comp[1:].rsplit("/", 1)[0] if comp.startswith("/") else comp
                matched = re.search(pattern, hval) is not None
            else:
                matched = hval.lower() == comp.lower()
            if matched:
                if not pos:
                    return False
                send = True
        return send

    def subscription(self) -> Subscription:
        return Subscription(
            peer=self.peer, format=self.format, events=frozenset(self.names),
            custom=frozenset(self.custom), filters=tuple(self.filters), queued=len(self.queue),
            dropped=self.dropped,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Calls being played


class _Track:
    """One capture (plain or json) of a call, played from `pos` up to `end`."""

    __slots__ = ("base_rel", "cap", "end", "fmt", "offset_s", "pos", "primary", "start", "vals")

    def __init__(self, cap: CompiledCapture, vals: list[str], offset_s: int, primary: bool) -> None:
        self.cap = cap
        self.fmt = cap.fmt
        self.vals = vals
        self.offset_s = offset_s  # seconds added to every captured time
        self.primary = primary
        self.pos = 0
        self.end = 0
        self.start = 0.0
        self.base_rel = 0


class _Call:
    _ids = itertools.count(1)

    def __init__(
        self,
        scenario: Scenario,
        fresh: list[str],
        fresh_map: dict[str, str],
        tracks: list[_Track],
        wire_substitutions: dict[str, str] | None,
        job_uuid: str | None,
    ) -> None:
        self.id = next(self._ids)
        self.scenario = scenario
        self.fresh = fresh
        self.fresh_map = fresh_map  # original uuid (both captures, Core-UUID) -> fresh
        self.tracks = tracks
        self.primary = tracks[0]
        self.subs = list(wire_substitutions.items()) if wire_substitutions else []
        self.job_uuid = job_uuid
        self.speed: float | None = None
        self.cut_bytes: int | None = None
        self.cut_done: set[int] = set()
        self.skip: set[tuple[str, int]] = set()  # (format, event index) never sent
        self.last_enq: dict[_Conn, int] = {}
        self.events = self.frames = self.dropped = 0
        self.running = 0
        self.cancelled = False
        self.done = gevent.event.AsyncResult()

    @property
    def state_pos(self) -> int:
        return self.primary.pos

    @property
    def finished(self) -> bool:
        return self.primary.pos >= len(self.primary.cap.events)

    def record(self) -> PlayedCall:
        uuids = {orig: fresh for orig, fresh in self.fresh_map.items() if not self._is_core(orig)}
        return PlayedCall(
            scenario=self.scenario.name, uuids=uuids, a_leg=self.fresh[0], events=self.events,
            frames=self.frames, dropped=self.dropped, paused=not self.finished and not self.cancelled,
            interrupted=self.cancelled, job_uuid=self.job_uuid,
        )  # fmt: skip

    def _is_core(self, orig: str) -> bool:
        return any(orig == cap.core_uuid for cap in self.scenario.captures())


# ---------------------------------------------------------------------------------------------
# The simulator


class FreeSwitchSimulator:
    """FreeSWITCH's inbound Event Socket, replaying real captures (see module docstring)."""

    def __init__(
        self,
        password: str = "ClueCon",
        host: str = "127.0.0.1",
        port: int = 0,
        reject: bool = False,
        *,
        max_queue: int = MAX_QUEUE_LEN,
        tz: datetime.tzinfo | None = None,
        heartbeat_interval: float | None = None,
        sndbuf: int | None = None,
        cdr_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.password = password
        self.host = host
        self.port = port
        self.reject = reject
        self.max_queue = max_queue
        self.tz = tz  # zone of the *_stamp / Event-Date-Local strings; None: this process's
        self.heartbeat_interval = heartbeat_interval
        self.sndbuf = sndbuf  # SO_SNDBUF of client sockets: small makes slow readers show fast
        self.core_uuid = str(uuid.uuid4())
        self.commands: list[str] = []
        self.originate_result = "+OK"
        self.originate_plays: str | None = None
        self.originate_speed: float | None = None
        self.stall_timeout = 10.0  # play() stops waiting for a client that reads nothing this long
        self.originates: list[Originate] = []
        # Extra `api` commands: name -> body, or callable(arg) -> body ("status", "uuid_kill"...).
        self.api_responses: dict[str, str | Callable[[str], str]] = {}
        self._server: gevent.server.StreamServer | None = None
        self._conns: dict[int, _Conn] = {}
        self._event_conns: list[_Conn] = []
        self._subscribed = gevent.event.Event()
        self._drained = gevent.event.Event()
        self._seq = itertools.count(1)
        self._stamps: dict[tuple[str, int, bool], str] = {}
        self._calls: dict[int, _Call] = {}  # playing or paused
        self._by_a_leg: dict[str, _Call] = {}
        self._residual_live: set[str] = set()
        self._pending_cut: int | None = None
        self._timed: list[tuple[float, int, _Track, _Call]] = []
        self._fast: deque[tuple[_Track, _Call]] = deque()
        self._timed_wake = gevent.event.Event()
        self._fast_wake = gevent.event.Event()
        self._order = itertools.count()
        self._greenlets: list[gevent.Greenlet] = []
        self.emitted = 0  # events rendered, all calls and formats
        # mod_json_cdr: its log-dir, prefix-a-leg and encode-values settings; documents written so far.
        self.cdr_dir = Path(cdr_dir) if cdr_dir is not None else None
        self.cdr_prefix_a = False
        self.cdr_encode_values = False
        self.cdr_written: list[Path] = []
        # Modules `module_exists` reports loaded: the lab PBX's (json_cdr is what wrote fixtures/json_cdr).
        self.modules = {"mod_event_socket", "mod_sofia", "mod_commands", "mod_dptools", "mod_dialplan_xml",
                        "mod_loopback", "mod_sndfile", "mod_json_cdr"}

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FreeSwitchSimulator:
        self._listen(self.port)
        self._greenlets = [gevent.spawn(self._run_timed), gevent.spawn(self._run_fast)]
        if self.heartbeat_interval:
            self._greenlets.append(gevent.spawn(self._heartbeat_loop, self.heartbeat_interval))
        return self

    def _listen(self, port: int) -> None:
        self._server = gevent.server.StreamServer((self.host, port), self._handle_connection)
        self._server.start()
        self.port = self._server.address[1]

    def stop(self) -> None:
        self._cancel_calls()
        for conn in list(self._conns.values()):
            conn.close()
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None
        gevent.killall(self._greenlets)
        self._greenlets = []

    def __enter__(self) -> FreeSwitchSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------------------------

    @property
    def subscriptions(self) -> list[Subscription]:
        """Connections that have asked for events, in connection order."""
        return [c.subscription() for c in self._conns.values() if c.events_on and not c.closed]

    @property
    def connections(self) -> int:
        return sum(not c.closed for c in self._conns.values())

    @property
    def dropped(self) -> int:
        return sum(c.dropped for c in self._conns.values())

    def wait_for_subscriber(self, timeout: float = 5.0, count: int = 1) -> Subscription:
        """Until `count` connections authenticated and sent `event`; the last of them."""
        deadline = time.monotonic() + timeout
        while True:
            subs = self.subscriptions
            if len(subs) >= count:
                return subs[-1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no Event Socket subscriber within {timeout}s ({len(subs)} present)")
            self._subscribed.clear()
            self._subscribed.wait(min(remaining, 0.05))

    @property
    def live_channels(self) -> set[str]:
        """Fresh uuids of channels created (CHANNEL_CREATE) and not destroyed by the plays."""
        live = set(self._residual_live)
        for call in self._calls.values():
            cap = call.primary.cap
            live.update(call.fresh[role] for role in cap.live_at[call.state_pos])
        return live

    # -- playing -------------------------------------------------------------------------------

    def play(
        self,
        scenario: str,
        speed: float | None = None,
        wire_substitutions: dict[str, str] | None = None,
        *,
        until: str | None = None,
        a_leg: str | None = None,
    ) -> PlayedCall:
        """Play one call to every subscribed client; returns once all of it was written, so a
        client must be reading meanwhile (beyond what socket buffers hold, ~1 call).

        speed None: as fast as the slowest live client reads; 1.0: recorded pacing (timestamps
        gaps); 10.0: ten times faster.  Times are shifted so the call starts now, by the same
        whole number of seconds everywhere, so durations stay as recorded whatever the speed.
        until: stop after the first event of that name (the call stays live for show channels
        and uuid_exists; resume() plays the rest).  a_leg: the fresh uuid of the first channel.
        Plain subscribers get the *.plain.raw capture, json ones the *.json.raw capture.
        """
        call = self._new_call(load_scenario(scenario), wire_substitutions, a_leg=a_leg)
        return self._run_call(call, speed, until)

    def play_async(self, *args: object, **kwargs: object) -> gevent.Greenlet:
        return gevent.spawn(self.play, *args, **kwargs)

    def resume(self, played: PlayedCall, speed: float | None = None, *, until: str | None = None) -> PlayedCall:
        """Play the rest of a call that play(until=...) left paused."""
        call = self._by_a_leg.get(played.a_leg)
        if call is None or call.finished or call.cancelled:
            raise ValueError(f"call {played.a_leg} is not paused")
        return self._run_call(call, speed, until)

    def play_many(
        self,
        scenarios: list[str] | str,
        calls: int,
        rate: float | None = None,
        concurrency: int | None = None,
        *,
        speed: float | None = None,
        wire_substitutions: dict[str, str] | None = None,
    ) -> list[PlayedCall]:
        """`calls` calls cycling through `scenarios`, each with fresh ids, started `rate` per
        second (None: all at once), at most `concurrency` playing at a time; they interleave."""
        names = [scenarios] if isinstance(scenarios, str) else list(scenarios)
        for name in names:
            load_scenario(name)  # compile before the clock starts
        pool = gevent.pool.Pool(concurrency) if concurrency else gevent.pool.Group()
        greenlets: list[gevent.Greenlet] = []
        t0 = time.monotonic()
        for i in range(calls):
            if rate:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    gevent.sleep(delay)
            greenlets.append(pool.spawn(self.play, names[i % len(names)], speed, wire_substitutions))
        gevent.joinall(greenlets, raise_error=True)
        return [g.value for g in greenlets]

    def _stamp(self, kind: str, epoch_s: int, enc: bool) -> str:
        key = (kind, epoch_s, enc)
        text = self._stamps.get(key)
        if text is None:
            if kind == "gmt":
                text = gmt_date(epoch_s)
            elif self.tz is None:
                text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_s))
            else:
                text = datetime.datetime.fromtimestamp(epoch_s, self.tz).strftime("%Y-%m-%d %H:%M:%S")
            if enc:
                text = fs_url_encode(text)
            if len(self._stamps) > 100_000:
                self._stamps.clear()
            self._stamps[key] = text
        return text

    def _new_call(
        self,
        scenario: Scenario,
        wire_substitutions: dict[str, str] | None,
        *,
        a_leg: str | None = None,
        job_uuid: str | None = None,
        overrides: dict[str, dict[str, str]] | None = None,
    ) -> _Call:
        plain = scenario.plain
        fresh = [str(uuid.uuid4()) for _ in plain.roles]
        if a_leg:
            fresh[0] = a_leg
        if job_uuid and plain.job_role is not None:
            fresh[plain.job_role] = job_uuid
        fresh_map: dict[str, str] = {}
        tracks = []
        now = time.time()
        for cap in scenario.captures():
            fresh_map.update(zip(cap.roles, fresh, strict=False))
            fresh_map[cap.core_uuid] = self.core_uuid
            # Whole seconds keep *_epoch, *_uepoch and the date strings consistent.
            offset_s = round(now - cap.t0_us / 1_000_000)
            vals = cap.values(fresh, self.core_uuid, offset_s, self._stamp)
            for key, text in (overrides or {}).get(cap.fmt, {}).items():
                kind, _, index = key.partition("@")
                vals[cap.events[int(index)].named[kind]] = text
            tracks.append(_Track(cap, vals, offset_s, primary=not tracks))
        call = _Call(scenario, fresh, fresh_map, tracks, wire_substitutions, job_uuid)
        if self._pending_cut is not None:
            call.cut_bytes, self._pending_cut = self._pending_cut, None
        return call

    def _run_call(self, call: _Call, speed: float | None, until: str | None) -> PlayedCall:
        self._schedule(call, speed, until)
        call.done.wait()
        flushed = True
        for conn, target in list(call.last_enq.items()):
            flushed = conn.wait_sent(target) and flushed
        record = call.record()
        record.flushed = flushed
        return record

    def _schedule(self, call: _Call, speed: float | None, until: str | None) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive (or None for as fast as possible)")
        call.speed = speed
        call.done = gevent.event.AsyncResult()
        stop_rel: int | None = None
        for track in call.tracks:
            events = track.cap.events
            end = len(events)
            if until is not None:
                found = next((e.index + 1 for e in events[track.pos :] if e.name == until), None)
                if found is None and track.primary:
                    raise ValueError(f"{call.scenario.name}: no {until} event left to stop at")
                if found is None and stop_rel is not None:
                    # The json capture lacks it (e.g. API): stop at the same recorded moment.
                    found = next((e.index for e in events[track.pos :] if e.rel_us > stop_rel), end)
                end = found if found is not None else end
                if track.primary and end:
                    stop_rel = events[end - 1].rel_us
            track.end = end
        self._calls[call.id] = call
        self._by_a_leg[call.fresh[0]] = call
        now = time.monotonic()
        call.running = 0
        for track in call.tracks:
            if track.pos >= track.end:
                continue
            call.running += 1
            track.start = now
            track.base_rel = track.cap.events[track.pos].rel_us
            if speed is None:
                self._fast.append((track, call))
                self._fast_wake.set()
            else:
                self._push_timed(track, call)
        if not call.running:
            self._finish(call)

    def _push_timed(self, track: _Track, call: _Call) -> None:
        rel = track.cap.events[track.pos].rel_us - track.base_rel
        due = track.start + max(rel, 0) / 1_000_000 / (call.speed or 1.0)
        if not self._timed or due < self._timed[0][0]:
            self._timed_wake.set()
        heapq.heappush(self._timed, (due, next(self._order), track, call))

    def _track_done(self, call: _Call) -> None:
        call.running -= 1
        if call.running <= 0:
            self._finish(call)

    def _finish(self, call: _Call) -> None:
        if call.finished or call.cancelled:
            self._calls.pop(call.id, None)
            if self._by_a_leg.get(call.fresh[0]) is call:
                del self._by_a_leg[call.fresh[0]]
            if not call.cancelled:
                cap = call.primary.cap
                self._residual_live.update(call.fresh[r] for r in cap.live_at[call.state_pos])
        call.done.set(True)

    def _cancel_calls(self) -> None:
        for call in list(self._calls.values()):
            call.cancelled = True
            self._finish(call)
        self._calls.clear()
        self._by_a_leg.clear()
        self._residual_live.clear()
        self._timed.clear()
        self._fast.clear()

    def _run_timed(self) -> None:
        heap = self._timed
        n = 0
        while True:
            if not heap:
                self._timed_wake.clear()
                self._timed_wake.wait()
                continue
            due, _, track, call = heap[0]
            delay = due - time.monotonic()
            if delay > 0:
                self._timed_wake.clear()
                self._timed_wake.wait(delay)
                continue
            heapq.heappop(heap)
            if call.cancelled:
                continue
            self._emit(track, call)
            if track.pos < track.end:
                self._push_timed(track, call)
            else:
                self._track_done(call)
            n += 1
            if n % 64 == 0:
                gevent.sleep(0)

    def _run_fast(self) -> None:
        fast = self._fast
        n = 0
        while True:
            if not fast:
                self._fast_wake.clear()
                self._fast_wake.wait()
                continue
            if n % 16 == 0 and self._congested():
                # As fast as possible means as fast as the clients read: a reader that is slow
                # but alive holds the fast plays back instead of losing events.
                self._drained.clear()
                self._drained.wait(0.05)
                if self._congested():
                    continue
            track, call = fast.popleft()
            if call.cancelled:
                continue
            self._emit(track, call)
            if track.pos < track.end:
                fast.append((track, call))
            else:
                self._track_done(call)
            n += 1
            if n % 32 == 0:
                gevent.sleep(0)

    def _congested(self) -> bool:
        now = time.monotonic()
        for conn in self._event_conns:
            if len(conn.queue) >= _HIGH_WATER and not (
                conn.send_started is not None and now - conn.send_started > _STALL_S
            ):
                return True
        return False

    def _emit(self, track: _Track, call: _Call) -> None:
        ev = track.cap.events[track.pos]
        track.pos += 1
        if (track.fmt, ev.index) in call.skip:
            return
        if track.primary and self.cdr_dir is not None and ev.name == "CHANNEL_HANGUP_COMPLETE":
            # FreeSWITCH reports the channel (CS_REPORTING) whether anyone listens to its events or not.
            self._write_cdr(track, ev)
        fresh = call.fresh_map
        targets = [c for c in self._event_conns if c.format == track.fmt and c.wants(ev, fresh)]
        if not targets:
            return
        frame = self._render(ev, track.vals, track.fmt, call.subs)
        call.events += 1
        cut = call.cut_bytes
        for conn in targets:
            if cut is not None and conn.id not in call.cut_done:
                call.cut_done.add(conn.id)
                conn.push_cut(cut)
            if conn.push_event(frame):
                call.frames += 1
                call.last_enq[conn] = conn.enqueued
            else:
                call.dropped += 1

    def _render(
        self, ev: EventTemplate, vals: list[str], fmt: str, subs: list[tuple[str, str]] | None = None
    ) -> bytes:
        vals[0] = str(next(self._seq))
        text = ev.template.render(vals)
        if subs:
            for old, new in subs:
                text = text.replace(old, new)
        body = text.encode()
        self.emitted += 1
        return b"Content-Length: %d\nContent-Type: text/event-%s\n\n%s" % (len(body), fmt.encode(), body)

    # -- mod_json_cdr and uuid_dump -----------------------------------------------------------

    def _headers_of(self, track: _Track, ev: EventTemplate) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, value in plain_headers(ev.template.render(track.vals)):
            headers.setdefault(name, value)  # FreeSWITCH's lookup returns the first
        return headers

    def _write_cdr(self, track: _Track, ev: EventTemplate) -> Path:
        """mod_json_cdr's my_on_reporting(): the leg's document, built from its HANGUP_COMPLETE."""
        h = self._headers_of(track, ev)
        apps = []
        for earlier in track.cap.events[: ev.index]:
            if earlier.name == "CHANNEL_EXECUTE" and earlier.unique_role == ev.unique_role:
                eh = self._headers_of(track, earlier)
                apps.append({"app_name": eh.get("Application", ""), "app_data": eh.get("Application-Data", ""),
                             "app_stamp": eh.get("Event-Date-Timestamp", "")})
        encode = fs_url_encode if self.cdr_encode_values else (lambda v: v)
        variables = {k[9:]: encode(v) for k, v in h.items() if k.startswith("variable_") and v}

        def profile(prefix: str) -> dict[str, object]:
            return {"username": h.get(f"{prefix}Username", ""), "dialplan": h.get(f"{prefix}Dialplan", ""),
                    "caller_id_name": h.get(f"{prefix}Caller-ID-Name", ""), "ani": h.get(f"{prefix}ANI", ""),
                    "aniii": "", "caller_id_number": h.get(f"{prefix}Caller-ID-Number", ""),
                    "network_addr": h.get(f"{prefix}Network-Addr", ""), "rdnis": h.get(f"{prefix}RDNIS", ""),
                    "destination_number": h.get(f"{prefix}Destination-Number", ""),
                    "uuid": h.get(f"{prefix}Unique-ID", ""), "source": h.get(f"{prefix}Source", ""),
                    "context": h.get(f"{prefix}Context", ""), "chan_name": h.get(f"{prefix}Channel-Name", "")}

        main = profile("Caller-")
        other = h.get("Other-Type")
        if other in ("originator", "originatee") and h.get("Other-Leg-Unique-ID"):
            main[other] = {f"{other}_caller_profiles": [profile("Other-Leg-")]}
        times = {key: h.get(f"Caller-{name}", "0") for key, name in (
            ("created_time", "Channel-Created-Time"), ("profile_created_time", "Profile-Created-Time"),
            ("progress_time", "Channel-Progress-Time"), ("progress_media_time", "Channel-Progress-Media-Time"),
            ("answered_time", "Channel-Answered-Time"), ("bridged_time", "Channel-Bridged-Time"),
            ("last_hold_time", "Channel-Last-Hold"), ("hold_accum_time", "Channel-Hold-Accum"),
            ("hangup_time", "Channel-Hangup-Time"), ("resurrect_time", "Channel-Resurrect-Time"),
            ("transfer_time", "Channel-Transfer-Time"))}
        doc: dict[str, object] = {
            "core-uuid": h.get("Core-UUID", self.core_uuid), "switchname": h.get("FreeSWITCH-Switchname", ""),
            "channel_data": {"state": "CS_REPORTING", "direction": h.get("Call-Direction", ""),
                             "state_number": "11"},
            "callStats": {}, "variables": variables,
        }
        if apps:
            doc["app_log"] = {"applications": apps}
        doc["callflow"] = [{"dialplan": h.get("Caller-Dialplan", ""),
                            "profile_index": h.get("Caller-Profile-Index", "1"),
                            "caller_profile": main, "times": times}]
        uuid_ = h.get("Unique-ID", "")
        # b-legs are those with an originator profile; only a-legs get the prefix (mod_json_cdr.c).
        prefix = "a_" if self.cdr_prefix_a and other != "originator" else ""
        assert self.cdr_dir is not None
        path = self.cdr_dir / f"{prefix}{uuid_}.cdr.json"
        # Written in place, the final newline last, as process_cdr() does.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, _cjson(doc).encode() + b"\n")
        finally:
            os.close(fd)
        self.cdr_written.append(path)
        return path

    def _uuid_dump(self, arg: str) -> str:
        """`uuid_dump <uuid> json`: the channel's headers as its last played event carried them."""
        target = arg.split(" ")[0] if arg else ""
        for call in self._calls.values():
            if target not in call.fresh:
                continue
            role = call.fresh.index(target)
            cap = call.primary.cap
            if role not in cap.live_at[call.state_pos]:
                break
            last = next((e for e in reversed(cap.events[: call.state_pos])
                         if e.unique_role == role and "variable_uuid" in e.headers), None)
            if last is None:
                break
            data = self._headers_of(call.primary, last)
            data["Event-Name"] = "CHANNEL_DATA"
            return _cjson(data)
        return "-ERR No such channel!\n"

    # -- standalone events (API, BACKGROUND_JOB, HEARTBEAT) ------------------------------------

    def _standalone(
        self,
        name: str,
        named: dict[str, dict[str, str]] | None = None,
        roles: dict[str, str] | None = None,
    ) -> None:
        """Send one captured event of this name, now, with fresh ids and the given named values
        (per format); `roles` pins fresh values for original Job-UUIDs."""
        for fmt in ("plain", "json"):
            found = _template_of(name, fmt)
            conns = [c for c in self._event_conns if c.format == fmt]
            if found is None or not conns:
                continue
            cap, ev = found
            fresh = [str(uuid.uuid4()) for _ in cap.roles]
            if name == "BACKGROUND_JOB" and roles and cap.job_role is not None:
                fresh[cap.job_role] = roles["job"]
            fresh_map = dict(zip(cap.roles, fresh, strict=False))
            fresh_map[cap.core_uuid] = self.core_uuid
            targets = [c for c in conns if c.wants(ev, fresh_map)]
            if not targets:
                continue
            offset_s = round(time.time() - int(ev.headers["event-date-timestamp"]) / 1_000_000)
            vals = cap.values(fresh, self.core_uuid, offset_s, self._stamp)
            for key, text in (named or {}).get(fmt, {}).items():
                vals[ev.named[key]] = text
            frame = self._render(ev, vals, fmt)
            for conn in targets:
                conn.push_event(frame)

    def send_heartbeat(self) -> None:
        """A HEARTBEAT now (FreeSWITCH sends one every 20 s by default)."""
        self._standalone("HEARTBEAT")

    def _heartbeat_loop(self, interval: float) -> None:
        while True:
            gevent.sleep(interval)
            self.send_heartbeat()

    # -- faults --------------------------------------------------------------------------------

    def cut(self, reset: bool = False) -> int:
        """Abruptly close every client connection (FIN, or RST with reset=True); how many."""
        conns = [c for c in self._conns.values() if not c.closed]
        for conn in conns:
            conn.close(reset=reset)
        return len(conns)

    def cut_after_bytes(self, n: int) -> None:
        """The next play() cuts each receiving connection after n bytes of its events."""
        self._pending_cut = n

    def restart(self, down_for: float = 0.0, graceful: bool = False) -> None:
        """FreeSWITCH restarts: connections cut (graceful: after the shutdown notice), live
        channels and plays forgotten, new Core-UUID, Event-Sequence from 1 again; the port
        refuses connections for `down_for` seconds."""
        if graceful:
            for conn in list(self._conns.values()):
                conn.finish(_disconnect_notice(SHUTDOWN_NOTICE))
            gevent.sleep(0.05)
        self.cut()
        self._cancel_calls()
        self.core_uuid = str(uuid.uuid4())
        self._seq = itertools.count(1)
        if down_for > 0 and self._server is not None:
            self._server.stop(timeout=0)
            gevent.sleep(down_for)
            self._listen(self.port)

    def refuse_connections(self) -> None:
        """The event socket goes away (cut, and refused) while FreeSWITCH and its calls go on."""
        if self._server is not None:
            self._server.stop(timeout=0)
            self._server = None
        self.cut()

    def accept_connections(self) -> None:
        """The event socket is back, on the same port."""
        if self._server is None:
            self._listen(self.port)

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes to every connected client, in order with its queued events."""
        for conn in self._conns.values():
            conn.push_raw(data)

    # -- connections ---------------------------------------------------------------------------

    def _handle_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        conn = _Conn(self, sock, (address[0], address[1]))
        self._conns[conn.id] = conn
        if self.reject:
            # mod_event_socket: ACL refusal, then the generic goodbye of every closing listener.
            msg = ACL_MESSAGE.encode()
            conn.finish(
                b"Content-Type: text/rude-rejection\nContent-Length: %d\n\n%s" % (len(msg), msg),
                _disconnect_notice(GOODBYE),
            )
            conn.writer.join()
            return
        conn.send_urgent(AUTH_REQUEST)
        buf = b""
        try:
            while not conn.closed and not conn.closing:
                data = sock.recv(65536)
                if not data:
                    break
                buf += data
                while not conn.closing:
                    packet, buf = _next_packet(buf)
                    if packet is None:
                        break
                    self._command(conn, *packet)
        except OSError:
            pass
        if conn.closing:
            conn.writer.join(timeout=5)
        conn.close()

    def _forget(self, conn: _Conn) -> None:
        self._conns.pop(conn.id, None)
        if conn in self._event_conns:
            self._event_conns.remove(conn)

    def _set_events(self, conn: _Conn, on: bool) -> None:
        conn.events_on = on
        if on and conn not in self._event_conns:
            self._event_conns.append(conn)
            self._subscribed.set()
        elif not on and conn in self._event_conns:
            self._event_conns.remove(conn)

    # -- commands (mod_event_socket.c parse_command, in its order) -----------------------------

    def _command(self, conn: _Conn, cmd: str, headers: dict[str, str], body: bytes) -> None:
        self.commands.append(cmd)
        low = cmd.lower()
        if low.startswith(("exit", "...")):
            conn.finish(_reply("+OK bye"), _disconnect_notice(GOODBYE))
            return
        if not conn.authed:
            if low.startswith("auth "):
                if cmd[5:] == self.password:
                    conn.authed = True
                    conn.send_urgent(_reply("+OK accepted"))
                    return
                conn.finish(_reply("-ERR invalid"), _disconnect_notice(GOODBYE))
            elif low.startswith("userauth "):
                # Directory users are not simulated: every userauth is refused like a bad one.
                conn.finish(_reply("-ERR invalid"), _disconnect_notice(GOODBYE))
            else:
                conn.send_urgent(_reply("-ERR command not found"))
            return
        if low.startswith("filter "):
            conn.send_urgent(_reply(_filter_command(conn, cmd[7:])))
        elif low.startswith("sendmsg"):
            target = cmd[7:].strip() or headers.get("session-id", "")
            live = target in self.live_channels
            conn.send_urgent(_reply("+OK" if live else f"-ERR invalid session id [{target or '(null)'}]"))
        elif low.startswith("api "):
            name, arg = _split_api(cmd[4:])
            conn.send_urgent(_api_response(self._api(name, arg)))
            self._api_event(name, arg)
        elif low.startswith("bgapi "):
            self._bgapi(conn, cmd[6:], headers)
        elif low.startswith("log"):
            level_s = cmd[3:].strip().split(" ")[0]
            level = _LOG_LEVELS.get(level_s.lower(), int(level_s) if level_s.isdigit() else None)
            if not level_s:
                level = 7  # FreeSWITCH echoes the empty level: "+OK log level  [7]"
            if level is None:
                conn.send_urgent(_reply("-ERR invalid log level"))
            else:
                conn.log_level = level
                conn.send_urgent(_reply(f"+OK log level {level_s} [{level}]"))
        elif low.startswith(("linger", "nolinger")):
            conn.send_urgent(_reply("-ERR not controlling a session"))
        elif low.startswith("nolog"):
            was, conn.log_level = conn.log_level, None
            conn.send_urgent(_reply("+OK no longer logging" if was is not None else "-ERR not loging"))
        elif low.startswith("event"):
            conn.send_urgent(_reply(self._event_command(conn, cmd)))
        elif low.startswith("nixevent"):
            conn.send_urgent(_reply(self._nixevent_command(conn, cmd)))
        elif low.startswith("noevents"):
            if conn.events_on:
                conn.names.clear()
                conn.custom.clear()
                conn.custom_all = False
                conn.discard_queued()
                self._set_events(conn, False)
                conn.send_urgent(_reply("+OK no longer listening for events"))
            else:
                conn.send_urgent(_reply("-ERR not listening for events"))
        else:
            conn.send_urgent(_reply("-ERR command not found"))

    def _event_command(self, conn: _Conn, cmd: str) -> str:
        rest = cmd[5:]
        space = rest.find(" ")
        key_count = 0
        custom = False
        if space >= 0:
            for count, word in enumerate(rest[space + 1 :].split(" ")):
                if count == 0 and word.lower() in ("xml", "plain", "json"):
                    conn.format = word.lower()
                    continue
                if custom:
                    conn.custom.add(word)
                    continue
                name = event_type(word)
                if name is None:
                    continue
                key_count += 1
                if name == "ALL":
                    conn.custom_all = True
                conn.names.add(name)
                if name == "CUSTOM":
                    custom = True
        if not key_count:
            return "-ERR no keywords supplied"
        self._set_events(conn, True)
        return f"+OK event listener enabled {conn.format}"

    def _nixevent_command(self, conn: _Conn, cmd: str) -> str:
        rest = cmd[8:]
        space = rest.find(" ")
        key_count = 0
        custom = False
        if space >= 0:
            for word in rest[space + 1 :].split(" "):
                if custom:
                    conn.custom.discard(word)
                    continue
                name = event_type(word)
                if name is None:
                    continue
                key_count += 1
                if name == "CUSTOM":
                    custom = True
                elif name == "ALL":
                    conn.names.clear()
                else:
                    if "ALL" in conn.names:
                        # FreeSWITCH turns ALL into every single event, then removes this one.
                        conn.names = set(EVENT_NAMES) - {"ALL"}
                    conn.names.discard(name)
        if not key_count:
            return "-ERR no keywords supplied"
        self._set_events(conn, True)
        return "+OK events nixed"

    # -- api / bgapi ---------------------------------------------------------------------------

    def _api(self, name: str, arg: str) -> str:
        custom = self.api_responses.get(name)
        if custom is not None:
            return custom(arg) if callable(custom) else custom
        if name == "show":
            return self._show(arg)
        if name == "uuid_exists":
            return "true" if arg and arg in self.live_channels else "false"
        if name == "uuid_dump":
            return self._uuid_dump(arg)
        if name == "module_exists":
            return "true" if arg in self.modules else "false"
        if name == "originate":
            return self._originate(arg, job_uuid=None).result
        return f"-ERR {name} Command not found!\n"

    def _api_event(self, name: str, arg: str) -> None:
        # switch_api_execute() fires API after every command, known or not.
        self._standalone("API", _api_named(name, arg))

    def _job_event(self, job_uuid: str, name: str, arg: str, body: str) -> None:
        self._standalone("BACKGROUND_JOB", _job_named(name, arg, body), roles={"job": job_uuid})

    def _bgapi(self, conn: _Conn, text: str, headers: dict[str, str]) -> None:
        name, _, arg = text.partition(" ")
        job_uuid = headers.get("job-uuid") or str(uuid.uuid4())
        conn.send_urgent(
            f"Content-Type: command/reply\nReply-Text: +OK Job-UUID: {job_uuid}\nJob-UUID: {job_uuid}\n\n".encode()
        )
        if name == "originate":
            self._originate(arg, job_uuid=job_uuid)
            return

        def run() -> None:
            api_name, api_arg = _split_api(text)
            body = self._api(api_name, api_arg)
            self._api_event(api_name, api_arg)
            self._job_event(job_uuid, name, arg, body)

        gevent.spawn(run)

    def _originate(self, args: str, job_uuid: str | None) -> Originate:
        match = _ORIGINATION_UUID_RE.search(args)
        leg = match.group(1) if match else str(uuid.uuid4())
        refusal = _originate_refusal(args)
        ok = refusal is None and self.originate_result.startswith("+OK")
        result = f"+OK {leg}\n" if ok else (refusal or f"{self.originate_result.rstrip()}\n")
        record = Originate(job_uuid=job_uuid, args=args, uuid=leg, result=result)
        self.originates.append(record)
        scenario = load_scenario(self.originate_plays) if ok and self.originate_plays else None
        # The reply was queued first; what follows happens "in the job thread".
        if scenario is None:
            if job_uuid is not None:
                gevent.spawn(self._finish_job, job_uuid, args, result)
            return record
        overrides: dict[str, dict[str, str]] = {}
        captured_job = scenario.plain.job_index is not None
        for cap in scenario.captures():
            named: dict[str, str] = {}
            if cap.api_index is not None:
                named[f"api@{cap.api_index}"] = _api_named("originate", args)[cap.fmt]["api"]
            if cap.job_index is not None:
                named[f"job@{cap.job_index}"] = _job_named("originate", args, result)[cap.fmt]["job"]
            overrides[cap.fmt] = named
        call = self._new_call(scenario, None, a_leg=leg, job_uuid=job_uuid, overrides=overrides)
        if job_uuid is None:
            # `api originate` answers in its api/response, not in a BACKGROUND_JOB.
            call.skip = {(c.fmt, c.job_index) for c in scenario.captures() if c.job_index is not None}
        speed = self.originate_speed

        def run() -> PlayedCall:
            if job_uuid is not None and not captured_job:
                self._finish_job(job_uuid, args, result)
            return self._run_call(call, speed, None)

        record.play = gevent.spawn(run)
        return record

    def _finish_job(self, job_uuid: str, args: str, result: str) -> None:
        self._api_event("originate", args)
        self._job_event(job_uuid, "originate", args, result)

    def _show(self, arg: str) -> str:
        words = arg.split(" ")
        what = words[0].lower() if words else ""
        fmt = words[2].lower() if len(words) > 2 and words[1].lower() == "as" else None
        if what not in ("channels", "calls") or fmt != "json":
            return f"-ERR the simulator only answers `show channels as json` / `show calls as json`, not {arg!r}\n"
        rows: list[tuple[int, int, dict[str, str]]] = []
        for order, call in enumerate(self._calls.values()):
            snap: DbSnapshot = call.primary.cap.db_at[call.state_pos]
            raw = channel_rows(snap) if what == "channels" else call_rows(snap)
            for row in raw:
                fresh = self._fresh_row(row, call.fresh_map, call.primary.offset_s)
                key = "created_epoch" if what == "channels" else "call_created_epoch"
                rows.append((int(fresh[key] or 0), order, fresh))
        if not rows:
            return '{"row_count": 0}\n'  # show_function() prints this literally when idle
        rows.sort(key=lambda item: (item[0], item[1]))
        return _cjson({"row_count": len(rows), "rows": [r for _, _, r in rows]})

    def _fresh_row(self, row: dict[str, object], fresh: dict[str, str], offset_s: int) -> dict[str, str]:
        out: dict[str, str] = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                kind, epoch = value
                out[key] = self._stamp("local", epoch + offset_s, False) if kind == "local" else str(
                    epoch + offset_s
                )
            else:
                out[key] = UUID_RE.sub(lambda m: fresh.get(m.group(0), m.group(0)), str(value))
        return out


# ---------------------------------------------------------------------------------------------
# mod_json_cdr documents in bulk

JSON_CDR_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "json_cdr"
_SAMPLE_A, _SAMPLE_B = "31ff8abf-a4ac-4f83-a050-5a0db45e0c55", "95bf58e2-2fa0-4370-8553-0d97a378255b"
_SAMPLE_T0_S = 1795721858  # start_epoch of the real pair
_EPOCH_RE = re.compile(rb"\b(\d{10})(\d{6})?\b")


def write_cdr_pairs(dest: Path, starts_us: Iterable[int], *, encode_values: bool = False) -> list[tuple[str, str]]:
    """Copies of the real answered call's two documents (tests/fixtures/json_cdr/), one pair per start time:
    fresh uuids, every epoch shifted so the call starts then; files get that call's end as mtime.
    Returns (a-leg, b-leg) uuids. As fast as a day's worth needs (a copy is a few substitutions)."""
    texts = {leg: json.dumps(json.loads((JSON_CDR_DIR / f"{leg}.cdr.json").read_text()), separators=(",", ":"))
             for leg in (_SAMPLE_A, _SAMPLE_B)}
    if encode_values:
        for leg, text in texts.items():
            doc = json.loads(text)
            doc["variables"] = {k: fs_url_encode(v) for k, v in doc["variables"].items()}
            texts[leg] = json.dumps(doc, separators=(",", ":"))
    raw = {leg: text.encode() for leg, text in texts.items()}
    made = []
    for start_us in starts_us:
        shift_s = start_us // 1_000_000 - _SAMPLE_T0_S

        def shifted(m: re.Match[bytes], shift_s: int = shift_s) -> bytes:
            secs = int(m[1])
            if abs(secs - _SAMPLE_T0_S) > 3600:
                return m[0]   # not one of the call's times (a counter, an SSRC)
            return str(secs + shift_s).encode() + (m[2] or b"")

        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        for leg in (_SAMPLE_A, _SAMPLE_B):
            body = _EPOCH_RE.sub(shifted, raw[leg]).replace(_SAMPLE_A.encode(), a.encode()).replace(
                _SAMPLE_B.encode(), b.encode())
            path = dest / f"{a if leg == _SAMPLE_A else b}.cdr.json"
            path.write_bytes(body + b"\n")
            end_s = start_us / 1_000_000 + 9
            os.utime(path, (end_s, end_s))
        made.append((a, b))
    return made


# ---------------------------------------------------------------------------------------------
# Helpers


def _next_packet(buf: bytes) -> tuple[tuple[str, dict[str, str], bytes] | None, bytes]:
    """read_packet(): leading blank lines skipped, command line, headers, blank line, body."""
    buf = buf.lstrip(b"\r\n")
    m = _PACKET_END_RE.search(buf)
    if not m:
        return None, buf
    lines = buf[: m.start()].decode("utf-8", "replace").replace("\r", "").split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.setdefault(name.strip().lower(), value.lstrip(" "))
    end = m.end()
    length = int(headers.get("content-length", "0") or 0)
    if len(buf) < end + length:
        return None, buf
    return (lines[0], headers, buf[end : end + length]), buf[end + length :]


def _split_api(text: str) -> tuple[str, str]:
    name, _, arg = text.strip().partition(" ")
    return name.strip(), arg.strip()


def _api_named(name: str, arg: str) -> dict[str, dict[str, str]]:
    """The command echo of an API event: API-Command-Argument only when there is one."""
    plain = f"API-Command: {fs_url_encode(name)}\n" if name else ""
    js = f',"API-Command":"{json_escape(name)}"' if name else ""
    if arg:
        plain += f"API-Command-Argument: {fs_url_encode(arg)}\n"
        js += f',"API-Command-Argument":"{json_escape(arg)}"'
    return {"plain": {"api": plain}, "json": {"api": js}}


def _job_named(name: str, arg: str, body: str) -> dict[str, dict[str, str]]:
    """The tail of a BACKGROUND_JOB (api_exec() in mod_event_socket.c) in both formats."""
    size = len(body.encode())
    plain = f"Job-Command: {fs_url_encode(name)}\n"
    js = f',"Job-Command":"{json_escape(name)}"'
    if arg:
        plain += f"Job-Command-Arg: {fs_url_encode(arg)}\n"
        js += f',"Job-Command-Arg":"{json_escape(arg)}"'
    plain += f"Content-Length: {size}\n\n{body}"
    js += f',"Content-Length":"{size}","_body":"{json_escape(body)}"'
    return {"plain": {"job": plain}, "json": {"job": js}}


def _cjson(obj: object) -> str:
    # cJSON_PrintUnformatted: no spaces, UTF-8 kept, '/' not escaped.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _filter_command(conn: _Conn, text: str) -> str:
    header_name = text.lstrip(" ")
    header_name, sep, header_val = header_name.partition(" ")
    val: str | None = header_val if sep else None
    if header_name.lower() == "delete" and val is not None:
        header_name, sep, rest = val.partition(" ")
        val = rest if sep else None
        if header_name.lower() == "all":
            conn.filters.clear()
        else:
            conn.filters = [
                (n, v)
                for n, v in conn.filters
                if not (n.lower() == header_name.lower() and (val is None or v == val))
            ]
        return f"+OK filter deleted. [{header_name}][{val or ''}]"
    if val is not None:
        if header_name.lower() == "add":
            header_name, sep, rest = val.partition(" ")
            val = rest if sep else None
        if val is not None:
            conn.filters.append((header_name, val))
        return f"+OK filter added. [{header_name}]=[{val if val is not None else '(null)'}]"
    return "-ERR invalid syntax"


_TEMPLATE_CACHE: dict[tuple[str, str], tuple[CompiledCapture, EventTemplate] | None] = {}


def _template_of(name: str, fmt: str) -> tuple[CompiledCapture, EventTemplate] | None:
    """A captured event of this name in this format, to stamp out standalone copies."""
    key = (name, fmt)
    if key not in _TEMPLATE_CACHE:
        found = None
        # Prefer the originate capture: its API and BACKGROUND_JOB belong together.
        names = sorted(scenario_names(), key=lambda n: n != "outbound_originate_answered")
        for scenario in names:
            for cap in load_scenario(scenario).captures():
                if cap.fmt != fmt:
                    continue
                idx = cap.job_index if name == "BACKGROUND_JOB" else cap.api_index if name == "API" else None
                if idx is None:
                    idx = next((e.index for e in cap.events if e.name == name), None)
                if idx is not None:
                    found = (cap, cap.events[idx])
                    break
            if found:
                break
        _TEMPLATE_CACHE[key] = found
    return _TEMPLATE_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Standalone


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.freeswitch",
        description="FreeSWITCH Event Socket simulator replaying real captures.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8021)
    parser.add_argument("--password", default="ClueCon")
    parser.add_argument(
        "--scenario", action="append", help=f"capture to play (repeatable): {', '.join(scenario_names())}"
    )
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--rate", type=float, default=None, help="calls started per second")
    parser.add_argument("--speed", type=float, default=1.0, help="1.0 recorded pacing; 0 as fast as possible")
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--once", action="store_true", help="exit after the calls instead of serving on")
    args = parser.parse_args(list(argv) if argv is not None else None)

    sim = FreeSwitchSimulator(password=args.password, host=args.host, port=args.port, heartbeat_interval=20.0)
    sim.start()
    print(f"FreeSWITCH simulator on {sim.host}:{sim.port} (Core-UUID {sim.core_uuid})", flush=True)
    try:
        print("waiting for a client to send `event ...`", flush=True)
        while True:
            try:
                sim.wait_for_subscriber(timeout=3600)
                break
            except TimeoutError:
                continue
        started = time.monotonic()
        played = sim.play_many(
            args.scenario or ["inbound_answered"], args.calls, rate=args.rate,
            concurrency=args.concurrency, speed=args.speed or None,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        events = sum(p.events for p in played)
        print(f"played {len(played)} calls, {events} events in {elapsed:.1f}s", flush=True)
        while not args.once:
            gevent.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
