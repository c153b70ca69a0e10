"""Calls placed while fsbridge is stopped, recovered from the real FreeSWITCH's CDR documents
(mod_json_cdr, tests/e2e/freeswitch/autoload_configs/json_cdr.conf.xml): every one is in the history once,
with its true outcome, and no card is sent for them.

How FreeSWITCH is found, and how to enable these tests: tests/e2e/conftest.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.e2e.conftest import World
from tests.e2e.harness import DID_100, DID_200
from tests.e2e.test_calls import check_history
from tests.waiting import until

pytestmark = pytest.mark.e2e


def test_calls_placed_while_fsbridge_is_stopped_are_recovered_from_the_cdrs(world: World) -> None:
    from fsbridge.service import Bridge

    cdr_dir = world.fs.cdr_dir
    if cdr_dir is None or not cdr_dir.is_dir():
        pytest.skip("this FreeSWITCH's mod_json_cdr log-dir is not readable here (FSBRIDGE_E2E_CDR_DIR)")
    world.bridge.stop()
    # Documents of the suite's earlier calls are not this test's business.
    for old in cdr_dir.glob("*.cdr.json"):
        old.unlink()
    cards = len(world.crm.events)

    phone = world.sipp.phone("100", "answer", ring_ms=1000)
    customer = world.sipp.customer(DID_100, "talk", hold_ms=3000)
    customer.ok()
    phone.ok()
    phone = world.sipp.phone("200", "ring")
    customer = world.sipp.customer(DID_200, "refused")
    customer.ok(timeout=60)
    phone.ok()
    until(lambda: len(list(cdr_dir.glob("*.cdr.json"))) >= 4, 10, "FreeSWITCH's four CDR documents")

    cfg = world.bridge.cfg
    cfg = dataclasses.replace(cfg, freeswitch=dataclasses.replace(cfg.freeswitch, cdr_dir=str(cdr_dir)))
    again = Bridge(cfg, on_finished=world.finished.append)
    assert again.spool is not None
    again.spool.grace = 1.0
    again.spool.poll_interval = 0.5
    world.bridge = again
    again.start()
    try:
        until(lambda: len(world.crm.calls) >= 2, 30, "both calls in the history")
        answered = next(c.call_id for c in world.finished if c.result == "answered")
        refused = next(c.call_id for c in world.finished if c.result != "answered")
        check_history(world, answered, result="answered", code="100", did=DID_100, talk_s=3, recorded=True)
        check_history(world, refused, result="no answer", code="200", did=DID_200)
        assert len(world.crm.calls) == 2 and len(world.crm.uploads) >= 1
        stored = [c["externalId"] for u in world.crm.uploads for c in u.calls if c["externalId"] not in u.duplicates]
        assert sorted(stored) == sorted(world.crm.calls), "each call stored once"
        assert len(world.crm.events) == cards, "no card for calls that ended while fsbridge was stopped"
        assert {c.source for c in world.finished} == {"cdr"}
    finally:
        again.stop()
