"""Virtual PBX: one fsbridge, several companies, each with its own retailCRM account.

Two tenants whose extensions (100, 200), managers' user ids and customers look exactly the same, each
with its own strict fake retailCRM; the FreeSWITCH simulator replays the captured calls with the domain /
DID of one company or the other written on the wire."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import subprocess
import sys
import textwrap
import uuid as uuidlib
from typing import Any

import gevent
import pytest
import requests
import yaml

from fsbridge import config
from fsbridge.calls.legs import CUSTOMER, MANAGER, OTHER
from fsbridge.config import ConfigError
from fsbridge.service import Bridge
from fsbridge.tenants.attribution import Attribution
from fsbridge.tenants.settings import load_all
from tests.conftest import base_url, internal_url, run_bridge, settings
from tests.fakes.retailcrm import FakeRetailCRM
from tests.waiting import until

KEYS = {"acme": "acme-api-key-0123456789", "beta": "beta-api-key-0123456789"}
CLIENT_IDS = {"acme": "acme-client-id-0123456789abcdef", "beta": "beta-client-id-0123456789abcdef"}
DOMAINS = {"acme": "acme.pbx.example.com", "beta": "beta.pbx.example.com"}
# The captures' DIDs are acme's; beta's calls come in on its own DIDs (a DID belongs to one tenant).
DIDS = {"acme": {"74999999999": "shop1", "74999999998": "shop1"},
        "beta": {"74950000001": "shop1", "74950000002": "shop1"}}
TO_BETA = {"74999999999": "74950000001", "74999999998": "74950000002"}


def tenant_yaml(name: str, crm_url: str, **extra: Any) -> str:
    dids = "".join(f'\n  "{did}": {site}' for did, site in DIDS[name].items())
    text = textwrap.dedent(f"""\
        domains: [{DOMAINS[name]}]
        crm: {{url: "{crm_url}", api_key: "{KEYS[name]}", timezone: Europe/Moscow, card_max_age: 5}}
        integration: {{client_id: "{CLIENT_IDS[name]}"}}
        managers: {{"100": 1, "200": 2}}
        external_phones:""") + dids + "\n"
    for key, value in extra.items():
        text += f"{key}: {value}\n"
    return text


def provider_raw(tenants_dir: pathlib.Path, fs_port: int = 8021) -> dict:
    raw = settings(fs_port=fs_port)
    for key in ("managers", "external_phones"):
        del raw[key]
    raw["crm"] = {"timezone": "Europe/Moscow", "timeout": 2.0}
    raw["history"] = {"retry_max_delay": 1.0}
    raw["integration"] = {"public_url": "https://pbx.example.com"}
    raw["tenants_dir"] = str(tenants_dir)
    return raw


def crm_for(name: str) -> FakeRetailCRM:
    return FakeRetailCRM(api_key=KEYS[name], known_codes={"100", "200"}, known_user_ids={1, 2},
                         known_sites={"shop1"}).start()


@pytest.fixture
def crms():
    started = {name: crm_for(name) for name in ("acme", "beta")}
    yield started
    for crm in started.values():
        crm.stop()


@pytest.fixture
def tenants_dir(tmp_path, crms) -> pathlib.Path:
    d = tmp_path / "tenants.d"
    d.mkdir()
    for name, crm in crms.items():
        (d / f"{name}.yaml").write_text(tenant_yaml(name, crm.url))
    return d


@pytest.fixture
def provider(simulator, tenants_dir):
    started: list[Bridge] = []

    def start() -> Bridge:
        return run_bridge(config.from_mapping(provider_raw(tenants_dir, simulator.port), env={}), simulator, started)

    yield start
    for bridge in started:
        bridge.stop()


def as_beta(scenario: str) -> dict[str, str]:
    """Wire substitutions that make a captured call beta's: its DID, or its phone's domain."""
    subs = {f'"Caller-Destination-Number":"{a}"': f'"Caller-Destination-Number":"{b}"' for a, b in TO_BETA.items()}
    if scenario.startswith("outbound"):
        subs = {'"variable_sip_from_host":"127.0.0.1"': f'"variable_sip_from_host":"{DOMAINS["beta"]}"'}
    return subs


def as_acme(scenario: str) -> dict[str, str] | None:
    if scenario.startswith("outbound"):
        return {'"variable_sip_from_host":"127.0.0.1"': f'"variable_sip_from_host":"{DOMAINS["acme"]}"'}
    return None


# -- tenant files ---------------------------------------------------------------------------------------


def test_single_company_config_is_one_implicit_tenant_matching_every_domain(make_config) -> None:
    cfg = make_config()
    loaded = load_all(cfg)
    assert list(loaded.tenants) == [""] and loaded.errors == {}
    assert loaded.tenants[""].cfg is cfg


def test_tenant_file_gets_provider_defaults_and_its_own_overrides(tmp_path, crms, tenants_dir) -> None:
    (tenants_dir / "beta.yaml").write_text(tenant_yaml("beta", crms["beta"].url,
                                                       routing="{timeout: 0.5}", history="{strategy: periodic}"))
    top = config.from_mapping(provider_raw(tenants_dir), env={"FSBRIDGE_CRM_API_KEY": "not-a-tenant-key-123"})
    loaded = load_all(top)
    assert loaded.errors == {}
    acme, beta = loaded.tenants["acme"], loaded.tenants["beta"]
    # The environment's key is the single company's, never every tenant's.
    assert acme.cfg.crm.api_key == KEYS["acme"] and beta.cfg.crm.api_key == KEYS["beta"]
    assert acme.cfg.originate.manager_dial == "user/{code}@{domain}"
    assert acme.cfg.routing.timeout == 1.0 and beta.cfg.routing.timeout == 0.5
    assert acme.cfg.history.strategy == "immediate" and beta.cfg.history.strategy == "periodic"
    assert beta.cfg.freeswitch == top.freeswitch and beta.cfg.integration.public_url == "https://pbx.example.com"


def test_the_example_tenant_file_is_valid(tmp_path) -> None:
    example = pathlib.Path(__file__).parent.parent / "conf" / "tenants.d" / "example.yaml"
    d = tmp_path / "tenants.d"
    d.mkdir()
    (d / "example.yaml").write_bytes(example.read_bytes())
    loaded = load_all(config.from_mapping(provider_raw(d), env={}))
    assert loaded.errors == {} and loaded.tenants["example"].domains == ("example.pbx.provider.com",)


@pytest.mark.parametrize(("content", "key"), [
    ('domains: [acme.pbx.example.com]\ncrm: {url: "http://127.0.0.1:9", timezone: UTC}\n'
     'integration: {client_id: "acme-client-id-0123456789abcdef"}\nmanagers: {"100": 1}\n', "crm.api_key: missing"),
    ("domains: [acme.pbx.example.com]\nmanagers: {}\n", "managers: expected"),
    ("domains: ['bad domain']\n", "domains: expected"),
    ("freeswitch: {port: 1}\n", "freeswitch: not a tenant setting"),
    ("domains: [a.example.com]\nrouting: {allow_from: [0.0.0.0/0]}\n", "routing.allow_from: not a per-tenant"),
    ("domains: [a.example.com\n", "not valid YAML"),
])
def test_a_broken_tenant_file_is_one_line_naming_the_file_and_key(tenants_dir, content, key) -> None:
    (tenants_dir / "acme.yaml").write_text(content)
    loaded = load_all(config.from_mapping(provider_raw(tenants_dir), env={}))
    # At start-up a broken file stops nothing but its own tenant.
    assert list(loaded.tenants) == ["beta"]
    [error] = loaded.errors.values()
    assert "\n" not in error and error.startswith(str(tenants_dir / "acme.yaml") + ": ") and key in error


@pytest.mark.parametrize("clash", ["domains", "external_phones", "client_id"])
def test_two_tenants_claiming_the_same_thing_is_an_error_naming_both_files(tenants_dir, crms, clash) -> None:
    text = tenant_yaml("beta", crms["beta"].url)
    text = {"domains": text.replace(DOMAINS["beta"], DOMAINS["acme"]),
            "external_phones": text.replace("74950000002", "74999999998"),
            "client_id": text.replace(CLIENT_IDS["beta"], CLIENT_IDS["acme"])}[clash]
    (tenants_dir / "zeta.yaml").write_text(text)
    (tenants_dir / "beta.yaml").unlink()
    loaded = load_all(config.from_mapping(provider_raw(tenants_dir), env={}))
    assert list(loaded.tenants) == ["acme"]
    error = loaded.errors["zeta"]
    assert str(tenants_dir / "zeta.yaml") in error and str(tenants_dir / "acme.yaml") in error
    assert CLIENT_IDS["acme"] not in error   # a secret is never quoted


def test_top_level_company_keys_with_tenants_dir_are_refused(tenants_dir) -> None:
    raw = provider_raw(tenants_dir)
    raw["managers"] = {"100": 1}
    with pytest.raises(ConfigError, match=r"^managers: with tenants_dir"):
        config.from_mapping(raw, env={})


# -- attribution --------------------------------------------------------------------------------------


def leg_event(**headers: str) -> dict[str, str]:
    return {"Unique-ID": "u1", "Event-Name": "CHANNEL_CREATE", **headers}


def test_extension_100_of_each_domain_is_its_own_tenants_manager(tenants_dir) -> None:
    loaded = load_all(config.from_mapping(provider_raw(tenants_dir), env={}))
    attribution = Attribution(loaded.tenants.values(), config.from_mapping(provider_raw(tenants_dir), env={}).trunks)
    from fsbridge.calls.legs import classify

    for name in ("acme", "beta"):
        phone = leg_event(**{"Call-Direction": "inbound", "variable_sip_from_user": "100",
                             "Caller-Caller-ID-Number": "100", "variable_sip_from_host": DOMAINS[name]})
        directory = attribution.for_event(phone)
        assert directory is not None and directory.tenant == name
        leg = classify(phone, directory, 0)
        assert (leg.role, leg.code, leg.tenant) == (MANAGER, "100", name)
        to_user = leg_event(**{"Call-Direction": "outbound", "variable_dialed_user": "100",
                               "variable_dialed_domain": DOMAINS[name],
                               "variable_domain_name": DOMAINS["beta" if name == "acme" else "acme"]})
        assert attribution.for_event(to_user).tenant == name   # the dialled user's domain decides
    trunk_call = leg_event(**{"Call-Direction": "inbound", "Caller-Caller-ID-Number": "75555555555",
                              "Caller-Destination-Number": "+74950000001", "variable_sip_from_host": "carrier.example"})
    assert attribution.for_event(trunk_call).tenant == "beta"
    stranger = leg_event(**{"Call-Direction": "inbound", "Caller-Destination-Number": "74000000000",
                            "variable_sip_from_host": "127.0.0.1"})
    assert attribution.for_event(stranger) is None
    assert attribution.tenant_of_domain("ACME.pbx.example.com") == "acme"


def test_a_call_between_two_tenants_extensions_is_nobodys_card(tenants_dir) -> None:
    """acme's 100 dials beta's 100: an internal call between two companies' phones. The retailCRM model has
    a card for a customer only, and neither phone is the other company's customer: no card, no history."""
    from fsbridge.calls.tracker import CallTracker

    cfg = config.from_mapping(provider_raw(tenants_dir), env={})
    events: list = []
    finished: list = []
    tracker = CallTracker(Attribution(load_all(cfg).tenants.values(), cfg.trunks), events.append, finished.append)
    a = {"Unique-ID": "a", "Call-Direction": "inbound", "variable_sip_from_user": "100",
         "Caller-Caller-ID-Number": "100", "Caller-Destination-Number": "100",
         "variable_sip_from_host": DOMAINS["acme"], "Caller-Channel-Created-Time": "1"}
    b = {"Unique-ID": "b", "Call-Direction": "outbound", "variable_dialed_user": "100",
         "variable_dialed_domain": DOMAINS["beta"], "Caller-Destination-Number": "100",
         "variable_originating_leg_uuid": "a", "Caller-Channel-Created-Time": "2"}
    for name, ev in [("CHANNEL_CREATE", a), ("CHANNEL_CREATE", b), ("CHANNEL_PROGRESS", b), ("CHANNEL_ANSWER", b),
                     ("CHANNEL_BRIDGE", {**a, "Bridge-A-Unique-ID": "a", "Bridge-B-Unique-ID": "b"}),
                     ("CHANNEL_HANGUP_COMPLETE", b), ("CHANNEL_HANGUP_COMPLETE", a)]:
        tracker.handle({**ev, "Event-Name": name, "Hangup-Cause": "NORMAL_CLEARING"})
    assert tracker.legs == {}
    assert events == [] and finished == []


