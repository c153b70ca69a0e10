"""The config file is a user-facing contract: wrong input gets one clear line naming the key."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml

from fsbridge import config
from fsbridge.config import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "conf" / "fsbridge.example.yaml"


def minimal() -> dict:
    return {
        "crm": {"url": "https://shop.retailcrm.ru", "api_key": "k" * 32, "timezone": "Europe/Moscow"},
        "integration": {"client_id": "c" * 32, "public_url": "https://pbx.example.com"},
        "records": {"link_secret": "r" * 32},
        "managers": {"100": 1, 200: 2},
        "external_phones": {"+7 (499) 999-99-99": "shop1"},
    }


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = config.from_mapping(minimal(), env={})
    assert cfg.freeswitch.port == 8021 and cfg.http.listen == "127.0.0.1:8088"
    assert cfg.managers == {"100": 1, "200": 2}
    assert cfg.external_phones == {"74999999999": "shop1"}


def test_example_file_loads_and_documents_every_setting() -> None:
    cfg = config.load(EXAMPLE, env={})
    assert cfg.crm.timezone == "Europe/Moscow"
    text = EXAMPLE.read_text()
    raw = yaml.safe_load(text)
    for key, _default, _doc in config.describe():
        section, _, name = key.partition(".")
        assert section in raw, f"{section} missing from the example"
        if name:
            assert name in (raw[section] or {}), f"{key} is not documented in {EXAMPLE.name}"


def test_environment_overrides_secrets() -> None:
    raw = minimal()
    del raw["crm"]["api_key"]
    env = {"FSBRIDGE_CRM_API_KEY": "from-env-123456", "FSBRIDGE_ESL_PASSWORD": "s3cret",
           "FSBRIDGE_CLIENT_ID": "e" * 20}
    cfg = config.from_mapping(raw, env=env)
    assert cfg.crm.api_key == "from-env-123456"
    assert cfg.freeswitch.password == "s3cret"
    assert cfg.integration.client_id == "e" * 20


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["crm"].pop("url"), "crm.url: missing"),
    (lambda r: r["crm"].update(url="ftp://x"), "crm.url: expected an http(s) URL"),
    # Both go into request lines and headers, which carry ASCII only.
    (lambda r: r["crm"].update(url="https://магазин.рф"), "crm.url: expected an http(s) URL of ASCII"),
    (lambda r: r["crm"].update(url="https://x.retailcrm.ru/a b"), "crm.url: expected an http(s) URL of ASCII"),
    (lambda r: r["crm"].update(api_key="ключ-ключ-ключ"), "crm.api_key: expected printable ASCII"),
    (lambda r: r["crm"].update(timezone="Moscow"), "crm.timezone: expected an IANA time zone"),
    (lambda r: r["crm"].update(telephony_rate=0.5), "crm.telephony_rate: expected 0 (no pacing) or a number"),
    (lambda r: r["crm"].update(telephony_rate=5000), "crm.telephony_rate: expected 0 (no pacing) or a number"),
    (lambda r: r["crm"].update(telephony_rate=False), "crm.telephony_rate: expected 0 (no pacing) or a number"),
    (lambda r: r["crm"].update(apikey="x"), "crm.apikey: unknown setting (did you mean crm.api_key?)"),
    (lambda r: r.update(freeswitch={"port": 70000}), "freeswitch.port: expected an integer from 1 to 65535"),
    (lambda r: r.update(freeswitch={"port": "8021"}), "freeswitch.port: expected an integer"),
    (lambda r: r.update(managers={"10a": 1}), "managers: expected digit-only extensions"),
    # /retailcrm/status, click-to-call and the Lua script take 16 digits at most: so does the config.
    (lambda r: r.update(managers={"1" * 17: 1}), "managers: expected digit-only extensions of 1 to 16"),
    (lambda r: r.update(managers={"100": "one"}), "managers: expected a positive integer user id"),
    (lambda r: r.update(managers={}), "managers: expected a mapping of extension"),
    (lambda r: r.pop("managers"), "managers: missing"),
    (lambda r: r["integration"].update(client_id="short"), "integration.client_id: expected at least 16"),
    (lambda r: r.update(http={"listen": "8088"}), 'http.listen: expected "host:port"'),
    (lambda r: r.update(external_phones={"100": "shop1"}), "external_phones: expected external numbers"),
    (lambda r: r.update(trunks={"gateways": "gw1"}), "trunks.gateways: expected a list of names"),
])
def test_bad_settings_name_the_key(mutate, message: str) -> None:
    raw = minimal()
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        config.from_mapping(raw, env={})
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_telephony_rate_zero_turns_pacing_off(make_config) -> None:
    from fsbridge.service import Bridge

    raw = minimal()
    raw["crm"]["telephony_rate"] = 0
    assert config.from_mapping(raw, env={}).crm.telephony_rate == 0.0
    # ... and it reaches the client the service builds: no limiter in front of /telephony requests.
    for rate, paced in ((0, False), (40, True)):
        bridge = Bridge(make_config(crm={"telephony_rate": rate}))
        try:
            assert (bridge.crm._limiters["telephony"] is not None) == paced
        finally:
            bridge.stop(timeout=1.0)


def test_secret_values_are_not_echoed() -> None:
    raw = minimal()
    raw["integration"]["client_id"] = "tiny-secret"
    with pytest.raises(ConfigError) as err:
        config.from_mapping(raw, env={})
    assert "tiny-secret" not in str(err.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fsbridge", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_reports_a_broken_config_in_one_line(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("crm: {url: https://x.retailcrm.ru, api_key: kkkkkkkkkk, timezone: Mars/Olympus}\n")
    proc = run_cli("run", "--config", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fsbridge: config error: crm.timezone: expected an IANA time zone such as Europe/Moscow, got 'Mars/Olympus'"]
    assert "Traceback" not in proc.stderr


def test_cli_reports_invalid_yaml_and_missing_file(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("crm: [unclosed\n")
    proc = run_cli("check", "--config", str(bad))
    assert proc.returncode == 2 and "is not valid YAML at line" in proc.stderr
    proc = run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
