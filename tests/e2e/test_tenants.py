"""The virtual PBX on a real FreeSWITCH: one fsbridge for two customer companies, each with its own
FreeSWITCH domain (a.pbx.test, b.pbx.test: tests/e2e/freeswitch/directory/tenants.xml and
dialplan/tenants.xml, laid out as FusionPBX lays out a provider's customers) and its own retailCRM account
(tenants_dir with one file per company, conftest.tenant_file; a strict fake retailCRM each).

The two companies look alike: extensions 100 and 200 in both, the same customer calling both, DIDs one
digit apart. What each company's CRM receives must be its own calls only, with its own managers' user ids:
calls into both domains at once, click-to-call with each company's clientId, the Lua routing asking the
company of the call's domain, a call between the two companies' phones (nobody's card: README, "The call
model with tenants"), and a customer transferred to the other company's extension (still the first
company's call; the other company's phone is nobody's manager).

FSBRIDGE_E2E_CAPTURE_DIR=dir records each test's Event Socket traffic as dir/tenants_<test>.{plain,json}.raw:
how tests/fixtures/esl/tenants_*.raw were made (tests/fixtures/README.md).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import gevent
import pytest
import requests

from tests.e2e.conftest import CLICK_RING_TIMEOUT, World
from tests.e2e.harness import (
    CUSTOMER,
    TENANT_CLIENT_IDS,
    TENANT_DIDS,
    TENANT_DOMAINS,
    TENANT_ROUTED,
    TENANT_USER_IDS,
)
from tests.e2e.test_calls import check_card_delay, check_recording, invite_from, routed, script_said
from tests.waiting import until

pytestmark = pytest.mark.e2e

TENANTS = tuple(TENANT_DOMAINS)
OTHER = {"a": "b", "b": "a"}


def phone_of(tenant: str, ext: str) -> str:
    """SippFactory.phone's name for extension `ext` of a company."""
    return f"{ext}@{TENANT_DOMAINS[tenant]}"


def cards(crm: Any) -> list[tuple[str, str, tuple[str, ...], str | None, str | None]]:
    return [(e["type"], e["phone"], tuple(sorted(e["codes"])), e.get("externalPhone"), e.get("hangupStatus"))
            for e in crm.events]


def wait_crms(world: World, events: dict[str, int], calls: dict[str, int], timeout: float = 20.0) -> None:
    """Each company's CRM has received (at least) that many call events and history records."""
    for tenant in TENANTS:
        crm = world.crms[tenant]
        until(lambda crm=crm, t=tenant: len(crm.events) >= events[t] and len(crm.calls) >= calls[t], timeout,
              f"{events[tenant]} call events and {calls[tenant]} calls in company {tenant}'s CRM")
    # Anything more (a card or a record crossing over) would arrive right after: give it the chance to.
    gevent.sleep(0.5)


def only_record(world: World, tenant: str) -> dict[str, Any]:
    """The company's one call: one id from its first card to its history record."""
    crm = world.crms[tenant]
    [record] = crm.calls.values()
    assert {e["callExternalId"] for e in crm.events} <= {record["externalId"]}, "one call, one id"
    return dict(record)


def check_record(record: dict[str, Any], tenant: str, *, kind: str, result: str, code: str, did: str | None,
                 talk_s: float) -> None:
    """The history record as the company's manager reads it in its CRM: its own manager's user id."""
    assert {k: record.get(k) for k in ("type", "phone", "result", "code", "userId", "externalPhone", "site")} == {
        "type": kind, "phone": CUSTOMER, "result": result, "code": code, "userId": TENANT_USER_IDS[tenant][code],
        "externalPhone": did, "site": "shop1" if did else None}
    assert abs(record["duration"] - talk_s) <= 2, f"talk time {record['duration']} s, expected about {talk_s:g} s"


def nothing_crossed(world: World) -> None:
    """No call id of one company reached the other's CRM (cards or history)."""
    ids = {t: {e["callExternalId"] for e in world.crms[t].events} | set(world.crms[t].calls) for t in TENANTS}
    assert not ids["a"] & ids["b"], f"a call reached both companies' CRMs: {ids}"


def check_archived(world: World, call_id: str, tenant: str) -> None:
    """FusionPBX's per-domain archive: <recordings>/<domain>/archive/<YYYY>/<Mon>/<DD>/<uuid>.wav, where
    RECORD_STOP said FreeSWITCH wrote it."""
    finished = next(c for c in world.finished if c.call_id == call_id)
    assert finished.tenant == tenant
    if world.fs.recordings is None:
        return
    path = Path(finished.recording_path or "")
    relative = path.relative_to(world.fs.recordings).as_posix()
    assert re.fullmatch(rf"{re.escape(TENANT_DOMAINS[tenant])}/archive/\d{{4}}/[A-Z][a-z]{{2}}/\d\d/{call_id}\.wav",
                        relative), relative
    assert path.is_file()


# -- customers calling both companies at once ----------------------------------------------------------