def test_another_tenants_phone_joining_a_call_is_not_its_manager(tenants_dir) -> None:
    from fsbridge.calls.tracker import CallTracker

    cfg = config.from_mapping(provider_raw(tenants_dir), env={})
    tracker = CallTracker(Attribution(load_all(cfg).tenants.values(), cfg.trunks), lambda e: None, lambda c: None)
    customer = {"Unique-ID": "c", "Call-Direction": "inbound", "Caller-Caller-ID-Number": "75555555555",
                "Caller-Destination-Number": "74999999999", "Event-Name": "CHANNEL_CREATE"}
    own = {"Unique-ID": "m1", "Call-Direction": "outbound", "variable_dialed_user": "100",
           "variable_dialed_domain": DOMAINS["acme"], "variable_originating_leg_uuid": "c",
           "Event-Name": "CHANNEL_CREATE"}
    foreign = {**own, "Unique-ID": "m2", "variable_dialed_domain": DOMAINS["beta"]}
    for ev in (customer, own, foreign):
        tracker.handle(ev)
    legs = tracker.legs
    assert (legs["c"].role, legs["c"].tenant) == (CUSTOMER, "acme")
    assert (legs["m1"].role, legs["m1"].code) == (MANAGER, "100")
    assert (legs["m2"].role, legs["m2"].code) == (OTHER, None)
    assert legs["c"].call.tenant == "acme" and legs["c"].call.site == "shop1"


