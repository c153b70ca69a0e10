"""What this process holds open, read from /proc: for tests that prove nothing leaks."""

from __future__ import annotations

import os
from pathlib import Path


def open_fds(path: Path) -> int:
    """How many of this process's file descriptors point at `path`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


def deleted_fds(under: Path) -> list[str]:
    """This process's descriptors on files below `under` that were deleted (their space not given back)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(" (deleted)") and target.startswith(f"{under}/"):
            found.append(target)
    return found
