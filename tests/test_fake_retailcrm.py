"""The fake retailCRM must refuse whatever the real one refuses.

Everything here talks plain HTTP with `requests` (not fsbridge's client), so a lenient
fake cannot hide a bug in the client and vice versa.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.pool
import pytest
import requests

from tests.fakes.retailcrm import FakeRetailCRM

KEY = "test-key"
EVENT = "/api/v5/telephony/call/event"
UPLOAD = "/api/v5/telephony/calls/upload"
MANAGER = "/api/v5/telephony/manager"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> Iterator[FakeRetailCRM]:
    with FakeRetailCRM(api_key=KEY) as server:
        yield server


def post(
    fake: FakeRetailCRM, path: str, data: Any = None, *, key: str | None = KEY, **kw: Any
) -> requests.Response:
    headers = {"X-API-KEY": key} if key else {}
    headers.update(kw.pop("headers", {}))
    return requests.post(fake.url + path, data=data, headers=headers, timeout=5, **kw)


def get(fake: FakeRetailCRM, path: str, params: Any = None, *, key: str | None = KEY) -> requests.Response:
    headers = {"X-API-KEY": key} if key else {}
    return requests.get(fake.url + path, params=params, headers=headers, timeout=5)


def send_event(fake: FakeRetailCRM, event: dict[str, Any]) -> requests.Response:
    return post(fake, EVENT, {"event": json.dumps(event)})


def upload(fake: FakeRetailCRM, calls: list[Any]) -> requests.Response:
    return post(fake, UPLOAD, {"calls": json.dumps(calls)})


def good_event(**over: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"phone": "+79121234567", "type": "in", "codes": ["100"], "callExternalId": "c1"}
    event.update(over)
    return {k: v for k, v in event.items() if v is not None}


def good_call(n: int = 0, **over: Any) -> dict[str, Any]:
    call: dict[str, Any] = {
        "date": "2024-03-21 05:14:07", "type": "in", "phone": "+79121234567", "code": "100",
        "result": "answered", "duration": 42, "durationWaiting": 3, "externalId": f"uuid-{n}",
        "recordUrl": "https://pbx.example.com/rec/1.mp3?sig=abc", "externalPhone": "+74999999999",
        "site": "shop1",
    }
    call.update(over)
    return {k: v for k, v in call.items() if v is not None}


def assert_error(resp: requests.Response, status: int, message: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is False
    assert body["errorMsg"] == message
    return body


# -- auth ----------------------------------------------------------------------------


def test_missing_key(fake: FakeRetailCRM) -> None:
    assert_error(get(fake, "/api/credentials", key=None), 403, '"apiKey" is missing.')
    resp = post(fake, EVENT, {"event": json.dumps(good_event())}, key=None)
    assert_error(resp, 403, '"apiKey" is missing.')
    assert not fake.events


def test_wrong_key(fake: FakeRetailCRM) -> None:
    assert_error(get(fake, "/api/credentials", key="nope"), 403, 'Wrong "apiKey" value.')
    assert not fake.events


def test_key_as_parameter(fake: FakeRetailCRM) -> None:
    assert get(fake, "/api/credentials", {"apiKey": KEY}, key=None).json()["success"] is True
    resp = post(fake, EVENT, {"event": json.dumps(good_event()), "apiKey": KEY}, key=None)
    assert resp.status_code == 200, resp.text


# -- transport -----------------------------------------------------------------------


def test_json_body_is_not_a_form(fake: FakeRetailCRM) -> None:
    resp = post(fake, EVENT, json={"event": good_event()})
    assert_error(resp, 400, "Parameter 'event' is missing")


def test_nested_form_fields_rejected(fake: FakeRetailCRM) -> None:
    resp = post(fake, "/api/v5/integration-modules/fsbridge/edit",
                {"integrationModule[code]": "fsbridge", "integrationModule[active]": "1"})
    assert_error(resp, 400, 'Input value "integrationModule" contains a non-scalar value')
    resp = post(fake, EVENT, {"event[phone]": "+7912", "event[type]": "in"})
    assert_error(resp, 400, 'Input value "event" contains a non-scalar value')


def test_invalid_json(fake: FakeRetailCRM) -> None:
    assert_error(post(fake, EVENT, {"event": "{'phone': '+7912'"}), 400, "Errors in the entity format")
    # A JSON value of the wrong shape is as bad as no JSON.
    assert_error(post(fake, UPLOAD, {"calls": json.dumps(good_call())}), 400, "Errors in the entity format")


def test_body_must_be_utf8(fake: FakeRetailCRM) -> None:
    body = "event=" + urllib.parse.quote_from_bytes(json.dumps(good_event(phone="Иван"), ensure_ascii=False)
                                                   .encode("cp1251"))
    resp = post(fake, EVENT, body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(resp, 400, "Errors in the entity format")


def test_unknown_path_and_wrong_method(fake: FakeRetailCRM) -> None:
    assert_error(get(fake, "/api/v5/telephony/nope"), 404, "API method not found")
    resp = get(fake, EVENT)
    assert resp.status_code == 405
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.text.lstrip().startswith("<html>")


# -- call events ---------------------------------------------------------------------


def test_event_accepted_and_recorded(fake: FakeRetailCRM) -> None:
    before = time.time()
    analytics = {"campaign": {"name": "x", "code": "y"}, "queryString": "utm_source=z"}
    resp = send_event(fake, good_event(codes=["100", "999"], userIds=[1, 7], externalPhone="+74999999999",
                                       site="shop1", webAnalyticsData=analytics))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True, "notExistCodes": ["999"], "notExistUsers": [7]}
    (event,) = fake.events
    assert event["phone"] == "+79121234567"
    assert before <= event["_received"] <= time.time()


def test_event_hangup_statuses(fake: FakeRetailCRM) -> None:
    ok = send_event(fake, good_event(type="hangup", hangupStatus="no answered"))
    assert ok.status_code == 200, ok.text
    # The history's spelling is NOT valid here: the two enums differ on purpose.
    body = assert_error(send_event(fake, good_event(type="hangup", hangupStatus="no answer")),
                        400, "Errors in the entity format")
    assert body["errors"] == {"hangupStatus": "The value you selected is not a valid choice."}
    body = assert_error(send_event(fake, good_event(type="hangup")), 400, "Errors in the entity format")
    assert "hangupStatus" in body["errors"]
    body = assert_error(send_event(fake, good_event(type="in", hangupStatus="answered")),
                        400, "Errors in the entity format")
    assert "hangupStatus" in body["errors"]
    assert len(fake.events) == 1


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (good_event(phone=None), "phone"),
        (good_event(phone=""), "phone"),
        (good_event(type=None), "type"),
        (good_event(type="ringing"), "type"),
        (good_event(codes=None), "codes"),
        (good_event(codes=[]), "codes"),
        (good_event(codes=[100]), "codes"),  # codes are strings
        (good_event(codes=None, userIds=["x"]), "userIds"),
        (good_event(callExternalId=123), "callExternalId"),
        (good_event(site="shop9"), "site"),
        (good_event(direction="in"), "direction"),  # extra field
        (good_event(webAnalyticsData={"utm": "x"}), "webAnalyticsData"),
    ],
)
def test_event_rejections(fake: FakeRetailCRM, event: dict[str, Any], field: str) -> None:
    body = assert_error(send_event(fake, event), 400, "Errors in the entity format")
    assert field in body["errors"]
    assert not fake.events


def test_event_user_ids_instead_of_codes(fake: FakeRetailCRM) -> None:
    resp = send_event(fake, good_event(codes=None, userIds=[1]))
    assert resp.status_code == 200, resp.text


# -- calls upload ---------------------------------------------------------------------


def test_upload_and_duplicates(fake: FakeRetailCRM) -> None:
    resp = upload(fake, [good_call(1), good_call(2, type="out", result="no answer", code=None, userId=1)])
    assert resp.json() == {"success": True, "processedCallsCount": 2, "duplicateCalls": []}
    assert set(fake.calls) == {"uuid-1", "uuid-2"}
    resp = upload(fake, [good_call(2), good_call(3)])
    assert resp.json() == {"success": True, "processedCallsCount": 1, "duplicateCalls": ["uuid-2"]}
    assert [u.processed for u in fake.uploads] == [2, 1]


def test_upload_limit_50(fake: FakeRetailCRM) -> None:
    body = assert_error(upload(fake, [good_call(n) for n in range(51)]), 400, "Errors in the entity format")
    assert "calls" in body["errors"]
    assert upload(fake, [good_call(n) for n in range(50)]).json()["processedCallsCount"] == 50
    assert_error(upload(fake, []), 400, "Errors in the entity format")


def test_one_bad_call_rejects_the_batch(fake: FakeRetailCRM) -> None:
    calls = [good_call(n) for n in range(5)]
    calls[3]["result"] = "no answered"  # the event spelling is NOT valid in the history
    body = assert_error(upload(fake, calls), 400, "Errors in the entity format")
    assert body["errors"] == {"calls[3][result]": "The value you selected is not a valid choice."}
    assert fake.calls == {}


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (good_call(date="2024-03-21T05:14:07"), "date"),
        (good_call(date="2024-03-21 05:14:07+03:00"), "date"),
        (good_call(date="2024-02-30 10:00:00"), "date"),
        (good_call(date=None), "date"),
        (good_call(type="hangup"), "type"),
        (good_call(phone=None), "phone"),
        (good_call(result=None), "result"),
        (good_call(result="cancel"), "result"),
        (good_call(code=None), "code"),
        (good_call(code=100), "code"),
        (good_call(duration=-1), "duration"),
        (good_call(duration=4.5), "duration"),
        (good_call(durationWaiting="3"), "durationWaiting"),
        (good_call(recordUrl="ftp://pbx/rec.mp3"), "recordUrl"),
        (good_call(recordUrl="/rec/1.mp3"), "recordUrl"),
        (good_call(site="nope"), "site"),
        (good_call(source={"utm_source": "x"}), "source"),
        (good_call(hangupStatus="answered"), "hangupStatus"),
    ],
)
def test_call_rejections(fake: FakeRetailCRM, call: dict[str, Any], field: str) -> None:
    body = assert_error(upload(fake, [good_call(9), call]), 400, "Errors in the entity format")
    assert f"calls[1][{field}]" in body["errors"], body["errors"]
    assert fake.calls == {}


def test_upload_keeps_utf8(fake: FakeRetailCRM) -> None:
    resp = upload(fake, [good_call(1, source={"source": "Яндекс", "campaign": "весна"})])
    assert resp.status_code == 200, resp.text
    assert fake.calls["uuid-1"]["source"]["source"] == "Яндекс"


# -- responsible manager ------------------------------------------------------------


def test_manager_lookup(fake: FakeRetailCRM) -> None:
    manager = {"id": 1, "firstName": "John", "lastName": "Doe", "email": "a@b.c", "code": "100"}
    fake.managers_by_phone["+79121234567"] = manager
    fake.customers_by_phone["+79121234567"] = {"id": 888, "firstName": "Ivan"}
    assert get(fake, MANAGER, {"phone": "+79121234567"}).json() == {"success": True, "manager": manager}
    detailed = get(fake, MANAGER, {"phone": "79121234567", "details": "1"}).json()
    assert detailed["manager"] == manager and detailed["customer"]["id"] == 888 and "links" in detailed
    assert get(fake, MANAGER, {"phone": "+70000000000"}).json() == {"success": True}
    fake.manager_status[1] = "busy"
    assert "manager" not in get(fake, MANAGER, {"phone": "+79121234567"}).json()
    assert get(fake, MANAGER, {"phone": "+79121234567", "ignoreStatus": "1"}).json()["manager"] == manager


@pytest.mark.parametrize("params", [
    {"phone": "+7912", "details": "true"},
    {"phone": "+7912", "ignoreStatus": "True"},
    {"phone": "+7912", "details": "2"},
])
def test_manager_flags_must_be_0_or_1(fake: FakeRetailCRM, params: dict[str, str]) -> None:
    assert_error(get(fake, MANAGER, params), 400, "Errors in the entity format")


def test_manager_needs_phone(fake: FakeRetailCRM) -> None:
    assert_error(get(fake, MANAGER, {}), 400, "Parameter 'phone' is missing")


def test_manager_latency(fake: FakeRetailCRM) -> None:
    fake.manager_latency = 0.3
    start = time.monotonic()
    get(fake, MANAGER, {"phone": "+7912"})
    assert time.monotonic() - start >= 0.3


# -- integration modules ------------------------------------------------------------


def module(**over: Any) -> dict[str, Any]:
    mod: dict[str, Any] = {
        "code": "fsbridge", "active": True, "name": "FreeSWITCH", "logo": "https://pbx.example.com/logo.svg",
        "baseUrl": "https://pbx.example.com", "clientId": "s3cr3t" * 6, "accountUrl": "https://pbx.example.com/account",
        "integrations": {"telephony": {
            "makeCallUrl": "https://pbx.example.com/retailcrm/make-call",
            "changeUserStatusUrl": "https://pbx.example.com/retailcrm/status",
            "allowEdit": False, "inputEventSupported": True, "outputEventSupported": True,
            "hangupEventSupported": True,
            "additionalCodes": [{"userId": "1", "code": "100"}, {"userId": "2", "code": "200"}],
            "externalPhones": [{"siteCode": "shop1", "externalPhone": "+74999999999"}],
        }},
    }
    mod.update(over)
    return {k: v for k, v in mod.items() if v is not None}


def edit(fake: FakeRetailCRM, mod: dict[str, Any], code: str = "fsbridge") -> requests.Response:
    return post(fake, f"/api/v5/integration-modules/{code}/edit", {"integrationModule": json.dumps(mod)})


def test_module_create_update_get(fake: FakeRetailCRM) -> None:
    assert_error(get(fake, "/api/v5/integration-modules/fsbridge"), 404, "Not found")
    first = edit(fake, module())
    assert first.status_code == 201 and first.json() == {"success": True, "info": []}
    again = edit(fake, module(name="FreeSWITCH 2"))
    assert again.status_code == 200
    got = get(fake, "/api/v5/integration-modules/fsbridge").json()
    assert got["success"] is True and got["integrationModule"]["name"] == "FreeSWITCH 2"


def test_module_reports_unknown_users_and_sites(fake: FakeRetailCRM) -> None:
    mod = module()
    mod["integrations"]["telephony"]["additionalCodes"].append({"userId": "9", "code": "900"})
    mod["integrations"]["telephony"]["externalPhones"].append({"siteCode": "shop9", "externalPhone": "+7"})
    assert edit(fake, mod).json()["info"] == {"notExistUsersIds": ["9"], "notExistSiteCodes": ["shop9"]}


@pytest.mark.parametrize(
    ("mod", "field", "message"),
    [
        (module(logo="https://pbx.example.com/logo.png"), "logo", "Logo image must be svg"),
        (module(baseUrl=""), "baseUrl", "This value should not be blank."),
        (module(baseUrl=None), "baseUrl", "This value should not be blank."),
        (module(clientId=None), "clientId", "This value should not be blank."),
        (module(name=None), "name", "This value should not be blank."),
        (module(active=None), "active", "This value should not be blank."),
        (module(active="1"), "active", "This value is not valid."),
        (module(code="other"), "code", None),
        (module(actions={"other": "/other"}), "actions", None),
        (module(actions={"activity": ""}), "actions[activity]", None),
        (module(settings={}), "settings", None),
    ],
)
def test_module_rejections(fake: FakeRetailCRM, mod: dict[str, Any], field: str, message: str | None) -> None:
    body = assert_error(edit(fake, mod), 400, "Errors in the entity format")
    assert field in body["errors"]
    if message:
        assert body["errors"][field] == message
    assert fake.modules == {}


def test_module_unknown_telephony_key(fake: FakeRetailCRM) -> None:
    mod = module()
    mod["integrations"]["telephony"]["hangupUrl"] = "https://x"
    body = assert_error(edit(fake, mod), 400, "Errors in the entity format")
    assert "integrations[telephony][hangupUrl]" in body["errors"]


def test_credentials(fake: FakeRetailCRM) -> None:
    body = get(fake, "/api/credentials").json()
    assert body["success"] is True and body["siteAccess"] == "access_full"
    assert body["sitesAvailable"] == ["shop1"]
    assert "/api/telephony/call/event" in body["credentials"]


# -- rate limit and failure switches -----------------------------------------------


def _burst(fake: FakeRetailCRM, path: str, count: int) -> list[requests.Response]:
    pool = gevent.pool.Pool(count)
    if path == EVENT:
        return pool.map(lambda _: send_event(fake, good_event()), range(count))
    return pool.map(lambda _: get(fake, path), range(count))


def test_rate_limit_telephony(fake: FakeRetailCRM) -> None:
    replies = _burst(fake, EVENT, 50)
    limited = [r for r in replies if r.status_code == 503]
    assert len(limited) == 10 == fake.rate_limited
    assert "Service temporary unavailable" in limited[0].text
    assert limited[0].headers["Content-Type"].startswith("text/html")
    assert len(fake.events) == 40


def test_rate_limit_general_and_window(fake: FakeRetailCRM) -> None:
    replies = _burst(fake, "/api/credentials", 12)
    assert sorted(r.status_code for r in replies) == [200] * 10 + [503] * 2
    # The window slides: a second later there is room again.
    gevent.sleep(1.05)
    assert get(fake, "/api/credentials").status_code == 200


@pytest.mark.parametrize(("outage", "status"), [("html502", 502), ("html503", 503)])
def test_html_outages(fake: FakeRetailCRM, outage: str, status: int) -> None:
    fake.outage = outage
    resp = send_event(fake, good_event())
    assert resp.status_code == status and resp.text.lstrip().startswith("<html>")
    assert fake.rate_limited == 0 and not fake.events
    fake.outage = None
    assert send_event(fake, good_event()).status_code == 200


def test_reset_outage(fake: FakeRetailCRM) -> None:
    fake.outage = "reset"
    with pytest.raises(requests.ConnectionError):
        send_event(fake, good_event())
    fake.outage = None
    assert send_event(fake, good_event()).status_code == 200


def test_timeout_outage_holds_until_lifted(fake: FakeRetailCRM) -> None:
    fake.outage = "timeout"
    with pytest.raises(requests.ReadTimeout):
        requests.get(fake.url + "/api/credentials", headers={"X-API-KEY": KEY}, timeout=0.2)
    gevent.spawn_later(0.2, setattr, fake, "outage", None)
    start = time.monotonic()
    resp = get(fake, "/api/credentials")
    assert resp.status_code == 200 and time.monotonic() - start >= 0.15


def test_latency_and_request_log(fake: FakeRetailCRM) -> None:
    fake.latency = 0.2
    start = time.monotonic()
    get(fake, MANAGER, {"phone": "+7912", "details": "0"})
    assert time.monotonic() - start >= 0.2
    (record,) = fake.requests
    assert (record.method, record.path, record.params, record.status) == (
        "GET", MANAGER, {"phone": "+7912", "details": "0"}, 200)


def test_standalone() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.retailcrm", "--port", str(port), "--api-key", "demo-key",
         "--manager", "+79121234567=100", "--log-requests"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                resp = requests.get(url + MANAGER, params={"phone": "+79121234567"},
                                    headers={"X-API-KEY": "demo-key"}, timeout=2)
                break
            except requests.ConnectionError:
                gevent.sleep(0.05)
        else:
            pytest.fail("standalone fake did not start")
        assert resp.json()["manager"]["code"] == "100"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=5)
    # --log-requests: what reached it, one line a request, without the API key.
    lines = out.decode().splitlines()
    assert lines[0] == f"fake retailCRM listening on {url}"
    assert f"GET {MANAGER} -> 200 phone=+79121234567" in lines[1:]
    assert "demo-key" not in out.decode()
