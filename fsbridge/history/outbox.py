"""The durable outbox of finished calls: SQLite in WAL mode.

Every finished call is written here before anything is sent, and leaves the `pending` state only once
retailCRM has confirmed it (or refused it for good: `quarantined`, with the CRM's reason). A crash at
any moment therefore loses nothing and, because the CRM de-duplicates on `externalId`, a batch that
was delivered but not yet marked is merely re-sent and counted as a duplicate.

Why the write is a plain INSERT on the caller's path (the ESL reader), not handed to a writer thread:
- An INSERT committed in WAL mode with synchronous=NORMAL is in the WAL file, i.e. in the kernel's page
  cache, when execute() returns: it survives `kill -9` of fsbridge (not a power cut; `fsync=True`
  buys that with an fsync per call, ~6x the cost).
- It costs ~50 µs per call on the 2-core CI VM (bench/bench_upload.py), against ~700 µs to frame, parse
  and track the ~57 events of a call: at 100 calls/s that is 0.5 % of a core, and the reader's ceiling
  goes from ~1450 to ~1330 calls/s. What could stall the reader is a WAL checkpoint (fsyncs) run inside an
  unlucky commit, so the service turns SQLite's automatic checkpoints off and runs them from a worker
  thread (`checkpoint_interval`).
- A queue in front of a writer thread would take those ~50 µs off the reader, but make the write
  asynchronous: a call handed over and still in the queue dies with the process, the very loss the outbox
  exists to prevent. Not worth 8 % of a ceiling no PBX fsbridge serves comes near.
The connection is used from one OS thread (the gevent hub); SQLite calls never yield, so each statement
runs as one uninterrupted unit and a lock is only a guard against real threads. Nothing yields while
holding it (add() on the ESL reading path must never wait for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent

from fsbridge.background import give_way
from fsbridge.calls.model import FinishedCall

PENDING, SENT, QUARANTINED = 0, 1, 2
STATE_NAMES = {PENDING: "pending", SENT: "sent", QUARANTINED: "quarantined"}
SCHEMA_VERSION = 4

log = logging.getLogger("fsbridge.history")
MAX_REASON = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id          INTEGER PRIMARY KEY,       -- arrival order: the oldest call goes first
    external_id TEXT NOT NULL UNIQUE,      -- the CRM's de-duplication key; one row per call
    payload     TEXT NOT NULL,             -- the FinishedCall as JSON; the CRM entry is built when sent
    state       INTEGER NOT NULL DEFAULT 0,
    added       REAL NOT NULL,             -- time.time() when written
    updated     REAL,                      -- when sent / quarantined / re-queued
    reason      TEXT                       -- why the CRM refused it (quarantined)
);
-- Partial indexes, one per state: an INSERT (state 0) touches only the first, claiming walks only
-- pending rows however many sent ones are kept, and counting a state reads only its own index.
CREATE INDEX IF NOT EXISTS calls_pending ON calls(id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS calls_sent ON calls(updated) WHERE state = 1;
CREATE INDEX IF NOT EXISTS calls_quarantined ON calls(updated) WHERE state = 2;
"""
# Schema 2: the company a call belongs to (virtual PBX), so that each tenant's uploader claims its own calls
# and a tenant whose CRM is down holds back nobody else's. '' is the single company: rows of schema 1.
_TENANTS = """
ALTER TABLE calls ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS calls_pending_tenant ON calls(tenant, id) WHERE state = 0;
"""
# Schema 3: record links never expire, but delivered calls are purged after history.keep_sent_days; the
# purge keeps what a link needs to find its file (the RECORD_STOP path and the company: FusionPBX keeps
# recordings in per-domain directories), a hundred bytes a recorded call, never purged.
_RECORD_PATHS = """
CREATE TABLE IF NOT EXISTS record_paths (
    external_id TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    tenant      TEXT NOT NULL
) WITHOUT ROWID;
"""

# Schema 4: a company's own recent calls (its account page) without walking every other company's rows.
_TENANT_CALLS = """
CREATE INDEX IF NOT EXISTS calls_tenant ON calls(tenant, id);
"""