# -- over real sockets --------------------------------------------------------------------------------


def cards(crm: FakeRetailCRM) -> list[tuple]:
    return [(e["type"], e["phone"], e["codes"], e.get("externalPhone")) for e in crm.events]


def uploaded(crm: FakeRetailCRM) -> list[dict]:
    return [c for u in crm.uploads for c in u.calls]


def test_two_lookalike_tenants_calling_at_once_reach_only_their_own_crm(simulator, crms, provider) -> None:
    bridge = provider()
    scenarios = ["inbound_answered", "inbound_busy", "outbound_ext_dial"]
    plays = [simulator.play_async(s, None, as_acme(s)) for s in scenarios]
    plays += [simulator.play_async(s, None, as_beta(s)) for s in scenarios]
    gevent.joinall(plays, raise_error=True)
    acme_ids = {g.value.a_leg for g in plays[:3]}
    beta_ids = {g.value.a_leg for g in plays[3:]}
    for crm in crms.values():
        until(lambda crm=crm: len(crm.events) >= 6 and len(uploaded(crm)) >= 3, timeout=10,
              what="each tenant's cards and history")
    gevent.sleep(0.3)
    for name, ids in (("acme", acme_ids), ("beta", beta_ids)):
        crm = crms[name]
        assert {e["callExternalId"] for e in crm.events} == ids
        assert {c["externalId"] for c in uploaded(crm)} == ids
        dids = {e.get("externalPhone") for e in crm.events} - {None}
        assert dids == set(DIDS[name]), name
    assert sorted(cards(crms["acme"])) != [] and len(crms["acme"].events) == len(crms["beta"].events) == 6
    until(lambda: bridge.outbox.pending_by_tenant() == {}, what="the calls marked sent")


