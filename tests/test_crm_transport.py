"""The CRM transport against servers that behave as real ones do: kept-alive, chunked, closing, TLS, broken."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent
import pytest
from gevent.server import StreamServer

from fsbridge.crm.client import RetailCRM
from fsbridge.crm.errors import CRMUnavailable
from fsbridge.crm.transport import ConnectionFailed, NoReply, ReadTimeout, RequestsTransport, Transport
from tests.conftest import API_KEY
from tests.fakes.raw_http import read_request

OK = b'{"success":true}'


class Script:
    """A server answering each request on a connection with what `answer(request_head, n)` returns."""

    def __init__(self, answer: Callable[[bytes, int], bytes | None], ssl_args: dict | None = None) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.close_idle = False  # close each connection right after its reply, as an idle timeout does
        self.server = StreamServer(("127.0.0.1", 0), self._handle, **(ssl_args or {}))
        self.server.start()

    @property
    def port(self) -> int:
        return int(self.server.address[1])

    def _handle(self, sock: socket.socket, _addr: object) -> None:
        self.connections += 1
        buf = b""
        n = 0
        while (got := read_request(sock, buf)) is not None:
            head, body, buf = got
            self.requests.append(head + b"\r\n\r\n" + body)
            n += 1
            reply = self.answer(head, n)
            if reply is None:
                sock.close()  # closed after reading the request: no answer
                return
            sock.sendall(reply)
            if b"Connection: close" in reply or reply.startswith(b"HTTP/1.0"):
                return  # StreamServer closes the socket
            if self.close_idle:
                gevent.sleep(0.05)
                return

    def stop(self) -> None:
        self.server.stop(timeout=0.5)


def watched(t: Transport) -> tuple[list[object], list[object]]:
    """(connections opened, exchanges made) by `t`: a request sent again shows as a second exchange, which
    the server's own counts cannot show (a request sent on a closed socket never reaches it)."""
    opened: list[object] = []
    exchanges: list[object] = []
    connect, exchange = t._connect, t._exchange

    def counted_connect(*args):  # type: ignore[no-untyped-def]
        conn = connect(*args)
        opened.append(conn)
        return conn

    def counted_exchange(conn, *args):  # type: ignore[no-untyped-def]
        exchanges.append(conn)
        return exchange(conn, *args)

    t._connect = counted_connect  # type: ignore[method-assign]
    t._exchange = counted_exchange  # type: ignore[method-assign]
    return opened, exchanges


@pytest.fixture
def serve() -> Iterator[Callable[..., Script]]:
    scripts: list[Script] = []

    def start(answer: Callable[[bytes, int], bytes | None], **kw: object) -> Script:
        script = Script(answer, **kw)  # type: ignore[arg-type]
        scripts.append(script)
        return script

    yield start
    for script in scripts:
        script.stop()


def _length_reply(body: bytes = OK, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def _get(transport: Transport, target: str = "/api/credentials") -> bytes:
    return transport.request("GET", target, {"X-API-KEY": "k"}, None, 1.0, 1.0).content


def test_connections_are_kept_alive(serve) -> None:
    script = serve(lambda head, n: _length_reply())
    t = Transport(f"http://127.0.0.1:{script.port}")
    for _ in range(20):
        assert _get(t) == OK
    assert script.connections == 1 and len(script.requests) == 20
    first = script.requests[0].decode()
    assert first.startswith("GET /api/credentials HTTP/1.1\r\n") and f"Host: 127.0.0.1:{script.port}\r\n" in first


def test_post_body_and_length_go_out_as_given(serve) -> None:
    script = serve(lambda head, n: _length_reply())
    t = Transport(f"http://127.0.0.1:{script.port}")
    reply = t.request("POST", "/api/v5/telephony/call/event", {"Content-Type": "application/x-www-form-urlencoded"},
                      b"event=%7B%7D", 1.0, 1.0)
    assert reply.status == 200
    assert script.requests[0].endswith(b"Content-Length: 12\r\n\r\nevent=%7B%7D")


def test_chunked_reply_is_decoded(serve) -> None:
    body = b'{"success":true,"pad":"' + b"x" * 5000 + b'"}'
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000])
                      for i in range(0, len(body), 1000))
    script = serve(lambda head, n: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
                   + b"0\r\nX-Trailer: 1\r\n\r\n")
    t = Transport(f"http://127.0.0.1:{script.port}")
    assert _get(t) == body and _get(t) == body
    assert script.connections == 1  # the connection stays usable after a chunked body


