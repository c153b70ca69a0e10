"""changeUserStatusUrl over real HTTP, the durable status store, and the HTTP layer's own answers."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest
import requests

from fsbridge.http import HttpServer, Request, Response, Router, check_client_id
from fsbridge.http.status import StatusHandler
from fsbridge.manager_status import ManagerStatus

CLIENT_ID = "crm-client-id-0123456789abcdef0123456789"
MANAGERS = {"100": 1, "200": 2}


def serve(router: Router) -> Iterator[str]:
    server = HttpServer("127.0.0.1:0", router, timeout=10)
    server.start()
    host, port = server.address
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop(timeout=0.2)


def status_app(store_path: Path) -> tuple[Router, ManagerStatus]:
    store = ManagerStatus(store_path)
    router = Router()
    StatusHandler(CLIENT_ID, MANAGERS, store).register(router)
    return router, store


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[str, ManagerStatus, Path]]:
    path = tmp_path / "state" / "manager_status.json"
    router, store = status_app(path)
    for base in serve(router):
        yield base, store, path


def get(base: str, **params: str) -> requests.Response:
    return requests.get(base + "/retailcrm/status", params=params)


def ok_params(**over: str) -> dict[str, str]:
    params = {"clientId": CLIENT_ID, "code": "100", "userId": "1", "status": "busy"}
    params.update(over)
    return params


def raw(base: str, target: str) -> int:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


# --- the endpoint ------------------------------------------------------------------------------------


def test_happy_path(app: tuple[str, ManagerStatus, Path]) -> None:
    base, store, path = app
    assert store.get("100") == "free" and store.is_free("100")  # never told: free
    for status in ("busy", "dinner", "break", "free", "busy"):
        r = get(base, **ok_params(status=status))
        assert r.status_code == 200
        assert r.content == b""
        assert store.get("100") == status
    assert not store.is_free("100")
    assert store.is_free("200")
    assert json.loads(path.read_text())["managers"]["100"]["status"] == "busy"
    # userId is optional for us (the CRM always sends it)
    assert get(base, clientId=CLIENT_ID, code="200", status="dinner").status_code == 200
    assert store.get("200") == "dinner"


def test_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "manager_status.json"
    router, _ = status_app(path)
    for base in serve(router):
        assert get(base, **ok_params(code="100", status="dinner")).status_code == 200
        assert get(base, **ok_params(code="200", userId="2", status="break")).status_code == 200
    # A new process: new store, new server, same file.
    router2, store2 = status_app(path)
    assert store2.get("100") == "dinner" and store2.get("200") == "break"
    for base in serve(router2):
        assert get(base, **ok_params(code="100", status="free")).status_code == 200
    assert ManagerStatus(path).snapshot() == {"100": "free", "200": "break"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manager_status.json"]  # no temp files left


@pytest.mark.parametrize("client_id", [None, "", "wrong", CLIENT_ID[:-1], CLIENT_ID + "x", CLIENT_ID.upper(),
                                       " " + CLIENT_ID])
def test_wrong_client_id_is_403_and_changes_nothing(app: tuple[str, ManagerStatus, Path],
                                                     client_id: str | None) -> None:
    base, store, path = app
    params = ok_params()
    if client_id is None:
        del params["clientId"]
    else:
        params["clientId"] = client_id
    r = get(base, **params)
    assert r.status_code == 403
    assert store.get("100") == "free"
    assert not path.exists()


def test_client_id_is_checked_before_anything_else(app: tuple[str, ManagerStatus, Path]) -> None:
    base, _, _ = app
    assert get(base, clientId="wrong", code="999", status="nonsense").status_code == 403


@pytest.mark.parametrize(
    "over",
    [
        {"code": "999"},  # not a configured manager
        {"code": ""},
        {"code": "abc"},
        {"code": "100 "},
        {"code": "+100"},
        {"code": "１００"},  # full-width digits
        {"code": "100\r\nX-Injected: 1"},
        {"code": "1" * 2000},
        {"code": "1" * 20000},  # past pywsgi's 8 KiB request line: 414
        {"status": "away"},
        {"status": ""},
        {"status": "FREE"},
        {"status": "free "},
        {"status": "free\r\n"},
        {"status": "free\x00"},
        {"status": "свободен"},
        {"status": "free" * 500},
        {"status": "free" * 5000},
        {"userId": "1; DROP"},
        {"userId": "1" * 100},
        {"userId": "١"},  # Arabic-Indic digit one
    ],
)
def test_bad_values_are_400_and_change_nothing(app: tuple[str, ManagerStatus, Path],
                                               over: dict[str, str]) -> None:
    base, store, path = app
    r = get(base, **ok_params(**over))
    assert r.status_code == (414 if len(r.request.url) > 8192 else 400)
    assert len(r.text.splitlines()) <= 1  # a one-line reason
    for value in over.values():
        if len(value) > 3:
            assert value not in r.text  # never echoed back
    assert store.snapshot() == {}
    assert not path.exists()


def test_missing_status_is_400(app: tuple[str, ManagerStatus, Path]) -> None:
    base, store, _ = app
    params = ok_params()
    del params["status"]
    assert get(base, **params).status_code == 400
    assert store.snapshot() == {}


def test_repeated_or_malformed_parameters_are_400(app: tuple[str, ManagerStatus, Path]) -> None:
    base, store, _ = app
    assert raw(base, f"/retailcrm/status?clientId={CLIENT_ID}&code=100&status=busy&status=free") == 400
    assert raw(base, f"/retailcrm/status?clientId=x&clientId={CLIENT_ID}&code=100&status=busy") == 400
    assert raw(base, f"/retailcrm/status?clientId={CLIENT_ID}&code=100&status=%ff%fe") == 400
    many = "&".join(f"p{i}=1" for i in range(500))
    assert raw(base, f"/retailcrm/status?clientId={CLIENT_ID}&code=100&status=busy&{many}") == 400
    assert store.snapshot() == {}


def test_other_methods_and_paths(app: tuple[str, ManagerStatus, Path]) -> None:
    base, _, _ = app
    assert requests.post(base + "/retailcrm/status", params=ok_params()).status_code == 405
    assert requests.head(base + "/retailcrm/status", params=ok_params()).status_code == 200
    assert requests.get(base + "/retailcrm/status/", params=ok_params()).status_code == 404
    assert requests.get(base + "/nothing").status_code == 404


def test_clientid_never_reaches_the_log(app: tuple[str, ManagerStatus, Path],
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="fsbridge")
    base, _, _ = app
    get(base, **ok_params())
    get(base, **ok_params(clientId="wrong-" + CLIENT_ID))
    raw(base, f"/retailcrm/status?clientId={CLIENT_ID}&a=1&a=2")
    raw(base, f"/retailcrm/status?clientId={CLIENT_ID}&code=100 HTTP/1.1 junk")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/retailcrm/status 200" in text
    assert CLIENT_ID not in text


# --- the store ---------------------------------------------------------------------------------------


def test_store_validates(tmp_path: Path) -> None:
    store = ManagerStatus(tmp_path / "s.json")
    for code, status in (("abc", "free"), ("100", "gone"), ("", "free"), ("1" * 17, "free")):
        with pytest.raises(ValueError):
            store.set(code, status)
    assert store.get("nobody") == "free"


def test_store_is_gevent_safe(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    store = ManagerStatus(path)
    statuses = ("free", "busy", "dinner", "break")

    def flip(code: int) -> None:
        for i in range(6):
            store.set(str(code), statuses[(code + i) % 4])
            gevent.sleep(0)

    gevent.joinall([gevent.spawn(flip, code) for code in range(100, 120)], raise_error=True)
    expected = {str(code): statuses[(code + 5) % 4] for code in range(100, 120)}
    assert store.snapshot() == expected
    assert ManagerStatus(path).snapshot() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]


def test_corrupt_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text("{not json")
    store = ManagerStatus(path)
    assert store.snapshot() == {}
    assert (tmp_path / "s.json.corrupt").read_text() == "{not json"
    store.set("100", "busy")
    assert ManagerStatus(path).get("100") == "busy"


def test_file_with_bad_entries_keeps_the_good_ones(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"version": 1, "managers": {
        "100": {"status": "busy"}, "200": {"status": "sleeping"}, "x": {"status": "free"}, "300": "free"}}))
    assert ManagerStatus(path).snapshot() == {"100": "busy"}


# --- the HTTP layer's own answers ---------------------------------------------------------------------


def test_router_answers_500_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def boom(request: Request) -> Response:
        raise RuntimeError(f"secret detail {request.query.get('clientId')}")

    def bad_header(request: Request) -> Response:
        return Response(200, {"X-Bad": "a\r\nSet-Cookie: x=1"}, b"ok")

    router = Router()
    router.add({"GET"}, "/boom", boom)
    router.add({"GET"}, "/bad-header", bad_header)
    caplog.set_level("DEBUG", logger="fsbridge")
    for base in serve(router):
        r = requests.get(base + "/boom", params={"clientId": CLIENT_ID})
        assert r.status_code == 500
        assert "Traceback" not in r.text and "secret detail" not in r.text
        r = requests.get(base + "/bad-header")
        assert r.status_code == 500
        assert "Set-Cookie" not in r.headers
    errors = [rec.getMessage() for rec in caplog.records if rec.levelname == "ERROR"]
    assert len(errors) == 2
    assert all("\n" not in e for e in errors)
    assert "RuntimeError" in errors[0]
    assert not any(CLIENT_ID in rec.getMessage() or "secret detail" in rec.getMessage()
                   for rec in caplog.records)


def test_check_client_id_unit() -> None:
    def req(query: dict[str, str]) -> Request:
        from fsbridge.http import Headers
        return Request("GET", "/", query, Headers(), "127.0.0.1")

    assert check_client_id(req({"clientId": "abc"}), "abc") is None
    assert check_client_id(req({"clientId": "abd"}), "abc").status == 403
    assert check_client_id(req({}), "abc").status == 403
    assert check_client_id(req({"clientId": ""}), "").status == 403  # an unset secret admits nobody
    assert check_client_id(req({"clientId": "ü"}), "abc").status == 403


def test_request_headers_are_case_insensitive() -> None:
    seen: dict[str, str | None] = {}

    def handler(request: Request) -> Response:
        seen["ua"] = request.headers.get("user-agent")
        seen["UA"] = request.headers.get("USER-AGENT")
        seen["x"] = request.headers.get("X-Custom-Thing")
        seen["remote"] = request.remote_addr
        return Response.text(200, "hi")

    router = Router()
    router.add({"GET"}, "/h", handler)
    for base in serve(router):
        r = requests.get(base + "/h", headers={"User-Agent": "ua/1", "x-custom-thing": "v"})
        assert r.text == "hi\n"
    assert seen == {"ua": "ua/1", "UA": "ua/1", "x": "v", "remote": "127.0.0.1"}


def test_stalled_and_idle_connections_are_closed_after_the_timeout(capfd: pytest.CaptureFixture[str]) -> None:
    router = Router()
    server = HttpServer("127.0.0.1:0", router, timeout=0.3)
    server.start()
    try:
        for first in (b"GET /x HTTP/1.1\r\n", b"", b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n"):
            with socket.create_connection(server.address, timeout=5) as s:
                s.sendall(first)  # ... and then nothing
                start = time.monotonic()
                while s.recv(1024):
                    pass
                assert time.monotonic() - start < 3
    finally:
        server.stop(timeout=0.2)
    assert "Traceback" not in capfd.readouterr().err


def test_listen_address_parsing() -> None:
    from fsbridge.http.server import parse_listen

    assert parse_listen("127.0.0.1:8088") == ("127.0.0.1", 8088)
    assert parse_listen("[::1]:80") == ("::1", 80)
    assert parse_listen(":8088") == ("0.0.0.0", 8088)
    for bad in ("8088", "host:", "host:99999", "host:http"):
        with pytest.raises(ValueError):
            parse_listen(bad)
