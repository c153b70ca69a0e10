"""HTTP/1.1 to retailCRM: kept-alive connections, one request each at a time; what the API needs, no more.

The API client (client.py) says what to ask; a transport carries it, as requests splits Session from
adapter. `Transport` is the default: through requests, a call event cost ~0.6 ms of CPU, half of all
fsbridge did at 200 calls/s (bench_load), and a card waited for it. Here it is one send of the request
and a few reads of the reply. `RequestsTransport` is used when the environment names an HTTP proxy, which
requests knows how to go through (CONNECT, NO_PROXY, credentials).

Neither follows redirects (one would carry X-API-KEY to wherever it points), nor sends Accept-Encoding.
Failures are one of three exceptions, each with a short reason that names no URL (a query string can
carry a phone number) and no header (X-API-KEY).

Why our own and not urllib3 (issue 11): it stays only while it is far cheaper than urllib3 and passes the
hostile-server suite (tests/test_crm_transport_hostile.py: framing by RFC 9112, one deadline per request,
no POST sent twice, large replies read without holding the hub). Decided by
`python3 -m bench.bench_transport` (a call-event POST on one kept-alive loopback connection, gevent-patched;
three runs on a shared 2-vCPU VM, 2026-12-04): fsbridge 58-87 µs of CPU per request, urllib3's PoolManager
478-496 µs (5.7-8.3×), requests.Session 840-937 µs (10.7-16.1×); the goal is urllib3 ≥ 3×. So: our own,
kept. If a later run misses the goal, or the suite finds something this cannot handle simply, switch to
urllib3 (it comes with requests).

What it accepts: a status line `HTTP/1.0|1.1 NNN reason`; field lines of a token, a colon and visible
characters (no space before the colon, no folding, no control characters); a body framed by chunked
(hex sizes only, extensions ignored, trailers read and dropped) or by one Content-Length value (repeats must
agree), never both, or read to the close; at most MAX_INTERIM 1xx replies, MAX_HEAD of head, MAX_BODY of
body. Anything else is ConnectionFailed and the connection is closed. A connection goes back to the pool
only when the reply ended exactly where its framing said.

A request is sent again at most once: a GET when a kept-alive connection failed before any byte of the
reply, a POST only when its first write failed (so no byte left). A server that read a POST and closed
gets it once; the caller gets NoReply, "connection closed without a reply" (RetailCRM decides what happens
next: a call event is not sent again, an upload is, since the CRM de-duplicates uploads by externalId).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http.client
import os
import re
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from fsbridge.background import give_way

# A reply head or body larger than these is not retailCRM's API.
MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
MAX_LINE = 4096  # a chunk-size line, extensions included
MAX_INTERIM = 8  # 1xx replies before the final one
_RECV = 64 * 1024
_YIELD_EVERY = 1024 * 1024  # bytes read between two turns given to the other greenlets
_IDEMPOTENT = frozenset({"GET", "HEAD"})

# RFC 9112 §4 and §5: "HTTP/1.x NNN reason"; a field is a token, a colon, a value of visible characters,
# spaces and tabs (no whitespace before the colon, no folding, no control characters).
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: [\t\x20-\x7e\x80-\xff]*)?")
_FIELD_LINES = re.compile(r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
# RFC 9112 §7.1: hex digits only (int(x, 16) would take "-1", "+10", "0x10", "1_0"), then extensions, ignored.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_DIGITS = re.compile(r"[0-9]{1,18}")

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@dataclass(slots=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    content: bytes


class TransportError(Exception):
    """The request got no usable reply; str() is a short reason, safe to log."""


class ConnectTimeout(TransportError):
    pass


class ReadTimeout(TransportError):
    pass


class ConnectionFailed(TransportError):
    pass


class NoReply(ConnectionFailed):
    """The request went out whole or in part and the server closed without replying: it may have acted on it."""


def describe(exc: BaseException) -> str:
    """Our own words for a connection failure; anything unknown is named by type only, since library
    messages may embed the URL with its query string."""
    root = _root_cause(exc)
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, ConnectionResetError | BrokenPipeError):
        return "connection reset"
    if isinstance(root, http.client.RemoteDisconnected | EOFError):
        return "connection closed without a reply"
    if isinstance(root, socket.gaierror):
        return "host name not resolved"
    if isinstance(root, ssl.SSLError):
        return f"TLS error ({' '.join(str(getattr(root, 'reason', None) or type(root).__name__).split())})"
    return type(root).__name__


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps, outermost first: requests wraps urllib3 wraps the socket error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        nested = getattr(current, "reason", None)
        if not isinstance(nested, BaseException):
            nested = next((a for a in current.args if isinstance(a, BaseException)), None)
        current = nested or current.__cause__ or current.__context__


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception."""
    return collections.deque(_chain(exc), maxlen=1)[0]


