"""Stalled uploads against the real `fsbridge run`: a body no route takes is never buffered.

Many clients send a POST head with a large Content-Length to a public route that takes no body, send most
of that body and stall. Before, fsbridge read up to 1 MiB per request before routing (300 such connections
took it from 40 to 341 MiB); now each is answered from its head at once and closed. What a user notices:
the answer comes back at once, and the process's memory (VmRSS) does not grow with the connections.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import gevent
import requests

from tests.conftest import settings
from tests.test_operations import start_fsbridge
from tests.waiting import until

CONNECTIONS = 100
DECLARED = 1 << 20  # what the old server accepted (its limit) and read before routing
SENT = DECLARED - 1  # all but the last byte: the request never completes
MIB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def settled_rss(pid: int, seconds: float = 5.0) -> int:
    """The process's RSS once it stops growing for 0.5 s (it may still be reading what was sent)."""
    deadline = time.monotonic() + seconds
    last, since = rss(pid), time.monotonic()
    while time.monotonic() < deadline:
        gevent.sleep(0.1)
        now = rss(pid)
        if now > last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            break
    return last


def stall(port: int, path: str) -> tuple[socket.socket, bytes]:
    """POST a head declaring DECLARED bytes, send SENT of them (as far as the server takes them), stop.
    Returns the socket (left open: the client stalls) and what the server answered within 2 s."""
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: pbx.example.com\r\nContent-Length: {DECLARED}\r\n"
              f"Content-Type: application/x-www-form-urlencoded\r\n\r\n".encode())
    chunk = b"x" * 65536
    left = SENT
    with contextlib.suppress(OSError):  # the server may close on us: it wants none of it
        while left:
            left -= s.send(chunk[:left])
    s.settimeout(2)
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n" not in answer and (data := s.recv(4096)):
            answer += data
    return s, answer


def test_stalled_uploads_to_routes_without_a_body_cost_no_memory(tmp_path: Path, simulator, fake_crm) -> None:
    public, internal = free_port(), free_port()
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, state_dir=str(tmp_path / "state"),
                   http={"listen": f"127.0.0.1:{public}", "internal_listen": f"127.0.0.1:{internal}"})
    proc = start_fsbridge(tmp_path, raw)
    sockets: list[socket.socket] = []
    try:
        until(lambda: _answers(f"http://127.0.0.1:{public}/logo.svg"), 20, "fsbridge to serve")
        simulator.wait_for_subscriber(timeout=15)
        before = settled_rss(proc.pid)
        paths = ["/retailcrm/make-call", "/retailcrm/status", "/no/such/route", "/%72etailcrm/make-call"]
        jobs = [gevent.spawn(stall, public, paths[n % len(paths)]) for n in range(CONNECTIONS)]
        gevent.joinall(jobs, timeout=60, raise_error=True)
        sockets = [job.value[0] for job in jobs]
        answers = [job.value[1] for job in jobs]
        grown = settled_rss(proc.pid) - before
        assert proc.poll() is None, "fsbridge is still running"
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        proc.communicate(timeout=30)
    statuses = sorted({a.split(b" ", 2)[1].decode() if a.startswith(b"HTTP/1.1 ") else repr(a[:20]) for a in answers})
    assert statuses == ["404", "405"], "every stalled upload is answered from its head, at once"
    # The old server held ~1 MiB per connection here (100+ MiB); the new one reads none of it.
    assert grown < 16 * MIB, f"fsbridge grew by {grown / MIB:.0f} MiB for {CONNECTIONS} stalled uploads"


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
