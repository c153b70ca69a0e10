"""FreeSWITCH's own record of finished channels: no call is lost while fsbridge is away.

mod_json_cdr, in its file mode, writes one JSON document per leg into its `log-dir` once the channel is
done (`<uuid>.cdr.json`; `a_<uuid>.cdr.json` with `prefix-a-leg`): FreeSWITCH keeps that record whether
fsbridge runs or not. This module reconciles fsbridge's history against it:

- a document is read once, presented to the call model as the events it reads (`legs.classify` and the
  tracker see the CDR's variables and caller profile under the event headers' names), and grouped with
  the documents of the legs it names (originator, bridge partner, originated legs, loopback twin, ...);
- a group whose legs all ended is replayed through a private CallTracker, which builds the very
  FinishedCall the live path would have built (same call id, so the outbox de-duplicates; no cards);
- a call already in the history (followed live) only marks its documents accounted for; one that is not,
  and whose legs fsbridge no longer follows, is recovered from them with its true outcome, talk time,
  manager and recording; a call the live path finished with a gap in its events waits here for its
  documents (its guess is written only if they never come);
- documents accounted for are remembered in a ledger (SQLite, storage.dir) and never read again; only
  they are ever deleted, `keep_days` after they were written (never, with 0).

Everything runs on the gevent hub, in small steps that give way to the ESL reader (background.give_way);
the directory is listed in a worker thread. Per-company things (which history a call goes to) are the
sink's business: the spool and the call model are shared.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import gevent
import gevent.event

from fsbridge.background import give_way
from fsbridge.calls.legs import Directory
from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.esl.protocol import digits
from fsbridge.record_links import valid_record_id

log = logging.getLogger("fsbridge.cdr")

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# mod_json_cdr.c: "%s%s.cdr.json" with the a_ prefix (prefix-a-leg); b_ accepted for other writers.
DOC_NAME_RE = re.compile(rf"(?:a_|b_)?({_UUID})\.cdr\.json")
_UUID_RE = re.compile(_UUID)
RECORD_EXTENSIONS = ("wav", "mp3")

# Variables that name other legs of the same call.
_REF_VARIABLES = ("originator", "originating_leg_uuid", "bridge_uuid", "signal_bond", "last_bridge_to",
                  "other_loopback_leg_uuid", "cc_member_session_uuid", "fifo_bridge_uuid", "originated_legs")
# Variables the call model reads from events (legs.classify, CallTracker._parent_of), as `variable_<name>`.
_EVENT_VARIABLES = ("sip_from_user", "dialed_user", "sip_gateway_name", "sip_gateway", "sofia_profile_name",
                    "originating_leg_uuid", "cc_member_session_uuid", "fifo_bridge_uuid",
                    "other_loopback_leg_uuid", "other_loopback_from_uuid",
                    # which company a leg is (tenants/attribution.py)
                    "domain_name", "dialed_domain", "sip_from_host", "sip_req_host", "sip_to_host")

# Ledger states of a document.
LIVE, RECOVERED, IGNORED, UNREADABLE = 1, 2, 3, 4
STATE_NAMES = {LIVE: "live", RECOVERED: "recovered", IGNORED: "ignored", UNREADABLE: "unreadable"}

# A document still being written (mod_json_cdr writes it in place, newline last) gets this long to be whole.
_WRITE_GRACE = 60.0
_SLICE = 0.002          # seconds of work between two give_way()s
_LIVE_DONE_MAX = 200_000
_BATCH = 50             # groups settled per history / ledger transaction (~5 ms of the hub)


class CdrError(ValueError):
    """A document that is not a mod_json_cdr leg record."""


class Incomplete(CdrError):
    """A document mod_json_cdr has not finished writing (no final newline, or not JSON yet)."""


@dataclass(slots=True)
class LegRecord:
    """What one CDR document says about its leg, in the call model's terms."""

    name: str                       # file name in the spool
    uuid: str
    headers: dict[str, str]         # as the CHANNEL_CREATE event would carry them
    refs: frozenset[str]            # other legs it names
    created_us: int
    rang_us: int                    # first progress / early media / answer; 0: never rang
    bridged_us: int                 # its (last) bridge; 0: never bridged
    partner: str                    # the leg it was (last) bridged to
    end_us: int
    cause: str
    record_path: str | None         # allow-listed and rebuilt under records.dir
    record_ms: str
    mtime: float


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _us(value: Any) -> int:
    text = _str(value)
    return int(text) if digits(text) else 0