def test_reply_without_length_is_read_to_the_close(serve) -> None:
    script = serve(lambda head, n: b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK)
    t = Transport(f"http://127.0.0.1:{script.port}")
    _, exchanges = watched(t)
    assert _get(t) == OK and _get(t) == OK
    assert script.connections == 2  # such a connection ends with its reply
    assert len(exchanges) == 2 and exchanges[0] is not exchanges[1]  # not tried again on the ended one


def test_silent_server_is_a_read_timeout(serve) -> None:
    script = serve(lambda head, n: (gevent.sleep(2), _length_reply())[1])
    t = Transport(f"http://127.0.0.1:{script.port}")
    opened, _ = watched(t)
    with pytest.raises(ReadTimeout, match=r"no reply within 0\.3 s"):
        t.request("GET", "/x", {}, None, 1.0, 0.3)
    # Closed, not kept: the late reply will not be taken for the next request's.
    assert [c.sock.fileno() for c in opened] == [-1]  # type: ignore[attr-defined]


def test_connection_close_is_honoured(serve) -> None:
    script = serve(lambda head, n: _length_reply(extra="Connection: close\r\n"))
    t = Transport(f"http://127.0.0.1:{script.port}")
    _, exchanges = watched(t)
    for _ in range(3):
        assert _get(t) == OK
    assert script.connections == 3
    assert len(set(map(id, exchanges))) == len(exchanges) == 3  # each on its own connection, none re-sent


def test_idle_connection_closed_by_the_server_is_not_used(serve) -> None:
    # nginx closes idle kept-alive connections after keepalive_timeout: the next request must not fail.
    def answer(head: bytes, n: int) -> bytes:
        return _length_reply()

    script = serve(answer)
    script.close_idle = True
    t = Transport(f"http://127.0.0.1:{script.port}")
    opened, exchanges = watched(t)
    assert _get(t) == OK
    gevent.sleep(0.2)  # the server has closed the kept-alive connection by now
    assert _get(t) == OK
    assert script.connections == 2
    # Sent once, on a fresh connection: the closed one was seen closed before anything was sent on it.
    assert exchanges == opened and len(opened) == 2


def test_request_on_a_connection_the_server_dropped_meanwhile_is_sent_again_once(serve) -> None:
    # The server takes the request on the kept-alive connection and closes without answering (it was
    # closing that connection as the request arrived): the request goes again, on a new connection.
    def answer(head: bytes, n: int) -> bytes | None:
        return _length_reply() if n == 1 else None

    script = serve(answer)
    t = Transport(f"http://127.0.0.1:{script.port}")
    assert _get(t) == OK
    assert _get(t) == OK
    assert script.connections == 2


def test_fresh_connection_closed_without_reply_fails(serve) -> None:
    script = serve(lambda head, n: None)
    t = Transport(f"http://127.0.0.1:{script.port}")
    with pytest.raises(ConnectionFailed, match="closed without a reply"):
        _get(t)
    assert len(script.requests) == 1  # not re-sent: a new connection was not the server's to drop


@pytest.mark.parametrize(("reply", "reason"), [
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP reply"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported transfer coding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "reply head too large"),
], ids=["not-http", "bad-length", "gzip", "bad-chunk", "bad-header", "huge-head"])
def test_broken_replies_are_one_line_errors(serve, reply: bytes, reason: str) -> None:
    script = serve(lambda head, n: reply + b"Connection: close\r\n")
    t = Transport(f"http://127.0.0.1:{script.port}")
    opened, _ = watched(t)
    with pytest.raises(ConnectionFailed, match=reason):
        _get(t)
    assert [c.sock.fileno() for c in opened] == [-1]  # type: ignore[attr-defined]


