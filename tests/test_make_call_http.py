"""retailCRM's makeCallUrl over real HTTP, against fsbridge following the simulator."""

from __future__ import annotations

import http.client
import urllib.parse

import pytest
import requests

from tests.conftest import CLIENT_ID, base_url
from tests.test_originate import INJECTIONS
from tests.waiting import until


@pytest.fixture
def running(start_bridge):
    bridge = start_bridge(originate={"customer_dial": "sofia/internal/{phone}@127.0.0.1:5092", "ringing_wait": 2.0})
    return bridge, base_url(bridge)


def make_call(base: str, **params: str) -> requests.Response:
    query = {"clientId": CLIENT_ID, "code": "100", "phone": "+7 (912) 123-45-67", "userId": "1", **params}
    return requests.get(f"{base}/retailcrm/make-call?{urllib.parse.urlencode(query)}", timeout=10)


def test_click_answers_200_once_the_manager_rings_and_cards_follow(running, simulator, fake_crm) -> None:
    _, base = running
    simulator.originate_plays = "outbound_originate_answered"
    reply = make_call(base, externalPhone="+7 (499) 999-99-99")
    assert reply.status_code == 200
    [orig] = simulator.originates
    assert orig.args.startswith("{origination_uuid=")
    assert "sofia/internal/+79121234567@127.0.0.1:5092" in orig.args
    until(lambda: len(fake_crm.events) >= 2, what="the out and hangup events")
    assert [(e["type"], e["phone"], e["codes"], e.get("externalPhone"), e["callExternalId"])
            for e in fake_crm.events] == [
        ("out", "+79121234567", ["100"], "74999999999", orig.uuid),
        ("hangup", "+79121234567", ["100"], "74999999999", orig.uuid)]


def test_wrong_or_missing_client_id_is_403_and_nothing_happens(running, simulator) -> None:
    _, base = running
    assert make_call(base, clientId="nope").status_code == 403
    assert requests.get(f"{base}/retailcrm/make-call?code=100&phone=79121234567", timeout=5).status_code == 403
    assert simulator.originates == []


@pytest.mark.parametrize("param", ["code", "phone", "externalPhone", "userId"])
def test_injection_at_every_parameter_over_http(running, simulator, param: str) -> None:
    bridge, base = running
    simulator.originate_result = "-ERR NO_ANSWER"   # whatever gets through must still be clean
    for payload in INJECTIONS:
        reply = make_call(base, **{param: payload})
        assert reply.status_code in (400, 502), (payload, reply.status_code, reply.text)
        assert "\n" not in reply.text.strip()
    for orig in simulator.originates:
        # Only the clean click ever reached FreeSWITCH.
        assert "sofia/internal/+79121234567@127.0.0.1:5092" in orig.args or \
            "sofia/internal/79121234567@127.0.0.1:5092" in orig.args
        ours = f"execute_on_answer='record_session {bridge.cfg.records.dir}/{orig.uuid}.wav'"
        assert ours in orig.args, "fsbridge's own record clause"
        assert not any(c in orig.args.replace(ours, "") for c in "'\\$;|<>^\n\r")


def test_repeated_parameter_is_refused(running, simulator) -> None:
    _, base = running
    url = f"{base}/retailcrm/make-call?clientId={CLIENT_ID}&code=100&code=200&phone=79121234567"
    assert requests.get(url, timeout=5).status_code == 400
    assert simulator.originates == []


def test_freeswitch_refusal_is_502_with_the_reason(running, simulator) -> None:
    _, base = running
    simulator.originate_result = "-ERR USER_NOT_REGISTERED"
    reply = make_call(base)
    assert reply.status_code == 502 and "USER_NOT_REGISTERED" in reply.text


def test_double_click_starts_one_call(running, simulator) -> None:
    _, base = running
    simulator.originate_plays = "outbound_originate_answered"
    assert make_call(base).status_code == 200
    assert make_call(base, phone="+79121234567").status_code == 200
    assert len(simulator.originates) == 1


def get_as_written(base: str, target: str) -> int:
    """GET `target` byte for byte: requests would re-quote the query."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", target)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def test_the_guides_literal_plus_dials_the_plus(running, simulator) -> None:
    # retailCRM's guide, "Example of request on makeCallUrl", with this config's clientId: a literal +.
    _, base = running
    simulator.originate_plays = "outbound_originate_answered"
    guide = f"/retailcrm/make-call?clientId={CLIENT_ID}&code=100&phone=+79121234567&userId=1"
    assert get_as_written(base, guide) == 200
    [orig] = simulator.originates
    assert "sofia/internal/+79121234567@127.0.0.1:5092" in orig.args
    # ... the same click as the encoded form: deduplicated, not a second call to another number.
    assert get_as_written(base, guide.replace("phone=+", "phone=%2B")) == 200
    assert len(simulator.originates) == 1
    # Only a leading + is taken literally: elsewhere it is what form encoding says, a space (a separator
    # here), and no plus is made up.
    assert get_as_written(base, f"/retailcrm/make-call?clientId={CLIENT_ID}&code=200&phone=7912+123+45+67") == 200
    assert "sofia/internal/79121234567@127.0.0.1:5092" in simulator.originates[1].args


def test_freeswitch_down_is_503(running, simulator) -> None:
    bridge, base = running
    simulator.stop()
    until(lambda: not bridge.listener.connected, what="the disconnect")
    reply = make_call(base)
    assert reply.status_code == 503 and "not connected" in reply.text


def test_status_callback_is_served_and_remembered(running) -> None:
    bridge, base = running
    url = f"{base}/retailcrm/status?clientId={CLIENT_ID}&code=100&userId=1&status=dinner"
    reply = requests.get(url, timeout=5)
    assert reply.status_code == 200 and reply.text == ""
    assert bridge.statuses.get("100") == "dinner" and not bridge.statuses.is_free("100")


def test_click_to_call_without_a_gateway_says_why(start_bridge) -> None:
    bridge = start_bridge()   # the default customer_dial needs originate.gateway, which is not set
    base = base_url(bridge)
    assert make_call(base, clientId="nope").status_code == 403
    reply = make_call(base)
    assert reply.status_code == 503
    assert reply.text.strip() == ("click-to-call is off: originate.gateway: missing; "
                                  "the dial-string templates use {gateway}")
