"""fsbridge's HTTP server: gevent.pywsgi with a safe access log and zero-copy file responses.

Plain HTTP only: TLS, if wanted, terminates in a reverse proxy in front of fsbridge.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from gevent.socket import wait_write

from fsbridge.http.app import FileBody, Router, loggable

log = logging.getLogger("fsbridge.http")

# One sendfile() call moves at most this much; between calls the greenlet yields now and then, so a fast
# client downloading a huge file cannot starve the others.
_SENDFILE_STEP = 1 << 20
_YIELD_EVERY = 8 << 20
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"

# pywsgi's own error messages quote the raw request line, query string (and clientId) included.
_QUERY_RE = re.compile(r"\?[^\s'\"\\]*")


def parse_listen(listen: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or ':port' (all interfaces) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"listen address must be host:port, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Server(WSGIServer):
    router: Router
    zero_copy: bool
    conn_timeout: float | None


class _Handler(WSGIHandler):
    server: _Server

    def handle(self) -> None:
        # Without a timeout an idle or trickling client holds its greenlet (and a file) forever.
        if self.server.conn_timeout:
            self.socket.settimeout(self.server.conn_timeout)
        # Nagle would hold the last, short segment of every file answer until the client ACKs the
        # previous ones, and clients delay ACKs by up to 40 ms: measured, it cut single-client
        # throughput tenfold. Headers are still coalesced with the data (MSG_MORE below).
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def _log_path(self) -> str:
        environ = getattr(self, "environ", None)
        if environ is not None:
            try:
                path = environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace")
            except UnicodeError:
                path = "?"
        else:
            # The request line never became an environ (400/414): its raw path, minus the query.
            path = (getattr(self, "path", None) or "-").partition("?")[0]
        return self.server.router.loggable_path(path)

    def log_request(self) -> None:
        # One line per request, path and status only: the query string carries clientId.
        if not log.isEnabledFor(logging.INFO):
            return
        status = getattr(self, "_orig_status", None) or self.status or "000"
        if isinstance(status, bytes):
            status = status.decode("latin-1")
        elapsed = (self.time_finish or time.time()) - self.time_start
        address = self.client_address[0] if isinstance(self.client_address, tuple) else self.client_address
        log.info(
            "%s %s %s %s %d %.1fms",
            address or "-",
            loggable(getattr(self, "command", None) or "-", 16),
            self._log_path(),
            str(status).split(" ", 1)[0],
            self.response_length or 0,
            elapsed * 1000,
        )

    def log_error(self, msg: str, *args: Any) -> None:
        try:
            message = msg % args if args else msg
        except Exception:
            message = msg
        log.warning("%s", loggable(_QUERY_RE.sub("?<query>", str(message)), 300))

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes] | None:
        # pywsgi prints a traceback for anything but a ValueError here; a client that stalls mid-request
        # (the timeout) is routine and gets its connection closed without a word.
        if isinstance(ex, TimeoutError):
            return None
        if isinstance(ex, ValueError):
            return super()._handle_client_error(ex)  # type: ignore[no-any-return]
        self.log_error("invalid request from %s: %s", self.client_address, type(ex).__name__)
        return "400", _BAD_REQUEST

    def handle_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        # pywsgi would print a traceback together with the environ (QUERY_STRING included) to stderr.
        if not issubclass(t, gevent.GreenletExit):
            log.error(
                "%s %s: failed while sending the response: %s",
                loggable(getattr(self, "command", None) or "-", 16),
                self._log_path(),
                t.__name__,
            )
        self._send_error_response_if_possible(500)

    def process_result(self) -> None:
        result = self.result
        if (
            isinstance(result, FileBody)
            and self.server.zero_copy
            and self.provided_content_length is not None
            and self.code not in (204, 304)
        ):
            self._send_file(result)
        else:
            super().process_result()

    # Flags for the next _sendall: MSG_MORE while sending the headers of a sendfile answer.
    _send_flags = 0

    def _sendall(self, data: bytes | bytearray) -> None:
        # pywsgi's _sendall, plus flags.
        try:
            self.socket.sendall(data, self._send_flags)
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def _send_file(self, body: FileBody) -> None:
        """Headers, then the file straight from the page cache to the socket (os.sendfile).

        gevent's socket.sendfile() falls back to read()+send() in 8 KiB blocks because os.sendfile is not
        cooperative on a blocking socket; the gevent socket's descriptor is non-blocking underneath, so
        calling os.sendfile on it directly and waiting on EAGAIN is both zero-copy and cooperative.
        """
        sock = self.socket
        out = sock.fileno()
        # MSG_MORE holds the headers back until the file data joins them: full packets, as nginx's
        # tcp_nopush, without two setsockopt(TCP_CORK) calls per request.
        self._send_flags = _MSG_MORE if body.length else 0
        try:
            self.write(b"")  # sends the status line and headers
        finally:
            self._send_flags = 0
        fd = body.file.fileno()
        offset, remaining = body.offset, body.length
        since_yield = 0
        while remaining > 0:
            try:
                sent = os.sendfile(out, fd, offset, min(remaining, _SENDFILE_STEP))
            except BlockingIOError:
                wait_write(out, timeout=sock.gettimeout(), timeout_exc=TimeoutError("send timed out"))
                continue
            except InterruptedError:
                continue
            if sent == 0:
                raise EOFError("file shorter than announced")
            offset += sent
            remaining -= sent
            self.response_length += sent
            since_yield += sent
            if since_yield >= _YIELD_EVERY:
                since_yield = 0
                gevent.sleep(0)


class HttpServer:
    """The HTTP listener for retailCRM's callbacks and the record proxy.

    zero_copy sends file responses with os.sendfile; timeout bounds each read/write on a connection
    (idle keep-alive included); max_connections caps concurrent connections (greenlets).
    """

    def __init__(
        self,
        listen: str,
        router: Router,
        *,
        zero_copy: bool = True,
        timeout: float | None = 60.0,
        max_connections: int = 1000,
    ) -> None:
        self.router = router
        host, port = parse_listen(listen)
        self._server = _Server(
            (host, port),
            router.wsgi,
            spawn=Pool(max_connections),
            log=None,  # the access log is _Handler.log_request, which never writes the query string
            error_log=None,
            handler_class=_Handler,
        )
        self._server.router = router
        self._server.zero_copy = zero_copy
        self._server.conn_timeout = timeout

    def start(self) -> None:
        self._server.start()
        host, port = self.address
        log.info("listening on %s:%d", host, port)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.stop(timeout=timeout)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port once started on port 0."""
        address = self._server.address
        return str(address[0]), int(address[1])

    def serve_forever(self) -> None:
        self._server.serve_forever()
