"""The shared descriptors behind the record proxy: one open file per recording, never closed under a reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fsbridge.open_files import OpenFiles
from tests.procfs import open_fds


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_concurrent_answers_share_one_descriptor(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.wav", b"0123456789")
    files = OpenFiles(keep_seconds=60)
    (one, st), (two, _) = files.open(str(path)), files.open(str(path))  # type: ignore[misc]
    assert st.st_size == 10 and open_fds(path) == 1
    # Explicit offsets: one reader does not move the other.
    assert os.pread(one.fileno(), 3, 7) == b"789" and os.pread(two.fileno(), 3, 0) == b"012"
    one.close()
    one.close()  # idempotent
    with pytest.raises(ValueError):
        one.fileno()
    assert os.pread(two.fileno(), 2, 4) == b"45"
    two.close()
    files.close()
    assert open_fds(path) == 0


def test_evicted_file_stays_open_for_the_answer_reading_it(tmp_path: Path) -> None:
    paths = [_file(tmp_path, f"{i}.wav", bytes([65 + i]) * 4) for i in range(3)]
    files = OpenFiles(keep_seconds=60, max_open=2)
    reading, _ = files.open(str(paths[0]))  # type: ignore[misc]
    for p in paths[1:]:
        lease, _ = files.open(str(p))  # type: ignore[misc]
        lease.close()
    assert len(files) == 2 and open_fds(paths[0]) == 1  # evicted from the cache, not closed
    assert os.pread(reading.fileno(), 4, 0) == b"AAAA"
    reading.close()
    assert open_fds(paths[0]) == 0
    files.close()
    assert sum(open_fds(p) for p in paths) == 0


def test_idle_files_close_after_keep_seconds(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.wav", b"x")
    files = OpenFiles(keep_seconds=5)
    lease, _ = files.open(str(path))  # type: ignore[misc]
    files.close_idle(now=1e12)
    assert open_fds(path) == 1  # still being read: kept whatever its age
    lease.close()
    files.close_idle()
    assert open_fds(path) == 1  # used just now
    files.close_idle(now=1e12)
    assert open_fds(path) == 0 and len(files) == 0


def test_keep_seconds_zero_closes_with_the_last_lease(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.wav", b"x")
    files = OpenFiles(keep_seconds=0)
    lease, _ = files.open(str(path))  # type: ignore[misc]
    assert open_fds(path) == 1
    lease.close()
    assert open_fds(path) == 0 and len(files) == 0


def test_only_regular_files_are_opened(tmp_path: Path) -> None:
    target = _file(tmp_path, "outside.txt", b"secret")
    (tmp_path / "link.wav").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.wav")
    (tmp_path / "dir.wav").mkdir()
    files = OpenFiles()
    with pytest.raises(OSError):
        files.open(str(tmp_path / "link.wav"))  # O_NOFOLLOW
    assert files.open(str(tmp_path / "fifo.wav")) is None  # and it did not hang
    assert files.open(str(tmp_path / "dir.wav")) is None
    with pytest.raises(FileNotFoundError):
        files.open(str(tmp_path / "missing.wav"))
    assert len(files) == 0


def test_a_symlink_swapped_in_after_caching_is_not_followed(tmp_path: Path) -> None:
    path = _file(tmp_path, "a.wav", b"audio")
    target = _file(tmp_path, "outside.txt", b"secret")
    files = OpenFiles(keep_seconds=60)
    lease, _ = files.open(str(path))  # type: ignore[misc]
    lease.close()
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(OSError):
        files.open(str(path))
    assert open_fds(target) == 0
    files.close()