def test_callbacks_find_the_tenant_by_client_id(crms, provider) -> None:
    bridge = provider()
    url = base_url(bridge)
    for name in ("acme", "beta"):
        r = requests.get(f"{url}/retailcrm/status", params={"clientId": CLIENT_IDS[name], "code": "100",
                                                             "status": "busy" if name == "acme" else "dinner"},
                         timeout=5)
        assert r.status_code == 200
    statuses = {c.name: c.statuses.snapshot() for c in bridge.companies}
    assert statuses == {"acme": {"100": "busy"}, "beta": {"100": "dinner"}}
    for path in ("/retailcrm/status", "/retailcrm/make-call"):
        r = requests.get(f"{url}{path}", params={"clientId": "unknown-client-id-0123456789", "code": "100",
                                                 "status": "free", "phone": "79121234567"}, timeout=5)
        assert r.status_code == 403
    assert statuses == {c.name: c.statuses.snapshot() for c in bridge.companies}


def test_routing_asks_the_crm_of_the_domain_the_script_passes(crms, provider) -> None:
    bridge = provider()
    crms["acme"].managers_by_phone["79121234567"] = {"id": 1, "code": "100"}
    crms["beta"].managers_by_phone["79121234567"] = {"id": 2, "code": "200"}
    url = internal_url(bridge) + "/routing/manager"
    answers = {name: requests.get(url, params={"phone": "+79121234567", "domain": DOMAINS[name]}, timeout=5).text
               for name in ("acme", "beta")}
    assert answers == {"acme": "100", "beta": "200"}
    for params in ({"phone": "+79121234567"}, {"phone": "+79121234567", "domain": "other.example.com"}):
        r = requests.get(url, params=params, timeout=5)
        assert (r.status_code, r.text) == (200, "")


