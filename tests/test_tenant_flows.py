"""The virtual PBX's calls replayed from their real captures: tests/fixtures/esl/tenants_*.raw, made by
tests/e2e/test_tenants.py on FreeSWITCH 1.10.12 with two domains (a.pbx.test, b.pbx.test) laid out as
FusionPBX lays them out. fsbridge runs with the same two tenant files as there (tests/e2e/harness.py
tenant_file: extensions 100 and 200 in both companies, different retailCRM user ids), each company with
its own strict fake retailCRM. The traffic is FreeSWITCH's own, domain fields included: what each company
would notice is that its CRM gets its calls, with its managers, and nothing of the other's.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import gevent
import pytest
import requests

from fsbridge import config
from tests.conftest import base_url, run_bridge
from tests.e2e.harness import (
    CUSTOMER,
    TENANT_CLIENT_IDS,
    TENANT_DIDS,
    TENANT_DOMAINS,
    TENANT_KEYS,
    TENANT_ROUTED,
    TENANT_USER_IDS,
    tenant_file,
)
from tests.fakes.retailcrm import FakeRetailCRM
from tests.test_tenants import provider_raw
from tests.waiting import until

TENANTS = tuple(TENANT_DOMAINS)


@pytest.fixture
def crms():
    started = {t: FakeRetailCRM(api_key=TENANT_KEYS[t], known_codes={"100", "200"},
                                known_user_ids=set(TENANT_USER_IDS[t].values()), known_sites={"shop1"}).start()
               for t in TENANTS}
    yield started
    for crm in started.values():
        crm.stop()


@pytest.fixture
def start_provider(simulator, crms, tmp_path):
    started: list[Any] = []

    def start(dids: bool = True) -> Any:
        tenants_dir = tmp_path / "tenants.d"
        tenants_dir.mkdir()
        for tenant, crm in crms.items():
            (tenants_dir / f"{tenant}.yaml").write_text(tenant_file(tenant, crm.url, dids=dids))
        raw = provider_raw(tenants_dir, simulator.port)
        # Click-to-call as in the e2e config: the customer on a SIPp UAS (the capture's dial string).
        raw["originate"] = {"customer_dial": "sofia/internal/{phone}@127.0.0.1:5092", "ring_timeout": 6}
        return run_bridge(config.from_mapping(raw, env={}), simulator, started)

    yield start
    for bridge in started:
        bridge.stop()


@pytest.fixture
def provider(start_provider):
    return start_provider()


def cards(crm: FakeRetailCRM) -> list[tuple]:
    return [(e["type"], e["phone"], tuple(sorted(e["codes"])), e.get("externalPhone"), e.get("hangupStatus"))
            for e in crm.events]


def record(crm: FakeRetailCRM, call_id: str) -> dict[str, Any]:
    got = dict(crm.calls[call_id])
    got["recorded"] = bool(got.pop("recordUrl", ""))
    keys = ("type", "phone", "result", "code", "userId", "duration", "externalPhone", "site", "recorded")
    return {k: got.get(k) for k in keys}


def history(tenant: str, kind: str, code: str, did: str, duration: int, recorded: bool) -> dict[str, Any]:
    return {"type": kind, "phone": CUSTOMER, "result": "answered", "code": code,
            "userId": TENANT_USER_IDS[tenant][code], "duration": duration, "externalPhone": did, "site": "shop1",
            "recorded": recorded}


def wait_history(crms: dict[str, FakeRetailCRM], counts: dict[str, int]) -> None:
    for tenant, count in counts.items():
        until(lambda crm=crms[tenant], n=count: len(crm.calls) >= n, timeout=15,
              what=f"{count} calls in company {tenant}'s history")
    gevent.sleep(0.2)   # anything more would arrive now


def only_call(crm: FakeRetailCRM) -> str:
    [call_id] = crm.calls
    assert {e["callExternalId"] for e in crm.events} == {call_id}, "one call, one id"
    return call_id


@pytest.mark.parametrize("dids", [True, False], ids=["dids-configured", "domain-only"])
def test_customers_calling_both_domains_at_once(simulator, crms, start_provider, dids) -> None:
    """The same customer calls both companies' DIDs at once; each DID rings 100 of its own domain. With the
    DIDs in the tenant files the customer's leg is claimed by its DID; without, by nothing, and the call is
    the company of the phone FreeSWITCH dialled for it (user/100@<domain>: variable_dialed_domain)."""
    start_provider(dids=dids)
    simulator.play("tenants_inbound_both")
    wait_history(crms, {"a": 1, "b": 1})
    for t in TENANTS:
        did = TENANT_DIDS[t]
        assert cards(crms[t]) == [("in", CUSTOMER, ("100",), did, None),
                                  ("hangup", CUSTOMER, ("100",), did, "answered")]
        expected = history(t, "in", "100", did, 4, True)
        if not dids:
            expected["site"] = None   # a number of no configured shop
        assert record(crms[t], only_call(crms[t])) == expected
    assert set(crms["a"].calls).isdisjoint(crms["b"].calls)


def test_each_domains_routed_did_is_its_own_companys_call(simulator, crms, provider) -> None:
    """fsbridge_inbound.xml in each domain's context rang the responsible manager its company's CRM named:
    200 of a.pbx.test, 100 of b.pbx.test."""
    simulator.play("tenants_routed_both")
    wait_history(crms, {"a": 1, "b": 1})
    for t, code in (("a", "200"), ("b", "100")):
        did = TENANT_ROUTED[t]
        assert cards(crms[t]) == [("in", CUSTOMER, (code,), did, None),
                                  ("hangup", CUSTOMER, (code,), did, "answered")]
        assert record(crms[t], only_call(crms[t])) == history(t, "in", code, did, 4, True)


@pytest.mark.parametrize("tenant", TENANTS)
def test_click_to_call_of_each_company_rings_its_own_domain(simulator, crms, provider, tenant) -> None:
    """make-call with a company's clientId: fsbridge originates user/100@<its domain> (the simulator answers
    with that company's real click), and the cards and the history go to that company's CRM only."""
    other = "b" if tenant == "a" else "a"
    simulator.originate_plays = f"tenants_click_{tenant}"
    url = base_url(provider) + "/retailcrm/make-call"

    def click(client_id: str, did: str) -> requests.Response:
        return requests.get(url, params={"clientId": client_id, "code": "100", "phone": CUSTOMER,
                                         "externalPhone": did}, timeout=10)

    assert click("unknown-client-id-0123456789abcdef", TENANT_DIDS[tenant]).status_code == 403
    assert click(TENANT_CLIENT_IDS[tenant], TENANT_DIDS[other]).status_code == 400
    assert simulator.originates == [], "nothing reached FreeSWITCH"
    reply = click(TENANT_CLIENT_IDS[tenant], TENANT_DIDS[tenant])
    assert (reply.status_code, reply.text) == (200, "")
    [originate] = simulator.originates
    assert f"}}user/100@{TENANT_DOMAINS[tenant]} &bridge(" in originate.args
    wait_history(crms, {tenant: 1})
    did = TENANT_DIDS[tenant]
    assert cards(crms[tenant]) == [("out", CUSTOMER, ("100",), did, None),
                                   ("hangup", CUSTOMER, ("100",), did, "answered")]
    call_id = only_call(crms[tenant])
    assert call_id == originate.uuid, "the call's id is the uuid fsbridge originated it with"
    assert record(crms[tenant], call_id) == history(tenant, "out", "100", did, 4, True)
    assert crms[other].events == [] and crms[other].calls == {}


def test_a_call_between_two_companies_phones_reaches_neither_crm(simulator, crms, provider) -> None:
    """100@a.pbx.test dialled 5100, 100@b.pbx.test answered: nobody's card (README, the call model with
    tenants), and nothing waits in the outbox for either company."""
    played = simulator.play("tenants_cross_domain")
    simulator.play("tenants_inbound_both")     # a call after it, to know fsbridge has read this far
    wait_history(crms, {"a": 1, "b": 1})
    for t in TENANTS:
        assert played.a_leg not in crms[t].calls
        assert {e["callExternalId"] for e in crms[t].events} == set(crms[t].calls)
        assert len(crms[t].calls) == 1
    # Marked sent once fsbridge has read the CRMs' replies (the fakes store them before they answer).
    until(lambda: provider.outbox.pending_by_tenant() == {}, what="the calls marked sent")


def test_a_customer_transferred_to_the_other_companys_phone_stays_the_first_companys(simulator, crms,
                                                                                     provider) -> None:
    """100@a.pbx.test blind-transferred a's customer to 5200, and 200@b.pbx.test took the call: b's phone is
    neither a's manager (a's own 200 is another person) nor b's customer. a's CRM: the card of its 100 and
    the history credited to it; b's CRM: nothing (not even a card for its 200, whose phone rang)."""
    simulator.play("tenants_transfer_cross_domain")
    wait_history(crms, {"a": 1})
    did = TENANT_DIDS["a"]
    assert cards(crms["a"]) == [("in", CUSTOMER, ("100",), did, None), ("hangup", CUSTOMER, ("100",), did, "answered")]
    assert record(crms["a"], only_call(crms["a"])) == history("a", "in", "100", did, 8, True)
    assert crms["b"].events == [] and crms["b"].calls == {}


