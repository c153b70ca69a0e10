"""Call recordings on disk: `<recordings_dir>/<uuid>.wav` written by FreeSWITCH, optionally an MP3 beside it.

Paths are only ever built as `directory / f"{uuid}.{ext}"` after the uuid matched UUID_RE and ext the
allow-list, so no caller-supplied text can name another file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fsbridge.open_files import Lease, OpenFiles
from fsbridge.record_links import CONTENT_TYPES, EXTENSIONS, valid_record_id

log = logging.getLogger(__name__)

ENCODERS = ("auto", "lame", "ffmpeg")


@dataclass(slots=True)
class OpenRecording:
    """An opened recording; the caller owns `file` and must close it."""

    file: Lease
    size: int
    mtime: float
    mtime_ns: int
    content_type: str
    ext: str


# A RIFF/WAVE header with its chunks before the data: FreeSWITCH (libsndfile) writes 44 bytes, a LIST or
# fact chunk may add a few hundred. Past this the file is not one of FreeSWITCH's recordings.
_WAV_HEAD_MAX = 4096
_UNKNOWN_LENGTHS = (0, 0xFFFFFFFF)


def wav_header_fix(fd: int, size: int) -> bytes:
    """The repaired header of a WAV whose header claims no data, or b"" when it needs none.

    FreeSWITCH writes a recording's lengths into its header when it closes the file: a recording cut short by
    a FreeSWITCH crash (or still being written) says RIFF and data lengths of 0, and players then play
    nothing. The answer is the same bytes with the lengths the file really has; the file is not touched
    (fsbridge only reads recordings)."""
    head = os.pread(fd, min(size, _WAV_HEAD_MAX), 0)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return b""
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"data":
            data_start = pos + 8
            real = size - data_start
            if length not in _UNKNOWN_LENGTHS and data_start + length <= size:
                return b""   # a proper header (any bytes after the data are other chunks)
            fixed = bytearray(head[:data_start])
            fixed[4:8] = min(size - 8, 0xFFFFFFFF).to_bytes(4, "little")
            fixed[pos + 4:pos + 8] = min(real, 0xFFFFFFFF).to_bytes(4, "little")
            return bytes(fixed)
        pos += 8 + length + (length & 1)   # chunks are padded to an even length
    return b""


def _encoder_argv(encoder: str, src: Path, dst: Path, bitrate_kbps: int) -> list[str] | None:
    """argv for the first usable encoder, or None. Paths are absolute, so neither can look like an option."""
    candidates = ("lame", "ffmpeg") if encoder == "auto" else (encoder,)
    for name in candidates:
        exe = shutil.which(name)
        if exe is None:
            continue
        if name == "lame":
            return [exe, "--quiet", "--noreplaygain", "-b", str(bitrate_kbps), str(src), str(dst)]
        return [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(src),
                "-codec:a", "libmp3lame", "-b:a", f"{bitrate_kbps}k", "-f", "mp3", str(dst)]
    return None


def to_mp3(
    wav_path: str | os.PathLike[str],
    *,
    encoder: str = "auto",
    bitrate_kbps: int = 32,
    timeout: float = 120.0,
    keep_wav: bool = True,
) -> Path | None:
    """Encode `<x>.wav` to `<x>.mp3` beside it with lame or ffmpeg; the MP3's path, or None.

    None (and the WAV untouched) when no encoder is on PATH, it fails or times out. The MP3 is written
    under a temporary name and renamed, so the record proxy never serves half a file. The WAV is deleted
    only after a successful conversion and only if keep_wav is False.
    """
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
    src = Path(wav_path).absolute()
    try:
        mode = os.lstat(src).st_mode
    except OSError:
        mode = 0
    # lstat: a symlink planted under a recording's name is not encoded, as the proxy does not follow it.
    if src.suffix != ".wav" or not stat.S_ISREG(mode):
        log.warning("to_mp3: %s is not a WAV file", src.name)
        return None
    dst = src.with_suffix(".mp3")
    tmp = src.with_name(src.stem + ".mp3.part")
    argv = _encoder_argv(encoder, src, tmp, bitrate_kbps)
    if argv is None:
        log.info("to_mp3: no MP3 encoder (%s) on PATH, keeping %s", encoder, src.name)
        return None
    try:
        # The encoder writes to a file created here, not to whatever a planted name points at (unlink
        # removes a symlink itself, O_EXCL | O_NOFOLLOW refuse one put back meanwhile).
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640))
        # A list argv and no shell: the file name is never parsed by anything.
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0 or not tmp.is_file() or tmp.stat().st_size == 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            log.warning("to_mp3: %s failed on %s (exit %s): %s", Path(argv[0]).name, src.name,
                        proc.returncode, err[-1][:200] if err else "")
            return None
        os.replace(tmp, dst)
    except subprocess.TimeoutExpired:
        log.warning("to_mp3: %s timed out after %.0fs on %s", Path(argv[0]).name, timeout, src.name)
        return None
    except OSError as exc:
        log.warning("to_mp3: %s on %s: %s", Path(argv[0]).name, src.name, exc)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    if not keep_wav:
        src.unlink(missing_ok=True)
    return dst


_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _valid_subdir(subdir: str) -> bool:
    """"" or up to 8 allow-listed segments: a directory FreeSWITCH's dialplan names, never `..`."""
    if not subdir:
        return True
    parts = subdir.split("/")
    return len(parts) <= 8 and all(_SEGMENT.fullmatch(p) and ".." not in p for p in parts)


