"""fsbridge.crm.RetailCRM against the strict fake retailCRM, over real HTTP."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import gevent
import pytest

from fsbridge.crm import (
    CRMAuthError,
    CRMError,
    CRMNoReply,
    CRMRejected,
    CRMUnavailable,
    RateLimiter,
    RetailCRM,
    encode_form,
    encode_params,
    form_body,
)
from fsbridge.crm.backoff import backoff_delay
from tests.fakes.retailcrm import FakeRetailCRM

KEY = "k3y-that-must-never-be-logged"


@pytest.fixture
def fake() -> Iterator[FakeRetailCRM]:
    with FakeRetailCRM(api_key=KEY) as server:
        yield server


@pytest.fixture
def crm(fake: FakeRetailCRM) -> Iterator[RetailCRM]:
    with RetailCRM(fake.url, KEY, connect_timeout=1.0, timeout=2.0) as client:
        yield client


def event(**over: Any) -> dict[str, Any]:
    return {"phone": "+79121234567", "type": "in", "codes": ["100"], "callExternalId": "c1", **over}


def call(n: int, **over: Any) -> dict[str, Any]:
    return {
        "date": "2024-03-21 05:14:07", "type": "in", "phone": "+79121234567", "code": "100",
        "result": "answered", "duration": 42, "durationWaiting": 3, "externalId": f"uuid-{n}",
        "recordUrl": "https://pbx.example.com/rec/1.mp3", **over,
    }


MODULE: dict[str, Any] = {
    "code": "fsbridge", "active": True, "name": "FreeSWITCH", "logo": "https://pbx.example.com/logo.svg",
    "baseUrl": "https://pbx.example.com", "clientId": "x" * 32,
    "integrations": {"telephony": {
        "makeCallUrl": "https://pbx.example.com/retailcrm/make-call", "allowEdit": False,
        "additionalCodes": [{"userId": "1", "code": "100"}, {"userId": "5", "code": "500"}],
        "externalPhones": [{"siteCode": "shop1", "externalPhone": "+74999999999"}],
    }},
}


# -- encoding ------------------------------------------------------------------------


def test_encode_form_nests_as_one_json_field() -> None:
    form = encode_form({"event": {"phone": "+7", "name": "Иван", "codes": ["100"]}, "flag": True, "no": None})
    assert form == {"event": '{"phone":"+7","name":"Иван","codes":["100"]}', "flag": "1"}


def test_encode_params_booleans_as_digits() -> None:
    assert encode_params({"phone": "+7", "details": True, "ignoreStatus": False, "x": None}) == {
        "phone": "+7", "details": "1", "ignoreStatus": "0"}
    with pytest.raises(TypeError):
        encode_params({"filter": {"a": 1}})


def test_url_is_normalised() -> None:
    assert RetailCRM("https://demo.retailcrm.ru/api/v5/", KEY).url == "https://demo.retailcrm.ru"
    assert KEY not in repr(RetailCRM("https://demo.retailcrm.ru", KEY))
    with pytest.raises(ValueError):
        RetailCRM("demo.retailcrm.ru", KEY)


# -- success paths -------------------------------------------------------------------


def test_call_event(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    reply = crm.send_call_event(event(codes=["100", "300"], externalPhone="+74999999999"))
    assert reply == {"success": True, "notExistCodes": ["300"], "notExistUsers": []}
    assert fake.events[0]["codes"] == ["100", "300"]
    assert fake.requests[0].form.keys() == {"event"}


def test_upload_calls(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    reply = crm.upload_calls([call(1, source={"source": "Яндекс"}), call(2, result="no answer")])
    assert reply == {"success": True, "processedCallsCount": 2, "duplicateCalls": []}
    assert fake.calls["uuid-1"]["source"]["source"] == "Яндекс"
    assert crm.upload_calls([call(2)])["duplicateCalls"] == ["uuid-2"]


def test_upload_more_than_50_is_refused_locally(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    with pytest.raises(ValueError):
        crm.upload_calls([call(n) for n in range(51)])
    with pytest.raises(ValueError):
        crm.upload_calls([])
    assert fake.requests == []
    assert crm.upload_calls([call(n) for n in range(50)])["processedCallsCount"] == 50


def test_responsible_manager(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    manager = {"id": 1, "firstName": "John", "lastName": "Doe", "email": "a@b.c", "code": "100"}
    fake.managers_by_phone["+79121234567"] = manager
    fake.managers_by_phone["+79990000000"] = None  # answers "manager": null
    assert crm.responsible_manager("+79121234567") == manager
    assert fake.requests[-1].params == {"phone": "+79121234567", "details": "0", "ignoreStatus": "0"}
    assert crm.responsible_manager("+79121234567", details=True, ignore_status=True) == manager
    assert fake.requests[-1].params == {"phone": "+79121234567", "details": "1", "ignoreStatus": "1"}
    assert crm.responsible_manager("+70000000000") is None
    assert crm.responsible_manager("+79990000000") is None


def test_responsible_manager_timeout(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    fake.manager_latency = 2.0
    start = time.monotonic()
    with pytest.raises(CRMUnavailable):
        crm.responsible_manager("+79121234567", timeout=0.3)
    assert time.monotonic() - start < 0.5


def test_integration_module(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    with pytest.raises(CRMRejected) as missing:
        crm.get_integration_module("fsbridge")
    assert missing.value.status == 404 and "Not found" in str(missing.value)
    created, reply = crm.edit_integration_module(MODULE)
    assert created is True
    assert reply["info"] == {"notExistUsersIds": ["5"]}
    created, reply = crm.edit_integration_module({**MODULE, "name": "FS"})
    assert created is False
    assert crm.get_integration_module("fsbridge")["name"] == "FS"


def test_credentials(crm: RetailCRM) -> None:
    reply = crm.credentials()
    assert reply["siteAccess"] == "access_full" and "/api/telephony/calls/upload" in reply["credentials"]


# -- error classes and messages --------------------------------------------------------


def test_wrong_key_is_auth_error(fake: FakeRetailCRM) -> None:
    client = RetailCRM(fake.url, "wrong-" + KEY)
    with pytest.raises(CRMAuthError) as err:
        client.send_call_event(event())
    assert err.value.status == 403
    assert str(err.value) == 'retailCRM answered HTTP 403: Wrong "apiKey" value.'
    assert KEY not in str(err.value)
    assert len(fake.requests) == 1  # not retried


def test_validation_error_keeps_field_errors(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    calls = [call(n) for n in range(5)]
    calls[3]["result"] = "no answered"
    with pytest.raises(CRMRejected) as err:
        crm.upload_calls(calls)
    assert not isinstance(err.value, CRMAuthError | CRMUnavailable)
    assert err.value.status == 400
    assert err.value.errors == {"calls[3][result]": "The value you selected is not a valid choice."}
    assert "\n" not in str(err.value)
    assert "calls[3][result]" in str(err.value)
    assert len(fake.requests) == 1


def test_hangup_status_spelling(crm: RetailCRM) -> None:
    crm.send_call_event(event(type="hangup", hangupStatus="no answered"))
    with pytest.raises(CRMRejected):
        crm.send_call_event(event(type="hangup", hangupStatus="no answer"))


def test_html_page_message(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    fake.outage = "html502"
    with pytest.raises(CRMUnavailable) as err:
        crm.send_call_event(event(), deadline=time.monotonic() + 0.3)
    assert str(err.value) == "retailCRM answered HTTP 502 with an HTML page (not the API)"
    assert err.value.status == 502


def test_default_is_five_attempts(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    fake.outage = "html503"
    with pytest.raises(CRMUnavailable):
        crm.send_call_event(event())
    assert len(fake.requests) == 5
    fake.requests.clear()
    with pytest.raises(CRMUnavailable):
        crm.request("POST", "/api/v5/telephony/call/event", form={"event": event()}, attempts=2)
    assert len(fake.requests) == 2


def test_wrong_method_and_unknown_path_are_not_retried(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    with pytest.raises(CRMRejected) as err:
        crm.request("GET", "/api/v5/telephony/call/event")
    assert err.value.status == 405 and "HTML page" in str(err.value)
    with pytest.raises(CRMRejected) as err:
        crm.request("GET", "/api/v5/telephony/nope")
    assert err.value.status == 404 and "API method not found" in str(err.value)
    assert len(fake.requests) == 2


def test_connection_refused(fake: FakeRetailCRM) -> None:
    url = fake.url
    fake.stop()
    client = RetailCRM(url, KEY, connect_timeout=0.5)
    with pytest.raises(CRMUnavailable) as err:
        client.request("GET", "/api/credentials", attempts=2)
    assert "connection refused" in str(err.value) and err.value.status is None


# -- retries and deadlines -------------------------------------------------------------


@pytest.mark.parametrize("outage", ["html503", "html502"])
def test_retry_until_outage_lifted(fake: FakeRetailCRM, crm: RetailCRM, outage: str) -> None:
    fake.outage = outage
    gevent.spawn_later(0.3, setattr, fake, "outage", None)
    reply = crm.send_call_event(event(), deadline=time.monotonic() + 5)
    assert reply["success"] is True
    assert len(fake.requests) >= 3
    assert len(fake.events) == 1


def test_upload_retried_through_connection_resets(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    fake.outage = "reset"
    gevent.spawn_later(0.3, setattr, fake, "outage", None)
    reply = crm.upload_calls([call(1)], deadline=time.monotonic() + 5)
    assert reply["success"] is True
    assert len(fake.requests) >= 3


@pytest.fixture
def short_timeout_client(fake: FakeRetailCRM) -> RetailCRM:
    # A read timeout shorter than the outage, so the first attempt times out and is retried.
    return RetailCRM(fake.url, KEY, timeout=0.2)


def test_an_upload_that_timed_out_is_sent_again(fake: FakeRetailCRM, short_timeout_client: RetailCRM) -> None:
    # The CRM de-duplicates uploads by externalId: sending one again after no reply is safe.
    fake.outage = "timeout"
    gevent.spawn_later(0.5, setattr, fake, "outage", None)
    reply = short_timeout_client.upload_calls([call(1)], deadline=time.monotonic() + 3)
    assert reply["success"] is True
    assert len(fake.requests) >= 2


def test_a_call_event_that_may_have_arrived_is_not_sent_again(fake: FakeRetailCRM,
                                                              short_timeout_client: RetailCRM) -> None:
    # No reply within the timeout: the CRM may have shown the card already, and call events are not
    # documented as de-duplicated. A card is shown once or not at all; a refused connection is retried.
    fake.outage = "timeout"
    gevent.spawn_later(0.5, setattr, fake, "outage", None)
    with pytest.raises(CRMNoReply):
        short_timeout_client.send_call_event(event(), deadline=time.monotonic() + 3)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("through", ["own", "requests"])
def test_a_call_event_the_server_read_and_dropped_is_delivered_once(through: str) -> None:
    # "requests": the transport used behind an HTTP proxy (HTTPS_PROXY), which says less about what was sent.
    from fsbridge.crm.transport import RequestsTransport
    from tests.fakes.raw_http import RawHttpServer

    with RawHttpServer(lambda peer, request: peer.close()) as raw:
        client = RetailCRM(raw.url, KEY, timeout=1.0,
                           transport=RequestsTransport(raw.url) if through == "requests" else None)
        with pytest.raises(CRMNoReply, match=r"closed without a reply|connection reset"):
            client.send_call_event(event(), deadline=time.monotonic() + 3)
        assert len(raw.received("POST")) == 1
        with pytest.raises(CRMNoReply):
            client.upload_calls([call(1)], deadline=time.monotonic() + 1)
        assert len(raw.received("POST")) > 2   # uploads are de-duplicated by the CRM: retried


@pytest.mark.parametrize("outage", ["timeout", "html503"])
def test_deadline_respected(fake: FakeRetailCRM, crm: RetailCRM, outage: str) -> None:
    fake.outage = outage
    start = time.monotonic()
    with pytest.raises(CRMUnavailable):
        crm.send_call_event(event(), deadline=start + 0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 0.6
    if outage == "timeout":
        assert elapsed >= 0.45  # the held attempt was cut at the deadline, not at timeout=2.0
    else:
        # Retried while there was time; it stops early when the next backoff would overshoot.
        assert len(fake.requests) >= 3


def test_deadline_already_past(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    with pytest.raises(CRMUnavailable):
        crm.send_call_event(event(), deadline=time.monotonic() - 1)
    assert fake.requests == []


# -- rate limit ------------------------------------------------------------------------


def test_limiter_spacing_is_exact() -> None:
    clock = [100.0]
    lateness = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds + lateness[0]

    limiter = RateLimiter(40.0, clock=lambda: clock[0], sleep=sleep)
    starts = []
    for _ in range(4):
        assert limiter.acquire()
        starts.append(clock[0])
    assert starts == pytest.approx([100.0, 100.025, 100.05, 100.075])
    # A late wake-up pushes the next slot back instead of letting the next caller squeeze in.
    lateness[0] = 0.01
    assert limiter.acquire() and clock[0] == pytest.approx(100.11)
    lateness[0] = 0.0
    # No slot before the deadline: refused at once, nothing consumed.
    assert limiter.acquire(deadline=clock[0] + 0.01) is False and clock[0] == pytest.approx(100.11)
    assert limiter.acquire() and clock[0] == pytest.approx(100.135)
    clock[0] = 200.0  # idle time earns no burst
    assert limiter.acquire() and clock[0] == 200.0
    assert limiter.acquire() and clock[0] == pytest.approx(200.025)


def test_limiter_burst_lets_a_few_go_at_once_and_keeps_every_second_under_the_rate() -> None:
    # Call events: a company whose calls ring close together must not wait 26 ms per card for its slot, but
    # retailCRM counts requests per second: never more than the rate in any one second (and one slot).
    clock = [100.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    limiter = RateLimiter(10.0, burst=4, clock=lambda: clock[0], sleep=sleep)
    starts = []
    for _ in range(4):
        assert limiter.acquire()
        starts.append(clock[0])
    assert starts == [100.0] * 4   # from idle: four at once
    for _ in range(26):
        assert limiter.acquire()
        starts.append(clock[0])
    for i, t in enumerate(starts):
        assert sum(1 for u in starts[i:] if u < t + 1.1 - 1e-9) <= 10, starts
    assert starts[-1] - starts[0] < 3.0   # and the rate itself is kept up: 30 starts in under 3 s
    # Idle time earns `burst` slots, no more.
    clock[0] += 60.0
    quiet = clock[0]
    for _ in range(5):
        assert limiter.acquire()
    assert clock[0] == pytest.approx(quiet + 0.1)


def test_limiter_deadline_while_queued() -> None:
    limiter = RateLimiter(5.0)  # one slot per 0.2 s
    assert limiter.acquire()
    holder = gevent.spawn(limiter.acquire)  # queued for the next slot, holding the lock
    gevent.sleep(0)
    start = time.monotonic()
    assert limiter.acquire(deadline=start + 0.05) is False
    assert time.monotonic() - start < 0.15
    assert holder.get(timeout=1) is True


def test_rate_limit_prevents_503(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    def worker(n: int) -> None:
        for i in range(10):
            crm.send_call_event(event(callExternalId=f"{n}-{i}"), deadline=time.monotonic() + 30)

    start = time.monotonic()
    gevent.joinall([gevent.spawn(worker, n) for n in range(20)], raise_error=True)
    elapsed = time.monotonic() - start
    assert fake.rate_limited == 0
    assert len(fake.events) == 200 and len(fake.requests) == 200
    rate = 200 / elapsed
    assert 32.0 < rate <= 40.0, rate


def test_telephony_rate_zero_sends_without_pacing(fake: FakeRetailCRM) -> None:
    fake.telephony_rate_limit = None  # a test bed without retailCRM's limit
    crm = RetailCRM(fake.url, KEY, telephony_rate=0)
    start = time.monotonic()
    gevent.joinall([gevent.spawn(crm.send_call_event, event(callExternalId=str(n))) for n in range(80)],
                   raise_error=True)
    # Paced at 40/s these would take 2 s; unpaced they take what 80 loopback requests take.
    assert time.monotonic() - start < 1.0 and len(fake.events) == 80


def test_general_rate_class(fake: FakeRetailCRM, crm: RetailCRM) -> None:
    start = time.monotonic()
    gevent.joinall([gevent.spawn(crm.credentials) for _ in range(12)], raise_error=True)
    assert fake.rate_limited == 0, [(round(r.received - fake.requests[0].received, 3), r.status) for r in fake.requests]
    # 11 gaps at 10/s less the pacing margin.
    assert time.monotonic() - start >= 1.1


# -- logging ---------------------------------------------------------------------------


def test_no_api_key_in_logs(fake: FakeRetailCRM, crm: RetailCRM, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.outage = "html503"
    gevent.spawn_later(0.3, setattr, fake, "outage", None)
    crm.send_call_event(event(), deadline=time.monotonic() + 5)
    fake.outage = "reset"
    gevent.spawn_later(0.15, setattr, fake, "outage", None)
    crm.upload_calls([call(2)], deadline=time.monotonic() + 5)
    crm.responsible_manager("+79121234567", details=True)
    with pytest.raises(CRMRejected):
        crm.upload_calls([call(1, result="bogus")])
    with pytest.raises(CRMAuthError):
        RetailCRM(fake.url, KEY + "x").credentials()
    crm_records = [r for r in caplog.records if r.name == "fsbridge.crm"]
    assert any("retry" in r.getMessage() for r in crm_records)
    assert any("rejected" in r.getMessage() for r in crm_records)
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_info or "")
        assert KEY not in text, record.getMessage()
        assert "\n" not in record.getMessage()
        assert "<html" not in record.getMessage()


def test_error_hierarchy() -> None:
    assert issubclass(CRMAuthError, CRMRejected)
    assert issubclass(CRMRejected, CRMError) and issubclass(CRMUnavailable, CRMError)
    err = CRMRejected(400, "bad", {"f": "x"})
    assert (err.status, err.message, err.errors, str(err)) == (400, "bad", {"f": "x"}, "bad")


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    for failures in range(1, 200):  # far past the cap: no overflow
        ceiling = min(5.0, 0.1 * 2 ** min(failures - 1, 60))
        delays = {backoff_delay(0.1, failures, 5.0) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # spread: workers that failed together do not retry together


def test_form_body_is_urlencode_and_lets_the_others_run_on_long_values() -> None:
    import urllib.parse

    fields = encode_form({"calls": [call(n, phone="+7 (912) 123-45-67", recordUrl="https://x/?a=1&b=ё")
                                    for n in range(50)], "apiKey": "a b&c=d"})
    ran: list[bool] = []
    gevent.spawn(ran.append, True)  # e.g. a card worker, due while a 50-call upload is being encoded
    body = form_body(fields)
    assert ran == [True]
    assert body == urllib.parse.urlencode(fields).encode("ascii")
    assert form_body({"event": "{}"}) == b"event=%7B%7D"


def test_deadline_after_a_failure_reports_that_failure_not_the_rate_limiter(fake: FakeRetailCRM) -> None:
    fake.outage = "html502"
    # One request per ~1 s: after the first 502 the next slot lies past the deadline.
    client = RetailCRM(fake.url, KEY, telephony_rate=1, timeout=2.0)
    with pytest.raises(CRMUnavailable) as err:
        client.send_call_event(event(), deadline=time.monotonic() + 0.8)
    assert str(err.value) == "retailCRM answered HTTP 502 with an HTML page (not the API)"
    assert len(fake.requests) == 1
    with pytest.raises(CRMUnavailable, match="no request slot"):  # nothing tried yet: the limiter it is
        client.send_call_event(event(), deadline=time.monotonic() + 0.1)
