"""Readiness right after start, against a FreeSWITCH that heartbeats at its real 20 s interval.

A load balancer or Docker's HEALTHCHECK asks /healthz as soon as fsbridge is up: a successful connect
and subscription is a sign of life, so a fresh start is ready before FreeSWITCH's first HEARTBEAT.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import internal_url
from tests.waiting import until


@pytest.fixture
def simulator() -> Iterator[Any]:
    from tests.fakes.freeswitch import FreeSwitchSimulator

    sim = FreeSwitchSimulator(password="ClueCon", heartbeat_interval=20.0)   # FreeSWITCH's default
    sim.start()
    yield sim
    sim.stop()


def test_ready_as_soon_as_subscribed_not_at_the_first_heartbeat(start_bridge, simulator) -> None:
    bridge = start_bridge()
    reply = requests.get(f"{internal_url(bridge)}/healthz", timeout=5)
    assert reply.status_code == 200, reply.text
    assert reply.json()["checks"]["freeswitch"]["ok"]


def test_silence_after_the_subscription_still_turns_readiness_red(start_bridge, simulator) -> None:
    bridge = start_bridge()
    bridge.health.heartbeat_timeout = 0.2   # no heartbeat for longer than this: the connection is suspect
    until(lambda: requests.get(f"{internal_url(bridge)}/healthz", timeout=5).status_code == 503, what="red")
    check = requests.get(f"{internal_url(bridge)}/healthz", timeout=5).json()["checks"]["freeswitch"]
    assert check == {"ok": False, "detail": "connected but no event or heartbeat lately"}
    simulator.send_heartbeat()
    until(lambda: requests.get(f"{internal_url(bridge)}/healthz", timeout=5).status_code == 200, what="green again")