class Recordings:
    """The recordings directory.

    prefer_mp3: open() gives the MP3 when both exist. The encoder settings are used by to_mp3().
    keep_open_seconds: how long open() keeps a recording open after its last answer (see open_files.py).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        prefer_mp3: bool = False,
        encoder: str = "auto",
        bitrate_kbps: int = 32,
        convert_timeout: float = 120.0,
        keep_wav: bool = True,
        keep_open_seconds: float = 1.0,
    ) -> None:
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        self.directory = Path(directory)
        self._dir = os.fspath(self.directory)
        self.prefer_mp3 = prefer_mp3
        self.encoder = encoder
        self.bitrate_kbps = bitrate_kbps
        self.convert_timeout = convert_timeout
        self.keep_wav = keep_wav
        self._open_files = OpenFiles(keep_open_seconds)

    def wav_path(self, record_id: str, subdir: str = "") -> Path:
        """Where FreeSWITCH writes the recording of the leg `record_id` (`subdir`: from subdir_of())."""
        return self._path(record_id, "wav", subdir)

    def _path(self, record_id: str, ext: str, subdir: str = "") -> Path:
        if not valid_record_id(record_id) or ext not in EXTENSIONS or not _valid_subdir(subdir):
            raise ValueError("not a recording id / format")
        return (self.directory / subdir if subdir else self.directory) / f"{record_id}.{ext}"

    def subdir_of(self, path: str | None) -> str | None:
        """The directory under the recordings directory that a RECORD_STOP path names ("" for the directory
        itself, e.g. "acme.pbx.example.com/archive/2026/Dec/04" in FusionPBX's layout), or None when the path
        is not a recording of ours under it. Text only, every segment allow-listed: no `..`, no dot files."""
        if not path or not path.startswith(self._dir.rstrip("/") + "/"):
            return None
        parts = path[len(self._dir.rstrip("/")) + 1:].split("/")
        stem, dot, ext = parts.pop().rpartition(".")
        if not dot or not valid_record_id(stem) or ext not in EXTENSIONS:
            return None
        subdir = "/".join(parts)
        return subdir if _valid_subdir(subdir) else None

    def _order(self, wanted: str | None) -> list[str]:
        preferred = ["mp3", "wav"] if self.prefer_mp3 else ["wav", "mp3"]
        order = [wanted] if wanted in EXTENSIONS else []
        for ext in [*preferred, "ogg"]:
            if ext not in order:
                order.append(ext)
        return order

    def to_mp3(self, wav_path: str | os.PathLike[str]) -> Path | None:
        return to_mp3(wav_path, encoder=self.encoder, bitrate_kbps=self.bitrate_kbps,
                      timeout=self.convert_timeout, keep_wav=self.keep_wav)

    def open(self, record_id: str, ext: str | None = None, subdir: str = "") -> OpenRecording | None:
        """The recording of `record_id`, opened: format `ext` if it exists, else the preferred one (mp3 first when
        prefer_mp3), else any; None when there is none. The caller serves exactly the file it stat'ed, and
        closes `file`."""
        if not valid_record_id(record_id) or not _valid_subdir(subdir):
            return None
        where = f"{self._dir}/{subdir}" if subdir else self._dir
        for candidate in self._order(ext):
            # Plain strings, not pathlib: this runs for every request of the record proxy.
            path = f"{where}/{record_id}.{candidate}"
            try:
                opened = self._open_files.open(path)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("cannot open recording %s.%s: %s", record_id, candidate, exc.strerror)
                continue
            if opened is None:
                continue  # not a regular file
            lease, st = opened
            return OpenRecording(lease, st.st_size, st.st_mtime, st.st_mtime_ns, CONTENT_TYPES[candidate],
                                 candidate)
        return None

    def close(self) -> None:
        """Close the recordings kept open between requests."""
        self._open_files.close()