def parse_document(text: str, name: str, records_dir: Path | None, mtime: float = 0.0) -> LegRecord:
    """One mod_json_cdr document -> LegRecord. Raises Incomplete while it is being written, CdrError if
    it is not a leg record. Values are read as mod_json_cdr writes them, URL-encoded or not (encode-values)."""
    if not text.endswith("\n"):
        raise Incomplete("no final newline yet")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise Incomplete(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("variables"), dict):
        raise CdrError("no variables object")
    raw_vars: dict[str, Any] = doc["variables"]
    # encode-values=true (mod_json_cdr's default) URL-encodes every variable (switch_url_encode: ' ' and ':'
    # among others); start_stamp, "Y-m-d H:M:S", is in every document.
    stamp = _str(raw_vars.get("start_stamp"))
    encoded = " " not in stamp and "%20" in stamp

    def var(key: str) -> str:
        value = _str(raw_vars.get(key))
        return unquote(value) if encoded and "%" in value else value

    channel_data = doc.get("channel_data")
    channel_data = channel_data if isinstance(channel_data, dict) else {}
    flows = [f for f in doc.get("callflow") or [] if isinstance(f, dict)]
    # callflow[0] is the channel's current profile, the last one its first: events at creation carried that.
    profile = flows[-1].get("caller_profile") if flows else None
    profile = profile if isinstance(profile, dict) else {}
    times = [f.get("times") for f in flows if isinstance(f.get("times"), dict)]
    uuid = var("uuid") or _str(profile.get("uuid"))
    match = DOC_NAME_RE.fullmatch(name)
    if not uuid or match is None or uuid.lower() != match[1].lower():
        raise CdrError(f"names channel {uuid[:40]!r}, not the one in its file name")

    def first(key: str) -> int:
        found = [_us(t.get(key)) for t in times]
        return min((v for v in found if v), default=0)

    def last(key: str) -> int:
        return max((_us(t.get(key)) for t in times), default=0)

    created = first("created_time") or _us(var("start_uepoch"))
    end = last("hangup_time") or _us(var("end_uepoch"))
    if not end:
        raise CdrError("no hangup time")
    created = created or end
    rang = min((v for v in (first("progress_time"), first("progress_media_time"), first("answered_time")) if v),
               default=0)
    partner = var("bridge_uuid") or var("last_bridge_to") or var("signal_bond")
    bridged = last("bridged_time") or _us(var("bridge_uepoch"))

    headers = {
        "Unique-ID": uuid,
        "Call-Direction": var("direction") or _str(channel_data.get("direction")),
        "Caller-Caller-ID-Number": _str(profile.get("caller_id_number")),
        "Caller-Destination-Number": _str(profile.get("destination_number")),
        "Caller-Username": _str(profile.get("username")),
        "Caller-Context": _str(profile.get("context")),
        "Caller-Channel-Created-Time": str(created),
        # legs.classify knows loopback/ halves by their channel name.
        "Channel-Name": var("channel_name"),
    }
    for key in _EVENT_VARIABLES:
        value = var(key)
        if value:
            headers[f"variable_{key}"] = value
    refs: set[str] = set()
    for key in _REF_VARIABLES:
        refs.update(_UUID_RE.findall(var(key)))
    originator = ""
    for flow in flows:
        cp = flow.get("caller_profile")
        if not isinstance(cp, dict):
            continue
        for side, listing in (("originator", "originator_caller_profiles"),
                              ("originatee", "originatee_caller_profiles")):
            group = cp.get(side)
            for other in (group.get(listing) if isinstance(group, dict) else None) or []:
                other_uuid = _str(other.get("uuid")) if isinstance(other, dict) else ""
                if _UUID_RE.fullmatch(other_uuid):
                    refs.add(other_uuid)
                    if side == "originator" and cp is profile and not originator:
                        originator = other_uuid
    originator = originator or var("originator")
    if originator:
        # What a b-leg's CHANNEL_CREATE says about the leg that originated it.
        headers["Other-Type"] = "originator"
        headers["Other-Leg-Unique-ID"] = originator
    refs.discard(uuid)
    ms = var("record_ms")
    if not digits(ms):
        seconds = var("record_seconds")
        ms = str(int(seconds) * 1000) if digits(seconds) else ""
    return LegRecord(name=name, uuid=uuid, headers=headers, refs=frozenset(refs), created_us=created,
                     rang_us=rang, bridged_us=bridged if partner else 0, partner=partner, end_us=end,
                     cause=var("hangup_cause"), record_path=_record_path(doc, var, records_dir),
                     record_ms=ms, mtime=mtime)


