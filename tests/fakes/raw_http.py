"""A raw HTTP/1.1 server on 127.0.0.1 that answers exactly the bytes a test scripts.

For trying how a client copes with a server (or a middlebox) that breaks the rules: bad framing, replies
trickled a byte at a time, connections closed or reset at the worst moment. It parses only what it must to
find each request (the head, then a Content-Length body) and records every request it read, so a test can
count what actually reached the server: a request sent twice shows up twice here.

In-process (`RawHttpServer`, on the tests' gevent hub), or as its own process (`canned_reply_process`) when
the client under test must find data waiting on every read, as it does behind a fast link.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gevent
import gevent.pool
from gevent.server import StreamServer

_MAX_REQUEST_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class Request:
    head: bytes  # request line and fields, without the blank line
    body: bytes
    connection: int  # which connection it came on, 1 for the server's first
    n: int  # its number on that connection, from 1

    @property
    def method(self) -> str:
        return self.head.split(b" ", 1)[0].decode("latin-1")


class Peer:
    """The connection a request came on, as a script sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def trickle(self, data: bytes, every: float, size: int = 1) -> None:
        """`size` bytes each `every` seconds, until all are out or the client went away."""
        for start in range(0, len(data), size):
            try:
                self.sock.sendall(data[start:start + size])
            except OSError:
                return
            gevent.sleep(every)

    def close(self) -> None:
        """A clean close (FIN) once what was sent is out."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def reset(self) -> None:
        """An abortive close: the client gets an RST, not a FIN."""
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Script = Callable[[Peer, Request], None]


class RawHttpServer:
    """Runs `script(peer, request)` for each request read; the connection then carries on with the next
    request unless the script closed it. `on_idle(peer)`, if set, runs after each script that left the
    connection open (e.g. to close it later, as a keep-alive timeout does)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.on_idle: Callable[[Peer], None] | None = None
        self.connections = 0
        self.requests: list[Request] = []
        # A pool, so that stop() ends the scripts still trickling.
        self._server = StreamServer(("127.0.0.1", 0), self._handle, spawn=gevent.pool.Pool())

    def start(self) -> RawHttpServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=0.5)

    def __enter__(self) -> RawHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return int(self._server.address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def received(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]

    def _handle(self, sock: socket.socket, _address: object) -> None:
        self.connections += 1
        connection = self.connections
        peer = Peer(sock)
        buf = b""
        n = 0
        while not peer.closed and (got := read_request(sock, buf)) is not None:
            head, body, buf = got
            n += 1
            request = Request(head, body, connection, n)
            self.requests.append(request)
            self.script(peer, request)
            if not peer.closed and self.on_idle is not None:
                self.on_idle(peer)


def read_request(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The next request on `sock` after what `buf` already holds: (head, body, what is left); None when the
    connection ended. Only as much HTTP as the clients under test send: a head, then a Content-Length body."""
    try:
        return _read_request(sock, buf)
    except OSError:
        return None


def _read_request(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data or len(buf) > _MAX_REQUEST_HEAD:
            return None
        buf += data
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    return head, buf[:length], buf[length:]


def reply(status: str = "200 OK", body: bytes = b'{"success":true}', *fields: str) -> bytes:
    """A well-formed reply with a Content-Length, plus any extra `fields` ("Name: value")."""
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


# -- a separate process with one canned reply ------------------------------------------------------------


@contextlib.contextmanager
def canned_reply_process(length: int) -> Iterator[str]:
    """A server in its own process (plain threads, no gevent) answering every request with the same reply:
    a JSON body of `length` bytes (at least 16: `{"success":true}`) after the fields nginx in front of
    retailCRM sends, written as fast as the client reads. Yields its base URL."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.raw_http", str(length)], cwd=root,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def canned_body(length: int) -> bytes:
    return b'{"success":true}' if length <= 25 else b'{"success":true,"pad":"' + b"x" * (length - 25) + b'"}'


def _serve_canned(length: int) -> None:
    import threading

    whole = reply("200 OK", canned_body(length), "Server: nginx", "Date: Thu, 01 Jan 2026 00:00:00 GMT",
                  "Connection: keep-alive", "Cache-Control: no-cache, private")
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as nginx in front of retailCRM
        with conn:
            buf = b""
            while (got := read_request(conn, buf)) is not None:
                buf = got[2]
                conn.sendall(whole)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    _serve_canned(int(sys.argv[1]))
