"""The integration's page in retailCRM (accountUrl), over real HTTP: who gets in, sessions, CSRF, escaping."""

from __future__ import annotations

import dataclasses
import time

import requests

from fsbridge import registration
from fsbridge.http.account import COOKIE, Sessions
from tests.conftest import CLIENT_ID, base_url
from tests.waiting import until

NAME = "fsbridge-page-test"


def open_page(url: str, client_id: str | None = CLIENT_ID) -> requests.Response:
    data = {} if client_id is None else {"clientId": client_id}
    return requests.post(url + "/account", data=data, timeout=10)


def test_only_the_companys_client_id_opens_the_page_and_its_session(start_bridge, fake_crm) -> None:
    bridge = start_bridge(integration={"name": NAME})
    registration.register(bridge.cfg)
    url = base_url(bridge)
    for client_id in (None, "", "wrong-client-id-0123456789abcdef", CLIENT_ID + "x"):
        r = open_page(url, client_id)
        assert r.status_code == 403, client_id
        assert NAME not in r.text and "<td>" not in r.text and "Set-Cookie" not in r.headers
    assert requests.get(url + "/account", timeout=5).status_code == 403

    r = open_page(url)
    assert r.status_code == 200 and NAME in r.text
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=None" in cookie
    csp = r.headers["Content-Security-Policy"]
    assert f"frame-ancestors {fake_crm.url.rstrip('/')}" in csp and "script-src" not in csp
    assert "default-src 'none'" in csp
    session = r.cookies[COOKIE]
    # The links work afterwards with the cookie alone.
    again = requests.get(url + "/account", cookies={COOKIE: session}, timeout=5)
    assert again.status_code == 200 and NAME in again.text
    # The mapping: configured extensions beside the CRM's.
    assert "<td>100</td><td>1</td><td>1</td>" in again.text
    # Read from retailCRM once a minute at most: each read spends a request of the budget the company's
    # cards and history live on, and an admin reloading the page must not eat into it.
    module_reads = [r for r in fake_crm.requests if "integration-modules" in r.path and r.method == "GET"]
    assert len(module_reads) == 1
    assert "As retailCRM had it " in again.text and " s ago." in again.text

    forged = session[:-1] + ("0" if session[-1] != "0" else "1")
    expired = Sessions(bridge.account.sessions.key, clock=lambda: time.time() - 3600).issue("")
    other_key = Sessions().issue("")
    for bad in (forged, expired, other_key, "x.1.y", "x.\u00b2.y", session[:-1] + "\u00e9"):
        r = requests.get(url + "/account", cookies={COOKIE: bad}, timeout=5)
        assert r.status_code == 403 and NAME not in r.text, bad


def test_actions_need_the_sessions_csrf_token(start_bridge, fake_crm) -> None:
    bridge = start_bridge()
    url = base_url(bridge)
    r = open_page(url)
    session = r.cookies[COOKIE]
    token = bridge.account.sessions.csrf(session)
    assert f'name="csrf" value="{token}"' in r.text
    assert fake_crm.modules == {}
    for data in ({"action": "register"}, {"action": "register", "csrf": "0" * 64},
                 {"action": "register", "csrf": "\u00e9" * 64},
                 {"action": "register", "csrf": Sessions().csrf(session)}):
        r = requests.post(url + "/account", data=data, cookies={COOKIE: session}, timeout=5)
        assert r.status_code == 403
    # Without the session, even the right token does nothing.
    r = requests.post(url + "/account", data={"action": "register", "csrf": token}, timeout=5)
    assert r.status_code == 403
    assert fake_crm.modules == {}
    r = requests.post(url + "/account", data={"action": "register", "csrf": token}, cookies={COOKIE: session},
                      timeout=10)
    assert r.status_code == 200 and "fsbridge" in fake_crm.modules
    assert fake_crm.modules["fsbridge"]["accountUrl"] == "https://pbx.example.com/account"
    # The page after the action shows the CRM's side as the registration left it, not as first read.
    assert "<td>100</td><td>1</td><td>1</td>" in r.text and "As retailCRM has it now." in r.text


def test_caller_controlled_text_is_escaped(start_bridge, fake_crm, simulator) -> None:
    bridge = start_bridge()
    evil = "<img src=x onerror=alert(1)>"
    subs = {'"Caller-Caller-ID-Name":"75555555555"': f'"Caller-Caller-ID-Name":"{evil}"',
            '"Caller-Caller-ID-Number":"75555555555"': '"Caller-Caller-ID-Number":"7555555555<b>"'}
    simulator.play("inbound_answered", None, subs)
    until(lambda: bridge.outbox.levels()[0] + len(fake_crm.uploads) > 0 or bridge.outbox.recent(1),
          what="the call in the outbox")
    # Whatever else reaches the outbox with markup in it (a number FreeSWITCH passed on as it came, a
    # manager code): the page shows it as text.
    call = bridge.outbox.recent(1)[0][0]
    bridge.outbox.add(dataclasses.replace(call, call_id="11111111-2222-3333-4444-555555555555",
                                          phone="7999<b>", manager_code="<i>m</i>", result="<u>r</u>"))
    page = open_page(base_url(bridge)).text
    assert "<img" not in page and "<b>" not in page and "<i>" not in page and "<u>" not in page
    assert "No calls yet." not in page and "&lt;i&gt;m&lt;/i&gt;" in page and "&lt;u&gt;r&lt;/u&gt;" in page
    # The number's last 4 characters are shown: here they carry the tag, escaped.
    assert "•••9&lt;b&gt;" in page


def test_quarantined_calls_show_the_crms_reason_and_are_queued_again(start_bridge, fake_crm, simulator) -> None:
    bridge = start_bridge()
    simulator.play("inbound_answered", None, None)
    until(lambda: bool(bridge.outbox.recent(1)), what="a call")
    call = bridge.outbox.recent(1)[0][0]
    bridge.outbox.add(dataclasses.replace(call, call_id="11111111-2222-3333-4444-666666666666", result="bogus"))
    until(lambda: len(bridge.outbox.quarantined()) == 1, timeout=15, what="the refused call in quarantine")
    url = base_url(bridge)
    r = open_page(url)
    assert "1 call(s) refused by retailCRM" in r.text and "not a valid choice" in r.text
    session = r.cookies[COOKIE]
    r = requests.post(url + "/account", data={"action": "requeue", "csrf": bridge.account.sessions.csrf(session)},
                      cookies={COOKIE: session}, timeout=5)
    assert r.status_code == 200 and "1 quarantined call(s) queued again." in r.text
