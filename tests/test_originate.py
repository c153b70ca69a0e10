"""Click-to-call: nothing from the request reaches FreeSWITCH unless an allow-list passed it."""

from __future__ import annotations

import itertools
import re

import pytest

from fsbridge.calls.legs import Directory
from fsbridge.calls.tracker import CallTracker
from fsbridge.config import FreeSwitchSettings
from fsbridge.esl.listener import EventListener
from fsbridge.originate import (
    Click,
    ClickFailed,
    ClickRejected,
    DialPlan,
    Originator,
    originate_command,
    validate_click,
)
from tests.waiting import until

MANAGERS = frozenset({"100", "200"})
EXTERNAL = {"74999999999": "shop1"}
PLAN = DialPlan(gateway="provider1")
UUID = "0b5e7b52-38f6-4c5b-9c2e-1f0e9d1d7a11"

# freeswitch-notes.md, "Originate security", and more.
INJECTIONS = [
    "\r\nbgapi originate user/200 &park()", "\napi shutdown", "79121234567 &park()", "7912'1234567",
    "7912\\1234567", "{api_on_answer=system rm -rf /}79121234567", "[leg_timeout=1]79121234567",
    "<x>79121234567", "^^:79121234567", "79121234567,user/200", "79121234567|user/200",
    "79121234567:_:user/200", "&bridge(user/200)", "(79121234567)&", "sofia/gateway/x/79121234567",
    "79121234567@evil.example", "79121234567;transport=tcp", "7912:1234567", "origination_uuid=79121234567",
    "${system(id)}79121234567", "$79121234567", "+7912+1234567", "%0d%0aapi shutdown", "79121234567\x00",
    "７９１２１２３４５６７", "79121234567²", "1" * 40, "", " ", "++79121234567", "79121234567\t&park()",
]


def test_a_real_click_is_normalised() -> None:
    click = validate_click("100", "+7 (912) 123-45-67", "+7 (499) 999-99-99", MANAGERS, EXTERNAL)
    assert click == Click(code="100", phone="+79121234567", external_phone="74999999999")
    assert originate_command(click, PLAN, UUID) == (
        "originate {origination_uuid=0b5e7b52-38f6-4c5b-9c2e-1f0e9d1d7a11,origination_caller_id_number=+79121234567,"
        "origination_caller_id_name=+79121234567,originate_timeout=30,ignore_early_media=true,fsbridge_click=true}"
        "user/100 &bridge({fsbridge_click=true,origination_caller_id_number=74999999999,"
        "origination_caller_id_name=74999999999,effective_caller_id_number=74999999999}"
        "sofia/gateway/provider1/+79121234567)")


@pytest.mark.parametrize(("param", "payload"), list(itertools.product(["code", "phone", "externalPhone"],
                                                                      INJECTIONS)))
def test_injection_never_reaches_the_command(param: str, payload: str) -> None:
    values = {"code": "100", "phone": "79121234567", "externalPhone": "74999999999"}
    clean = originate_command(validate_click(*values.values(), MANAGERS, EXTERNAL), PLAN, UUID)
    values[param] = payload
    if param == "externalPhone" and not payload:
        return  # an empty externalPhone means "none given": covered by test_a_real_click_is_normalised
    try:
        click = validate_click(values["code"], values["phone"], values["externalPhone"] or None, MANAGERS, EXTERNAL)
    except ClickRejected as exc:
        assert "\n" not in str(exc)
        assert not payload.strip() or payload.strip() not in str(exc), "reasons never echo the input"
        return
    # Accepted only as a plain number, and then the command differs from the clean one by that number alone.
    assert re.fullmatch(r"\+?[0-9]{5,16}", click.phone), click.phone
    assert originate_command(click, PLAN, UUID) == clean.replace("79121234567", click.phone)


@pytest.mark.parametrize("code", ["300", "10 0", "100 ", "", "1e2", "0x64", "١٠٠"])
def test_only_configured_extensions(code: str) -> None:
    with pytest.raises(ClickRejected, match="code"):
        validate_click(code, "79121234567", None, MANAGERS, EXTERNAL)


def test_external_phone_must_be_configured() -> None:
    with pytest.raises(ClickRejected, match="externalPhone"):
        validate_click("100", "79121234567", "74990000000", MANAGERS, EXTERNAL)


@pytest.mark.parametrize("template", ["user/{code} &park()", "user/{code},user/200", "{x}user/{code}",
                                      "user/{code}|x", "user/${code}", "user/{code} "])
def test_dial_templates_are_allow_listed_too(template: str) -> None:
    with pytest.raises(ValueError):
        DialPlan(manager_dial=template, gateway="gw")