def _record_path(doc: dict[str, Any], var: Callable[[str], str], records_dir: Path | None) -> str | None:
    """The recording the leg started (record_session in its app log, or an execute_on_* variable), as
    `<records_dir>/<uuid>.<wav|mp3>`: only an allow-listed file name is kept, never the directory it names."""
    found: list[str] = []
    app_log = doc.get("app_log")
    apps = app_log.get("applications") if isinstance(app_log, dict) else None
    for app in apps if isinstance(apps, list) else []:
        if isinstance(app, dict) and _str(app.get("app_name")) == "record_session":
            found.append(_str(app.get("app_data")))
    for key in ("execute_on_answer", "execute_on_pre_answer", "execute_on_media", "execute_on_originate"):
        value = var(key)
        if value.startswith("record_session "):
            found.append(value[len("record_session "):])
    for data in reversed(found):
        words = data.split()
        if not words:
            continue
        stem, dot, ext = os.path.basename(words[0]).rpartition(".")
        if dot and valid_record_id(stem) and ext in RECORD_EXTENSIONS and records_dir is not None:
            return str(records_dir / f"{stem}.{ext}")
    return None


def replay(legs: Iterable[LegRecord], directory: Directory) -> list[FinishedCall]:
    """The customer calls these legs make, as the live call model would have closed them: their documents
    presented as the events it reads, in the order they happened. Cards go nowhere."""
    finished: list[FinishedCall] = []
    tracker = CallTracker(directory, on_event=lambda event: None, on_finished=finished.append)
    events: list[tuple[int, int, int, dict[str, str]]] = []
    for n, leg in enumerate(sorted(legs, key=lambda lg: (lg.created_us, "Other-Leg-Unique-ID" in lg.headers))):
        uuid = leg.uuid
        events.append((leg.created_us, 0, n, {**leg.headers, "Event-Name": "CHANNEL_CREATE"}))
        if leg.rang_us:
            events.append((leg.rang_us, 1, n, {"Event-Name": "CHANNEL_PROGRESS", "Unique-ID": uuid}))
        if leg.bridged_us:
            events.append((leg.bridged_us, 2, n, {
                "Event-Name": "CHANNEL_BRIDGE", "Unique-ID": uuid, "Bridge-A-Unique-ID": uuid,
                "Bridge-B-Unique-ID": leg.partner, "Event-Date-Timestamp": str(leg.bridged_us)}))
        if leg.record_path:
            events.append((leg.end_us, 3, n, {"Event-Name": "RECORD_STOP", "Unique-ID": uuid,
                                              "Record-File-Path": leg.record_path,
                                              "variable_record_ms": leg.record_ms}))
        events.append((leg.end_us, 4, n, {"Event-Name": "CHANNEL_HANGUP_COMPLETE", "Unique-ID": uuid,
                                          "Hangup-Cause": leg.cause, "variable_end_uepoch": str(leg.end_us)}))
    events.sort(key=lambda e: e[:3])
    for *_, event in events:
        tracker.handle(event)
    return [dataclasses.replace(call, source="cdr", gap=False) for call in finished]


class HistorySink(Protocol):
    """Where calls go: the call history (per company, later)."""

    def known(self, call_ids: list[str]) -> set[str]: ...      # which of these ids it already holds
    def record(self, calls: list[FinishedCall]) -> bool: ...   # True once all are durably held


