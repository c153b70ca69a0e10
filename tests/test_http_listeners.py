"""fsbridge's two HTTP listeners: the public one (behind the TLS proxy) and the internal one (loopback).

A route exists on one listener only; percent-encoded forms of a route's name reach nothing. Raw requests
(http.client): requests would decode `%6d` into `m` before sending, hiding exactly what is tested.
"""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import urlsplit

import pytest

from fsbridge import config
from tests.conftest import CLIENT_ID, base_url, internal_url, settings

REC_ID = "31ff8abf-a4ac-4f83-a050-5a0db45e0c55"  # tests/fixtures/recordings/
PHONE = "%2B79121234567"


def fetch(base: str, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (no quoting, no normalisation)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", target)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


@pytest.fixture
def bridge(start_bridge) -> Any:
    return start_bridge()


def public_targets(bridge: Any) -> list[str]:
    return ["/logo.svg", bridge.links.path(REC_ID),
            f"/retailcrm/make-call?clientId={CLIENT_ID}&code=100&phone={PHONE}&userId=1",
            f"/retailcrm/status?clientId={CLIENT_ID}&code=100&userId=1&status=free"]


INTERNAL = ["/metrics", "/healthz", "/healthz/live", f"/routing/manager?phone={PHONE}"]


def test_public_routes_only_on_the_public_listener(bridge: Any) -> None:
    for target in public_targets(bridge):
        status, _ = fetch(base_url(bridge), target)
        assert status != 404, target  # 200, or the handler's own answer (503: click-to-call is off here)
        assert fetch(internal_url(bridge), target)[0] == 404, target


def test_internal_routes_only_on_the_internal_listener(bridge: Any) -> None:
    status, body = fetch(internal_url(bridge), "/metrics")
    assert status == 200 and b"fsbridge_http_responses_total" in body
    assert fetch(internal_url(bridge), "/healthz/live")[0] == 200
    assert fetch(internal_url(bridge), "/healthz")[0] in (200, 503)  # a readiness report either way
    assert fetch(internal_url(bridge), f"/routing/manager?phone={PHONE}")[0] == 200  # loopback may ask
    for target in INTERNAL:
        status, body = fetch(base_url(bridge), target)
        assert status == 404 and body == b"not found\n", target


@pytest.mark.parametrize("target", ["/%6detrics", "/metric%73", "/%6Detrics", "/%2Fmetrics", "//metrics",
                                    "/metrics/", "/%68ealthz", "/healthz%2Flive", f"/routing/%6danager?phone={PHONE}",
                                    "/%6cogo.svg", "/retailcrm/make-c%61ll", "/%72ecords/x"])
def test_percent_encoded_route_names_reach_nothing(bridge: Any, target: str) -> None:
    for base in (base_url(bridge), internal_url(bridge)):
        status, body = fetch(base, target)
        assert status == 404, (base, target)
        assert b"fsbridge_" not in body and b"status" not in body


def test_the_two_listeners_must_differ() -> None:
    defaults = config.HttpSettings()
    assert (defaults.listen, defaults.internal_listen) == ("127.0.0.1:8088", "127.0.0.1:8090")
    for listen, internal in (("127.0.0.1:8088", "127.0.0.1:8088"), ("0.0.0.0:8088", "127.0.0.1:8088"),
                             ("127.0.0.1:8088", "localhost:8088")):
        with pytest.raises(config.ConfigError) as info:
            config.from_mapping(settings(http={"listen": listen, "internal_listen": internal}), env={})
        assert str(info.value).startswith("http.internal_listen: expected an address other than http.listen's")
    with pytest.raises(config.ConfigError, match=r"^http\.internal_listen: expected \"host:port\""):
        config.from_mapping(settings(http={"internal_listen": "8090"}), env={})
