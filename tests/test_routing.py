"""GET /routing/manager over real HTTP: fsbridge's HTTP server, the lookup and the strict fake retailCRM."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests

from fsbridge.crm import RetailCRM
from fsbridge.http import HttpServer, Router
from fsbridge.http.lookup import LOOPBACK, RoutingHandler
from fsbridge.manager_status import ManagerStatus
from fsbridge.routing import ManagerLookup
from tests.conftest import API_KEY
from tests.fakes.retailcrm import FakeRetailCRM
from tests.waiting import until

MANAGERS = {"100": 1, "200": 2}
PHONE = "+79121234567"
JOHN = {"id": 1, "firstName": "John", "lastName": "Doe", "email": "john@example.com", "code": "100"}
MANAGER_PATH = "/api/v5/telephony/manager"


@dataclass
class App:
    base: str
    crm: FakeRetailCRM
    status: ManagerStatus
    lookup: ManagerLookup
    http: requests.Session

    def ask(self, phone: str | None = PHONE, **kwargs: Any) -> requests.Response:
        params = {} if phone is None else {"phone": phone}
        return self.http.get(self.base + "/routing/manager", params=params, timeout=10, **kwargs)

    def crm_lookups(self) -> list[dict[str, str]]:
        return [r.params for r in self.crm.requests if r.path == MANAGER_PATH]


@contextlib.contextmanager
def running(fake_crm: FakeRetailCRM, tmp_path: Path, *, listen: str = "127.0.0.1:0",
            allow_from: tuple[str, ...] | list[str] = LOOPBACK, crm: Any = None,
            **lookup_options: Any) -> Iterator[App]:
    status = ManagerStatus(tmp_path / "manager_status.json")
    client = crm or RetailCRM(fake_crm.url, API_KEY, timeout=5)
    options = {"timeout": 0.5, "cache_ttl": 60.0, "negative_ttl": 10.0, **lookup_options}
    lookup = ManagerLookup(client, MANAGERS, status, **options)
    router = Router()
    RoutingHandler(lookup, allow_from=allow_from).register(router)
    server = HttpServer(listen, router, timeout=10)
    server.start()
    http = requests.Session()
    http.trust_env = False  # a proxy from the environment must not sit between the test and fsbridge
    try:
        yield App(f"http://127.0.0.1:{server.address[1]}", fake_crm, status, lookup, http)
    finally:
        http.close()
        server.stop(timeout=0.2)


@pytest.fixture
def app(fake_crm: FakeRetailCRM, tmp_path: Path) -> Iterator[App]:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    with running(fake_crm, tmp_path) as application:
        yield application


def timed(call: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = call()
    return result, time.monotonic() - start


# --- the answer ---------------------------------------------------------------------------------------


def test_answers_the_responsible_managers_extension_as_plain_text(app: App) -> None:
    r = app.ask()
    assert r.status_code == 200
    assert r.text == "100"
    assert r.headers["Content-Type"].startswith("text/plain")
    assert app.crm_lookups() == [{"phone": PHONE, "details": "0", "ignoreStatus": "0"}]


def test_a_cached_answer_spares_the_crm_whatever_way_the_number_is_written(app: App) -> None:
    for phone in (PHONE, "79121234567", "+7 (912) 123-45-67", PHONE):
        assert app.ask(phone).text == "100"
    assert len(app.crm_lookups()) == 1


def test_the_cache_expires(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    with running(fake_crm, tmp_path, cache_ttl=0.3) as app:
        assert app.ask().text == "100"
        fake_crm.managers_by_phone[PHONE] = {**JOHN, "id": 2, "code": "200"}  # reassigned in the CRM
        assert app.ask().text == "100"
        gevent.sleep(0.4)
        assert app.ask().text == "200"
        assert len(app.crm_lookups()) == 2


def test_unknown_phone_gets_an_empty_answer_remembered_briefly(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone["+79990000000"] = None  # the CRM's other shape: "manager": null
    with running(fake_crm, tmp_path, negative_ttl=0.3) as app:
        for phone in ("+79995550000", "+79990000000"):
            r = app.ask(phone)
            assert (r.status_code, r.text) == (200, "")
            assert app.ask(phone).text == ""
        assert len(app.crm_lookups()) == 2
        fake_crm.managers_by_phone["+79995550000"] = dict(JOHN)  # a manager was assigned since
        gevent.sleep(0.4)
        assert app.ask("+79995550000").text == "100"


def test_a_manager_who_is_not_free_gets_no_call_even_from_the_cache(app: App) -> None:
    assert app.ask().text == "100"
    app.status.set("100", "dinner")  # what the CRM's changeUserStatusUrl callback stores
    assert app.ask().text == ""
    app.status.set("100", "free")
    assert app.ask().text == "100"
    assert len(app.crm_lookups()) == 1


def test_the_crms_own_status_is_respected_unless_ignore_status(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.manager_status[1] = "busy"
    with running(fake_crm, tmp_path) as app:
        assert app.ask().text == ""
    with running(fake_crm, tmp_path, ignore_status=True, details=True) as app:
        # Only fsbridge's status store (free by default) decides now.
        assert app.ask().text == "100"
    sent = [r.params for r in fake_crm.requests if r.path == MANAGER_PATH]
    assert sent == [{"phone": PHONE, "details": "0", "ignoreStatus": "0"},
                    {"phone": PHONE, "details": "1", "ignoreStatus": "1"}]


def test_a_manager_who_is_not_a_configured_extension_gets_no_call(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = {**JOHN, "id": 3, "code": "300"}
    fake_crm.managers_by_phone["+79997770000"] = {**JOHN, "code": None}  # a manager without an extension
    with running(fake_crm, tmp_path) as app:
        assert app.ask().text == ""
        assert app.ask("+79997770000").text == ""


def test_callers_of_one_number_at_once_share_one_crm_request(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.manager_latency = 0.2
    with running(fake_crm, tmp_path) as app:
        greenlets = [gevent.spawn(lambda: app.ask().text) for _ in range(5)]
        gevent.joinall(greenlets, raise_error=True)
        assert [g.value for g in greenlets] == ["100"] * 5
        assert len(app.crm_lookups()) == 1


def test_the_cache_is_bounded(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    phones = ["+79990000001", "+79990000002", "+79990000003"]
    with running(fake_crm, tmp_path, cache_size=2) as app:
        for phone in [*phones, phones[2], phones[0]]:
            app.ask(phone)
        # 3 and then 1 again: 1 had been pushed out by 3, 3 had not.
        assert [p["phone"] for p in app.crm_lookups()] == [*phones, phones[0]]


# --- a slow or broken CRM costs the caller at most the timeout -----------------------------------------


@pytest.mark.parametrize("outage", ["html503", "html502", "reset", "timeout"])
def test_crm_down_answers_empty_within_the_timeout(fake_crm: FakeRetailCRM, tmp_path: Path, outage: str) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.outage = outage
    with running(fake_crm, tmp_path, timeout=0.5) as app:
        r, elapsed = timed(app.ask)
        assert (r.status_code, r.text) == (200, "")
        assert elapsed < 0.9


def test_slow_crm_answers_empty_within_the_timeout(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.manager_latency = 3.0
    with running(fake_crm, tmp_path, timeout=0.5, breaker=0) as app:
        r, elapsed = timed(app.ask)
        assert (r.status_code, r.text) == (200, "")
        assert 0.4 < elapsed < 0.9
        # A late answer is not cached as "nobody": once the CRM is fast again the manager is found.
        fake_crm.manager_latency = 0.0
        assert app.ask().text == "100"


def test_crm_unreachable_answers_empty(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    client = RetailCRM(f"http://127.0.0.1:{closed_port}", API_KEY, timeout=5)
    with running(fake_crm, tmp_path, crm=client, timeout=0.5) as app:
        r, elapsed = timed(app.ask)
        assert (r.status_code, r.text) == (200, "")
        assert elapsed < 0.9


def test_a_broken_client_never_reaches_the_dialplan(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    class Broken:
        def responsible_manager(self, phone: str, **kwargs: Any) -> dict[str, Any]:
            raise RuntimeError("bug")

    with running(fake_crm, tmp_path, crm=Broken()) as app:
        r = app.ask()
        assert (r.status_code, r.text) == (200, "")


def test_an_outage_is_logged_once_and_so_is_the_recovery(
        fake_crm: FakeRetailCRM, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.outage = "html503"
    with caplog.at_level(logging.INFO, logger="fsbridge.routing"), \
            running(fake_crm, tmp_path, timeout=0.3, breaker=0) as app:
        for n in range(5):
            assert app.ask(f"+7999000000{n}").text == ""
        fake_crm.outage = None
        assert app.ask().text == "100"
    routing = [r for r in caplog.records if r.name == "fsbridge.routing"]
    assert len(routing) == 2, [r.getMessage() for r in routing]
    assert "inbound calls go to the dialplan's fallback" in routing[0].getMessage()
    assert "work again (5 failed meanwhile)" in routing[1].getMessage()


def test_a_failing_crm_is_asked_once_per_lookup(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    # retailCRM's front answers 502: each lookup used to retry about six times within its budget, a request
    # multiplier on a CRM already down. Only the first lookup, made while all looked well, tries twice.
    fake_crm.outage = "html502"
    with running(fake_crm, tmp_path, timeout=1.0, breaker=0) as app:
        for n in range(10):
            r, elapsed = timed(lambda n=n: app.ask(f"+7999000000{n}"))
            assert (r.status_code, r.text) == (200, "")
            assert elapsed < 0.9
        assert len(app.crm_lookups()) == 11
        assert app.lookup.stats.failures == 10


def test_after_failures_the_crm_is_left_alone_for_a_while_then_asked_again(
        fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.outage = "html502"
    with running(fake_crm, tmp_path, timeout=1.0, breaker=0.5, breaker_max=1.0) as app:
        for n in range(20):  # the callers of the next half-second: the fallback rings at once for each
            assert app.ask(f"+7999000000{n:02}").text == ""
        assert len(app.crm_lookups()) == 2  # the first lookup's two tries; the others asked nothing
        assert app.lookup.stats.skipped == 19
        # Once the pause is over one lookup probes, once; it fails, and the pause doubles.
        gevent.sleep(0.6)
        assert app.ask("+79990001111").text == ""
        assert len(app.crm_lookups()) == 3
        probed = time.monotonic()
        fake_crm.outage = None
        assert app.ask().text == ""  # back, but the pause (1 s now) is not over: not asked yet
        assert len(app.crm_lookups()) == 3
        until(lambda: app.ask().text == "100", timeout=5, what="lookups to resume")
        assert time.monotonic() - probed > 0.8
        assert len(app.crm_lookups()) == 4


def test_a_number_the_crm_refuses_is_nobody_for_that_caller_and_trips_no_breaker(
        fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.refused_phones.add("79990000001")
    with running(fake_crm, tmp_path, timeout=1.0, breaker=5.0) as app:
        assert app.ask("+79990000001").text == ""
        # The next caller is still looked up at once: one odd number is not a CRM outage.
        assert app.ask().text == "100"
        assert app.lookup.stats.skipped == 0


def test_the_phone_number_is_not_logged_at_info(app: App, caplog: pytest.LogCaptureFixture) -> None:
    app.crm.outage = "html503"
    with caplog.at_level(logging.INFO):
        app.ask()
        app.ask("+79995550000")
    assert caplog.records  # the access log and the outage warning were written...
    assert "9121234567" not in caplog.text and "9995550000" not in caplog.text  # ...without the numbers


# --- what is refused before the CRM is asked ---------------------------------------------------------------


@pytest.mark.parametrize("phone", [
    None, "", "anonymous", "123", "1" * 17, "+" + "7" * 17,
    "79121234567&ignoreStatus=1", "7912;1234567", "+7912\r\n1234567", "+7912'1234567", "../../../etc/passwd",
    "+٧٩١٢١٢٣٤٥٦٧",  # Arabic-Indic digits: str.isdigit() says yes, the CRM would not
    "+7912{1234567}", "x" * 5000,
])
def test_hostile_or_meaningless_phones_are_refused_without_asking_the_crm(app: App, phone: str | None) -> None:
    r = app.ask(phone)
    assert r.status_code == 400
    assert app.lookup.lookup(phone) == ""  # the lookup refuses them too, whoever calls it
    assert app.crm_lookups() == []


def test_the_refusal_says_what_a_phone_should_look_like(app: App) -> None:
    r = app.ask("anonymous")
    assert (r.status_code, r.text) == (400, "phone: expected 5 to 16 digits, optionally after +\n")


def test_a_repeated_phone_parameter_is_refused(app: App) -> None:
    r = app.http.get(app.base + f"/routing/manager?phone={PHONE}&phone=%2B79990000000", timeout=5)
    assert r.status_code == 400
    assert app.crm_lookups() == []


def _own_address() -> str | None:
    """An address of this host that is not loopback, if it has one."""
    for target in ("203.0.113.1", "10.255.255.255", "192.168.255.255"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))  # nothing is sent: this only picks the outgoing interface
            except OSError:
                continue
            address = s.getsockname()[0]
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


def test_requests_from_other_hosts_are_refused_unless_allowed(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    address = _own_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to send a request from")
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    with running(fake_crm, tmp_path, listen="0.0.0.0:0") as app:
        outside = app.base.replace("127.0.0.1", address)
        r = app.http.get(outside + "/routing/manager", params={"phone": PHONE}, timeout=5)
        assert r.status_code == 403
        assert app.crm_lookups() == []
        assert app.ask().text == "100"  # loopback still is
    with running(fake_crm, tmp_path, listen="0.0.0.0:0", allow_from=[f"{address}/32"]) as app:
        outside = app.base.replace("127.0.0.1", address)
        assert app.http.get(outside + "/routing/manager", params={"phone": PHONE}, timeout=5).text == "100"
        assert app.ask().status_code == 403  # allow_from replaces the loopback default


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_requests_through_a_reverse_proxy_are_refused(app: App, header: str) -> None:
    # The TLS proxy in front of fsbridge connects from 127.0.0.1 on behalf of anyone on the internet.
    r = app.ask(headers={header: "203.0.113.7"})
    assert r.status_code == 403
    assert app.crm_lookups() == []
