"""fsbridge's HTTP/1.1 server: gevent StreamServer, the router's handlers called directly, zero-copy file answers.

gevent.pywsgi cost ~190 µs of CPU per request before the application ran (environ, rfile, header
objects, WSGI start_response); fsbridge's own work is ~18 µs. This server parses the head with a few
regular expressions (wire.py), calls the route's handler (`Router.call`), and writes the answer with
one send (bytes bodies) or a send of the head with MSG_MORE followed by os.sendfile (FileBody). WSGI
stays available as `Router.wsgi` for anyone who wants another server.

Per connection: TCP_NODELAY; keep-alive as HTTP/1.0 and 1.1 define it, capped at max_requests requests;
pipelined requests answered in order. The route, the method and the declared body size are checked from
the head alone (Router.refusal): a body is read only for a route that takes it, up to that route's own
limit; otherwise 404/405/413 goes out at once and, unless the body was already in, the connection closes
(stalled uploads cost a connection, never a buffer). `timeout` bounds the idle wait for a request; once
its first bytes are in, the rest of the head must follow within `timeout` however it trickles
(slowloris), then the body within another `timeout` (a 408, logged and counted like any answer, when
either is late); every wait for the client to take more of the answer is bounded by `timeout` too.
Handlers are never timed out by this.

Timeouts are not socket timeouts: with one, gevent arms and cancels a timer on every wait, ~10 µs of
CPU per request. Instead each connection has a deadline, set only while it waits on its client, and one
periodic timer per server throws TimeoutError into connections whose deadline has passed (the way
gevent.Timeout expires, and nginx's timer tree). Refusals (wire.py) are answered with
a one-line reason and `Connection: close`, after which the server reads and drops what the client still
sends for a moment (so the refusal is not lost to a RST). The access log is one line per request:
address, method, the router's loggable (redacted) path as sent, status, bytes sent, time; never the
query string (clientId is in it).

Plain HTTP only: TLS, if wanted, terminates in a reverse proxy in front of fsbridge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.socket import wait_write

from fsbridge.http import wire
from fsbridge.http.app import BadRequest, FileBody, Headers, Request, Response, Router, _where, loggable

log = logging.getLogger("fsbridge.http")

# One sendfile() call moves at most this much; between calls the greenlet yields now and then, so a fast
# client downloading a huge file cannot starve the others.
_SENDFILE_STEP = 1 << 20
_YIELD_EVERY = 8 << 20
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_RECV = 64 * 1024
# A bytes body up to this size goes out in the same send as the head; a larger one gets its own.
_COALESCE = 64 * 1024
# After answering with Connection: close, read and drop what the client still sends for this long (and
# this much) before closing: closing with unread data makes the kernel send a RST, which can destroy the
# answer (a 413, a 431) before the client has read it.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1 << 20
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Where lingering connections drop what they still receive: one scratch buffer for all (what lands in it is
# never looked at), so a flood of unwanted uploads allocates nothing.
_DISCARD = bytearray(_RECV)

_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[1] = formatdate(now, usegmt=True)
        _date_cache[0] = now
    return _date_cache[1]  # type: ignore[no-any-return]


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Closed(Exception):
    """The connection is over: the client went away or stalled, or the answer could not be completed."""


class _Connection:
    """One client connection: read a request, dispatch it, write the answer; again while keep-alive."""

    __slots__ = ("buf", "deadline", "greenlet", "readable", "remote", "router", "sent", "server", "sock", "timeout")

    def __init__(self, server: HttpServer, sock: Any, address: Any) -> None:
        self.server = server
        self.router = server.router
        self.sock = sock
        self.remote = str(address[0]) if isinstance(address, tuple) else str(address or "")
        self.timeout = server.timeout
        self.buf = b""  # received, not yet consumed: the start of the next (pipelined) request
        self.sent = 0  # bytes of the current answer written, for the access log
        # When the current wait on the client expires (time.monotonic()); None while not waiting on it.
        self.deadline: float | None = None
        self.greenlet = gevent.getcurrent()
        # Between keep-alive requests: wait for the socket to be readable before recv(). The next request
        # is almost never there yet, and a recv() that fails with EAGAIN first (what gevent's recv does)
        # costs a syscall and an exception per request. Closed in HttpServer._handle.
        self.readable = gevent.get_hub().loop.io(sock.fileno(), 1)

    def _wait_for_client(self) -> None:
        """Start a wait on the client: it must deliver (or take) something within `timeout`."""
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout

    # --- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        sock = self.sock
        sock.settimeout(None)  # the deadline bounds the waits (see the module's docstring)
        # Nagle would hold the last, short segment of every file answer until the client ACKs the
        # previous ones, and clients delay ACKs by up to 40 ms. Heads are still coalesced with the data
        # (MSG_MORE).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        served = 0
        max_requests = self.server.max_requests
        while True:
            try:
                head = self._read_head(served > 0)
            except wire.WireError as exc:
                self._refuse(exc.status, exc.reason, time.monotonic())
                return
            if head is None:
                return
            start = time.monotonic()  # the access log times the answer, not the idle wait before it
            served += 1
            outcome = self._serve(head, head.keep_alive and served < max_requests, start)
            if outcome is None:
                return
            if not outcome:
                self._linger()
                return

    def _recv(self) -> bytes:
        """One recv(); b"" at EOF. _Closed on an error or when the deadline passes."""
        try:
            return self.sock.recv(_RECV)  # type: ignore[no-any-return]
        except OSError as exc:  # TimeoutError included
            raise _Closed from exc

    def _read_head(self, keep_alive: bool) -> wire.RequestHead | None:
        """The next request's head; None when the client closed or went idle between requests."""
        buf = self.buf
        if not buf:
            # The usual case: the whole head in one segment. Waiting for it is the keep-alive idle time.
            # (On a new connection the request is usually in already: recv() at once.)
            self._wait_for_client()
            try:
                if keep_alive:
                    gevent.get_hub().wait(self.readable)
                buf = self.sock.recv(_RECV)
            except OSError:  # TimeoutError included: an idle keep-alive connection ends without a word
                return None
            if not buf:
                return None
        if buf[:1] in (b"\r", b"\n"):
            buf = buf.lstrip(b"\r\n")  # blank lines before a request line are ignored (RFC 9112 §2.2)
        end = wire.find_head_end(buf)
        if end is None:
            rest = self._read_rest_of_head(buf)
            if rest is None:
                return None
            buf, end = rest
        head_end, next_start = end
        self.buf = buf[next_start:]
        return wire.parse_head(buf[:head_end])

    def _read_rest_of_head(self, buf: bytes) -> tuple[bytes, tuple[int, int]] | None:
        """Read until the head is complete: within `timeout` of now, whatever the pace (slowloris), and
        within the limits of wire.check_partial. None when the connection is over."""
        start = time.monotonic()
        self._wait_for_client()  # one deadline for the whole rest, not one per read
        acc = bytearray(buf)
        try:
            while True:
                wire.check_partial(acc)
                scanned = len(acc)
                data = self._recv()
                if not data:
                    if acc:
                        log.debug("%s: connection closed in the middle of a request head", self.remote)
                    return None
                acc += data
                if not scanned and acc[:1] in (b"\r", b"\n"):
                    del acc[: len(acc) - len(acc.lstrip(b"\r\n"))]
                end = wire.find_head_end(acc, scanned)
                if end is not None:
                    return bytes(acc), end
        except _Closed as exc:
            if acc and _was_late(exc):
                line = wire.request_line_of(acc)
                head = None if line is None else wire.RequestHead(line[0], line[1], b"", True, {}, 0, False, False)
                self._timed_out(head, start)
            return None

    def _timed_out(self, head: wire.RequestHead | None, start: float) -> None:
        """The client did not finish its request within `timeout`: 408, logged and counted like any answer."""
        body = b"request timeout\n"
        self.sent = 0
        self._send_quietly(self._error_head(408, len(body)) + body)
        self._log(head, 408, start)

    def _read_body(self, head: wire.RequestHead, start: float) -> bytes | None:
        """The request body (b"" without one), its size already accepted by the route; None when it did not
        arrive (the connection is over: 408 if the client was too slow)."""
        need = head.content_length
        if not need:
            return b""
        buf = self.buf
        if len(buf) >= need:
            self.buf = buf[need:]
            return buf[:need]
        if head.expect_continue and not buf:
            self._send_quietly(_CONTINUE)
        parts = [buf]
        have = len(buf)
        self._wait_for_client()
        try:
            while have < need:
                data = self._recv()
                if not data:
                    return None
                parts.append(data)
                have += len(data)
        except _Closed as exc:
            if _was_late(exc):
                self._timed_out(head, start)
            return None
        body = b"".join(parts)
        self.buf = body[need:]
        return body[:need]

    # --- answering -----------------------------------------------------------------------------------

    def _serve(self, head: wire.RequestHead, keep_alive: bool, start: float) -> bool | None:
        """Answer one request. True: go on with the next one; False: close (lingering); None: drop the
        connection now (it is broken, or the answer could not be completed)."""
        self.sent = 0
        router = self.router
        route = None
        try:
            path = router.decode_path(head.path)
            route = router.match(path)
            response = router.refusal(route, head.method, head.content_length)
        except BadRequest as exc:
            response = Response.text(exc.status, str(exc))
        if response is not None:
            # Refused from the head alone (no such route, a method or a body size it does not take): the
            # body is not read. Unless all of it is in already, the connection closes after the answer.
            need = head.content_length
            if need and len(self.buf) >= need:
                self.buf = self.buf[need:]
            elif need:
                self.buf = b""  # the start of that body: not kept while the connection lingers
                keep_alive = False
        else:
            body = self._read_body(head, start)
            if body is None:
                return None
            self.deadline = None  # the handler takes the time it takes
            try:
                query = router.parse_query(route, head.query)
            except BadRequest as exc:
                response = Response.text(exc.status, str(exc))
            else:
                response = router.call(route, Request(head.method, path, query,  # type: ignore[arg-type]
                                                      Headers.from_lowercase(head.headers), self.remote, body))
        try:
            status, keep_alive = self._write(head, response, keep_alive)
        except _Closed:
            self._log(head, response.status, start)
            return None
        self._log(head, status, start)
        return keep_alive

    def _write(self, head: wire.RequestHead, response: Response, keep_alive: bool) -> tuple[int, bool]:
        """Send `response`: (status sent, whether the connection stays open). _Closed when it cannot."""
        body = response.body
        status = response.status
        is_bytes = type(body) is bytes or isinstance(body, bytes | bytearray | memoryview)
        no_content = status < 200 or status == 204  # neither Content-Length nor content (RFC 9110 §8.6)
        bodyless = no_content or status == 304 or head.method == "HEAD"
        length: int | None
        if is_bytes:
            length = len(body)  # type: ignore[arg-type]
        elif isinstance(body, FileBody):
            length = body.length
        else:
            length = self._declared_length(response)
        if no_content:
            length = None
        elif bodyless:
            # HEAD and 304 describe the content a GET would get: the handler's Content-Length if it gave
            # one (records.py does for HEAD, with an empty body).
            declared = self._declared_length(response)
            length = declared if declared is not None else None if status == 304 else length
        elif length is None:
            keep_alive = False  # an iterable of unknown length: the close marks its end
        connection = None if keep_alive and head.http11 else "keep-alive" if keep_alive else "close"
        try:
            data = wire.response_head(status, response.headers, length, connection, _http_date())
        except (ValueError, TypeError, UnicodeError) as exc:
            # A header unsafe to send (a CR/LF in a value: header injection): answer 500 instead.
            if not is_bytes:
                _close(body)
            log.error("%s %s: bad response headers: %s at %s", head.method, self._log_path(head),
                      type(exc).__name__, _where(exc))
            text = b"internal error\n"
            data = wire.response_head(500, {"Content-Type": "text/plain; charset=utf-8"}, len(text), connection,
                                      _http_date())
            self._send(data if head.method == "HEAD" else data + text)
            return 500, keep_alive
        if is_bytes:
            if bodyless or not body:
                self._send(data)
            elif len(body) <= _COALESCE:  # type: ignore[arg-type]
                self._send(data + bytes(body))  # type: ignore[arg-type]
            else:
                self._send(data, _MSG_MORE)
                self._send(body)  # type: ignore[arg-type]
        elif bodyless:
            _close(body)
            self._send(data)
        elif isinstance(body, FileBody):
            self._send_file(head, data, body)
        else:
            self._send_iterable(head, data, body, length)
        return status, keep_alive

    @staticmethod
    def _declared_length(response: Response) -> int | None:
        for name, value in response.headers.items():
            if name.lower() == "content-length":
                return int(value) if value.isdigit() and value.isascii() else None
        return None

    def _send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """All of `data`, each send() progressing within the timeout; _Closed otherwise."""
        sock = self.sock
        sent = 0
        self._wait_for_client()
        try:
            sent = sock.send(data, flags)
            if sent < len(data):
                view = memoryview(data)
                while sent < len(view):
                    self._wait_for_client()
                    sent += sock.send(view[sent:], flags)
        except OSError as exc:
            raise _Closed from exc
        finally:
            self.sent += sent

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(_Closed):
            self._send(data)

    def _send_file(self, head: wire.RequestHead, data: bytes, body: FileBody) -> None:
        """Head, then the file: os.sendfile (zero_copy) straight from the page cache, else chunked reads.

        gevent's socket.sendfile() falls back to read()+send() in 8 KiB blocks because os.sendfile is not
        cooperative on a blocking socket; the gevent socket's descriptor is non-blocking underneath, so
        calling os.sendfile on it directly and waiting on EAGAIN is both zero-copy and cooperative."""
        try:
            # MSG_MORE holds the head back until the file data joins it: full packets, as nginx's
            # tcp_nopush, without two setsockopt(TCP_CORK) calls per request.
            self._send(data, _MSG_MORE if body.length else 0)
            if not self.server.zero_copy:
                self._send_chunks(head, body, body.length)
                return
            out = self.sock.fileno()
            fd = body.file.fileno()
            offset, remaining = body.offset, body.length
            if body.head:
                part = body.head_part()
                if part:
                    self._send(part, _MSG_MORE if remaining > len(part) else 0)
                offset, remaining = offset + len(part), remaining - len(part)
            since_yield = 0
            while remaining > 0:
                try:
                    sent = os.sendfile(out, fd, offset, min(remaining, _SENDFILE_STEP))
                except BlockingIOError:
                    self._wait_for_client()
                    try:
                        wait_write(out)
                    except OSError as exc:  # TimeoutError included: the deadline passed
                        raise _Closed from exc
                    continue
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise _Closed from exc
                if sent == 0:
                    self._body_failed(head, EOFError("file shorter than announced"))
                offset += sent
                remaining -= sent
                self.sent += sent
                since_yield += sent
                if since_yield >= _YIELD_EVERY:
                    since_yield = 0
                    gevent.sleep(0)
        finally:
            body.close()

    def _send_iterable(self, head: wire.RequestHead, data: bytes, body: Iterable[bytes],
                       length: int | None) -> None:
        try:
            self._send(data, _MSG_MORE if length else 0)
            self._send_chunks(head, body, length)
        finally:
            _close(body)

    def _send_chunks(self, head: wire.RequestHead, body: Iterable[bytes], length: int | None) -> None:
        """Send what `body` yields; exactly `length` bytes when it is not None, else all of it."""
        left = length
        chunks = iter(body)
        count = since_yield = 0
        while True:
            self.deadline = None  # producing the body is the handler's time
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except Exception as exc:
                self._body_failed(head, exc)
            if not chunk:
                continue
            if left is not None:
                if len(chunk) > left:
                    self._body_failed(head, ValueError("body longer than its Content-Length"))
                left -= len(chunk)
            self._send(chunk)
            # A send that never blocks never yields: let the other connections run now and then.
            count += 1
            since_yield += len(chunk)
            if since_yield >= _YIELD_EVERY or count % 64 == 0:
                since_yield = 0
                gevent.sleep(0)
        if left:
            self._body_failed(head, ValueError("body shorter than its Content-Length"))

    def _body_failed(self, head: wire.RequestHead, exc: BaseException) -> None:
        """The body cannot be completed after its head went out: log it, end the connection (the client
        sees a short body and a close, never a wait for bytes that will not come)."""
        log.error("%s %s: failed while sending the response: %s", head.method, self._log_path(head),
                  type(exc).__name__)
        raise _Closed from exc

    @staticmethod
    def _error_head(status: int, length: int) -> bytes:
        return wire.response_head(status, {"Content-Type": "text/plain; charset=utf-8"}, length, "close",
                                  _http_date())

    def _refuse(self, status: int, reason: str, start: float, head: wire.RequestHead | None = None) -> None:
        """Answer a request the wire layer refused, then close (lingering: the client may still be sending)."""
        text = (reason + "\n").encode()
        data = self._error_head(status, len(text))
        self.sent = 0
        self._send_quietly(data if head is not None and head.method == "HEAD" else data + text)
        self._log(head, status, start)
        self._linger()

    def _linger(self) -> None:
        sock = self.sock
        self.deadline = None  # bounded below: a rare path, a socket timeout is fine here
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            dropped = 0
            while dropped < _LINGER_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
                got = sock.recv_into(_DISCARD)
                if not got:
                    break
                dropped += got
        except OSError:
            pass

    # --- the access log ------------------------------------------------------------------------------

    def _log_path(self, head: wire.RequestHead | None) -> str:
        if head is None:
            return "-"
        return self.router.loggable_path(head.path.decode("utf-8", "replace"))

    def _log(self, head: wire.RequestHead | None, status: int, start: float) -> None:
        observer = self.server.observer
        if observer is not None:
            observer(head.path.decode("utf-8", "replace") if head is not None else "", status, self.sent)
        # One line per request, path and status only: the query string carries clientId.
        if not log.isEnabledFor(logging.INFO):
            return
        log.info(
            "%s %s %s %s %d %.1fms",
            self.remote or "-",
            loggable(head.method, 16) if head is not None else "-",
            self._log_path(head),
            status,
            self.sent,
            (time.monotonic() - start) * 1000,
        )