class Ledger:
    """Documents accounted for (SQLite, its own file: the spool is shared, outboxes are per company)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self.path = path
        self._db = sqlite3.connect(path, timeout=0.5, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS docs (name TEXT PRIMARY KEY, uuid TEXT NOT NULL, call_id TEXT, "
            "state INTEGER NOT NULL, at REAL NOT NULL, mtime REAL NOT NULL)")
        self._db.execute("CREATE INDEX IF NOT EXISTS docs_uuid ON docs(uuid)")
        self._db.execute("CREATE INDEX IF NOT EXISTS docs_mtime ON docs(mtime)")

    def names(self) -> set[str]:
        return {row[0] for row in self._db.execute("SELECT name FROM docs")}

    def mark(self, rows: list[tuple[str, str, str, int, float]]) -> None:
        """(name, uuid, call_id, state, mtime) of documents now accounted for."""
        if rows:
            now = time.time()
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?, ?)",
                                     [(n, u, c, s, now, m) for n, u, c, s, m in rows])
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def call_of(self, uuids: Iterable[str]) -> str | None:
        """The call an accounted leg was part of, if any."""
        for uuid in uuids:
            row = self._db.execute("SELECT call_id FROM docs WHERE uuid = ? AND call_id != ''", (uuid,)).fetchone()
            if row:
                return str(row[0])
        return None

    def older_than(self, mtime: float, limit: int, after: tuple[float, str] = (float("-inf"), "")
                   ) -> list[tuple[str, int, float]]:
        """Rows older than `mtime`, in (mtime, name) order from just past `after`: pages that move on past rows
        kept, instead of finding the same ones again."""
        return self._db.execute(
            "SELECT name, state, mtime FROM docs WHERE mtime < ? AND (mtime > ? OR (mtime = ? AND name > ?)) "
            "ORDER BY mtime, name LIMIT ?", (mtime, after[0], after[0], after[1], limit)).fetchall()

    def forget(self, names: list[str]) -> None:
        if names:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM docs WHERE name = ?", [(n,) for n in names])
            self._db.execute("COMMIT")

    def states(self) -> dict[str, int]:
        return {STATE_NAMES.get(s, str(s)): n
                for s, n in self._db.execute("SELECT state, count(*) FROM docs GROUP BY state")}

    def close(self) -> None:
        self._db.close()


@dataclass
class SpoolStats:
    reads: int = 0              # documents opened and parsed
    recovered: int = 0          # calls written to the history from CDRs
    completed: int = 0          # calls finished live with a gap, completed from their CDRs
    guessed: int = 0            # gap calls whose documents never came: the live guess was written
    accounted: int = 0          # documents marked accounted for
    deleted: int = 0            # accounted documents removed after keep_days
    unreadable: int = 0
    passes: int = 0


class CdrSpool:
    """Reconciles the history against mod_json_cdr's directory. All methods run on the gevent hub.

    live(uuid): the live call model still follows this channel (its document is left to the live path).
    view_ready(): fsbridge is connected and has taken stock of FreeSWITCH's channels, so a leg it does
    not follow is not up (a document naming a missing leg waits until then).
    """

    def __init__(self, directory: Path, ledger_path: Path, calls: Directory, sink: HistorySink, *,
                 records_dir: Path | None, live: Callable[[str], bool], view_ready: Callable[[], bool],
                 keep_days: int = 2, poll_interval: float = 5.0, grace: float = 10.0,
                 gap_wait: float = 60.0) -> None:
        self.dir = directory
        self.calls = calls
        self.sink = sink
        self.records_dir = records_dir
        self.live = live
        self.view_ready = view_ready
        self.keep_days = keep_days
        self.poll_interval = poll_interval
        self.grace = grace              # a fresh document's call may still be closing on the live path
        self.gap_wait = gap_wait        # how long a gap call waits for its documents
        self.ledger = Ledger(ledger_path)
        self.stats = SpoolStats()
        self._accounted: set[str] = set()
        self._loaded = False
        # Legs of calls the live path wrote to the history: their documents need no reading.
        self._live_done: OrderedDict[str, str] = OrderedDict()
        # Calls finished live with a gap in their events, waiting for their documents: id -> (call, deadline).
        self._gap_calls: dict[str, tuple[FinishedCall, float]] = {}
        self._gap_legs: dict[str, str] = {}
        self._cache: dict[str, LegRecord] = {}       # parsed documents of groups still waiting
        self._greenlet: gevent.Greenlet | None = None
        self._wake = gevent.event.Event()
        self._next_cleanup = 0.0
        self._said: set[str] = set()                 # problems already logged once
        self._dir_mtime: int | None = None
        self._listed_at = 0.0
        self._waiting = False

    # -- from the live path (the ESL reading path: memory only) --

    def note_live(self, call: FinishedCall) -> None:
        """The live path wrote this call to the history: its legs' documents are accounted for."""
        for uuid in call.legs:
            self._live_done[uuid] = call.call_id
        while len(self._live_done) > _LIVE_DONE_MAX:
            self._live_done.popitem(last=False)

    def defer(self, call: FinishedCall) -> None:
        """A call finished live with a gap in its events: completed from its documents when they are there,
        or written as guessed after gap_wait."""
        self._gap_calls[call.call_id] = (call, time.monotonic() + self.gap_wait)
        for uuid in (call.call_id, *call.legs):
            self._gap_legs[uuid] = call.call_id
        self._wake.set()

    # -- lifecycle --

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        # Gap calls still waiting: their guess now rather than nothing, if the documents never come (the
        # next start finds those documents accounted for through the call's legs).
        for call, _ in list(self._gap_calls.values()):
            self._write_guess(call)
        self.ledger.close()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            # Apart: a failing pass must not stop the cleanup, nor the cleanup the passes.
            for step in (self.reconcile, self.cleanup):
                try:
                    step()
                    # Recovered: the next failure of this step is said again.
                    self._said = {k for k in self._said if not k.startswith(f"{step.__name__}:")}
                except Exception as exc:
                    self._say_once(f"{step.__name__}:{type(exc).__name__}",
                                   f"CDR {step.__name__} failed ({type(exc).__name__}: {exc}); retrying every "
                                   f"{self.poll_interval:.0f} s", logging.ERROR)
                    log.debug("CDR %s failed", step.__name__, exc_info=True)
            self._wake.clear()
            self._wake.wait(self.poll_interval)

    # -- one pass --

    def reconcile(self) -> int:
        """Account for every document that can be now; returns the calls written to the history."""
        self.stats.passes += 1
        if not self._loaded:
            self._accounted = self.ledger.names()
            self._loaded = True
        written = self._expire_gap_calls()
        names = self._list()
        if names is None:
            return written
        by_uuid: dict[str, str] = {}
        quick: list[tuple[str, str, str, int, float]] = []
        for name in names:
            uuid = DOC_NAME_RE.fullmatch(name)[1]  # type: ignore[index]
            call_id = self._live_done.get(uuid)
            if call_id is not None and uuid not in self._gap_legs:
                quick.append((name, uuid, call_id, LIVE, time.time()))
            else:
                by_uuid[uuid] = name
        self._account(quick)
        done: set[str] = set()
        ready: list[tuple[list[LegRecord], list[FinishedCall]]] = []
        started = time.monotonic()
        for uuid in list(by_uuid):
            if uuid in done:
                continue
            group = self._group(uuid, by_uuid, done)
            if group is not None and self._ready(*group):
                ready.append((group[0], replay(group[0], self.calls)))
                if len(ready) >= _BATCH:
                    written += self._settle(ready)
                    ready = []
            if time.monotonic() - started > _SLICE:
                give_way()
                started = time.monotonic()
        if ready:
            written += self._settle(ready)
        # Parsed documents of groups that no longer exist (accounted meanwhile) are dropped.
        for name in [n for n in self._cache if n in self._accounted]:
            del self._cache[name]
        return written

    def _list(self) -> list[str] | None:
        """Names of unaccounted documents, listed in a worker thread (a spool holds days of documents)."""
        try:
            st = os.stat(self.dir)
        except OSError as exc:
            self._say_once("dir", f"cannot read the CDR directory {self.dir} ({exc}); calls that end while "
                                  "fsbridge is away cannot be recovered until it can", logging.ERROR)
            return None
        # A directory's mtime moves in clock ticks: a document created in the same tick as the last listing
        # leaves it unchanged. So the shortcut holds for a minute at most.
        if (st.st_mtime_ns == self._dir_mtime and not self._waiting and not self._gap_calls
                and time.monotonic() - self._listed_at < 60.0):
            return []
        accounted = self._accounted

        def scan(path: Path) -> list[str]:
            return [n for n in os.listdir(path) if n not in accounted and DOC_NAME_RE.fullmatch(n)]

        try:
            names = gevent.get_hub().threadpool.apply(scan, (self.dir,))
        except OSError as exc:
            self._say_once("dir", f"cannot list the CDR directory {self.dir}: {exc}", logging.ERROR)
            return None
        self._said.discard("dir")
        # Unchanged since and nothing left unaccounted: nothing new to see at the next pass.
        self._dir_mtime = st.st_mtime_ns
        self._listed_at = time.monotonic()
        self._waiting = bool(names)
        return names

    def _read(self, name: str) -> LegRecord | None:
        """The document parsed (cached while its group waits); None while it is being written."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        path = os.path.join(self.dir, name)
        try:
            # Only what mod_json_cdr writes: a regular file, not a link to something else fsbridge may read.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, encoding="utf-8", errors="surrogateescape") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                text = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                self._say_once(f"read:{name}", f"cannot read CDR {name}: {exc}", logging.WARNING)
                return None
            leg, reason, mtime = None, "a symbolic link, not a file mod_json_cdr wrote", time.time()
        else:
            self.stats.reads += 1
            try:
                leg = parse_document(text, name, self.records_dir, mtime)
            except Incomplete:
                if time.time() - mtime < _WRITE_GRACE:
                    return None
                leg, reason = None, "never finished (no final newline or not JSON)"
            except CdrError as exc:
                leg, reason = None, str(exc)
            except Exception as exc:   # RecursionError, an odd shape: this document, not the whole spool
                leg, reason = None, f"cannot be read as one ({type(exc).__name__})"
        if leg is None:
            # Kept on disk (fsbridge deletes only what it accounted for), never read again.
            log.warning("CDR %s is not a usable mod_json_cdr document (%s); left in place", name, reason)
            self.stats.unreadable += 1
            match = DOC_NAME_RE.fullmatch(name)
            self._account([(name, match[1] if match else "", "", UNREADABLE, mtime)])
            return None
        self._cache[name] = leg
        return leg

    def _group(self, uuid: str, by_uuid: dict[str, str], done: set[str]
               ) -> tuple[list[LegRecord], set[str], set[str]] | None:
        """The documents of `uuid` and of every leg they name, transitively: (legs, missing, accounted)
        where missing names legs without a document and accounted those whose documents were accounted for."""
        legs: list[LegRecord] = []
        missing: set[str] = set()
        accounted: set[str] = set()
        todo = [uuid]
        seen = {uuid}
        complete = True
        while todo:
            current = todo.pop()
            name = by_uuid.get(current)
            if name is None:
                (accounted if self._is_accounted_uuid(current) else missing).add(current)
                continue
            done.add(current)
            leg = self._read(name)
            if leg is None:
                if name in self._accounted or not (self.dir / name).exists():
                    missing.add(current)    # unusable or gone: as if the leg had left no document
                else:
                    complete = False        # still being written
                continue
            legs.append(leg)
            for ref in leg.refs:
                if ref not in seen:
                    seen.add(ref)
                    todo.append(ref)
        if not complete or not legs:
            return None
        return legs, missing, accounted

    def _is_accounted_uuid(self, uuid: str) -> bool:
        return any(f"{p}{uuid}.cdr.json" in self._accounted for p in ("", "a_", "b_"))

    def _ready(self, legs: list[LegRecord], missing: set[str], accounted: set[str]) -> bool:
        """Whether the group can be settled now (late legs of a call settled already are accounted here)."""
        uuids = [leg.uuid for leg in legs]
        gap = any(u in self._gap_legs for u in uuids)
        if any(self.live(u) for u in (*uuids, *missing)):
            return False        # the live path still follows part of it
        if missing and not self.view_ready():
            return False        # a leg without a document may still be up: wait until fsbridge can tell
        if not gap and time.time() - max(leg.mtime for leg in legs) < self.grace:
            return False        # just written: the live path may be closing this call right now
        if accounted:
            # Late legs of a call accounted for already (a document that came after its call was settled).
            call_id = self.ledger.call_of(accounted) or ""
            if call_id:
                self._account([(leg.name, leg.uuid, call_id, LIVE, leg.mtime) for leg in legs])
                return False
        return True

    def _settle(self, ready: list[tuple[list[LegRecord], list[FinishedCall]]]) -> int:
        """Decide, write and account for a batch of groups: one history transaction, one ledger transaction."""
        ids = [i for _, calls in ready for call in calls for i in (call.call_id, *call.legs)]
        known = self.sink.known(ids) if ids else set()
        writes: list[FinishedCall] = []
        rows: list[tuple[str, str, str, int, float]] = []
        completed: list[tuple[str, FinishedCall]] = []     # (gap call id, its completed version)
        guesses: list[FinishedCall] = []
        for legs, calls in ready:
            call_of: dict[str, tuple[str, int]] = {}
            for call in calls:
                own = (call.call_id, *call.legs)
                seen = next((i for i in own if i in known), None)
                if seen is None:
                    seen = next((self._live_done[i] for i in own if i in self._live_done), None)
                if seen is not None:
                    state, call_id = LIVE, seen
                else:
                    gap_id = next((self._gap_legs[i] for i in own if i in self._gap_legs), None)
                    if gap_id is not None:
                        # Completed from FreeSWITCH's record, under the id its cards carried.
                        call = dataclasses.replace(call, call_id=gap_id)
                        completed.append((gap_id, call))
                    writes.append(call)
                    state, call_id = RECOVERED, call.call_id
                for uuid in own:
                    call_of[uuid] = (call_id, state)
            for gap_id in {self._gap_legs[leg.uuid] for leg in legs if leg.uuid in self._gap_legs}:
                if gap_id in self._gap_calls and all(gap_id != c for c, _ in call_of.values()):
                    guesses.append(self._gap_calls[gap_id][0])   # its documents make no customer call
            rows += [(leg.name, leg.uuid, *call_of.get(leg.uuid, ("", IGNORED)), leg.mtime) for leg in legs]
        if writes and not self.sink.record(writes):
            return 0            # not durable: nothing accounted for, tried again at the next pass
        gap_ids = {gap_id for gap_id, _ in completed}
        for gap_id, call in completed:
            self._forget_gap(gap_id)
            log.info("call %s completed from FreeSWITCH's CDRs (%s, %d s of talk)", gap_id, call.result,
                     call.duration)
        recovered = [c for c in writes if c.call_id not in gap_ids]
        for call in recovered:
            log.info("call %s recovered from FreeSWITCH's CDRs: it ended while fsbridge was away (%s)",
                     call.call_id, call.result)
        self.stats.completed += len(completed)
        self.stats.recovered += len(recovered)
        for call in guesses:
            self._write_guess(call)
        self._account(rows)
        return len(writes)

    def _account(self, rows: list[tuple[str, str, str, int, float]]) -> None:
        if not rows:
            return
        self.ledger.mark(rows)
        for name, *_ in rows:
            self._accounted.add(name)
            self._cache.pop(name, None)
        self.stats.accounted += len(rows)

    # -- gap calls --

    def _forget_gap(self, call_id: str) -> None:
        entry = self._gap_calls.pop(call_id, None)
        if entry is not None:
            for uuid in (call_id, *entry[0].legs):
                if self._gap_legs.get(uuid) == call_id:
                    del self._gap_legs[uuid]

    def _write_guess(self, call: FinishedCall) -> bool:
        if not self.sink.record([call]):
            return False
        self._forget_gap(call.call_id)
        self.note_live(call)
        self.stats.guessed += 1
        return True

    def _expire_gap_calls(self) -> int:
        now = time.monotonic()
        written = 0
        for call_id, (call, deadline) in list(self._gap_calls.items()):
            if now >= deadline:
                log.warning("call %s: no CDR of it in %s after %.0f s; its history entry is what fsbridge saw",
                            call_id, self.dir, self.gap_wait)
                written += self._write_guess(call)
        return written

    # -- cleanup --

    def cleanup(self, now: float | None = None) -> int:
        """Delete accounted documents older than keep_days (hourly); forget ledger rows of documents gone."""
        now = time.time() if now is None else now
        if time.monotonic() < self._next_cleanup:
            return 0
        self._next_cleanup = time.monotonic() + 3600.0
        age = max(self.keep_days, 1) * 86400.0
        deleted = 0
        after: tuple[float, str] = (float("-inf"), "")
        while True:
            rows = self.ledger.older_than(now - age, 500, after)
            if not rows:
                break
            after = (rows[-1][2], rows[-1][0])
            gone: list[str] = []
            stuck = False
            for name, state, _mtime in rows:
                path = self.dir / name
                if self.keep_days and state != UNREADABLE:
                    try:
                        path.unlink()
                        deleted += 1
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        self._say_once("unlink", f"cannot delete accounted CDR documents in {self.dir} ({exc}); "
                                       "give fsbridge write access to it, or set freeswitch.cdr_keep_days: 0 "
                                       "and clean it yourself", logging.WARNING)
                        stuck = True
                        break
                elif path.exists():
                    continue    # kept: its ledger row keeps it from being read again
                gone.append(name)
            self.ledger.forget(gone)
            for name in gone:
                self._accounted.discard(name)
            if stuck or len(rows) < 500:
                break
            give_way()
        self.stats.deleted += deleted
        return deleted

    def _say_once(self, key: str, message: str, level: int) -> None:
        if key not in self._said:
            self._said.add(key)
            log.log(level, "%s", message)
