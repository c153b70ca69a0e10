"""`fsbridge register` / `fsbridge info` against the strict fake retailCRM, and the logo it points the CRM to."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests

from fsbridge.config import Config
from fsbridge.http import HttpServer, Router
from fsbridge.http.logo import LogoHandler
from fsbridge.registration import RegistrationError, build_module, info, register
from tests.conftest import CLIENT_ID
from tests.fakes.retailcrm import ENTITY_FORMAT, FakeRetailCRM, _Invalid

MakeConfig = Callable[..., Config]


def sent_modules(crm: FakeRetailCRM) -> list[dict[str, Any]]:
    return [json.loads(r.form["integrationModule"]) for r in crm.requests
            if r.path.endswith("/edit") and "integrationModule" in r.form]


def test_the_module_is_built_from_the_config_in_the_shape_of_the_docs(make_config: MakeConfig) -> None:
    cfg = make_config(integration={"public_url": "https://pbx.example.com/", "name": "Офис АТС"})
    assert build_module(cfg) == {
        "code": "fsbridge", "active": True, "name": "Офис АТС",
        "logo": "https://pbx.example.com/logo.svg",
        "baseUrl": "https://pbx.example.com", "clientId": CLIENT_ID, "accountUrl": "https://pbx.example.com/account",
        "actions": {"activity": "/retailcrm/activity"},
        "integrations": {"telephony": {
            "makeCallUrl": "https://pbx.example.com/retailcrm/make-call",
            "changeUserStatusUrl": "https://pbx.example.com/retailcrm/status",
            "allowEdit": False, "inputEventSupported": True, "outputEventSupported": True,
            "hangupEventSupported": True,
            "additionalCodes": [{"userId": "1", "code": "100"}, {"userId": "2", "code": "200"}],
            "externalPhones": [{"siteCode": "shop1", "externalPhone": "+74999999999"},
                               {"siteCode": "shop1", "externalPhone": "+74999999998"}]}},
    }


def test_a_crm_that_refuses_the_activity_action_still_gets_the_module(make_config: MakeConfig,
                                                                      fake_crm: FakeRetailCRM) -> None:
    fake_crm.known_actions = set()   # the strict reading of our API notes: `actions` refused
    cfg = make_config(crm_url=fake_crm.url)
    report = register(cfg)
    assert report.splitlines()[0] == f"created integration module 'fsbridge' in {fake_crm.url}"
    assert "refused actions.activity" in report
    stored = fake_crm.modules["fsbridge"]
    assert "actions" not in stored and stored["integrations"] == build_module(cfg)["integrations"]


def test_register_creates_then_updates(make_config: MakeConfig, fake_crm: FakeRetailCRM) -> None:
    cfg = make_config(crm_url=fake_crm.url)
    first = register(cfg)
    assert first.splitlines()[0] == f"created integration module 'fsbridge' in {fake_crm.url}"
    assert "https://pbx.example.com/retailcrm/make-call" in first
    assert "2 manager extension(s), 2 external number(s)" in first
    assert "warning" not in first
    assert fake_crm.modules["fsbridge"] == build_module(cfg)

    second = register(make_config(crm_url=fake_crm.url, managers={"100": 1, "200": 2, "201": 2}))
    assert second.splitlines()[0] == f"updated integration module 'fsbridge' in {fake_crm.url}"
    assert "3 manager extension(s)" in second
    # Every registration carries the whole lists, never just the change.
    assert [len(m["integrations"]["telephony"]["additionalCodes"]) for m in sent_modules(fake_crm)] == [2, 3]


def test_register_names_users_and_shops_the_crm_does_not_know(make_config: MakeConfig,
                                                                fake_crm: FakeRetailCRM) -> None:
    cfg = make_config(crm_url=fake_crm.url, managers={"100": 1, "300": 7, "301": 7},
                      external_phones={"74999999999": "shop1", "74951234567": "shop9"})
    report = register(cfg)
    assert report.splitlines()[0].startswith("created")
    assert ("warning: retailCRM has no user with id 7 (extension 300, 301 in managers): "
            "that extension is tied to nobody in the CRM") in report
    assert ("warning: retailCRM has no shop with code 'shop9' (number +74951234567 in external_phones): "
            "calls on that number will not be tied to a shop") in report
    assert "user with id 1 " not in report and "'shop1'" not in report


def test_a_refused_module_is_explained_field_by_field(make_config: MakeConfig, fake_crm: FakeRetailCRM) -> None:
    def refuse(code: str, form: dict[str, str]) -> Any:
        raise _Invalid(ENTITY_FORMAT, {
            "logo": "Logo image must be svg",
            "integrations[telephony][additionalCodes][1][userId]": "This value is not valid.",
            "integrations[telephony][makeCallUrl]": "This value is not valid.",
        })

    fake_crm._module_edit = refuse  # type: ignore[method-assign]  # the real CRM's checks are stricter
    with pytest.raises(RegistrationError) as caught:
        register(make_config(crm_url=fake_crm.url))
    assert str(caught.value).splitlines() == [
        "could not register the integration module 'fsbridge': retailCRM refused it (HTTP 400):",
        "  logo (from integration.public_url): Logo image must be svg",
        "  additionalCodes #2 userId (from managers): This value is not valid.",
        "  makeCallUrl (from integration.public_url): This value is not valid.",
    ]


def test_a_wrong_api_key_is_said_in_plain_words(make_config: MakeConfig, fake_crm: FakeRetailCRM) -> None:
    cfg = make_config(crm_url=fake_crm.url, crm={"api_key": "not-the-right-key"})
    for action in (register, info):
        with pytest.raises(RegistrationError) as caught:
            action(cfg)
        message = str(caught.value)
        assert "retailCRM refused the API key (crm.api_key or FSBRIDGE_CRM_API_KEY)" in message
        assert 'Wrong "apiKey" value' in message
        assert "not-the-right-key" not in message
    assert fake_crm.modules == {}


def test_an_unreachable_crm_is_said_in_plain_words(make_config: MakeConfig, fake_crm: FakeRetailCRM) -> None:
    fake_crm.outage = "html502"
    with pytest.raises(RegistrationError, match=r"Nothing was changed; try again when retailCRM is reachable"):
        register(make_config(crm_url=fake_crm.url, crm={"timeout": 1.0}))


def test_info_before_register_says_what_to_do(make_config: MakeConfig, fake_crm: FakeRetailCRM) -> None:
    with pytest.raises(RegistrationError, match=r"not registered in .*: run `fsbridge register`"):
        info(make_config(crm_url=fake_crm.url))


def test_info_shows_no_difference_then_each_one(make_config: MakeConfig, fake_crm: FakeRetailCRM) -> None:
    register(make_config(crm_url=fake_crm.url))
    same = info(make_config(crm_url=fake_crm.url))
    assert same.splitlines() == [f"integration module 'fsbridge' in {fake_crm.url}: active, name 'FreeSWITCH'",
                                 "no differences from the config"]

    changed = dataclasses.replace(make_config(
        crm_url=fake_crm.url,
        integration={"public_url": "https://pbx2.example.com", "name": "PBX",
                     "client_id": "another-client-id-0123456789abcdef"},
    ), managers={"100": 1, "200": 3, "300": 1}, external_phones={"74999999999": "shop2"})
    lines = info(changed).splitlines()
    assert lines[1] == "11 difference(s) from the config (`fsbridge register` sends the config):"
    assert lines[2:] == [
        "  name: 'PBX' in the config (from integration.name), 'FreeSWITCH' in the CRM",
        "  logo: 'https://pbx2.example.com/logo.svg' in the config (from integration.public_url), "
        "'https://pbx.example.com/logo.svg' in the CRM",
        "  baseUrl: 'https://pbx2.example.com' in the config (from integration.public_url), "
        "'https://pbx.example.com' in the CRM",
        "  clientId: differs from the config (from integration.client_id) (values not shown: it is a secret); "
        "fsbridge refuses the CRM's make-call and status callbacks until you register again",
        "  accountUrl: 'https://pbx2.example.com/account' in the config (from integration.public_url), "
        "'https://pbx.example.com/account' in the CRM",
        "  makeCallUrl: 'https://pbx2.example.com/retailcrm/make-call' in the config (from integration.public_url), "
        "'https://pbx.example.com/retailcrm/make-call' in the CRM",
        "  changeUserStatusUrl: 'https://pbx2.example.com/retailcrm/status' in the config "
        "(from integration.public_url), 'https://pbx.example.com/retailcrm/status' in the CRM",
        "  extension 200: user 3 in the config (managers), user 2 in the CRM",
        "  extension 300: user 1 in the config (managers), not in the CRM",
        "  number +74999999998: shop 'shop1' in the CRM, not in the config (external_phones)",
        "  number +74999999999: shop 'shop2' in the config (external_phones), shop 'shop1' in the CRM",
    ]
    assert CLIENT_ID not in "\n".join(lines) and "another-client-id" not in "\n".join(lines)


def test_info_reads_what_the_crm_keeps_in_its_own_spelling(make_config: MakeConfig,
                                                            fake_crm: FakeRetailCRM) -> None:
    cfg = make_config(crm_url=fake_crm.url)
    register(cfg)
    stored = fake_crm.modules["fsbridge"]
    telephony = stored["integrations"]["telephony"]
    # What an admin's edit in the CRM, or the CRM's own serialisation, may turn the lists into.
    telephony["additionalCodes"] = [{"userId": 1, "code": 100}, {"userId": 2, "code": "200"}]
    telephony["externalPhones"] = [{"siteCode": "shop1", "externalPhone": "+7-499-999-99-99"},
                                   {"siteCode": "shop1", "externalPhone": "+7 (499) 999-99-98"}]
    del stored["clientId"]  # a CRM that does not show the secret back has nothing to compare
    assert info(cfg).splitlines()[1] == "no differences from the config"
    stored["active"] = False
    telephony["hangupEventSupported"] = False
    assert info(cfg).splitlines() == [
        f"integration module 'fsbridge' in {fake_crm.url}: NOT active, name 'FreeSWITCH'",
        "2 difference(s) from the config (`fsbridge register` sends the config):",
        "  active: true in the config, false in the CRM",
        "  hangupEventSupported: true in the config, false in the CRM",
    ]


def test_fsbridge_serves_the_svg_logo_it_registers() -> None:
    router = Router()
    LogoHandler().register(router)
    server = HttpServer("127.0.0.1:0", router, timeout=5)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.address[1]}"
        r = requests.get(base + "/logo.svg?v=2", timeout=5)
        head = requests.head(base + "/logo.svg", timeout=5)
    finally:
        server.stop(timeout=0.2)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "image/svg+xml"
    assert r.content.lstrip().startswith(b"<?xml") and b"<svg" in r.content and b"<script" not in r.content
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(r.content))