def test_calls_into_both_domains_at_once_reach_only_their_own_crm(tenant_world: World) -> None:
    """The same customer calls each company's DID at the same moment; each DID rings extension 100 of its
    own domain. Each CRM gets exactly its own call: its card for its 100, its history with its own user id
    and a recording in its own archive."""
    world = tenant_world
    world.capture("tenants_inbound_both")
    phones = {t: world.sipp.phone(phone_of(t, "100"), "answer", ring_ms=1000) for t in TENANTS}
    customers = {t: world.sipp.customer(TENANT_DIDS[t], "talk", hold_ms=4000) for t in TENANTS}
    for t in TENANTS:
        customers[t].ok()
        phones[t].ok()
        assert invite_from(phones[t]) == CUSTOMER

    wait_crms(world, events={"a": 2, "b": 2}, calls={"a": 1, "b": 1})
    for t in TENANTS:
        did = TENANT_DIDS[t]
        assert cards(world.crms[t]) == [("in", CUSTOMER, ("100",), did, None),
                                        ("hangup", CUSTOMER, ("100",), did, "answered")]
        check_card_delay(dataclasses.replace(world, crm=world.crms[t]), phones[t], "100")
        record = only_record(world, t)
        check_record(record, t, kind="in", result="answered", code="100", did=did, talk_s=4)
        assert record.get("recordUrl"), "an answered call has a recording link"
        check_recording(world, record["recordUrl"], min_seconds=4)
        check_archived(world, record["externalId"], t)
    nothing_crossed(world)
    # The other company's record link is no way into this company's file: the link names the call only.
    a_link = world.crms["a"].calls[next(iter(world.crms["a"].calls))]["recordUrl"]
    b_id = next(iter(world.crms["b"].calls))
    forged = re.sub(r"/[0-9a-f-]{36}\.wav$", f"/{b_id}.wav", a_link)
    if world.records_url is not None:
        assert requests.get(forged, timeout=10).status_code in (403, 404)


# -- click-to-call: each company's clientId, its own domain's phone ----------------------------------

@pytest.mark.parametrize("tenant", TENANTS)
def test_click_to_call_rings_the_companys_own_extension(tenant_world: World, tenant: str) -> None:
    """retailCRM of company `tenant` asks for a call from its manager 100: 100 of its domain rings (not 100
    of the other company, which has the same extension), then the customer; the cards and the history go
    to that company's CRM only. Its clientId cannot use the other company's numbers; an unknown clientId
    is refused."""
    world = tenant_world
    world.capture(f"tenants_click_{tenant}")
    other = OTHER[tenant]
    manager = world.sipp.phone(phone_of(tenant, "100"), "answer", ring_ms=1000)
    wrong = world.sipp.phone(phone_of(other, "100"), "answer")
    customer = world.sipp.phone("customer", "talk", ring_ms=1000, hold_ms=4000)
    url = "http://{}:{}/retailcrm/make-call".format(*world.bridge.http.address)

    def click(client_id: str, **extra: str) -> requests.Response:
        params = {"clientId": client_id, "code": "100", "phone": CUSTOMER,
                  "userId": str(TENANT_USER_IDS[tenant]["100"]), **extra}
        return requests.get(url, params=params, timeout=CLICK_RING_TIMEOUT + 10)

    unknown = click("unknown-client-id-0123456789abcdef", externalPhone=TENANT_DIDS[tenant])
    assert unknown.status_code == 403
    # The other company's DID is not one of this company's numbers.
    assert click(TENANT_CLIENT_IDS[tenant], externalPhone=TENANT_DIDS[other]).status_code == 400
    reply = click(TENANT_CLIENT_IDS[tenant], externalPhone=TENANT_DIDS[tenant])
    assert (reply.status_code, reply.text) == (200, "")
    customer.ok()
    manager.ok()
    assert invite_from(manager) == CUSTOMER, "the manager's phone shows whom they are calling"
    assert invite_from(customer) == TENANT_DIDS[tenant], "the customer sees the company's own number"
    assert "INVITE" not in wrong.messages(), "the other company's extension 100 must not ring"

    wait_crms(world, events={tenant: 2, other: 0}, calls={tenant: 1, other: 0})
    did = TENANT_DIDS[tenant]
    assert cards(world.crms[tenant]) == [("out", CUSTOMER, ("100",), did, None),
                                         ("hangup", CUSTOMER, ("100",), did, "answered")]
    check_record(only_record(world, tenant), tenant, kind="out", result="answered", code="100", did=did, talk_s=4)
    assert world.crms[other].events == [] and world.crms[other].calls == {}
    assert [c.tenant for c in world.finished] == [tenant]


# -- inbound routing: each domain's DID asks its own company's CRM ------------------------------------