_FIELDS = tuple(f.name for f in dataclasses.fields(FinishedCall))
_FIELD_SET = frozenset(_FIELDS)


class OutboxError(Exception):
    """The outbox file cannot be used (unreadable, from a newer fsbridge, ...)."""


_VALUES = operator.attrgetter(*_FIELDS)
# A bound encoder and attrgetter: a third of the cost of the obvious dict comprehension + json.dumps,
# and this runs on the ESL reading path.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_call(call: FinishedCall) -> str:
    # Keys, not positions: a row must stay readable when FinishedCall gains or loses a field.
    return _ENCODE(dict(zip(_FIELDS, _VALUES(call), strict=True)))


def decode_call(text: str) -> FinishedCall:
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("payload is not an object")
    # Fields a later fsbridge added or dropped must not make old rows unreadable.
    known = {k: v for k, v in data.items() if k in _FIELD_SET}
    known["codes"] = tuple(known.get("codes") or ())
    known["legs"] = tuple(known.get("legs") or ())
    return FinishedCall(**known)


@dataclass(frozen=True, slots=True)
class Entry:
    """A claimed pending call."""

    row: int
    call: FinishedCall
    added: float


@dataclass(frozen=True, slots=True)
class Quarantined:
    row: int
    external_id: str
    call: FinishedCall | None      # None if the stored payload cannot be read back
    reason: str
    since: float


@dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    sent: int
    quarantined: int
    oldest_pending: float | None   # time.time() when the oldest pending call was written

    def oldest_pending_age(self, now: float | None = None) -> float | None:
        if self.oldest_pending is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.oldest_pending)


