"""Recordings kept open for a moment after an answer, shared by the answers that send them.

A browser seeking through a recording asks for it again and again, and a page of call history asks for
many at once. Opening, checking and closing the file was an eighth of the record proxy's CPU per
request; one lstat() now tells whether the descriptor already open still is the file under that name.

The descriptor can be shared because nothing uses its file position: os.sendfile and os.pread are given
explicit offsets. A file replaced or changed on disk (MP3 conversion, a re-recording) is opened afresh;
one deleted is released at its next request or after `keep_seconds` idle, so its disk space is not held.
"""

from __future__ import annotations

import os
import stat
import time
from collections import OrderedDict
from typing import Any

# O_NOFOLLOW: a symlink planted in the recordings dir is not followed out of it.
# O_NONBLOCK: a FIFO under that name cannot hang the greenlet (it is refused: not a regular file).
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class _Shared:
    __slots__ = ("fd", "identity", "last_used", "memo", "refs", "retired", "st")

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.memo: dict[str, Any] = {}
        self.st = st
        self.identity = _identity(st)
        self.refs = 0
        self.retired = False
        self.last_used = time.monotonic()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class Lease:
    """One answer's hold on an open file: what FileBody needs (fileno, close). close() is idempotent."""

    __slots__ = ("_owner", "_shared")

    def __init__(self, owner: OpenFiles, shared: _Shared) -> None:
        self._owner = owner
        self._shared: _Shared | None = shared
        shared.refs += 1

    def fileno(self) -> int:
        if self._shared is None:
            raise ValueError("lease already closed")
        return self._shared.fd

    @property
    def memo(self) -> dict[str, Any]:
        """What a reader derives from this file (its headers...), kept as long as the file is unchanged:
        a changed file is a new open file with an empty memo."""
        if self._shared is None:
            raise ValueError("lease already closed")
        return self._shared.memo

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            self._owner._release(shared)


class OpenFiles:
    """Regular files opened read-only by path, each kept open `keep_seconds` after its last use (at most
    `max_open` of them); keep_seconds=0 closes each when its last lease is closed."""

    def __init__(self, keep_seconds: float = 1.0, max_open: int = 64) -> None:
        self.keep_seconds = keep_seconds
        self.max_open = max_open
        self._files: OrderedDict[str, _Shared] = OrderedDict()
        self._timer: Any = None

    def open(self, path: str) -> tuple[Lease, os.stat_result] | None:
        """A lease on `path` and the stat of exactly the file it reads; None when `path` is not a regular
        file (a symlink, a directory, a FIFO). OSError as os.open raises it (FileNotFoundError...)."""
        cached = self._files.get(path)
        if cached is not None:
            try:
                st = os.lstat(path)
            except OSError:
                self._retire(path)
                raise
            if _identity(st) == cached.identity:
                cached.last_used = time.monotonic()
                self._files.move_to_end(path)
                return Lease(self, cached), cached.st
            self._retire(path)
        fd = os.open(path, _FLAGS)
        try:
            st = os.fstat(fd)  # of the file opened, whatever the name points at by now
        except BaseException:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        shared = _Shared(fd, st)
        lease = Lease(self, shared)
        if self.keep_seconds > 0:
            self._files[path] = shared
            while len(self._files) > self.max_open:
                self._retire(next(iter(self._files)))
            self._arm()
        else:
            shared.retired = True
        return lease, st

    def close_idle(self, now: float | None = None) -> None:
        """Close the files unused for keep_seconds (and not being sent)."""
        now = time.monotonic() if now is None else now
        idle = [path for path, shared in self._files.items()
                if shared.refs == 0 and now - shared.last_used >= self.keep_seconds]
        for path in idle:
            self._retire(path)
        if not self._files:
            self._disarm()

    def close(self) -> None:
        """Forget every file; those being sent close when their answer ends."""
        for path in list(self._files):
            self._retire(path)
        self._disarm()

    def __len__(self) -> int:
        return len(self._files)

    def _retire(self, path: str) -> None:
        shared = self._files.pop(path, None)
        if shared is not None:
            shared.retired = True
            if shared.refs == 0:
                os.close(shared.fd)

    def _release(self, shared: _Shared) -> None:
        shared.refs -= 1
        if shared.refs == 0:
            if shared.retired:
                os.close(shared.fd)
            else:
                shared.last_used = time.monotonic()

    def _arm(self) -> None:
        # A hub timer, not a greenlet: close_idle never blocks, and an idle proxy needs no wake-ups once
        # everything is closed (the timer stops with the last file).
        if self._timer is None:
            import gevent

            interval = max(0.05, self.keep_seconds / 2)
            self._timer = gevent.get_hub().loop.timer(interval, interval, ref=False)
            self._timer.start(self.close_idle)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None