def test_lua_routing_asks_the_crm_of_the_calls_domain(tenant_world: World) -> None:
    """Each company routes a DID with the shipped fsbridge_inbound.xml + fsbridge_route.lua, installed in
    its domain's context. The script passes ${domain_name}; fsbridge asks that company's CRM, whose answer
    differs: company a's responsible manager for the customer is 200, company b's is 100. Both calls at once."""
    world = tenant_world
    routed(world)
    world.capture("tenants_routed_both")
    responsible = {"a": "200", "b": "100"}
    for t, code in responsible.items():
        world.crms[t].managers_by_phone[CUSTOMER] = {"id": TENANT_USER_IDS[t][code], "firstName": "Manager",
                                                      "lastName": code, "email": f"{code}@{t}.example.com",
                                                      "code": code}
    fallback_a = world.sipp.phone(phone_of("a", "100"), "answer")   # where a's DID goes without an answer
    managers = {"a": world.sipp.phone(phone_of("a", "200"), "answer", ring_ms=1000),
                "b": world.sipp.phone(phone_of("b", "100"), "answer", ring_ms=1000)}
    silent_b = world.sipp.phone(phone_of("b", "200"), "answer")
    customers = {t: world.sipp.customer(TENANT_ROUTED[t], "talk", hold_ms=4000) for t in TENANTS}
    for t in TENANTS:
        customers[t].ok()
        managers[t].ok()
    assert "INVITE" not in fallback_a.messages() and "INVITE" not in silent_b.messages()

    wait_crms(world, events={"a": 2, "b": 2}, calls={"a": 1, "b": 1})
    for t, code in responsible.items():
        did = TENANT_ROUTED[t]
        crm = world.crms[t]
        assert cards(crm) == [("in", CUSTOMER, (code,), did, None), ("hangup", CUSTOMER, (code,), did, "answered")]
        record = only_record(world, t)
        check_record(record, t, kind="in", result="answered", code=code, did=did, talk_s=4)
        lookups = [r.params.get("phone", "") for r in crm.requests if r.path == "/api/v5/telephony/manager"]
        assert lookups == [CUSTOMER], f"company {t}'s CRM was asked once, for its own call"
        assert script_said(world, record["externalId"]) == [f"ringing the responsible manager {code}"]
    nothing_crossed(world)


# -- a call between the two companies' phones --------------------------------------------------------

def test_call_between_two_companies_extensions_is_nobodys_card(tenant_world: World) -> None:
    """100 of company a dials 5100 (FusionPBX's cross-tenant prefix): 100 of company b rings and answers.
    Neither phone is the other company's customer, and retailCRM has cards for customers only: no card
    and no history in either CRM (README, "The call model with tenants")."""
    world = tenant_world
    world.capture("tenants_cross_domain")
    callee = world.sipp.phone(phone_of("b", "100"), "answer", ring_ms=1000)
    same_ext_a = world.sipp.phone(phone_of("a", "100"), "answer")
    caller = world.sipp.phone_dials("5100", caller="100", domain=TENANT_DOMAINS["a"], hold_ms=3000)
    caller.ok()
    callee.ok()
    assert "INVITE" not in same_ext_a.messages(), "5100 is company b's 100, not a's"
    assert invite_from(callee) == "100"

    # FreeSWITCH has hung both legs up: fsbridge has seen the whole call by now.
    until(lambda: '"row_count":0' in world.fs.api("show channels as json").replace(" ", ""), 10, "no channels left")
    gevent.sleep(1.0)
    assert world.finished == []
    for t in TENANTS:
        assert world.crms[t].events == [] and world.crms[t].calls == {}, f"company {t}'s CRM got something"


def test_customer_transferred_to_the_other_companys_extension(tenant_world: World) -> None:
    """A customer of company a: 100@a answers and blind-transfers (REFER) to 5200; the customer's leg runs
    it in a's context, and 200 of company b takes the call. b's phone joined a's call: neither a's manager
    (a has a 200 too, another person) nor b's customer (README, "The call model with tenants"). a's CRM
    gets the card of its 100 only and the call's history, credited to its 100, the last of its managers
    who talked; b's CRM gets nothing."""
    world = tenant_world
    world.capture("tenants_transfer_cross_domain")
    first = world.sipp.phone(phone_of("a", "100"), "transfer", ring_ms=1000, transfer_to="5200")
    taker = world.sipp.phone(phone_of("b", "200"), "answer", ring_ms=1000)
    namesake = world.sipp.phone(phone_of("a", "200"), "answer")
    customer = world.sipp.customer(TENANT_DIDS["a"], "talk", hold_ms=8000)
    customer.ok()
    first.ok()
    taker.ok()
    assert invite_from(taker) == CUSTOMER, "the customer reached company b's 200"
    assert "INVITE" not in namesake.messages(), "5200 is company b's 200, not a's"

    wait_crms(world, events={"a": 2, "b": 0}, calls={"a": 1, "b": 0})
    did = TENANT_DIDS["a"]
    assert cards(world.crms["a"]) == [("in", CUSTOMER, ("100",), did, None),
                                      ("hangup", CUSTOMER, ("100",), did, "answered")]
    check_record(only_record(world, "a"), "a", kind="in", result="answered", code="100", did=did, talk_s=8)
    assert world.crms["b"].events == [] and world.crms["b"].calls == {}