def test_short_body_then_close_is_an_error(serve) -> None:
    def answer(head: bytes, n: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n" + OK

    script = serve(answer)
    t = Transport(f"http://127.0.0.1:{script.port}")
    with pytest.raises(ConnectionFailed, match="middle of the reply"):
        _get(t)


def test_interim_100_continue_is_skipped(serve) -> None:
    script = serve(lambda head, n: b"HTTP/1.1 100 Continue\r\n\r\n" + _length_reply())
    t = Transport(f"http://127.0.0.1:{script.port}")
    assert _get(t) == OK


def test_refused_connection(serve) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = Transport(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectionFailed, match="connection refused"):
        _get(t)


def test_pool_keeps_at_most_pool_size_idle(serve) -> None:
    script = serve(lambda head, n: (gevent.sleep(0.05), _length_reply())[1])
    t = Transport(f"http://127.0.0.1:{script.port}", pool_size=3)
    gevent.joinall([gevent.spawn(_get, t) for _ in range(8)], raise_error=True)
    assert script.connections == 8 and len(t._idle) == 3
    t.close()
    assert t._idle == []


def test_deadline_cut_leaves_no_half_read_connection(serve) -> None:
    # A reply that comes after the caller gave up must not be read as the answer to the next request.
    def answer(head: bytes, n: int) -> bytes:
        if len(script.requests) == 1:  # the first request of all, whatever the connection
            gevent.sleep(0.3)
            return _length_reply(b'{"success":true,"late":1}')
        return _length_reply()

    script = serve(answer)
    t = Transport(f"http://127.0.0.1:{script.port}")
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
        _get(t)
    assert _get(t) == OK


# -- through RetailCRM -------------------------------------------------------------------------------


def test_client_uses_requests_when_a_proxy_is_set(monkeypatch: pytest.MonkeyPatch, fake_crm) -> None:
    from fsbridge.crm.transport import PROXY_VARIABLES

    for name in PROXY_VARIABLES:  # whatever the machine running the tests has set
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert isinstance(RetailCRM("https://example.retailcrm.ru", API_KEY)._transport, RequestsTransport)
    monkeypatch.delenv("HTTPS_PROXY")
    assert isinstance(RetailCRM("https://example.retailcrm.ru", API_KEY)._transport, Transport)
    # The requests transport itself (no proxy in the way here) gives the same replies.
    crm = RetailCRM(fake_crm.url, API_KEY, transport=RequestsTransport(fake_crm.url))
    assert crm.request("GET", "/api/credentials")["success"] is True


def test_requests_transport_keeps_the_account_path_once(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsbridge.crm.transport import PROXY_VARIABLES

    for name in PROXY_VARIABLES:  # whatever the machine running the tests has set
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # chosen because of the proxy, but not sent through it here
    script = serve(lambda head, n: _length_reply())
    crm = RetailCRM(f"http://127.0.0.1:{script.port}/crm", API_KEY)
    assert isinstance(crm._transport, RequestsTransport)
    crm.request("GET", "/api/credentials")
    assert script.requests[0].startswith(b"GET /crm/api/credentials HTTP/1.1\r\n")


def test_client_messages_name_no_url_or_key(serve) -> None:
    script = serve(lambda head, n: b"garbage\r\n\r\n")
    crm = RetailCRM(f"http://127.0.0.1:{script.port}", API_KEY)
    with pytest.raises(CRMUnavailable) as err:
        crm.request("GET", "/api/v5/telephony/manager", params={"phone": "79001234567"}, attempts=1)
    text = str(err.value)
    assert "not an HTTP reply" in text and "79001234567" not in text and API_KEY not in text


# -- TLS ---------------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return key, cert


def test_tls_with_verified_certificate(serve, certificate: tuple[Path, Path]) -> None:
    key, cert = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(str(cert), str(key))
    script = serve(lambda head, n: _length_reply(), ssl_args={"ssl_context": server_side})
    trusted = ssl.create_default_context(cafile=str(cert))
    t = Transport(f"https://localhost:{script.port}", ssl_context=trusted)
    assert _get(t) == OK and _get(t) == OK
    assert script.connections == 1
    # The system's trust store does not know this certificate: refused, in plain words.
    with pytest.raises(ConnectionFailed, match="TLS error"):
        _get(Transport(f"https://localhost:{script.port}"))


def test_through_requests_a_post_that_never_left_is_not_taken_for_one_that_may_have_arrived(
        serve, certificate: tuple[Path, Path]) -> None:
    # Behind a proxy the requests transport is used, and requests says less about what was sent. A certificate
    # refused in the handshake, or a connection never made, sent nothing: ConnectionFailed (the card is tried
    # again while it is fresh), not NoReply (taken as "may have been shown", never re-sent: a lost card).
    key, cert = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(str(cert), str(key))
    script = serve(lambda head, n: _length_reply(), ssl_args={"ssl_context": server_side})
    post = ("POST", "/api/v5/telephony/call/event", {"X-API-KEY": "k"}, b"event=%7B%7D", 1.0, 1.0)
    with pytest.raises(ConnectionFailed, match="TLS error") as refused:
        RequestsTransport(f"https://localhost:{script.port}").request(*post)
    assert not isinstance(refused.value, NoReply)
    assert script.requests == []
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(ConnectionFailed) as refused:
        RequestsTransport(f"http://127.0.0.1:{port}").request(*post)
    assert not isinstance(refused.value, NoReply)
