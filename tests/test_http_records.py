"""The record proxy over real HTTP: Range, conditionals, signatures, traversal, streaming, disconnects."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

import gevent
import pytest
import requests

from fsbridge.http import HttpServer, Router
from fsbridge.http.records import RecordsHandler, parse_range
from fsbridge.record_links import RecordLinks
from fsbridge.recordings import Recordings
from tests.procfs import deleted_fds, open_fds
from tests.waiting import until

REC_ID = "31ff8abf-a4ac-4f83-a050-5a0db45e0c55"
MISSING_ID = "00000000-1111-2222-3333-444444444444"
BIG_ID = "b16b16b1-6b16-4b16-8b16-b16b16b16b16"
SECRET_TEXT = b"TOP-SECRET-NOT-A-RECORDING"
BIG_SIZE = 50 * 1024 * 1024


@dataclass
class Env:
    base: str
    links: RecordLinks
    rec_dir: Path
    secret_file: Path
    data: bytes
    server: HttpServer

    def url(self, record_id: str = REC_ID, ext: str = "wav") -> str:
        return self.base + self.links.path(record_id, ext)


def _start(tmp_path: Path, fixtures_dir: Path, *, zero_copy: bool = True, prefer_mp3: bool = False,
           accel: str | None = None) -> Iterator[Env]:
    rec_dir = tmp_path / "recordings"
    rec_dir.mkdir()
    src = fixtures_dir / "recordings" / f"{REC_ID}.wav"
    shutil.copy(src, rec_dir)
    # The file an attacker wants: right next to the recordings directory.
    secret_file = tmp_path / "secret.txt"
    secret_file.write_bytes(SECRET_TEXT)
    (rec_dir / "secret.txt").write_bytes(SECRET_TEXT)
    links = RecordLinks("https://pbx.example.com", "k" * 32)
    router = Router()
    RecordsHandler(links, Recordings(rec_dir, prefer_mp3=prefer_mp3), accel_redirect_prefix=accel,
                   chunk_size=64 * 1024).register(router)
    server = HttpServer("127.0.0.1:0", router, zero_copy=zero_copy, timeout=10)
    server.start()
    host, port = server.address
    try:
        yield Env(f"http://{host}:{port}", links, rec_dir, secret_file, src.read_bytes(), server)
    finally:
        server.stop(timeout=0.2)


@pytest.fixture(params=[True, False], ids=["sendfile", "chunked-read"])
def env(request: pytest.FixtureRequest, tmp_path: Path, fixtures_dir: Path) -> Iterator[Env]:
    yield from _start(tmp_path, fixtures_dir, zero_copy=request.param)


def raw_get(env: Env, target: str, extra: str = "", method: str = "GET") -> tuple[int, bytes, bytes]:
    """Send a request line exactly as given (no client-side normalisation of `..` or `%2e`)."""
    host, port = env.server.address
    with socket.create_connection((host, port), timeout=5) as s:
        request = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
        s.sendall(request.encode("latin-1"))
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, head, body


# --- full answers ------------------------------------------------------------------------------------


def test_full_get_is_byte_identical_with_headers(env: Env) -> None:
    r = requests.get(env.url())
    assert r.status_code == 200
    assert r.content == env.data
    assert r.headers["Content-Type"] == "audio/wav"
    assert r.headers["Content-Length"] == str(len(env.data))
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Cache-Control"] == "private"
    assert r.headers["ETag"].startswith('"')
    st = (env.rec_dir / f"{REC_ID}.wav").stat()
    assert r.headers["Last-Modified"] == formatdate(st.st_mtime, usegmt=True)


def test_keep_alive_serves_several_answers_on_one_connection(env: Env) -> None:
    with requests.Session() as s:
        for rng in ("bytes=0-9", None, "bytes=-3"):
            r = s.get(env.url(), headers={"Range": rng} if rng else {})
            assert r.ok
        assert r.content == env.data[-3:]


def test_unknown_query_parameters_are_ignored(env: Env) -> None:
    for query in ("?clientId=whatever&utm_source=crm", "?a=1&a=2", "?%ff%fe=%00", "?" + "x" * 2000):
        r = requests.get(env.url() + query)
        assert r.status_code == 200, query
        assert r.content == env.data


def test_head_sends_headers_only(env: Env) -> None:
    r = requests.head(env.url())
    assert r.status_code == 200
    assert r.headers["Content-Length"] == str(len(env.data))
    assert r.headers["Content-Type"] == "audio/wav"
    status, head, body = raw_get(env, env.links.path(REC_ID), method="HEAD")
    assert status == 200 and body == b""
    # Range is defined for GET only: HEAD describes the whole file.
    status, head, body = raw_get(env, env.links.path(REC_ID), "Range: bytes=0-9\r\n", method="HEAD")
    assert status == 200 and body == b"" and b"Content-Length: %d" % len(env.data) in head


def test_post_is_refused(env: Env) -> None:
    r = requests.post(env.url(), data=b"x")
    assert r.status_code == 405
    assert "GET" in r.headers["Allow"]


# --- ranges ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=0-0", 0, 0),
        ("bytes=100-", 100, None),
        ("bytes=-500", -500, None),
        ("bytes=1000-2000", 1000, 2000),
        ("bytes=263000-999999999", 263000, None),
        ("BYTES = 10 - 20", 10, 20),
    ],
)
def test_single_ranges(env: Env, header: str, first: int, last: int | None) -> None:
    size = len(env.data)
    r = requests.get(env.url(), headers={"Range": header})
    assert r.status_code == 206
    start = first if first >= 0 else size + first
    end = size - 1 if last is None else last
    assert r.content == env.data[start:end + 1]
    assert r.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
    assert r.headers["Content-Length"] == str(end - start + 1)
    assert r.headers["Content-Type"] == "audio/wav"


def test_suffix_longer_than_file_is_whole_file(env: Env) -> None:
    r = requests.get(env.url(), headers={"Range": "bytes=-999999999999"})
    assert r.status_code == 206
    assert r.content == env.data
    assert r.headers["Content-Range"] == f"bytes 0-{len(env.data) - 1}/{len(env.data)}"


@pytest.mark.parametrize("header", ["bytes=999999999-", "bytes=263724-", "bytes=-0",
                                    "bytes=" + "9" * 5000 + "-"])
def test_unsatisfiable_range_is_416(env: Env, header: str) -> None:
    r = requests.get(env.url(), headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(env.data)}"


@pytest.mark.parametrize("header", ["bytes=5-1", "items=0-5", "bytes=abc", "bytes=0-5,10-20", "bytes=--5",
                                    "bytes=１-２"])
def test_invalid_or_multi_range_gets_full_200(env: Env, header: str) -> None:
    r = requests.get(env.url(), headers={"Range": header.encode()})
    assert r.status_code == 200
    assert r.content == env.data


def test_parse_range_unit() -> None:
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=-5", 0) == "unsatisfiable"
    assert parse_range("bytes=-5", 3) == (0, 2)
    assert parse_range("bytes=2-2", 3) == (2, 2)
    assert parse_range("bytes=3-3", 3) == "unsatisfiable"
    assert parse_range("bytes=0-1, 2-3", 10) is None


# --- conditionals ------------------------------------------------------------------------------------


def test_etag_and_last_modified_give_304(env: Env) -> None:
    first = requests.get(env.url())
    etag, lm = first.headers["ETag"], first.headers["Last-Modified"]
    for headers in ({"If-None-Match": etag}, {"If-None-Match": f'"nope", W/{etag}'}, {"If-None-Match": "*"},
                    {"If-Modified-Since": lm}):
        r = requests.get(env.url(), headers=headers)
        assert r.status_code == 304, headers
        assert r.content == b""
        assert r.headers["ETag"] == etag
    # If-None-Match decides alone when present, even with a matching date.
    r = requests.get(env.url(), headers={"If-None-Match": '"other"', "If-Modified-Since": lm})
    assert r.status_code == 200 and r.content == env.data
    r = requests.get(env.url(), headers={"If-Modified-Since": "Mon, 01 Jan 2001 00:00:00 GMT"})
    assert r.status_code == 200
    r = requests.get(env.url(), headers={"If-Modified-Since": "garbage"})
    assert r.status_code == 200
    r = requests.head(env.url(), headers={"If-None-Match": etag})
    assert r.status_code == 304


def test_if_range(env: Env) -> None:
    first = requests.get(env.url())
    etag, lm = first.headers["ETag"], first.headers["Last-Modified"]
    r = requests.get(env.url(), headers={"Range": "bytes=10-19", "If-Range": etag})
    assert r.status_code == 206 and r.content == env.data[10:20]
    r = requests.get(env.url(), headers={"Range": "bytes=10-19", "If-Range": lm})
    assert r.status_code == 206
    for stale in ('"stale"', f"W/{etag}", "Mon, 01 Jan 2001 00:00:00 GMT", "junk"):
        r = requests.get(env.url(), headers={"Range": "bytes=10-19", "If-Range": stale})
        assert r.status_code == 200 and r.content == env.data, stale
    # A changed file gets a new validator, so the old one no longer fetches a range of the new bytes.
    path = env.rec_dir / f"{REC_ID}.wav"
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    r = requests.get(env.url(), headers={"Range": "bytes=10-19", "If-Range": etag})
    assert r.status_code == 200
    assert r.headers["ETag"] != etag


# --- authorisation -----------------------------------------------------------------------------------


def test_wrong_signature_is_403(env: Env) -> None:
    path = env.links.path(REC_ID)
    sig = path.split("/")[2]
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    other_case = sig.lower() if sig.lower() != sig else sig.upper()
    for bad in (flipped, sig[:-1], sig + "A", "x" * 22, "", other_case):
        r = requests.get(f"{env.base}/records/{bad}/{REC_ID}.wav")
        assert r.status_code == 403, bad
        assert r.content != env.data


def test_missing_signature_is_403(env: Env) -> None:
    assert requests.get(f"{env.base}/records/{REC_ID}.wav").status_code == 403


def test_signature_of_another_id_or_format_is_403(env: Env) -> None:
    other_sig = env.links.path(MISSING_ID).split("/")[2]
    assert requests.get(f"{env.base}/records/{other_sig}/{REC_ID}.wav").status_code == 403
    mp3_sig = env.links.path(REC_ID, "mp3").split("/")[2]
    assert requests.get(f"{env.base}/records/{mp3_sig}/{REC_ID}.wav").status_code == 403
    foreign = RecordLinks("https://pbx.example.com", "another-secret-of-32-characters!")
    assert requests.get(env.base + foreign.path(REC_ID)).status_code == 403


def test_signed_but_absent_recording_is_404(env: Env) -> None:
    assert requests.get(env.url(MISSING_ID)).status_code == 404
    assert requests.head(env.url(MISSING_ID)).status_code == 404


def test_other_format_of_same_recording_is_served_when_the_asked_one_is_gone(env: Env) -> None:
    # A link stored as .mp3 keeps working if only the WAV is left (or the other way round).
    r = requests.get(env.url(REC_ID, "mp3"))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "audio/wav"
    assert r.content == env.data


def test_content_types_per_format(tmp_path: Path, fixtures_dir: Path) -> None:
    for env in _start(tmp_path, fixtures_dir, prefer_mp3=True):
        (env.rec_dir / f"{REC_ID}.mp3").write_bytes(b"ID3fake-mp3")
        (env.rec_dir / f"{MISSING_ID}.ogg").write_bytes(b"OggSfake")
        r = requests.get(env.url(REC_ID, "mp3"))
        assert r.headers["Content-Type"] == "audio/mpeg" and r.content == b"ID3fake-mp3"
        r = requests.get(env.url(REC_ID, "wav"))
        assert r.headers["Content-Type"] == "audio/wav" and r.content == env.data
        r = requests.get(env.url(MISSING_ID, "ogg"))
        assert r.headers["Content-Type"] == "audio/ogg" and r.content == b"OggSfake"


# --- traversal ---------------------------------------------------------------------------------------


def test_traversal_attempts_never_leave_the_directory(env: Env) -> None:
    sig = env.links.path(REC_ID).split("/")[2]
    # Even a correct HMAC over a hostile "id" must not help: the id allow-list runs first.
    forged = env.links._mac(env.links._keys[0], "../secret", "txt")
    forged2 = env.links._mac(env.links._keys[0], "secret", "txt")
    targets = [
        "/records/../secret.txt",
        "/records/../../secret.txt",
        f"/records/{sig}/../secret.txt",
        f"/records/{sig}/../../secret.txt",
        f"/records/{forged}/../secret.txt",
        f"/records/{forged2}/secret.txt",
        "/records/%2e%2e/secret.txt",
        f"/records/{sig}/%2e%2e%2fsecret.txt",
        f"/records/{sig}/%2e%2e%2f%2e%2e%2fsecret.txt",
        f"/records/{sig}/..%2f..%2fsecret.txt",
        f"/records/{sig}/%252e%252e%252fsecret.txt",
        f"/records/{sig}/{REC_ID}.wav/../../secret.txt",
        f"/records/{sig}/{tmp_abs(env)}",
        f"/records/{sig}/%2f{tmp_abs(env)[1:].replace('/', '%2f')}",
        f"/records/{sig}//etc/passwd",
        f"/records/{sig}/{REC_ID}.wav%00.txt",
        f"/records/{sig}/{REC_ID}%00.wav",
        f"/records/{sig}/..\\..\\secret.txt",
        f"/records/{sig}/..%5c..%5csecret.txt",
        f"/records/{sig}\\..\\secret.txt",
        f"/records/{sig}/{REC_ID.upper()}.wav",
        f"/records/{sig}/{REC_ID * 50}.wav",
        f"/records/{sig}/{'a' * 7000}.wav",
        f"/records/{sig}/{REC_ID}.WAV",
        f"/records/{sig}/{REC_ID}.txt",
        f"/records/{sig}/{REC_ID}.wav.txt",
        f"/records/{sig}/{REC_ID}",
        f"/records/{sig}/ {REC_ID}.wav",
        f"/records/{sig}/{REC_ID}.wav%0a",
        f"/records/{sig}/%c0%ae%c0%ae/secret.txt",
        f"/records/{sig}/secret.txt",
        "/records/",
        "/records",
        f"http://evil/records/{sig}/../../secret.txt",
    ]
    for target in targets:
        status, _, body = raw_get(env, target)
        assert status in (400, 403, 404, 414), (target, status)
        assert SECRET_TEXT not in body, target


def tmp_abs(env: Env) -> str:
    return str(env.secret_file)


def test_symlink_planted_in_the_directory_is_not_followed(env: Env) -> None:
    planted = "abcdefab-cdef-4abc-8def-abcdefabcdef"
    (env.rec_dir / f"{planted}.wav").symlink_to(env.secret_file)
    r = requests.get(env.url(planted))
    assert r.status_code == 404
    assert SECRET_TEXT not in r.content


def test_access_log_hides_signature_and_query(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fsbridge.http")
    url = env.url()
    sig = url.split("/")[4]
    requests.get(url + "?clientId=very-secret-client-id")
    raw_get(env, "/records/%0d%0aFAKE?clientId=very-secret-client-id")
    raw_get(env, "/no?clientId=very-secret-client-id", method="BR OKEN")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"/records/*/{REC_ID}.wav 200" in text
    assert "very-secret-client-id" not in text
    assert sig not in text
    assert "\nFAKE" not in text and "\r" not in text


# --- accel-redirect mode -----------------------------------------------------------------------------


def test_accel_redirect_mode(tmp_path: Path, fixtures_dir: Path) -> None:
    for env in _start(tmp_path, fixtures_dir, accel="/_records/"):
        r = requests.get(env.url())
        assert r.status_code == 200
        assert r.headers["X-Accel-Redirect"] == f"/_records/{REC_ID}.wav"
        assert r.headers["Content-Type"] == "audio/wav"
        assert r.content == b""
        assert requests.get(env.url(MISSING_ID)).status_code == 404
        assert requests.get(f"{env.base}/records/{'x' * 22}/{REC_ID}.wav").status_code == 403
        # A recording cut short by a FreeSWITCH crash: nginx would send its header as it is (no data: the
        # player plays silence), so fsbridge serves that one itself, repaired.
        _crashed_copy(env)
        crashed = requests.get(env.url(CRASHED_ID))
        assert "X-Accel-Redirect" not in crashed.headers
        assert crashed.status_code == 200 and crashed.content == env.data
        part = requests.get(env.url(CRASHED_ID), headers={"Range": "bytes=0-43"})
        assert part.status_code == 206 and part.content == env.data[:44]


# --- streaming and resources -------------------------------------------------------------------------


def _assert_released(path: Path, within: float = 5.0) -> None:
    """No descriptor on `path` is left once the answers are over (recordings stay open ~1 s for reuse)."""
    until(lambda: open_fds(path) == 0, timeout=within, what=f"no descriptor left on {path.name}")


def test_replaced_recording_is_served_afresh(env: Env) -> None:
    path = env.rec_dir / f"{REC_ID}.wav"
    with requests.Session() as s:
        first = s.get(env.url())
        assert first.content == env.data
        # Replaced under the same name (a re-encode written beside it and renamed over it).
        tmp = env.rec_dir / "new.part"
        tmp.write_bytes(b"RIFF-new-content")
        os.replace(tmp, path)
        second = s.get(env.url())
        assert second.content == b"RIFF-new-content"
        assert second.headers["ETag"] != first.headers["ETag"]
        # Changed in place: the new length is served, not the old one.
        with open(path, "ab") as f:
            f.write(b"+more")
        third = s.get(env.url(), headers={"Range": "bytes=4-"})
        assert third.status_code == 206 and third.content == b"-new-content+more"
    gevent.sleep(0)
    assert not deleted_fds(env.rec_dir)  # the replaced file is not held open


def test_deleted_recording_is_404_and_its_space_released(env: Env) -> None:
    path = env.rec_dir / f"{REC_ID}.wav"
    assert requests.get(env.url()).status_code == 200
    path.unlink()  # a retention cleanup
    assert requests.get(env.url()).status_code == 404
    assert not deleted_fds(env.rec_dir)


def test_idle_recording_is_closed_even_without_further_requests(env: Env) -> None:
    path = env.rec_dir / f"{REC_ID}.wav"
    assert requests.get(env.url()).status_code == 200
    path.unlink()  # deleted while idle: its disk space must come back without another request
    until(lambda: not deleted_fds(env.rec_dir), timeout=5, what="the deleted recording's descriptor closed")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_big(env: Env) -> tuple[Path, dict[int, bytes]]:
    path = env.rec_dir / f"{BIG_ID}.wav"
    markers = {0: b"RIFF-start", 7 * 1024 * 1024 + 3: b"middle-mark", BIG_SIZE - 8: b"the-end!"}
    with open(path, "wb") as f:
        f.truncate(BIG_SIZE)  # sparse: costs no disk and no memory in this process
        for offset, mark in markers.items():
            f.seek(offset)
            f.write(mark)
    return path, markers


@pytest.mark.slow
def test_50mb_file_streams_without_growing_memory(env: Env) -> None:
    path, markers = _make_big(env)
    baseline = _rss()
    peak = baseline
    total = 0
    seen: dict[int, bytes] = {}
    with requests.get(env.url(BIG_ID), stream=True) as r:
        assert r.status_code == 200
        assert r.headers["Content-Length"] == str(BIG_SIZE)
        for chunk in r.iter_content(64 * 1024):
            for offset, mark in markers.items():
                if total <= offset < total + len(chunk):
                    seen[offset] = chunk[offset - total:offset - total + len(mark)]
            total += len(chunk)
            peak = max(peak, _rss())
    assert total == BIG_SIZE
    assert seen == markers
    # Whole-file buffering would add 50 MB (twice that with a copy); chunks are 64 KiB.
    assert peak - baseline < 8 * 1024 * 1024, (peak - baseline) / 1e6
    _assert_released(path)


@pytest.mark.slow
def test_client_disconnecting_mid_body_releases_the_file(env: Env) -> None:
    path, _ = _make_big(env)
    for _ in range(3):
        host, port = env.server.address
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(f"GET {env.links.path(BIG_ID)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got = 0
        while got < 256 * 1024:
            got += len(s.recv(65536))
        assert open_fds(path) == 1  # the transfer is in flight: the probe sees the open file
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        s.close()
        _assert_released(path)
    # ... and a polite close (FIN, unread data) too.
    s = socket.create_connection(env.server.address, timeout=5)
    s.sendall(f"GET {env.links.path(BIG_ID)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    s.recv(65536)
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    _assert_released(path)
    # The server is still fine.
    assert requests.get(env.url(), headers={"Range": "bytes=0-3"}).content == b"RIFF"


def test_empty_recording(env: Env) -> None:
    empty_id = "e0e0e0e0-0000-4000-8000-000000000000"
    (env.rec_dir / f"{empty_id}.wav").write_bytes(b"")
    r = requests.get(env.url(empty_id))
    assert r.status_code == 200 and r.content == b"" and r.headers["Content-Length"] == "0"
    r = requests.get(env.url(empty_id), headers={"Range": "bytes=0-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == "bytes */0"


def test_no_answer_leaves_the_file_open(env: Env) -> None:
    path = env.rec_dir / f"{REC_ID}.wav"
    etag = requests.get(env.url()).headers["ETag"]
    with requests.Session() as s:
        s.head(env.url())
        s.get(env.url(), headers={"If-None-Match": etag})
        s.get(env.url(), headers={"Range": "bytes=999999999-"})
        s.get(env.url(), headers={"Range": "bytes=0-9"})
        s.get(env.url(), stream=True).close()  # body never read
        assert s.get(env.url(), headers={"Range": "bytes=-2"}).status_code == 206
    _assert_released(path)


@pytest.mark.slow
def test_file_shrinking_mid_transfer_drops_the_connection(env: Env, caplog: pytest.LogCaptureFixture,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    path, _ = _make_big(env)
    caplog.set_level("INFO", logger="fsbridge.http")
    s = socket.create_connection(env.server.address, timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(f"GET {env.links.path(BIG_ID)}?clientId=leak-me HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = len(s.recv(65536))
    with open(path, "r+b") as f:
        f.truncate(1024 * 1024)  # e.g. an admin's cleanup job racing the download
    while data := s.recv(1 << 20):
        got += len(data)
    s.close()
    assert got < BIG_SIZE  # the client sees a short body and a closed connection, never a hang
    _assert_released(path)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "EOFError" in errors[0] and "leak-me" not in errors[0]
    assert "Traceback" not in capfd.readouterr().err
    assert requests.get(env.url(), headers={"Range": "bytes=0-3"}).content == b"RIFF"


# --- a recording cut short by a FreeSWITCH crash ------------------------------------------------------

CRASHED_ID = "c4a5bed0-0000-4000-8000-00000000c4a5"


def _crashed_copy(env: Env, riff: int = 0, data: int = 0) -> bytes:
    """The fixture as FreeSWITCH leaves it when it dies mid-call: its lengths never written (0, or libsndfile's
    placeholder), the audio all there."""
    raw = bytearray(env.data)
    assert raw[36:40] == b"data"   # the fixture's layout: fmt chunk, then data at 36
    raw[4:8] = riff.to_bytes(4, "little")
    raw[40:44] = data.to_bytes(4, "little")
    (env.rec_dir / f"{CRASHED_ID}.wav").write_bytes(raw)
    return bytes(raw)


@pytest.mark.parametrize("riff, data", [(0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (36, 0)])
def test_a_recording_whose_header_claims_no_data_is_served_with_its_real_length(
        env: Env, riff: int, data: int) -> None:
    import io
    import wave

    _crashed_copy(env, riff, data)
    whole = requests.get(env.url(CRASHED_ID))
    assert whole.status_code == 200
    assert whole.content == env.data   # the header FreeSWITCH would have written on close
    with wave.open(io.BytesIO(whole.content)) as played:
        assert played.getnframes() == (len(env.data) - 44) // 4   # 16-bit stereo
    # A player seeking reads the header and the audio through ranges, wherever they cut.
    for first, last in ((0, 43), (2, 6), (38, 50), (40, 43), (44, 1000)):
        part = requests.get(env.url(CRASHED_ID), headers={"Range": f"bytes={first}-{last}"})
        assert part.status_code == 206 and part.content == env.data[first:last + 1], (first, last)


def test_a_proper_header_is_left_as_it_is(env: Env, tmp_path: Path) -> None:
    # A header whose data length is shorter than the file (chunks after the data) is not "repaired".
    raw = env.data + b"LIST\x04\x00\x00\x00abcd"
    (env.rec_dir / f"{CRASHED_ID}.wav").write_bytes(raw)
    assert requests.get(env.url(CRASHED_ID)).content == raw
