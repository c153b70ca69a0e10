"""GET /routing/manager?phone=<caller>: the dialplan's question "who takes this call?".

Asked by FreeSWITCH's Lua script (conf/freeswitch/scripts/fsbridge_route.lua) on the same host, on
fsbridge's internal listener (http.internal_listen; the public one has no such route). The
answer is 200 text/plain: the extension, or an empty body for "use the fallback"; the script bridges only
to a body of digits, so any other answer (403, 400, 500) also means the fallback.

The endpoint is not authenticated (FreeSWITCH has no secret to send) but it tells whose customer a number
is, so only configured networks may ask (loopback by default), and a request that came through a reverse
proxy is refused whatever its peer address: a second fence, should a proxy ever be pointed at the internal
listener (it would make every outsider look like 127.0.0.1).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from fsbridge.http.app import Request, Response, Router, loggable
from fsbridge.routing import MAX_DIGITS, MIN_DIGITS, ManagerLookup, normalize_phone

log = logging.getLogger("fsbridge.http")

DEFAULT_PATH = "/routing/manager"
LOOPBACK = ("127.0.0.0/8", "::1/128")
# Headers a proxy adds; FreeSWITCH's curl / LuaSocket never send them.
_PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-host")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Refusals are logged once per peer; a bounded memory so a scan from many addresses cannot grow it.
_MAX_REMEMBERED_PEERS = 256


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """'127.0.0.0/8', '::1', '10.1.2.3' ... -> networks; ValueError names the bad entry."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"expected an IP address or network (CIDR), got {value!r}") from None
    return tuple(networks)


class RoutingHandler:
    def __init__(self, lookup: ManagerLookup, allow_from: Iterable[str] = LOOPBACK) -> None:
        self.lookup = lookup
        self.allow_from = parse_networks(allow_from)
        self._refused_peers: set[str] = set()

    def register(self, router: Router, path: str = DEFAULT_PATH) -> None:
        router.add({"GET"}, path, self)

    def allowed(self, request: Request) -> bool:
        if any(name in request.headers for name in _PROXY_HEADERS):
            return False
        try:
            peer = ipaddress.ip_address(request.remote_addr.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
            peer = peer.ipv4_mapped  # a dual-stack socket reports 127.0.0.1 as ::ffff:127.0.0.1
        return any(peer in network for network in self.allow_from)

    def __call__(self, request: Request) -> Response:
        if not self.allowed(request):
            self._log_refusal(request.remote_addr)
            return Response.text(403, "forbidden")
        phone = request.query.get("phone")
        # Checked here as well as in the lookup so that a human trying the URL by hand learns why; the
        # script falls back on any answer that is not digits, this one included.
        if normalize_phone(phone) is None:
            return Response.text(400, f"phone: expected {MIN_DIGITS} to {MAX_DIGITS} digits, optionally after +")
        lookup = self.lookup_for(request)
        extension = lookup.lookup(phone) if lookup is not None else ""
        return Response(200, {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"},
                        extension.encode("ascii"))

    def lookup_for(self, request: Request) -> ManagerLookup | None:
        """Whose CRM to ask (tenants/callbacks.py picks by the `domain` the script passes); None: nobody's."""
        return self.lookup

    def _log_refusal(self, peer: str) -> None:
        # WARNING: a refusal is a misconfiguration or a probe, worth seeing once per peer, not per request.
        if peer in self._refused_peers or len(self._refused_peers) >= _MAX_REMEMBERED_PEERS:
            return
        self._refused_peers.add(peer)
        log.warning("routing lookup refused for %s: not in routing.allow_from, or sent through a proxy",
                    loggable(peer or "an unknown peer", 64))
