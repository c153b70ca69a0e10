"""Managers' retailCRM statuses (free / busy / dinner / break), as the CRM sends them to changeUserStatusUrl.

Stored as one small JSON file, rewritten whole on each change through a temp file + fsync + os.replace:
there are a few dozen managers and a change is a human clicking a button, so sqlite would buy nothing but
a dependency on its locking and WAL files; the file stays readable and editable by an admin, and a crash
leaves either the old or the new file, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent
from gevent.lock import RLock

from fsbridge.config import EXTENSION_RE

log = logging.getLogger(__name__)

STATUSES = frozenset({"free", "busy", "dinner", "break"})
DEFAULT_STATUS = "free"  # what the CRM assumes of a manager it never told us about
USER_ID_RE = re.compile(r"[0-9]{1,20}")


class ManagerStatus:
    """Durable map extension code -> status. Safe to share between greenlets."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = RLock()
        self._entries: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            managers = data["managers"]
            return {
                code: dict(entry)
                for code, entry in managers.items()
                if EXTENSION_RE.fullmatch(code) and isinstance(entry, dict) and entry.get("status") in STATUSES
            }
        except (ValueError, KeyError, TypeError, AttributeError):
            # Starting with everyone "free" beats not starting; keep the bad file for a human to look at.
            aside = self.path.with_name(self.path.name + ".corrupt")
            log.error("manager status file %s is unreadable; moved aside to %s, starting empty",
                      self.path, aside.name)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return {}

    def _save(self) -> None:
        payload = json.dumps({"version": 1, "managers": self._entries}, indent=1, sort_keys=True).encode()
        # fsync blocks for milliseconds, and file I/O is not cooperative: do it in gevent's thread pool so
        # the event socket reader and the HTTP server keep running meanwhile.
        gevent.get_hub().threadpool.apply(self._write, (payload,))

    def _write(self, payload: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # The rename itself is durable only once the directory entry is on disk.
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def set(self, code: str, status: str, user_id: str | None = None) -> None:
        """Remember `status` for extension `code` (persisted before returning)."""
        if not isinstance(code, str) or EXTENSION_RE.fullmatch(code) is None:
            raise ValueError("manager code must be 1-16 digits")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}")
        if user_id is not None and USER_ID_RE.fullmatch(user_id) is None:
            raise ValueError("userId must be digits")
        with self._lock:
            old = self._entries.get(code)
            if old is not None and old.get("status") == status and old.get("userId") == user_id:
                return  # the CRM repeats itself; spare the disk
            entry: dict[str, Any] = {"status": status, "updated": int(time.time())}
            if user_id is not None:
                entry["userId"] = user_id
            # Memory first: if the disk write fails, routing still follows what the CRM said.
            self._entries[code] = entry
            self._save()
        log.info("manager %s is now %s", code, status)

    def get(self, code: str) -> str:
        entry = self._entries.get(code)
        return entry["status"] if entry is not None else DEFAULT_STATUS

    def is_free(self, code: str) -> bool:
        return self.get(code) == "free"

    def snapshot(self) -> dict[str, str]:
        """code -> status of every manager the CRM told us about."""
        return {code: entry["status"] for code, entry in self._entries.items()}