@pytest.mark.parametrize("domain", ["a..pbx.test", "-a.pbx.test", "a-.pbx.test", ".pbx.test", "pbx.test.",
                                    "a" * 64 + ".test"])
def test_a_dial_string_domain_is_a_host_name(domain: str) -> None:
    # {domain} goes into the originate command: the same rule as a tenant file's domains.
    with pytest.raises(ValueError, match="domain"):
        DialPlan(manager_dial="user/{code}@{domain}", gateway="gw", domain=domain)
    assert DialPlan(manager_dial="user/{code}@{domain}", gateway="gw", domain="a-1.pbx.test").domain == "a-1.pbx.test"


def test_a_gateway_is_needed_by_the_default_customer_dial_string() -> None:
    with pytest.raises(ValueError, match="gateway"):
        DialPlan()
    assert DialPlan(customer_dial="sofia/internal/{phone}@127.0.0.1:5092").gateway == ""


@pytest.fixture
def wired(simulator):
    cards: list = []
    tracker = CallTracker(Directory(managers=MANAGERS, external_phones=EXTERNAL), cards.append, lambda c: None)
    originator: Originator | None = None

    def on_event(ev) -> None:
        tracker.handle(ev)
        if originator is not None:
            originator.on_event(ev)

    listener = EventListener(FreeSwitchSettings(port=simulator.port, command_timeout=3.0), on_event)
    originator = Originator(listener, tracker, DialPlan(gateway="provider1", ringing_wait=2.0))
    listener.start()
    until(lambda: listener.connected, what="the listener")
    simulator.wait_for_subscriber()
    yield simulator, originator, cards
    listener.stop()


def test_click_rings_the_manager_then_reports_the_call(wired) -> None:
    simulator, originator, cards = wired
    simulator.originate_plays = "outbound_originate_answered"
    call_id = originator.click(Click(code="100", phone="+79121234567", external_phone="74999999999"))
    [orig] = simulator.originates
    assert f"origination_uuid={call_id}" in orig.args
    until(lambda: len(cards) >= 2, what="out and hangup cards")
    assert [(c.type, c.phone, c.codes, c.call_id) for c in cards] == [
        ("out", "+79121234567", ("100",), call_id), ("hangup", "+79121234567", ("100",), call_id)]


def test_repeated_click_starts_one_call(wired) -> None:
    simulator, originator, _ = wired
    simulator.originate_plays = "outbound_originate_answered"
    click = Click(code="100", phone="+79121234567", external_phone=None)
    first = originator.click(click)
    assert originator.click(click) == first
    assert len(simulator.originates) == 1


def test_freeswitch_refusal_is_a_502_with_the_cause(wired) -> None:
    simulator, originator, _ = wired
    simulator.originate_result = "-ERR USER_NOT_REGISTERED"
    with pytest.raises(ClickFailed, match="USER_NOT_REGISTERED") as err:
        originator.click(Click(code="100", phone="79121234567", external_phone=None))
    assert err.value.status == 502
    # A failed click can be retried at once: it is not de-duplicated.
    with pytest.raises(ClickFailed):
        originator.click(Click(code="100", phone="79121234567", external_phone=None))
    assert len(simulator.originates) == 2


def test_phone_that_never_rings_is_a_504_and_the_call_is_cancelled(wired, monkeypatch) -> None:
    simulator, originator, _ = wired
    # FreeSWITCH accepted the job and is still working on it: no channel event, no job result yet.
    simulator.originate_plays = None
    monkeypatch.setattr(simulator, "_finish_job", lambda *args: None)
    with pytest.raises(ClickFailed, match="did not start ringing within 2 s") as err:
        originator.click(Click(code="200", phone="79121234567", external_phone=None))
    assert err.value.status == 504
    [orig] = simulator.originates
    until(lambda: f"bgapi uuid_kill {orig.uuid} ORIGINATOR_CANCEL" in simulator.commands, what="the cancel")


def test_click_to_call_is_recorded_like_inbound_calls() -> None:
    plan = DialPlan(gateway="gw", record_dir="/var/lib/freeswitch/recordings/")
    command = originate_command(Click(code="100", phone="79121234567", external_phone=None), plan, UUID)
    assert f"RECORD_STEREO=true,execute_on_answer='record_session /var/lib/freeswitch/recordings/{UUID}.wav'" \
        in command
    assert "${" not in command, "FreeSWITCH refuses variables inside originate variables"
    with pytest.raises(ValueError, match="record_dir"):
        DialPlan(gateway="gw", record_dir="/tmp/x' &park()")