def test_one_tenants_crm_down_does_not_hold_back_anothers_cards_or_history(simulator, crms, provider) -> None:
    bridge = provider()
    crms["acme"].outage = "timeout"
    down = [simulator.play_async("inbound_answered", None, None) for _ in range(5)]
    gevent.sleep(0.2)
    beta = [simulator.play_async(s, None, as_beta(s)) for s in ("inbound_answered", "inbound_busy")]
    gevent.joinall(beta + down, raise_error=True)
    until(lambda: len(crms["beta"].events) >= 4 and len(uploaded(crms["beta"])) >= 2, timeout=10,
          what="beta's cards and history while acme's CRM hangs")
    assert bridge.companies.get("beta").cards.dropped_stale == 0
    until(lambda: bridge.outbox.pending_by_tenant() == {"acme": 5}, what="acme's calls waiting in the outbox")
    assert crms["acme"].events == []
    crms["acme"].outage = None
    until(lambda: len(uploaded(crms["acme"])) >= 5, timeout=30, what="acme's history after its outage")
    assert {c["externalId"] for c in uploaded(crms["acme"])} == {g.value.a_leg for g in down}


def test_a_rejected_key_is_reported_once_and_its_calls_wait(simulator, crms, provider, caplog) -> None:
    caplog.set_level(logging.WARNING)
    bridge = provider()
    crms["beta"].api_key = "the-key-was-revoked-0123"
    played = [simulator.play("inbound_answered", None, as_beta("inbound_answered")) for _ in range(3)]
    until(lambda: bridge.companies.get("beta").key.rejections >= 3, timeout=10, what="the refusals")
    assert sum("rejects the API key" in r.getMessage() for r in caplog.records) == 1
    metrics = requests.get(internal_url(bridge) + "/metrics", timeout=5).text
    assert 'fsbridge_tenant_crm_key_rejected{tenant="beta"} 1.0' in metrics
    assert 'fsbridge_tenant_crm_key_rejected{tenant="acme"} 0.0' in metrics
    health = requests.get(internal_url(bridge) + "/healthz", timeout=5).json()
    assert "beta: API key rejected" in health["checks"]["tenants"]["detail"]
    until(lambda: bridge.outbox.pending_by_tenant().get("beta") == 3, what="beta's calls in the outbox")
    crms["beta"].api_key = KEYS["beta"]
    until(lambda: len(uploaded(crms["beta"])) >= 3, timeout=90, what="beta's history once the key works")
    assert {c["externalId"] for c in uploaded(crms["beta"])} == {p.a_leg for p in played}


# -- reload and the command line ------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsbridge_cli(config_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsbridge", *args, "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def provider_file(tmp_path, simulator, tenants_dir):
    raw = provider_raw(tenants_dir, simulator.port)
    raw["http"] = {"listen": "127.0.0.1:0", "internal_listen": f"127.0.0.1:{free_port()}"}
    path = tmp_path / "fsbridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    bridge = Bridge(config.load(path, env={}))
    bridge.start()
    until(lambda: bridge.listener.connected, what="fsbridge to connect")
    simulator.wait_for_subscriber()
    yield path, bridge
    bridge.stop()