# Errors no request byte can have left before: the connection (to the proxy or the CRM) was never made, or
# the CRM's certificate was refused during the handshake. Anything else through requests may have been sent.
_NOT_CONNECTED_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}


def _never_sent(exc: BaseException) -> bool:
    """Whether a requests failure certainly happened before the request was written (a POST can be retried)."""
    from requests.exceptions import ProxyError
    from urllib3.exceptions import NewConnectionError

    for current in _chain(exc):
        # NewConnectionError: urllib3's "the connect failed" (refused, unreachable, no such host).
        if isinstance(current, ProxyError | NewConnectionError | socket.gaierror | ssl.SSLCertVerificationError):
            return True
        if isinstance(current, OSError) and current.errno in _NOT_CONNECTED_ERRNOS:
            return True
    return False


def proxy_in_environment() -> bool:
    return any(os.environ.get(name) for name in PROXY_VARIABLES)


class _Closed(Exception):
    """The request was written (maybe in part) and the peer closed or reset the connection before a byte of
    the reply: the server may have read it, and acted on it."""


class _NotWritten(Exception):
    """The first write failed: no byte of the request left this host, so the server cannot have it."""


class _Connection:
    __slots__ = ("buf", "read_since_yield", "sock", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # Grows in place (a bytes `+=` copied the whole reply on every read: quadratic in its size), and
        # bytearray drops consumed bytes from the front without copying the rest.
        self.buf = bytearray()
        self.read_since_yield = 0
        self.used = False  # has carried a request: the server may have closed it since

    def dropped(self) -> bool:
        """Whether an idle connection was closed by the server (or has stray bytes: unusable either way)."""
        if self.buf:
            return True
        try:
            poller = _poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# The original poll, not gevent's: checking an idle connection must not wait, nor switch greenlets.
try:
    from gevent import monkey as _monkey

    _poll = _monkey.get_original("select", "poll")
except ImportError:  # pragma: no cover - gevent is a dependency
    _poll = select.poll


class Transport:
    """Kept-alive connections to one origin (scheme://host:port); at most `pool_size` kept idle."""

    def __init__(self, base_url: str, *, pool_size: int = 64, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.hostname = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        self._host_header = host if default_port else f"{host}:{self.port}"
        self.pool_size = pool_size
        self._ssl = ssl_context if ssl_context is not None else (ssl.create_default_context() if self.tls else None)
        self._idle: list[_Connection] = []

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes | None,
                connect_timeout: float, read_timeout: float, *, deadline: float | None = None) -> Reply:
        """Send `method target` (path and query, already encoded) and read the whole reply.

        `read_timeout` bounds the whole exchange once connected (sending, interim replies, head and body),
        not each read; `deadline` (a time.monotonic() value) bounds everything, connecting included.
        """
        head = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body or b'')}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + (body or b"")
        limit = deadline
        again = False  # sent once more already: never a third time
        while True:
            conn = self._take(connect_timeout, limit, fresh=again)
            began = time.monotonic()
            end = began + read_timeout if limit is None else min(limit, began + read_timeout)
            try:
                reply, keep = self._exchange(conn, data, method, end)
            except _NotWritten as exc:
                conn.close()
                if not again:
                    again, limit = True, end  # certain the server never saw it: once more, on a new connection
                    continue
                raise ConnectionFailed(describe(exc.__cause__ or exc)) from exc.__cause__
            except _Closed as exc:
                conn.close()
                if conn.used and not again and method in _IDEMPOTENT:
                    # A kept-alive connection the server was closing as the request arrived: safe to ask
                    # again, once, on a new connection (the other idle ones may be as stale as this one).
                    again, limit = True, end
                    continue
                # The server may have acted on it: a POST (a call event, an upload) is never sent twice here.
                raise NoReply("connection closed without a reply") from exc.__cause__
            except TimeoutError as exc:
                conn.close()
                raise ReadTimeout(f"no reply within {max(end - began, 0.0):.1f} s") from exc
            except TransportError:
                conn.close()
                raise
            except (OSError, ValueError) as exc:
                conn.close()
                raise ConnectionFailed(describe(exc)) from exc
            except BaseException:
                conn.close()  # gevent.Timeout from the caller: the reply may still come, on no other request
                raise
            if keep and len(self._idle) < self.pool_size:
                conn.used = True
                self._idle.append(conn)
            else:
                conn.close()
            return reply

    # -- connections ----------------------------------------------------------------------------------

    def _take(self, connect_timeout: float, limit: float | None, *, fresh: bool = False) -> _Connection:
        idle = self._idle
        while idle and not fresh:
            conn = idle.pop()  # the most recent: the least likely to have been closed by the server
            if not conn.dropped():
                return conn
            conn.close()  # found closed before anything was written on it: nothing was sent
        if limit is not None:
            connect_timeout = min(connect_timeout, limit - time.monotonic())
            if connect_timeout <= 0:
                raise ConnectTimeout("no time left to connect before the deadline")  # nothing was sent
        return self._connect(connect_timeout)

    def _connect(self, timeout: float) -> _Connection:
        try:
            sock = socket.create_connection((self.hostname, self.port), timeout=timeout)
        except TimeoutError as exc:
            raise ConnectTimeout(f"no connection within {timeout:.1f} s") from exc
        except OSError as exc:
            raise ConnectionFailed(describe(exc)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.hostname)
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeout(f"no TLS handshake within {timeout:.1f} s") from exc
        except OSError as exc:
            sock.close()
            raise ConnectionFailed(describe(exc)) from exc
        return _Connection(sock)

    # -- one exchange ---------------------------------------------------------------------------------

    def _exchange(self, conn: _Connection, data: bytes, method: str, end: float) -> tuple[Reply, bool]:
        sock = conn.sock
        sock.settimeout(_left(end))
        try:
            sent = sock.send(data)  # one call: when it fails, none of the request went out
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _NotWritten from exc
        if sent < len(data):
            try:
                sock.sendall(memoryview(data)[sent:])  # gevent: `end` bounds the whole of it
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise _Closed from exc
        interim = 0
        while True:
            status, version11, headers = self._read_head(conn, end, first=not interim)
            if status >= 200:
                break
            if status == 101:
                raise ConnectionFailed("unexpected protocol switch")
            interim += 1  # 1xx interim answers (100 Continue unasked) are skipped, a few of them
            if interim > MAX_INTERIM:
                raise ConnectionFailed("too many interim (1xx) replies")
        connection = headers.get("connection", "").lower()
        keep = ("close" not in connection) if version11 else ("keep-alive" in connection)
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        if method == "HEAD" or status in (204, 304):
            if status == 204 and (te is not None or (cl is not None and cl.strip() != "0")):
                keep = False  # a 204 announcing a body: whatever follows is not the next reply
            body = b""
        elif te is not None:
            # RFC 9112 §6.3: both at once may be an attempt at smuggling a reply; and a 1.0 reply cannot
            # be chunked. Refused, not guessed at.
            if cl is not None:
                raise ConnectionFailed("reply has both Transfer-Encoding and Content-Length")
            if te.strip().lower() != "chunked" or not version11:
                raise ConnectionFailed(f"unsupported transfer coding {te[:40]!r}")
            body = self._read_chunked(conn, end)
        elif cl is not None:
            body = self._read_exact(conn, _content_length(cl), end)
        else:
            body = self._read_to_close(conn, end)
            keep = False
        # Bytes beyond the reply (a second reply to one request, a 204's body) would be read as the answer
        # to the next request on this connection: it is not kept.
        return Reply(status, headers, body), keep and not conn.buf

    def _fill(self, conn: _Connection, end: float) -> bool:
        """One more read into conn.buf; False at EOF. Raises TimeoutError at `end`."""
        sock = conn.sock
        sock.settimeout(_left(end))
        data = sock.recv(_RECV)
        if not data:
            return False
        conn.buf += data
        conn.read_since_yield += len(data)
        if conn.read_since_yield >= _YIELD_EVERY:
            # On loopback or a fast link every recv finds data and never waits, so a large reply would
            # be read without the hub running once: let the ESL reader and the HTTP server have a turn.
            conn.read_since_yield = 0
            give_way()
        return True

    def _read_head(self, conn: _Connection, end: float, *, first: bool) -> tuple[int, bool, dict[str, str]]:
        buf = conn.buf
        scanned = 0
        while True:
            at = buf.find(b"\r\n\r\n", scanned, MAX_HEAD)
            if at >= 0:
                break
            if not b"HTTP/".startswith(buf[:5]):  # an HTTP/0.9 reply (a bare body), or not HTTP at all
                raise ConnectionFailed("not an HTTP reply")
            if len(buf) >= MAX_HEAD:
                raise ConnectionFailed("reply head too large")
            scanned = max(len(buf) - 3, 0)
            try:
                more = self._fill(conn, end)
            except ConnectionResetError as exc:
                if first and not buf:
                    raise _Closed from exc
                raise
            if not more:
                if first and not buf:
                    raise _Closed
                raise ConnectionFailed("connection closed in the middle of the reply")
        head = buf[:at + 2].decode("latin-1")  # each line with its CRLF
        del buf[:at + 4]
        eol = head.index("\r\n")
        status_line = _STATUS_LINE.fullmatch(head, 0, eol)
        if status_line is None:
            raise ConnectionFailed("not an HTTP reply")
        # One regex pass checks every field line; only a bad head is looked at line by line.
        if _FIELD_LINES.fullmatch(head, eol + 2) is None:
            bad = next(line for line in head[eol + 2:].split("\r\n")
                       if _FIELD_LINES.fullmatch(line + "\r\n") is None)
            if bad[:1] in (" ", "\t"):
                raise ConnectionFailed("folded header line in the reply")
            raise ConnectionFailed("bad header line in the reply")
        headers: dict[str, str] = {}
        if len(head) > eol + 2:
            for line in head[eol + 2:-2].split("\r\n"):
                name, _, value = line.partition(":")
                name = name.lower()
                value = value.strip(" \t")
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return int(status_line[2]), status_line[1] == "1", headers

    def _read_exact(self, conn: _Connection, n: int, end: float) -> bytes:
        buf = conn.buf
        while len(buf) < n:
            if not self._fill(conn, end):
                raise ConnectionFailed("connection closed in the middle of the reply")
        if len(buf) == n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        return data

    def _read_line(self, conn: _Connection, end: float) -> bytes:
        buf = conn.buf
        scanned = 0
        while True:
            at = buf.find(b"\r\n", scanned)
            if at >= 0:
                line = bytes(buf[:at])
                del buf[:at + 2]
                return line
            if len(buf) > MAX_LINE:
                raise ConnectionFailed("chunked reply line too long")
            scanned = max(len(buf) - 1, 0)
            if not self._fill(conn, end):
                raise ConnectionFailed("connection closed in the middle of the reply")

    def _read_chunked(self, conn: _Connection, end: float) -> bytes:
        body = bytearray()
        buf = conn.buf
        while True:
            size_line = _CHUNK_SIZE.fullmatch(self._read_line(conn, end))
            if size_line is None:
                raise ConnectionFailed("bad chunk size in the reply")
            size = int(size_line[1], 16)
            if size == 0:
                break
            if len(body) + size > MAX_BODY:
                raise ConnectionFailed("reply body too large")
            while len(buf) < size + 2:
                if not self._fill(conn, end):
                    raise ConnectionFailed("connection closed in the middle of the reply")
            if buf[size:size + 2] != b"\r\n":
                raise ConnectionFailed("bad chunked reply")
            body += buf[:size]
            del buf[:size + 2]
        trailers = 0
        while True:  # trailer fields are read and dropped, up to the blank line; bounded as a head is
            line = self._read_line(conn, end)
            if not line:
                return bytes(body)
            trailers += len(line) + 2
            if trailers > MAX_HEAD:
                raise ConnectionFailed("reply trailers too large")
            if _FIELD_LINES.fullmatch(line.decode("latin-1") + "\r\n") is None:
                raise ConnectionFailed("bad trailer line in the reply")

    def _read_to_close(self, conn: _Connection, end: float) -> bytes:
        buf = conn.buf
        while self._fill(conn, end):
            if len(buf) > MAX_BODY:
                raise ConnectionFailed("reply body too large")
        data = bytes(buf)
        buf.clear()
        return data


