"""HTTP/1.1 to retailCRM: kept-alive connections, one request each at a time; what the API needs, no more.

The API client (client.py) says what to ask; a transport carries it, as requests splits Session from
adapter. `Transport` is the default: through requests, a call event cost ~0.6 ms of CPU, half of all
fsbridge did at 200 calls/s (bench_load), and a card waited for it. Here it is one send of the request
and a few reads of the reply. `RequestsTransport` is used when the environment names an HTTP proxy, which
requests knows how to go through (CONNECT, NO_PROXY, credentials).

Neither follows redirects (one would carry X-API-KEY to wherever it points), nor sends Accept-Encoding.
Failures are one of three exceptions, each with a short reason that names no URL (a query string can
carry a phone number) and no header (X-API-KEY).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

# A reply head or body larger than these is not retailCRM's API.
MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
_RECV = 64 * 1024

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


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: requests wraps urllib3 wraps the socket error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    deepest = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        deepest = current
        nested = getattr(current, "reason", None)
        if not isinstance(nested, BaseException):
            nested = next((a for a in current.args if isinstance(a, BaseException)), None)
        current = nested or current.__cause__ or current.__context__
    return deepest


def proxy_in_environment() -> bool:
    return any(os.environ.get(name) for name in PROXY_VARIABLES)


class _Closed(Exception):
    """The peer closed the connection before a byte of the reply came."""


class _Connection:
    __slots__ = ("buf", "sock", "timeout", "used")

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self.sock = sock
        self.buf = b""
        self.timeout = timeout
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
                connect_timeout: float, read_timeout: float) -> Reply:
        """Send `method target` (path and query, already encoded) and read the whole reply."""
        head = [f"{method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers.items():
            head.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body or b'')}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + (body or b"")
        while True:
            conn = self._take(connect_timeout)
            reused = conn.used
            try:
                reply, keep = self._exchange(conn, data, method, read_timeout)
            except _Closed as exc:
                conn.close()
                if reused:
                    continue  # a kept-alive connection the server closed as we sent: not processed, resend
                raise ConnectionFailed("connection closed without a reply") from exc.__cause__
            except TimeoutError as exc:
                conn.close()
                raise ReadTimeout(f"no reply within {read_timeout:.1f} s") from exc
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

    def _take(self, connect_timeout: float) -> _Connection:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recent: the least likely to have been closed by the server
            if not conn.dropped():
                return conn
            conn.close()
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
        return _Connection(sock, timeout)

    # -- one exchange ---------------------------------------------------------------------------------

    def _exchange(self, conn: _Connection, data: bytes, method: str, read_timeout: float) -> tuple[Reply, bool]:
        sock = conn.sock
        if conn.timeout != read_timeout:
            sock.settimeout(read_timeout)
            conn.timeout = read_timeout
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _Closed from exc
        while True:
            status, version11, headers = self._read_head(conn)
            if status >= 200 or status == 101:
                break  # 1xx interim answers (100 Continue unasked) are skipped
        if status == 101:
            raise ConnectionFailed("unexpected protocol switch")
        connection = headers.get("connection", "").lower()
        keep = ("close" not in connection) if version11 else ("keep-alive" in connection)
        if method == "HEAD" or status in (204, 304):
            return Reply(status, headers, b""), keep
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.strip().lower() != "chunked":
                raise ConnectionFailed(f"unsupported transfer coding {te[:40]!r}")
            return Reply(status, headers, self._read_chunked(conn)), keep
        cl = headers.get("content-length")
        if cl is not None:
            if not cl.strip().isdigit():
                raise ConnectionFailed("bad Content-Length in the reply")
            return Reply(status, headers, self._read_exact(conn, int(cl))), keep
        return Reply(status, headers, self._read_to_close(conn)), False

    def _fill(self, conn: _Connection) -> bool:
        """One more read into conn.buf; False at EOF."""
        data = conn.sock.recv(_RECV)
        if not data:
            return False
        conn.buf += data
        return True

    def _read_head(self, conn: _Connection) -> tuple[int, bool, dict[str, str]]:
        start = len(conn.buf)
        while True:
            end = conn.buf.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end >= 0:
                break
            if len(conn.buf) >= MAX_HEAD:
                raise ConnectionFailed("reply head too large")
            try:
                more = self._fill(conn)
            except ConnectionResetError as exc:
                if not conn.buf and not start:
                    raise _Closed from exc
                raise
            if not more:
                if not conn.buf:
                    raise _Closed
                raise ConnectionFailed("connection closed in the middle of the reply")
        raw, conn.buf = conn.buf[:end], conn.buf[end + 4:]
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not (
                len(parts[1]) == 3 and parts[1].isdigit()):
            raise ConnectionFailed("not an HTTP reply")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon:
                raise ConnectionFailed("bad header line in the reply")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return int(parts[1]), parts[0] == "HTTP/1.1", headers

    def _read_exact(self, conn: _Connection, n: int) -> bytes:
        if n > MAX_BODY:
            raise ConnectionFailed("reply body too large")
        while len(conn.buf) < n:
            if not self._fill(conn):
                raise ConnectionFailed("connection closed in the middle of the reply")
        data, conn.buf = conn.buf[:n], conn.buf[n:]
        return data

    def _read_line(self, conn: _Connection) -> bytes:
        while True:
            end = conn.buf.find(b"\r\n")
            if end >= 0:
                line, conn.buf = conn.buf[:end], conn.buf[end + 2:]
                return line
            if len(conn.buf) > MAX_HEAD:
                raise ConnectionFailed("bad chunked reply")
            if not self._fill(conn):
                raise ConnectionFailed("connection closed in the middle of the reply")

    def _read_chunked(self, conn: _Connection) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._read_line(conn).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ConnectionFailed("bad chunk size in the reply") from None
            if size == 0:
                while self._read_line(conn):  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY:
                raise ConnectionFailed("reply body too large")
            parts.append(self._read_exact(conn, size))
            if self._read_line(conn):
                raise ConnectionFailed("bad chunked reply")

    def _read_to_close(self, conn: _Connection) -> bytes:
        while self._fill(conn):
            if len(conn.buf) > MAX_BODY:
                raise ConnectionFailed("reply body too large")
        data, conn.buf = conn.buf, b""
        return data


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
                connect_timeout: float, read_timeout: float) -> Reply:
        requests = self._requests
        try:
            response = self._session.request(method, self.base_url + target, data=body, headers=headers,
                                             timeout=(connect_timeout, read_timeout), allow_redirects=False)
        except requests.ConnectTimeout as exc:
            raise ConnectTimeout(f"no connection within {connect_timeout:.1f} s") from exc
        except requests.Timeout as exc:
            raise ReadTimeout(f"no reply within {read_timeout:.1f} s") from exc
        except requests.RequestException as exc:
            raise ConnectionFailed(describe(exc)) from exc
        return Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)