def test_reload_applies_added_changed_removed_and_refuses_a_broken_file(simulator, crms, tenants_dir,
                                                                        provider_file, caplog) -> None:
    caplog.set_level(logging.INFO)
    path, bridge = provider_file
    # A call of beta is in progress when beta's file is removed: it finishes, and waits in the outbox.
    played = simulator.play("inbound_answered", None, as_beta("inbound_answered"), until="CHANNEL_BRIDGE")
    beta_file = (tenants_dir / "beta.yaml").read_text()
    (tenants_dir / "beta.yaml").unlink()
    proc = fsbridge_cli(path, "reload")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 tenant(s) running" in proc.stdout
    simulator.resume(played)
    until(lambda: bridge.outbox.pending_by_tenant() == {"beta": 1}, what="the removed tenant's call kept")
    listing = fsbridge_cli(path, "tenants")
    assert "beta" in listing.stdout and "removed" in listing.stdout, listing.stdout
    assert "pending by tenant: beta 1" in fsbridge_cli(path, "outbox").stdout
    # A broken file is refused in one line naming file and key; acme keeps its last good settings.
    (tenants_dir / "acme.yaml").write_text(tenant_yaml("acme", crms["acme"].url).replace("timezone: Europe/Moscow",
                                                                                        "timezone: Mars/Olympus"))
    proc = fsbridge_cli(path, "reload")
    assert proc.returncode == 1
    assert f"refused acme: {tenants_dir / 'acme.yaml'}: crm.timezone: expected an IANA time zone" in proc.stdout
    simulator.play("inbound_busy")
    until(lambda: len(crms["acme"].events) >= 2, what="acme's cards under its last good settings")
    # beta comes back, on another CRM account URL: its kept call goes out there, and new calls follow.
    moved = crm_for("beta")
    try:
        (tenants_dir / "beta.yaml").write_text(beta_file.replace(crms["beta"].url, moved.url))
        assert bridge.reload() == {"acme": bridge.companies.errors["acme"]}
        until(lambda: len(uploaded(moved)) == 1, what="the kept call delivered once beta is back")
        assert uploaded(moved)[0]["externalId"] == played.a_leg
        simulator.play("inbound_busy", None, as_beta("inbound_busy"))
        until(lambda: len(moved.events) >= 2, what="beta's cards on its new CRM")
        assert crms["beta"].events == [e for e in crms["beta"].events if e["callExternalId"] == played.a_leg]
    finally:
        moved.stop()
    assert "tenant beta removed" in caplog.text and "tenant beta added" in caplog.text


RINGING = 6


def cards_of(crm, call_id: str) -> list[str]:
    return [e["type"] for e in crm.events if e["callExternalId"] == call_id]