class Outbox:
    """One outbox file.

    checkpoint_interval: None leaves WAL checkpoints to SQLite, which runs them inside whichever commit
    crosses 1000 pages, fsyncs included: a stall of up to hundreds of ms for an unlucky add() on the ESL
    path. A number of seconds turns that off and runs a PASSIVE checkpoint that often from a worker thread
    (sqlite3 releases the GIL while it works), on a connection of its own. The service uses it; one-shot
    users (`fsbridge outbox`) need not.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False, busy_timeout: float = 0.5,
                 create: bool = True, checkpoint_interval: float | None = None) -> None:
        self.path = Path(path)
        self._next_purge = 0.0
        if not create and not self.path.exists():
            raise OutboxError(f"no outbox at {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Phone numbers are personal data; SQLite gives the -wal/-shm files the same mode.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
        try:
            # busy_timeout blocks the hub while another process (`fsbridge outbox --requeue`) holds the
            # write lock; its transactions are single statements, so a short wait is enough.
            self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"{self.path} was written by a newer fsbridge (schema {version})")
            if version < SCHEMA_VERSION:
                # One script, one transaction: two fsbridge processes starting together cannot both
                # half-create the schema.
                steps = (_SCHEMA if version < 1 else "") + (_TENANTS if version < 2 else "") + (
                    _RECORD_PATHS if version < 3 else "") + _TENANT_CALLS
                self._db.executescript(f"BEGIN IMMEDIATE;{steps}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
        except sqlite3.DatabaseError as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None
        self._lock = threading.Lock()
        # Rows handed to an uploader and not yet settled. Kept in memory on purpose: after a crash
        # nothing is in flight, so every unsettled row is simply pending again.
        self._inflight: set[int] = set()
        # Pending and quarantined rows, kept by this process's own writes: counting them at every /metrics
        # scrape took 57 ms of the hub with 1.5 million calls pending (a long CRM outage). Counted here,
        # and again only when another process has written to the file (levels()).
        self._pending = self._quarantined = self._data_version = 0
        with self._lock:
            self._recount()
        self._checkpointer: Any = None
        if checkpoint_interval is not None:
            self._start_checkpoints(checkpoint_interval, busy_timeout)

    def _start_checkpoints(self, interval: float, busy_timeout: float) -> None:
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        pool = gevent.get_hub().threadpool

        def checkpoint(path: Path) -> None:
            # A connection per run, opened and closed in the worker thread: nothing is shared with the
            # hub's thread, and close() never has to wait for a thread to let go of it.
            db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                db.close()

        def run() -> None:
            while True:
                gevent.sleep(interval)
                try:
                    pool.apply(checkpoint, (self.path,))
                except sqlite3.Error as exc:
                    log.warning("outbox checkpoint failed (the WAL file grows until one succeeds): %s", exc)

        self._checkpointer = gevent.spawn(run)

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.kill()
            self._checkpointer = None
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the producer side ---------------------------------------------------------------------

    def add(self, call: FinishedCall) -> bool:
        """Store a finished call; durable against a process kill when this returns.

        Idempotent on the call id: the same call reported twice (a reconnect, a replay) stays one row,
        and the first report wins, as it would in the CRM.
        """
        payload = encode_call(call)
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO calls (external_id, payload, added, tenant) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(external_id) DO NOTHING",
                (call.call_id, payload, time.time(), call.tenant))
            self._pending += cur.rowcount
        return cur.rowcount == 1

    def add_many(self, calls: Sequence[FinishedCall]) -> int:
        """Store calls in one transaction (calls recovered in bulk); how many were new."""
        now = time.time()
        rows = [(call.call_id, encode_call(call), now, call.tenant) for call in calls]
        added = 0
        with self._lock, self._transaction():
            for row in rows:
                added += self._db.execute(
                    "INSERT INTO calls (external_id, payload, added, tenant) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(external_id) DO NOTHING", row).rowcount
        self._pending += added
        return added

    # -- the uploader side ---------------------------------------------------------------------

    def claim(self, limit: int, tenant: str | None = None) -> list[Entry]:
        """Up to `limit` pending calls (of `tenant` only, unless None), oldest first, that no other claim
        holds."""
        if limit < 1:
            return []
        with self._lock:
            asked = limit + len(self._inflight)
            if tenant is None:
                rows = self._db.execute("SELECT id, payload, added FROM calls WHERE state = 0 ORDER BY id LIMIT ?",
                                        (asked,)).fetchall()
            else:
                rows = self._db.execute("SELECT id, payload, added FROM calls WHERE state = 0 AND tenant = ? "
                                        "ORDER BY id LIMIT ?", (tenant, asked)).fetchall()
            taken = [r for r in rows if r[0] not in self._inflight][:limit]
            self._inflight.update(r[0] for r in taken)
        # Decoded out of the lock, other greenlets running in between: a batch of 50 took ~1 ms in one go,
        # during which no event was read and no card sent. The rows are already this claim's.
        entries: list[Entry] = []
        broken: list[tuple[int, str]] = []
        try:
            for n, (row, payload, added) in enumerate(taken):
                if n % 10 == 9:
                    give_way()
                try:
                    entries.append(Entry(row, decode_call(payload), added))
                except (ValueError, TypeError) as exc:
                    broken.append((row, f"stored call unreadable: {exc}"))
            for row, reason in broken:
                self.quarantine([row], reason)
        except BaseException:
            # Killed meanwhile (a stop), or the file refused the quarantine (locked, disk full): the rows
            # stay pending and unclaimed, for the next claim.
            self.release(r[0] for r in taken)
            raise
        return entries

    def release(self, rows: Iterable[int]) -> None:
        """Give claimed rows back unchanged (the uploader is stopping)."""
        with self._lock:
            self._inflight.difference_update(rows)

    def mark_sent(self, rows: Sequence[int]) -> None:
        """The CRM confirmed these (stored or duplicate)."""
        self._settle(rows, SENT, None)

    def quarantine(self, rows: Sequence[int], reason: str) -> None:
        """The CRM refused these for good; kept with its reason until someone re-queues them."""
        self._settle(rows, QUARANTINED, reason[:MAX_REASON])

    def _settle(self, rows: Sequence[int], state: int, reason: str | None) -> None:
        if not rows:
            return
        marks = ",".join("?" * len(rows))
        with self._lock:
            # Only pending rows move: a row settled meanwhile by another process keeps its state.
            cur = self._db.execute(
                f"UPDATE calls SET state = ?, updated = ?, reason = ? WHERE state = 0 AND id IN ({marks})",
                (state, time.time(), reason, *rows))
            self._pending -= cur.rowcount
            if state == QUARANTINED:
                self._quarantined += cur.rowcount
            self._inflight.difference_update(rows)

    def purge_due(self, every: float) -> bool:
        """Whether a purge is due (then the next one is `every` seconds away): the uploaders sharing this
        file purge it once between them."""
        now = time.monotonic()
        if now < self._next_purge:
            return False
        self._next_purge = now + every
        return True

    def purge_sent(self, older_than: float, chunk: int = 1000) -> int:
        """Forget calls delivered more than `older_than` seconds ago.

        In chunks, with other greenlets run in between: SQLite does not yield, and an hour of delivered
        calls at 100 calls/s took a second to delete in one statement, a second of no events read."""
        cutoff = time.time() - older_than
        purged = 0
        while True:
            with self._lock, self._transaction():
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM calls WHERE state = 1 AND updated < ? LIMIT ?", (cutoff, chunk))]
                marks = ",".join("?" * len(ids))
                self._db.execute(
                    "INSERT OR IGNORE INTO record_paths (external_id, path, tenant) "
                    "SELECT external_id, json_extract(payload, '$.recording_path'), tenant FROM calls "
                    f"WHERE id IN ({marks}) AND json_extract(payload, '$.recording_path') IS NOT NULL", ids)
                deleted = self._db.execute(f"DELETE FROM calls WHERE id IN ({marks})", ids).rowcount
            purged += deleted
            if len(ids) < chunk:
                return purged
            give_way()

    # -- inspection and repair (`fsbridge outbox`) -----------------------------------------------

    def stats(self) -> Stats:
        """Counts per state, from the database (`fsbridge outbox`; the service reads levels())."""
        with self._lock:
            # One query per state, so that each is answered from its own partial index.
            pending, sent, quarantined = (
                self._db.execute(f"SELECT count(*) FROM calls WHERE state = {state}").fetchone()[0]
                for state in (PENDING, SENT, QUARANTINED))
            oldest = self._db.execute(
                "SELECT added FROM calls WHERE state = 0 ORDER BY id LIMIT 1").fetchone()
        return Stats(pending, sent, quarantined, oldest[0] if oldest else None)

    def oldest_pending(self, tenant: str | None = None) -> float | None:
        """time.time() when the oldest pending call (of `tenant`, unless None) was written; None if none waits."""
        with self._lock:
            if tenant is None:
                row = self._db.execute("SELECT added FROM calls WHERE state = 0 ORDER BY id LIMIT 1").fetchone()
            else:
                row = self._db.execute("SELECT added FROM calls WHERE state = 0 AND tenant = ? ORDER BY id LIMIT 1",
                                       (tenant,)).fetchone()
        return row[0] if row else None

    def pending_by_tenant(self) -> dict[str, int]:
        """Pending calls per tenant ('' the single company): `fsbridge tenants`, `fsbridge outbox`, /metrics."""
        with self._lock:
            rows = self._db.execute("SELECT tenant, count(*) FROM calls WHERE state = 0 GROUP BY tenant").fetchall()
        return dict(rows)

    def _moved_to_pending(self, count: int) -> None:
        self._pending += count
        self._quarantined = max(0, self._quarantined - count)

    def _recount(self) -> None:
        """Count from the file (caller holds the lock)."""
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self._pending, self._quarantined = (
            self._db.execute(f"SELECT count(*) FROM calls WHERE state = {state}").fetchone()[0]
            for state in (PENDING, QUARANTINED))

    def levels(self) -> tuple[int, int]:
        """(pending, quarantined) for metrics, scraped while calls flow: kept in memory, counted again only
        after another process wrote to the file (`fsbridge outbox --requeue`; SQLite's data_version)."""
        with self._lock:
            if self._db.execute("PRAGMA data_version").fetchone()[0] != self._data_version:
                self._recount()
            return self._pending, self._quarantined

    def pending(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM calls WHERE state = 0").fetchone()[0]

    def pending_here(self) -> int:
        """The pending calls of the company this outbox serves: all of them (a tenant's share,
        tenants.company.TenantOutbox, counts its own)."""
        return self.levels()[0]

    def pending_of(self, tenant: str) -> int:
        """Pending calls of one tenant (its own partial index: a company's backlog, not everybody's)."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM calls WHERE state = 0 AND tenant = ?",
                                    (tenant,)).fetchone()[0]

    def quarantined(self, limit: int | None = None, tenant: str | None = None) -> list[Quarantined]:
        """Quarantined calls (of `tenant` only, unless None), the longest refused first."""
        where = "state = 2" if tenant is None else "state = 2 AND tenant = ?"
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, external_id, payload, reason, updated FROM calls WHERE {where} "
                "ORDER BY updated, id LIMIT ?",
                (() if tenant is None else (tenant,)) + (-1 if limit is None else limit,)).fetchall()
        out = []
        for row, external_id, payload, reason, since in rows:
            try:
                call: FinishedCall | None = decode_call(payload)
            except (ValueError, TypeError):
                call = None
            out.append(Quarantined(row, external_id, call, reason or "", since or 0.0))
        return out

    def recent(self, limit: int, tenant: str | None = None) -> list[tuple[FinishedCall, int]]:
        """The newest `limit` calls (of `tenant` only, unless None; any state) with their state, newest first;
        unreadable payloads skipped."""
        where, args = ("", ()) if tenant is None else ("WHERE tenant = ? ", (tenant,))
        with self._lock:
            rows = self._db.execute(f"SELECT payload, state FROM calls {where}ORDER BY id DESC LIMIT ?",
                                    (*args, limit)).fetchall()
        out = []
        for payload, state in rows:
            try:
                out.append((decode_call(payload), state))
            except (ValueError, TypeError):
                continue
        return out

    def recording_of(self, external_id: str) -> tuple[str, str] | None:
        """(RECORD_STOP path, tenant) of a call, whether its row is still here or was purged; None if none."""
        with self._lock:
            row = self._db.execute(
                "SELECT json_extract(payload, '$.recording_path'), tenant FROM calls WHERE external_id = ? "
                "UNION ALL SELECT path, tenant FROM record_paths WHERE external_id = ? LIMIT 1",
                (external_id, external_id)).fetchone()
        return (row[0], row[1]) if row and isinstance(row[0], str) else None

    def known(self, external_ids: Iterable[str]) -> set[str]:
        """Which of these call ids the outbox holds, whatever their state (one indexed lookup each)."""
        ids = list(dict.fromkeys(external_ids))
        found: set[str] = set()
        for start in range(0, len(ids), 500):   # SQLite's limit on bound parameters
            chunk = ids[start:start + 500]
            with self._lock:
                rows = self._db.execute(
                    f"SELECT external_id FROM calls WHERE external_id IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall()
            found.update(r[0] for r in rows)
        return found

    def state_of(self, external_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM calls WHERE external_id = ?", (external_id,)).fetchone()
        return STATE_NAMES.get(row[0]) if row else None

    def requeue(self, external_ids: Iterable[str] | None = None) -> int:
        """Quarantined calls back to pending: those named, or all with None. Returns how many."""
        now = time.time()
        with self._lock:
            if external_ids is None:
                cur = self._db.execute(
                    "UPDATE calls SET state = 0, updated = ?, reason = NULL WHERE state = 2", (now,))
                self._moved_to_pending(cur.rowcount)
                return cur.rowcount
            count = 0
            with self._transaction():
                for external_id in dict.fromkeys(external_ids):
                    cur = self._db.execute(
                        "UPDATE calls SET state = 0, updated = ?, reason = NULL "
                        "WHERE state = 2 AND external_id = ?", (now, external_id))
                    count += cur.rowcount
            self._moved_to_pending(count)
            return count
