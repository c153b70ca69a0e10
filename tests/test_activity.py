"""retailCRM's activity callback: a deactivated or frozen module gets no cards and its history waits."""

from __future__ import annotations

import requests

from fsbridge import config, registration
from tests.conftest import CLIENT_ID, base_url, internal_url, run_bridge, settings
from tests.waiting import until


def uploaded(crm) -> list[dict]:
    return [c for u in crm.uploads for c in u.calls]


def test_deactivate_drops_cards_keeps_history_across_a_restart_and_activate_delivers_it(
        simulator, fake_crm, tmp_path) -> None:
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, state_dir=str(tmp_path / "state"))
    cfg = config.from_mapping(raw, env={})
    registration.register(cfg)
    assert fake_crm.modules["fsbridge"]["actions"] == {"activity": "/retailcrm/activity"}
    started: list = []
    bridge = run_bridge(cfg, simulator, started)
    try:
        url = base_url(bridge)
        # A stranger cannot switch a company off.
        r = fake_crm.send_activity("fsbridge", active=False, base=url, client_id="wrong-client-id-0123456789")
        assert r.status_code == 403
        r = requests.post(url + "/retailcrm/activity", data={"activity": '{"active": false}'}, timeout=5)
        assert r.status_code == 403
        r = fake_crm.send_activity("fsbridge", active=False, base=url)
        assert (r.status_code, r.json()) == (200, {"success": True})

        played = simulator.play("inbound_answered", None, None)
        company = next(iter(bridge.companies))
        until(lambda: company.cards.dropped_inactive >= 2, what="the cards dropped while deactivated")
        until(lambda: bridge.outbox.levels()[0] == 1, what="the call waiting in the outbox")
        assert fake_crm.events == [] and uploaded(fake_crm) == []
        health = requests.get(internal_url(bridge) + "/healthz", timeout=5).json()
        assert health["checks"]["activity"]["detail"] == "deactivated in retailCRM"
        metrics = requests.get(internal_url(bridge) + "/metrics", timeout=5).text
        assert 'fsbridge_module_delivering{tenant=""} 0.0' in metrics
    finally:
        bridge.stop()

    # The state survives a restart: the new process sends nothing either, until retailCRM says so.
    bridge = run_bridge(config.from_mapping(raw, env={}), simulator, started)
    try:
        url = base_url(bridge)
        fake_crm.send_activity("fsbridge", active=True, freeze=True, base=url)
        health = requests.get(internal_url(bridge) + "/healthz", timeout=5).json()
        assert health["checks"]["activity"]["detail"] == "frozen in retailCRM"
        bridge.stop()
        bridge = run_bridge(config.from_mapping(raw, env={}), simulator, started)
        url = base_url(bridge)
        company = next(iter(bridge.companies))
        assert not company.activity.delivering
        gevent_sleep()
        assert uploaded(fake_crm) == []
        r = fake_crm.send_activity("fsbridge", active=True, freeze=False, base=url)
        assert r.status_code == 200
        until(lambda: len(uploaded(fake_crm)) == 1, timeout=15, what="the history that waited")
        assert uploaded(fake_crm)[0]["externalId"] == played.a_leg
        assert requests.get(internal_url(bridge) + "/healthz", timeout=5).json()["checks"]["activity"]["detail"] \
            == "active"
        assert CLIENT_ID not in (tmp_path / "state" / "activity.json").read_text()
    finally:
        bridge.stop()


def gevent_sleep() -> None:
    import gevent

    gevent.sleep(0.5)