def test_a_changed_tenant_keeps_its_waiting_cards_in_order(simulator, crms, tenants_dir, request, caplog) -> None:
    caplog.set_level(logging.INFO)
    acme, beta = crms["acme"], crms["beta"]
    # acme's CRM answers in 0.15 s and acme delivers through one worker: the `in` cards of six ringing
    # calls queue up (0.9 s of them, under the 2 s after which a backlogged queue goes newest first).
    acme.latency = 0.15
    text = tenant_yaml("acme", acme.url).replace("card_max_age: 5", "card_max_age: 5, card_workers: 1")
    (tenants_dir / "acme.yaml").write_text(text)
    _path, bridge = request.getfixturevalue("provider_file")
    ringing = [simulator.play("inbound_answered", None, until="CHANNEL_BRIDGE") for _ in range(RINGING)]
    other = simulator.play("inbound_answered", None, as_beta("inbound_answered"), until="CHANNEL_BRIDGE")
    until(lambda: bridge.companies.get("acme").cards.pending >= RINGING // 2, what="acme's cards waiting")
    # The provider changes acme's file (same account, longer card age) while its cards wait.
    (tenants_dir / "acme.yaml").write_text(text.replace("card_max_age: 5", "card_max_age: 6"))
    assert bridge.reload() == {}
    assert "tenant acme changed" in caplog.text
    acme.latency = 0.0  # the CRM is quick again: a card sent through another queue now would overtake
    for played in [*ringing, other]:
        simulator.resume(played)
    until(lambda: all("hangup" in cards_of(acme, p.a_leg) for p in ringing), timeout=15,
          what="every hangup card of acme's calls")
    until(lambda: "hangup" in cards_of(beta, other.a_leg), what="beta's hangup card")
    for played in ringing:
        # Each card once, the `in` first: none was lost with the replaced company, none overtook.
        assert cards_of(acme, played.a_leg) == ["in", "hangup"], played.a_leg
    assert cards_of(beta, other.a_leg) == ["in", "hangup"]
    assert not any(e["callExternalId"] == other.a_leg for e in acme.events)
    assert bridge.companies.get("acme").cards.max_age == 6
    until(lambda: len(uploaded(acme)) == RINGING and len(uploaded(beta)) == 1, timeout=15, what="the history")
    assert sorted(c["externalId"] for c in uploaded(acme)) == sorted(p.a_leg for p in ringing)
    assert [c["externalId"] for c in uploaded(beta)] == [other.a_leg]


def test_register_info_and_check_take_a_tenant(crms, tenants_dir, provider_file) -> None:
    path, _bridge = provider_file
    proc = fsbridge_cli(path, "register")
    assert proc.returncode == 2 and "--tenant NAME, or --all" in proc.stdout
    proc = fsbridge_cli(path, "register", "--tenant", "beta")
    assert proc.returncode == 0, proc.stdout
    assert list(crms["beta"].modules) == ["fsbridge"] and crms["acme"].modules == {}
    assert crms["beta"].modules["fsbridge"]["clientId"] == CLIENT_IDS["beta"]
    proc = fsbridge_cli(path, "register", "--all")
    assert proc.returncode == 0 and "== tenant acme" in proc.stdout and "== tenant beta" in proc.stdout
    assert crms["acme"].modules["fsbridge"]["clientId"] == CLIENT_IDS["acme"]
    assert CLIENT_IDS["acme"] not in proc.stdout + proc.stderr
    proc = fsbridge_cli(path, "check", "--tenant", "nobody")
    assert proc.returncode == 1 and "tenant nobody: no such tenant file" in proc.stdout


# -- recordings -------------------------------------------------------------------------------------------


def test_record_links_resolve_in_fusionpbx_layout_to_that_tenants_calls_only(tmp_path, simulator, tenants_dir,
                                                                             fixtures_dir) -> None:
    from tests.test_history_outbox import make_call

    records = tmp_path / "recordings"
    sample = (fixtures_dir / "recordings" / "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.wav").read_bytes()
    ids = {name: str(uuidlib.uuid4()) for name in ("acme", "beta", "forged", "flat")}
    day = "archive/2026/Dec/04"
    for name, domain in (("acme", DOMAINS["acme"]), ("beta", DOMAINS["beta"]), ("forged", DOMAINS["acme"])):
        (records / domain / day).mkdir(parents=True, exist_ok=True)
        (records / domain / day / f"{ids[name]}.wav").write_bytes(sample)
    (records / f"{ids['flat']}.wav").write_bytes(sample)
    raw = provider_raw(tenants_dir, simulator.port)
    raw["records"] = {**raw["records"], "dir": str(records)}
    bridge = Bridge(config.from_mapping(raw, env={}))
    bridge.start()
    try:
        paths = {"acme": f"{records}/{DOMAINS['acme']}/{day}/{ids['acme']}.wav",
                 "beta": f"{records}/{DOMAINS['beta']}/{day}/{ids['beta']}.wav",
                 # beta's call claiming a file in acme's directory (a forged or mistaken RECORD_STOP path)
                 "forged": f"{records}/{DOMAINS['acme']}/{day}/{ids['forged']}.wav",
                 "flat": f"{records}/{ids['flat']}.wav"}
        owner = {"acme": "acme", "beta": "beta", "forged": "beta", "flat": "beta"}
        for n, (name, path) in enumerate(paths.items()):
            call = dataclasses.replace(make_call(n, recording_path=path, recording_ms=5000), call_id=ids[name],
                                       tenant=owner[name])
            bridge._finished(call)
        got = {name: requests.get(base_url(bridge) + bridge.links.path(ids[name]), timeout=5) for name in ids}
        assert {name: r.status_code for name, r in got.items()} == {"acme": 200, "beta": 200, "forged": 404,
                                                                    "flat": 200}
        assert got["acme"].content == sample
        # The link is the same shape as ever: nothing in it names a directory.
        assert bridge.links.path(ids["acme"]).count("/") == 3

        # Links never expire: once the calls are delivered and purged from the outbox (keep_sent_days), and
        # fsbridge restarted (nothing remembered in memory), the file is still found, and still only its own.
        outbox = bridge.outbox
        with outbox._lock:
            outbox._db.execute("UPDATE calls SET state = 1, updated = 0")
        assert outbox.purge_sent(older_than=0) == len(ids)
        assert all(outbox.state_of(i) is None for i in ids.values())
        bridge._located.clear()
        again = {name: requests.get(base_url(bridge) + bridge.links.path(ids[name]), timeout=5).status_code
                 for name in ids}
        assert again == {"acme": 200, "beta": 200, "forged": 404, "flat": 200}
    finally:
        bridge.stop()


def test_calls_recovered_from_cdr_documents_get_their_tenant(tenants_dir, fixtures_dir, tmp_path) -> None:
    from fsbridge.calls.cdr_spool import parse_document, replay

    cfg = config.from_mapping(provider_raw(tenants_dir), env={})
    attribution = Attribution(load_all(cfg).tenants.values(), cfg.trunks)
    docs = sorted((fixtures_dir / "json_cdr").iterdir())

    def tenant_of(rewrite: dict[str, str]) -> list[str]:
        legs = []
        for path in docs:
            text = path.read_text()
            for old, new in rewrite.items():
                text = text.replace(old, new)
            legs.append(parse_document(text, path.name, None))
        return [call.tenant for call in replay(legs, attribution)]

    assert tenant_of({}) == ["acme"]                                    # acme's DID
    assert tenant_of({'"74999999999"': '"74950000001"'}) == ["beta"]    # beta's DID
    # The legs' domain (variables.domain_name, as FusionPBX sets it) decides before the DID.
    assert tenant_of({'"sip_from_host":"127.0.0.1"':
                      f'"sip_from_host":"127.0.0.1","domain_name":"{DOMAINS["beta"]}"'}) == ["beta"]
    assert tenant_of({'"74999999999"': '"74000000000"'}) == []          # nobody's DID: nobody's call


def test_each_tenants_account_page_shows_its_own_calls_and_mapping(simulator, crms, provider) -> None:
    bridge = provider()
    for name, play in (("acme", simulator.play_async("inbound_answered", None, as_acme("inbound_answered"))),
                       ("beta", simulator.play_async("inbound_answered", None, as_beta("inbound_answered")))):
        play.get()
        until(lambda name=name: len(uploaded(crms[name])) == 1, timeout=10, what=f"{name}'s history")
    # A busy company: a hundred and twenty newer calls of beta's (another customer) in the shared outbox.
    beta_call = bridge.outbox.recent(1, tenant="beta")[0][0]
    bridge.outbox.add_many([dataclasses.replace(beta_call, call_id=f"busy-{n}", phone="79990004321")
                            for n in range(120)])
    pages = {}
    for name in ("acme", "beta"):
        r = requests.post(base_url(bridge) + "/account", data={"clientId": CLIENT_IDS[name]}, timeout=10)
        assert r.status_code == 200
        pages[name] = r.text
    # acme sees its one call (the page showed "No calls yet" when a hundred newer calls were another's), and
    # nothing of beta's; beta sees its newest twenty.
    assert "No calls yet." not in pages["acme"] and "•••4321" not in pages["acme"]
    assert pages["acme"].count("<td>in</td>") == 1
    assert pages["beta"].count("•••4321") == 20
    # Each mapping is read from the company's own CRM.
    for name, crm in crms.items():
        assert [r.path for r in crm.requests if "integration-modules" in r.path] != [], name