def _close(body: object) -> None:
    close = getattr(body, "close", None)
    if close is not None:
        with contextlib.suppress(Exception):
            close()


def _was_late(exc: _Closed) -> bool:
    """Whether the connection ended because the client was late (the watchdog's TimeoutError)."""
    return isinstance(exc.__cause__, TimeoutError)


class HttpServer:
    """One HTTP listener and its router (fsbridge runs two: the public one and the internal one).

    zero_copy sends file responses with os.sendfile; timeout bounds the wait for each request (idle
    keep-alive included), the arrival of its body, and each send; max_connections caps concurrent
    connections (greenlets), max_requests the requests answered on one connection.
    """

    def __init__(
        self,
        listen: str,
        router: Router,
        *,
        zero_copy: bool = True,
        timeout: float | None = 60.0,
        max_connections: int = 1000,
        max_requests: int = 1000,
    ) -> None:
        self.router = router
        # Told of every answer: (path, status, bytes sent); for metrics. Runs in the connection's greenlet.
        self.observer: Callable[[str, int, int], None] | None = None
        self.zero_copy = zero_copy
        self.timeout = timeout or None
        self.max_requests = max(1, max_requests)
        host, port = parse_listen(listen)
        self._server = StreamServer((host, port), self._handle, spawn=Pool(max_connections))
        self._connections: set[_Connection] = set()
        self._watchdog: Any = None

    def _handle(self, sock: Any, address: Any) -> None:
        # StreamServer closes the socket when this returns, whatever happened.
        conn = _Connection(self, sock, address)
        self._connections.add(conn)
        try:
            conn.run()
        except (_Closed, OSError):  # OSError: the deadline passed where nothing else expected it
            pass
        except Exception as exc:
            # A bug of ours: one line, no traceback (it would carry request data), and the connection goes.
            log.error("connection from %s failed: %s at %s", address[0] if isinstance(address, tuple) else "-",
                      type(exc).__name__, _where(exc))
        finally:
            conn.deadline = None
            conn.readable.close()
            self._connections.discard(conn)

    def _expire(self) -> None:
        """The watchdog, run by the hub: time out the connections whose client is late."""
        try:
            now = time.monotonic()
            late = [c for c in self._connections if c.deadline is not None and c.deadline <= now]
            for conn in late:
                # Re-checked: expiring one connection runs it, and the state of each may have moved on.
                if conn.deadline is not None and conn.deadline <= now and not conn.greenlet.dead:
                    conn.deadline = None
                    conn.greenlet.throw(TimeoutError("timed out"))
        except Exception as exc:
            log.error("http watchdog failed: %s at %s", type(exc).__name__, _where(exc))

    def start(self) -> None:
        self._server.start()
        if self.timeout is not None and self._watchdog is None:
            # Checked 4 times per timeout (at most once a second): a wait ends within 1.25 x timeout.
            interval = max(0.01, min(1.0, self.timeout / 4))
            self._watchdog = gevent.get_hub().loop.timer(interval, interval, ref=False)
            self._watchdog.start(self._expire)
        host, port = self.address
        log.info("listening on %s:%d", host, port)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.stop(timeout=timeout)
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog.close()
            self._watchdog = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port once started on port 0."""
        address = self._server.address
        return str(address[0]), int(address[1])

    def serve_forever(self) -> None:
        if not self._server.started:
            self.start()
        self._server.serve_forever()
