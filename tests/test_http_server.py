"""fsbridge's own HTTP/1.1 server on the wire: framing, limits, keep-alive, pipelining, timeouts, refusals.

Raw sockets throughout: an HTTP client library would normalise away exactly what is tested here.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import pytest

from fsbridge.http import FileBody, HttpServer, Request, Response, Router, wire
from tests.procfs import open_fds
from tests.waiting import until

BIG_SIZE = 20 * 1024 * 1024


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class App:
    server: HttpServer
    big: Path
    streams_closed: list[str] = field(default_factory=list)
    seen: list[Request] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address


def _router(app: App) -> Router:
    router = Router(max_body_bytes=1000)

    def hello(request: Request) -> Response:
        app.seen.append(request)
        return Response.text(200, "hello")

    def echo(request: Request) -> Response:
        app.seen.append(request)
        return Response(200, {"Content-Type": "application/octet-stream"}, request.body)

    def path(request: Request) -> Response:
        app.seen.append(request)
        return Response(200, {"Content-Type": "text/plain; charset=utf-8"}, request.path.encode())

    def big(request: Request) -> Response:
        return Response(200, {"Content-Type": "audio/wav"}, FileBody(open(app.big, "rb"), 0, BIG_SIZE))

    class Stream:
        """An iterable body whose close() (the server's duty, finished or not) is observable."""

        def __init__(self, name: str, chunks: int) -> None:
            self.name, self.chunks = name, chunks

        def __iter__(self) -> Iterator[bytes]:
            return (b"%06d\n" % i for i in range(self.chunks))

        def close(self) -> None:
            app.streams_closed.append(self.name)

    def stream(name: str, chunks: int, declare: bool) -> Response:
        headers = {"Content-Type": "text/plain"}
        if declare:
            headers["Content-Length"] = str(7 * chunks)
        return Response(200, headers, Stream(name, chunks))

    router.add({"GET"}, "/hello", hello)
    router.add({"POST"}, "/echo", echo)
    router.add({"POST"}, "/small", echo, max_body=100)  # a form with a limit of its own
    router.add({"GET"}, "/path/", path, prefix=True)
    router.add({"GET"}, "/big", big)
    router.add({"GET"}, "/stream", lambda r: stream("stream", 3, declare=False))
    router.add({"GET"}, "/stream-cl", lambda r: stream("stream-cl", 3, declare=True))
    router.add({"GET"}, "/endless", lambda r: stream("endless", 10**9, declare=False))
    router.add({"GET"}, "/slow", lambda r: (gevent.sleep(0.8), Response.text(200, "slow"))[1])
    router.add({"GET"}, "/empty", lambda r: Response.empty(204))
    router.add({"GET"}, "/not-modified", lambda r: Response.empty(304, {"ETag": '"x"'}))
    return router


def _make_big(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(BIG_SIZE)  # sparse
    return path


@pytest.fixture(params=[True, False], ids=["sendfile", "read"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[App]:
    yield from _serve(tmp_path, zero_copy=request.param)


@pytest.fixture
def app1(tmp_path: Path) -> Iterator[App]:
    """One server, for tests where zero_copy makes no difference."""
    yield from _serve(tmp_path)


def _serve(tmp_path: Path, **kwargs: object) -> Iterator[App]:
    app = App(server=None, big=_make_big(tmp_path / "big.wav"))  # type: ignore[arg-type]
    kwargs.setdefault("timeout", 2.0)
    app.server = HttpServer("127.0.0.1:0", _router(app), **kwargs)  # type: ignore[arg-type]
    app.server.start()
    try:
        yield app
    finally:
        app.server.stop(timeout=0.2)


def connect(app: App, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(app.address, timeout=timeout)


class Reader:
    """Reads responses off a raw socket, framed by Content-Length (or by the close when there is none)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def response(self, head_request: bool = False) -> Reply:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            if not self._fill():
                raise EOFError(f"connection closed before a full head: {bytes(self.buf[:200])!r}")
        raw_head = self._take(end)
        del self.buf[:4]
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated {name}"
            headers[name.lower()] = value.strip()
        code = int(status)
        if head_request or code in (204, 304) or code < 200:
            body = b""
        elif "content-length" in headers:
            need = int(headers["content-length"])
            while len(self.buf) < need:
                if not self._fill():
                    raise EOFError("short body")
            body = self._take(need)
        else:
            while self._fill():
                pass
            body = self._take(len(self.buf))
        return Reply(code, reason, headers, body, raw_head)

    def at_eof(self) -> bool:
        """True when the server closed the connection (after whatever is still buffered)."""
        return not self.buf and not self._fill()


def exchange(app: App, data: bytes, head_request: bool = False) -> tuple[Reply, bool]:
    """Send `data` on a new connection: (the reply, whether the server closed the connection after it).

    Only an answer with `Connection: close` is waited on for the close (and must be followed by it)."""
    with connect(app) as s:
        s.sendall(data)
        reader = Reader(s)
        reply = reader.response(head_request)
        return reply, reply.header("Connection") == "close" and reader.at_eof()


def get(path: str = "/hello", *, version: str = "1.1", extra: str = "", method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode("latin-1")


# --- ordinary answers, keep-alive, pipelining --------------------------------------------------------


def test_keep_alive_http11(app1: App) -> None:
    with connect(app1) as s:
        reader = Reader(s)
        for _ in range(3):
            s.sendall(get())
            reply = reader.response()
            assert reply.status == 200 and reply.body == b"hello\n"
            assert reply.header("Content-Length") == "6"
            assert reply.header("Connection") is None  # the HTTP/1.1 default: stays open
            assert reply.header("Server") == "fsbridge"
            assert (reply.header("Date") or "").endswith(" GMT")


def test_every_answer_has_a_content_length(app1: App) -> None:
    with connect(app1) as s:
        reader = Reader(s)
        for path in ("/nothing", "/hello?a=1&a=2", "/path/%ff", "/stream-cl"):
            s.sendall(get(path))
            reply = reader.response()
            assert reply.header("Content-Length") == str(len(reply.body)), path
        s.sendall(get("/echo"))
        reply = reader.response()
        assert reply.status == 405 and reply.header("Allow") == "POST"


def test_connection_close_is_honoured(app1: App) -> None:
    reply, closed = exchange(app1, get(extra="Connection: close\r\n"))
    assert reply.status == 200 and reply.header("Connection") == "close" and closed
    reply, closed = exchange(app1, get(extra="Connection: Keep-Alive, CLOSE\r\n"))
    assert reply.header("Connection") == "close" and closed


def test_http10_closes_unless_keep_alive_is_asked(app1: App) -> None:
    reply, closed = exchange(app1, get(version="1.0"))
    assert reply.status == 200 and closed
    assert reply.header("Connection") == "close"
    with connect(app1) as s:
        reader = Reader(s)
        for _ in range(2):
            s.sendall(get(version="1.0", extra="Connection: keep-alive\r\n"))
            reply = reader.response()
            assert reply.status == 200 and reply.header("Connection") == "keep-alive"
    # HTTP/1.0 needs no Host.
    reply, _ = exchange(app1, b"GET /hello HTTP/1.0\r\n\r\n")
    assert reply.status == 200


def test_pipelined_requests_are_answered_in_order(app1: App) -> None:
    requests = (get("/path/one") + get("/hello", method="HEAD") + get("/path/two")
                + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfive!" + get("/path/three"))
    with connect(app1) as s:
        s.sendall(requests)
        reader = Reader(s)
        assert reader.response().body == b"/path/one"
        head = reader.response(head_request=True)
        assert head.status == 200 and head.header("Content-Length") == "6"
        assert reader.response().body == b"/path/two"
        assert reader.response().body == b"five!"
        assert reader.response().body == b"/path/three"


def test_pipelined_requests_split_at_odd_places(app1: App) -> None:
    data = (get("/path/a") + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
            + get("/path/b"))
    with connect(app1) as s:
        reader = Reader(s)
        for i in range(0, len(data), 7):
            s.sendall(data[i:i + 7])
            gevent.sleep(0.001)
        assert [reader.response().body for _ in range(3)] == [b"/path/a", b"0123456789", b"/path/b"]


def test_requests_per_connection_are_capped(tmp_path: Path) -> None:
    for app in _serve(tmp_path, max_requests=3):
        with connect(app) as s:
            s.sendall(get() * 5)
            reader = Reader(s)
            replies = [reader.response() for _ in range(3)]
            assert [r.header("Connection") for r in replies] == [None, None, "close"]
            assert reader.at_eof()  # the 4th and 5th requests are left for a new connection


def test_head_sends_no_body(app: App) -> None:
    with connect(app) as s:
        reader = Reader(s)
        s.sendall(get("/big", method="HEAD"))
        reply = reader.response(head_request=True)
        assert reply.status == 200 and reply.header("Content-Length") == str(BIG_SIZE)
        s.sendall(get("/hello", method="HEAD"))
        assert reader.response(head_request=True).header("Content-Length") == "6"
        s.sendall(get("/stream-cl", method="HEAD"))
        assert reader.response(head_request=True).header("Content-Length") == "21"
        # Nothing but heads came: the next answer starts right where the heads ended.
        s.sendall(get())
        assert reader.response().body == b"hello\n"
    assert sorted(app.streams_closed) == ["stream-cl"]  # the unused generator was closed


def test_no_content_and_not_modified(app1: App) -> None:
    with connect(app1) as s:
        reader = Reader(s)
        s.sendall(get("/empty"))
        reply = reader.response()
        assert reply.status == 204 and "content-length" not in reply.headers
        s.sendall(get("/not-modified"))
        reply = reader.response()
        assert reply.status == 304 and reply.header("ETag") == '"x"'
        s.sendall(get())
        assert reader.response().body == b"hello\n"


def test_streamed_bodies(app1: App) -> None:
    # Unknown length: the close delimits the body.
    reply, closed = exchange(app1, get("/stream"))
    assert reply.body == b"000000\n000001\n000002\n" and reply.header("Connection") == "close" and closed
    assert reply.header("Content-Length") is None
    # Declared length: keep-alive as usual.
    with connect(app1) as s:
        reader = Reader(s)
        s.sendall(get("/stream-cl") + get())
        assert reader.response().body == b"000000\n000001\n000002\n"
        assert reader.response().body == b"hello\n"
    assert sorted(app1.streams_closed) == ["stream", "stream-cl"]


def test_big_file_in_full(app: App) -> None:
    with connect(app) as s:
        s.sendall(get("/big") + get())
        reader = Reader(s)
        reply = reader.response()
        assert len(reply.body) == BIG_SIZE and reply.body.count(0) == BIG_SIZE
        assert reader.response().body == b"hello\n"


# --- the target: percent-decoding and the query ------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/path/plain", "/path/plain"),
        ("/path/%41%42", "/path/%41%42"),  # routed and handed over as sent: never percent-decoded
        ("/path/a%2Fb", "/path/a%2Fb"),
        ("/path/%zz%4", "/path/%zz%4"),
        ("/path/a+b", "/path/a+b"),  # + is not a space in a path
        ("/path/été", "/path/été"),  # raw UTF-8 bytes
        ("/path/../path/x", "/path/../path/x"),  # no normalisation: that is the handlers' business
        ("/path/x?y=1", "/path/x"),
        ("/path/x?", "/path/x"),
        ("http://example.com/path/abs?q=1", "/path/abs"),  # absolute-form (RFC 9112 §3.2.2)
    ],
)
def test_path_reaches_the_handler_as_sent(app1: App, target: str, path: str) -> None:
    reply, _ = exchange(app1, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.status == 200, target
    assert reply.body.decode() == path


@pytest.mark.parametrize("target", ["/%68ello", "/hell%6F", "/%2Fhello", "/%70ath/x", "/pat%68/x", "/%2e/hello",
                                    "/hello/", "//hello"])
def test_percent_encoded_route_names_match_no_route(app1: App, target: str) -> None:
    # A proxy that allows or denies by raw prefix must see what fsbridge routes on: /%6detrics is not /metrics.
    reply, _ = exchange(app1, get(target))
    assert reply.status == 404, target
    assert app1.seen == []


def test_query_reaches_the_handler_and_bad_ones_are_refused(app1: App) -> None:
    with connect(app1) as s:
        reader = Reader(s)
        s.sendall(get("/hello?clientId=a%20b&code=100&empty="))
        assert reader.response().status == 200
        assert app1.seen[-1].query == {"clientId": "a b", "code": "100", "empty": ""}
        too_many = "/hello?" + "&".join(f"p{i}=1" for i in range(60))
        for bad in ("/hello?a=1&a=2", "/hello?x=%ff", "/path/\xff\xfe", too_many):
            s.sendall(get(bad))
            reply = reader.response()
            assert reply.status == 400, bad
            assert reply.body == b"malformed path or query\n" or reply.body == b"repeated query parameter\n"
        # A refusal of the query is not a framing problem: the connection goes on.
        s.sendall(get())
        assert reader.response().body == b"hello\n"


def test_request_fields_reach_the_handler(app1: App) -> None:
    exchange(app1, get(extra="X-Thing: a\r\nx-thing: b\r\nCookie: c=1\r\nCookie: d=2\r\nUser-Agent:  ua/1 \t\r\n"))
    request = app1.seen[-1]
    assert request.method == "GET" and request.path == "/hello" and request.remote_addr == "127.0.0.1"
    assert request.headers["x-thing"] == "a, b"  # repeated fields are one list (RFC 9110 §5.3)
    assert request.headers["cookie"] == "c=1; d=2"
    assert request.headers["user-agent"] == "ua/1"  # surrounding whitespace is not part of a value


def test_lf_line_endings_and_leading_blank_lines_are_accepted(app1: App) -> None:
    reply, _ = exchange(app1, b"\r\n\r\nGET /hello HTTP/1.1\nHost: x\n\n")
    assert reply.status == 200
    with connect(app1) as s:
        # A client that ends a POST body with an extra CRLF (RFC 9112 §2.2 lets the server skip it).
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok\r\n" + get())
        reader = Reader(s)
        assert reader.response().body == b"ok"
        assert reader.response().body == b"hello\n"


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /hello\r\n\r\n", 400),  # HTTP/0.9
        (b"GET  /hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
        (b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"BR OKEN /hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"G(T /hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET hello HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /hel\tlo HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /hel\x00lo HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"[:-4] + b"\rX: y\r\n\r\n", 400),  # bare CR
        (b"GET /hello http/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /hello HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"GET /hello HTTP/0.9\r\nHost: x\r\n\r\n", 505),
        (b"PUT /hello HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 501),
        (b"get /hello HTTP/1.1\r\nHost: x\r\n\r\n", 501),  # methods are case-sensitive
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),  # an HTTP/2 preface
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain-HTTP port
        (b"GET /hello HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n", 400),  # whitespace before the colon
        (b"GET /hello HTTP/1.1\r\nHost: x\r\n: empty-name\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400),  # obs-fold
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nX\xffA: 1\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n", 417),
    ],
)
def test_malformed_requests_are_refused_and_closed(app1: App, data: bytes, status: int) -> None:
    reply, closed = exchange(app1, data)
    assert reply.status == status, data
    assert reply.header("Connection") == "close" and closed
    assert reply.header("Content-Length") == str(len(reply.body))
    assert reply.body.count(b"\n") == 1  # a one-line reason, never an echo of the request
    assert b"hello" not in reply.body


def test_limits(app1: App) -> None:
    # The request line: 8 KiB, like pywsgi's (414), the query included.
    ok, _ = exchange(app1, get("/path/" + "a" * 8000))
    assert ok.status == 200
    reply, closed = exchange(app1, get("/hello?" + "a" * 9000))
    assert reply.status == 414 and closed
    # One field line, the number of fields, the whole head: 431.
    reply, closed = exchange(app1, get(extra="X-Big: " + "b" * 9000 + "\r\n"))
    assert reply.status == 431 and closed
    many = "".join(f"X-F{i}: {i}\r\n" for i in range(wire.MAX_HEADERS))
    reply, closed = exchange(app1, get(extra=many))
    assert reply.status == 431 and closed
    fine = "".join(f"X-F{i}: {i}\r\n" for i in range(wire.MAX_HEADERS - 1))
    assert exchange(app1, get(extra=fine))[0].status == 200
    several = "".join(f"X-F{i}: {'v' * 8000}\r\n" for i in range(5))
    reply, closed = exchange(app1, get(extra=several))
    assert reply.status == 431 and closed


def test_oversized_head_is_refused_before_it_ends(app1: App) -> None:
    # A head that never ends is refused once it passes the limit: the server does not wait for more.
    with connect(app1) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        for _ in range(10):
            s.sendall(b"X-Filler: " + b"f" * 4000 + b"\r\n")
        reader = Reader(s)
        reply = reader.response()
        assert reply.status == 431 and reply.header("Connection") == "close"
    with connect(app1) as s:
        s.sendall(b"GET /" + b"a" * 20000)  # no line end at all
        reply = Reader(s).response()
        assert reply.status == 414


def test_refusal_is_readable_even_while_the_client_keeps_sending(app1: App) -> None:
    # The server reads and drops what follows its refusal before closing: closing with unread data
    # would send a RST, which can destroy the answer before the client reads it.
    with connect(app1) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"z" * 200_000)
        reply = Reader(s).response()
        assert reply.status == 431


# --- request bodies ----------------------------------------------------------------------------------


def test_post_bodies(app1: App) -> None:
    with connect(app1) as s:
        reader = Reader(s)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
        gevent.sleep(0.05)
        s.sendall(b" world")
        assert reader.response().body == b"hello world"
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert reader.response().body == b""
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # no length: no body (RFC 9112 §6.3)
        assert reader.response().body == b""
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"m" * 1000)
        assert reader.response().body == b"m" * 1000  # exactly max_body_bytes
        s.sendall(b"POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"f" * 100)
        assert reader.response().body == b"f" * 100  # exactly the route's own limit


def test_client_vanishing_mid_request_body(app1: App) -> None:
    with connect(app1) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part")
    assert exchange(app1, get())[0].status == 200
    assert [r.path for r in app1.seen] == ["/hello"]  # the handler never saw the cut request


def test_expect_100_continue(app1: App) -> None:
    with connect(app1) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        reader = Reader(s)
        interim = reader.response()
        assert interim.status == 100
        s.sendall(b"body")
        assert reader.response().body == b"body"
    # Too large: refused at once, no 100.
    reply, closed = exchange(app1, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                                   b"Expect: 100-continue\r\n\r\n")
    assert reply.status == 413 and closed


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("Content-Length: 1001\r\n", 413),  # over Router.max_body_bytes
        ("Content-Length: 99999999999999999999999999\r\n", 413),
        ("Content-Length: abc\r\n", 400),
        ("Content-Length: -1\r\n", 400),
        ("Content-Length: +5\r\n", 400),
        ("Content-Length: 5, 5\r\n", 400),
        ("Content-Length: 5\r\nContent-Length: 5\r\n", 400),
        ("Transfer-Encoding: chunked\r\n", 411),
        ("Transfer-Encoding: Chunked\r\n", 411),
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        ("Transfer-Encoding: chunked, gzip\r\n", 400),
        ("Transfer-Encoding: identity\r\n", 400),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),  # the smuggling classic
        ("Transfer-Encoding: x\r\nTransfer-Encoding: chunked\r\n", 501),
    ],
)
def test_bodies_that_cannot_be_framed_are_refused(app1: App, extra: str, status: int) -> None:
    data = f"POST /echo HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode() + b"5\r\nhello\r\n0\r\n\r\n"
    reply, closed = exchange(app1, data)
    assert reply.status == status, extra
    assert reply.header("Connection") == "close" and closed
    assert app1.seen == []  # the handler never ran


def test_get_with_a_body_is_refused(app1: App) -> None:
    reply, closed = exchange(app1, get(extra="Content-Length: 5\r\n") + b"hello")
    assert reply.status == 400 and closed
    reply, _ = exchange(app1, get(extra="Content-Length: 0\r\n"))
    assert reply.status == 200


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/hello", 405),  # a route that takes no body at all
        ("POST", "/nothing", 404),
        ("POST", "/%65cho", 404),  # /echo takes POST, its percent-encoded name is no route
        ("POST", "/small", 413),  # over the route's own limit, far under the router's
    ],
)
def test_a_body_the_route_does_not_take_is_answered_without_being_read(app1: App, method: str, path: str,
                                                                        status: int) -> None:
    # The head promises 500 bytes that never come: the answer is decided from the head alone, at once.
    with connect(app1, timeout=1.5) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
                  f"Expect: 100-continue\r\n\r\n".encode())
        reader = Reader(s)
        reply = reader.response()
        assert reply.status == status  # no 100 Continue first: the body is not wanted
        assert reply.header("Connection") == "close" and reader.at_eof()
    assert app1.seen == []


# --- timeouts, disconnects, capacity -----------------------------------------------------------------


def _closed_within(s: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes (or resets); fails if that takes longer than `seconds`."""
    start = time.monotonic()
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < seconds
    return data


def test_slowloris_head_is_cut_off(tmp_path: Path) -> None:
    for app in _serve(tmp_path, timeout=0.5):
        with connect(app) as s:
            start = time.monotonic()
            s.sendall(b"GET /hello HTTP/1.1\r\n")
            try:
                for i in range(100):  # one header byte every 50 ms: each read is quick, the head never ends
                    s.sendall(b"X-%d: 1\r\n" % i)
                    gevent.sleep(0.05)
            except OSError:
                pass  # the server closed on us
            received = _closed_within(s, 3)
            assert time.monotonic() - start < 3
            assert received == b"" or received.startswith(b"HTTP/1.1 408 ")  # a RST may beat the 408


def test_slow_body_is_cut_off(tmp_path: Path) -> None:
    for app in _serve(tmp_path, timeout=0.5):
        with connect(app) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            start = time.monotonic()
            try:
                for _ in range(100):
                    s.sendall(b"x")
                    gevent.sleep(0.05)
            except OSError:
                pass
            _closed_within(s, 3)
            assert time.monotonic() - start < 3
        assert app.seen == []


def test_a_client_cut_off_by_the_timeout_is_logged_and_counted(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fsbridge.http")
    answers: list[tuple[str, int]] = []
    for app in _serve(tmp_path, timeout=0.3):
        app.server.observer = lambda path, status, sent: answers.append((path, status))
        for data in (b"GET /hello?clientId=secret HTTP/1.1\r\nHost: x\r\n",  # the head never ends
                     b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part",  # nor the body
                     b"GET /hel"):  # not even the request line
            with connect(app) as s:
                s.sendall(data)
                assert _closed_within(s, 3).startswith(b"HTTP/1.1 408 ")
        until(lambda: len(answers) == 3, 3, "the three answers")
    assert answers == [("/hello", 408), ("/echo", 408), ("", 408)]
    lines = [r.getMessage() for r in caplog.records if r.name == "fsbridge.http" and r.msg != "listening on %s:%d"]
    assert [line.split(" ", 4)[:4] for line in lines] == [
        ["127.0.0.1", "GET", "/hello", "408"], ["127.0.0.1", "POST", "/echo", "408"], ["127.0.0.1", "-", "-", "408"]]
    assert "secret" not in "\n".join(lines)


def test_a_slow_handler_is_not_timed_out(tmp_path: Path) -> None:
    # The timeout is for the client's waits (reading its request, taking the answer), not our own work.
    for app in _serve(tmp_path, timeout=0.3):
        with connect(app) as s:
            s.sendall(get("/slow") + get())
            reader = Reader(s)
            assert reader.response().body == b"slow\n"
            assert reader.response().body == b"hello\n"


def test_idle_keep_alive_connection_is_closed_silently(tmp_path: Path) -> None:
    for app in _serve(tmp_path, timeout=0.3):
        with connect(app) as s:
            s.sendall(get())
            reader = Reader(s)
            assert reader.response().status == 200
            assert _closed_within(s, 3) == b""  # no 408 for a connection that was merely idle


@pytest.mark.parametrize("how", ["reset", "close"])
def test_client_vanishing_mid_file_costs_nothing(app: App, how: str) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        s = connect(app)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(get("/big"))
        got = 0
        while got < 256 * 1024:
            got += len(s.recv(65536))
        assert open_fds(app.big) == 1  # in flight
        if how == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        else:
            s.shutdown(socket.SHUT_RDWR)
        s.close()
        until(lambda: open_fds(app.big) == 0, what="the big file closed")
    until(lambda: len(os.listdir("/proc/self/fd")) <= fds_before, what="no socket left behind")
    assert exchange(app, get())[0].status == 200


def test_client_vanishing_mid_stream_closes_the_generator(app1: App) -> None:
    s = connect(app1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(get("/endless"))
    s.recv(65536)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    until(lambda: app1.streams_closed == ["endless"], what="the stream closed")


def test_client_that_stops_reading_is_dropped_after_the_timeout(tmp_path: Path) -> None:
    for app in _serve(tmp_path, timeout=0.5):
        s = connect(app)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.sendall(get("/big"))
        s.recv(1024)  # ... and then reads nothing more
        until(lambda big=app.big: open_fds(big) == 0, 5, "the big file closed")
        s.close()


def test_max_connections(tmp_path: Path) -> None:
    for app in _serve(tmp_path, max_connections=1):
        first = connect(app)
        first.sendall(get())
        assert Reader(first).response().status == 200  # `first` now holds the only slot, idle
        second = connect(app)  # the kernel completes the handshake; fsbridge does not take it yet
        second.sendall(get())
        second.settimeout(0.3)
        with pytest.raises(TimeoutError):
            second.recv(1)
        first.close()
        second.settimeout(5)
        assert Reader(second).response().status == 200
        second.close()


def test_stop_ends_idle_connections(tmp_path: Path) -> None:
    for app in _serve(tmp_path, timeout=60):
        with connect(app) as s:
            s.sendall(get())
            assert Reader(s).response().status == 200
            start = time.monotonic()
            app.server.stop(timeout=0.2)
            assert _closed_within(s, 3) == b""
            assert time.monotonic() - start < 3


# --- the access log ----------------------------------------------------------------------------------


def test_access_log_one_line_per_request_never_the_query(app1: App, caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level("INFO", logger="fsbridge.http")
    secret = "very-secret-client-id"
    exchange(app1, get(f"/hello?clientId={secret}"))
    exchange(app1, get(f"/path/%0d%0aFAKE?clientId={secret}"))
    exchange(app1, f"GET /hello?clientId={secret} HTTP/9.9\r\n\r\n".encode())
    exchange(app1, f"GET /hello?clientId={secret}&x= HTTP/1.1\r\n\r\n".encode())
    exchange(app1, f"POST /echo?clientId={secret} HTTP/1.1\r\nHost: x\r\nContent-Length: 9999\r\n\r\n".encode())
    lines = [r.getMessage() for r in caplog.records if r.name == "fsbridge.http"]
    assert len(lines) == 5
    assert lines[0].startswith("127.0.0.1 GET /hello 200 ")
    assert lines[1].startswith("127.0.0.1 GET /path/%0d%0aFAKE 200 ")  # as sent, never decoded
    assert lines[2].startswith("127.0.0.1 - - 505 ")
    assert lines[3].startswith("127.0.0.1 - - 400 ")
    assert lines[4].startswith("127.0.0.1 POST /echo 413 ")
    text = "\n".join(lines)
    assert secret not in text and "\r" not in text
    assert "Traceback" not in capfd.readouterr().err


# --- the wire module on its own ----------------------------------------------------------------------


def test_find_head_end() -> None:
    assert wire.find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest") == (23, 27)
    assert wire.find_head_end(b"GET / HTTP/1.1\nHost: x\n\nrest") == (22, 24)
    assert wire.find_head_end(b"GET / HTTP/1.1\r\nHost: x\n\r\n") == (23, 26)
    assert wire.find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") is None
    # The earliest blank line wins, whatever its kind.
    assert wire.find_head_end(b"A\n\nB\r\n\r\n") == (1, 3)
    assert wire.find_head_end(b"A\r\n\r\nB\n\n") == (1, 5)


def test_parse_head_unit() -> None:
    head = wire.parse_head(b"POST /a%20b?x=1&y HTTP/1.0\r\nHost: h\r\nContent-Length: 3\r\nConnection: keep-alive")
    assert (head.method, head.path, head.query, head.http11, head.content_length, head.keep_alive) == (
        "POST", b"/a%20b", b"x=1&y", False, 3, True)
    with pytest.raises(wire.WireError) as info:
        wire.parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: y\r\n" * wire.MAX_HEADERS)
    assert info.value.status == 431


def test_response_head_refuses_injection() -> None:
    for headers in ({"X-A": "1\r\nSet-Cookie: x"}, {"X-A": "1\nb"}, {"X A": "1"}, {"X-A\r\nB": "1"}, {"X-A": "\x00"},
                    {"X-A": "café\u20ac"}):
        with pytest.raises((ValueError, UnicodeError)):
            wire.response_head(200, headers, 0, None, "d")
    head = wire.response_head(200, {"Content-Length": "999", "Connection": "x", "Server": "s", "X-A": "a\tb"},
                              5, "close", "d")
    assert head == (b"HTTP/1.1 200 OK\r\nServer: s\r\nX-A: a\tb\r\nDate: d\r\nContent-Length: 5\r\n"
                    b"Connection: close\r\n\r\n")


def test_router_wsgi_still_works(tmp_path: Path) -> None:
    # Router.wsgi shares parse_target with this server: same decoding, same refusals, under any WSGI server.
    from gevent.pywsgi import WSGIServer

    app = App(server=None, big=_make_big(tmp_path / "big.wav"))  # type: ignore[arg-type]
    wsgi = WSGIServer(("127.0.0.1", 0), _router(app).wsgi, log=None, error_log=None)
    wsgi.start()
    try:
        host, port = wsgi.address[:2]
        for target, status, body in (("/path/%41%2Fb", 200, b"/path/A/b"), ("/hello?a=1&a=2", 400, None),
                                     ("/path/%ff", 400, None), ("/nothing", 404, None)):
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(get(target, extra="Connection: close\r\n"))
                reply = Reader(s).response()
            assert reply.status == status, target
            if body is not None:
                assert reply.body == body
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
            assert Reader(s).response().body == b"abc"
    finally:
        wsgi.stop(timeout=0.2)