def _left(end: float) -> float:
    """Seconds until `end` for a socket timeout; TimeoutError once it has passed."""
    left = end - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _content_length(value: str) -> int:
    """RFC 9112 §6.3 and RFC 9110 §8.6: digits only; repeated (or a list), all the same number."""
    if value.isdigit() and value.isascii() and len(value) < 10:  # the usual single number
        n = int(value)
        if n > MAX_BODY:
            raise ConnectionFailed("reply body too large")
        return n
    numbers = {int(part) if _DIGITS.fullmatch(part := piece.strip()) else -1 for piece in value.split(",")}
    if -1 in numbers:
        raise ConnectionFailed("bad Content-Length in the reply")
    if len(numbers) > 1:
        raise ConnectionFailed("differing Content-Length values in the reply")
    n = numbers.pop()
    if n > MAX_BODY:
        raise ConnectionFailed("reply body too large")
    return n


class RequestsTransport:
    """The same through requests, for when the environment names a proxy."""

    def __init__(self, base_url: str, *, pool_size: int = 64) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self._requests = requests
        # The origin only: targets carry their whole path, as with Transport.
        parts = urllib.parse.urlsplit(base_url)
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._session.close()

    def request(self, method: str, target: str, headers: dict[str, str], body: bytes | None,
                connect_timeout: float, read_timeout: float, *, deadline: float | None = None) -> Reply:
        # requests' timeouts are per read: the caller's deadline (a gevent.Timeout in RetailCRM) bounds
        # the whole; here it only shortens them.
        if deadline is not None:
            left = max(deadline - time.monotonic(), 0.001)
            connect_timeout, read_timeout = min(connect_timeout, left), min(read_timeout, left)
        requests = self._requests
        try:
            response = self._session.request(method, self.base_url + target, data=body, headers=headers,
                                             timeout=(connect_timeout, read_timeout), allow_redirects=False)
        except requests.ConnectTimeout as exc:
            raise ConnectTimeout(f"no connection within {connect_timeout:.1f} s") from exc
        except requests.Timeout as exc:
            raise ReadTimeout(f"no reply within {read_timeout:.1f} s") from exc
        except requests.RequestException as exc:
            reason = describe(exc)
            if method not in _IDEMPOTENT and not _never_sent(exc):
                # requests cannot say whether any byte left: past the connect, the server may have acted on it.
                raise NoReply(reason) from exc
            raise ConnectionFailed(reason) from exc
        return Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)