def test_all_the_companies_calls_at_once_nothing_crosses(simulator, crms, provider) -> None:
    """Every capture played several times, interleaved, as fast as fsbridge reads: each CRM gets exactly its
    own calls' history, with its own managers' user ids, and cards of its own calls only (a card that cannot
    reach the CRM within crm.card_max_age is dropped by design, so cards are counted at most, the history
    exactly)."""
    plays = ["tenants_inbound_both", "tenants_routed_both", "tenants_click_a", "tenants_click_b",
             "tenants_cross_domain", "tenants_transfer_cross_domain"] * 4
    done = [simulator.play_async(name) for name in plays]
    gevent.joinall(done, raise_error=True)
    # Per round: inbound (1 each), routed (1 each), a's click, b's click, a's customer transferred to b's
    # phone (a's call); the call between the two companies' phones is nobody's.
    expected = {"a": 16, "b": 12}
    wait_history(crms, expected)
    for t in TENANTS:
        crm = crms[t]
        assert len(crm.calls) == expected[t]
        assert {e["callExternalId"] for e in crm.events} <= set(crm.calls)
        assert set(c["userId"] for c in crm.calls.values()) <= set(TENANT_USER_IDS[t].values()), \
            "only this company's managers"
        inbound = expected[t] - 8     # the DID's calls (plain and transferred), routed and clicks: 4 each
        assert Counter(c["externalPhone"] for c in crm.calls.values()) == {
            TENANT_DIDS[t]: inbound + 4, TENANT_ROUTED[t]: 4}
        assert Counter(e["type"] for e in crm.events) <= Counter({"in": inbound + 4, "out": 4, "hangup": expected[t]})
        assert Counter(c["type"] for c in crm.calls.values()) == {"in": inbound + 4, "out": 4}
    assert set(crms["a"].calls).isdisjoint(crms["b"].calls)


def test_a_leg_dialled_into_another_domain_is_that_domains(tmp_path, crms) -> None:
    """The leg to b's 100 in the cross-domain capture carries the caller's context (a.pbx.test) and the
    dialled user's domain (b.pbx.test): the dialled domain decides. Dialled by URI rather than user/ (a
    dialplan bridging sofia/internal/100@b.pbx.test:5060), FreeSWITCH writes the domain only in
    variable_sip_to_host, with the port: still b's phone, not a's extension 100."""
    from fsbridge.tenants.attribution import Attribution
    from fsbridge.tenants.settings import load_all
    from tests.capture import events

    tenants_dir = tmp_path / "tenants.d"
    tenants_dir.mkdir()
    for tenant, crm in crms.items():
        (tenants_dir / f"{tenant}.yaml").write_text(tenant_file(tenant, crm.url))
    cfg = config.from_mapping(provider_raw(tenants_dir), env={})
    attribution = Attribution(load_all(cfg).tenants.values(), cfg.trunks)
    callee = next(e for e in events("tenants_cross_domain")
                  if e["Event-Name"] == "CHANNEL_CREATE" and e["Call-Direction"] == "outbound")
    assert (callee["variable_dialed_domain"], callee["Caller-Context"]) == ("b.pbx.test", "a.pbx.test")
    assert attribution.for_event(callee).tenant == "b"
    by_uri = {k: v for k, v in callee.items() if k not in ("variable_dialed_domain", "variable_dialed_user")}
    by_uri["variable_sip_to_host"] = "b.pbx.test:5060"
    assert attribution.for_event(by_uri).tenant == "b"
