"""The tenants on the internal listener: `GET /tenants` (what `fsbridge tenants` shows of the running
service) and `POST /reload` (what `fsbridge reload` asks for; SIGHUP does the same).

Same fence as the routing lookup: routing.allow_from (loopback by default), never through a proxy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fsbridge.http.app import Request, Response, Router
from fsbridge.http.lookup import RoutingHandler
from fsbridge.tenants.registry import Companies


class TenantsOps:
    def __init__(self, companies: Companies, allow_from: list[str], reload: Callable[[], dict[str, str]]) -> None:
        self.companies = companies
        self._reload = reload   # the service's: what a reload changes outside the companies too (SIGHUP's)
        self._fence = RoutingHandler(None, allow_from=allow_from)  # type: ignore[arg-type]

    def register(self, router: Router) -> None:
        router.add({"GET"}, "/tenants", self.list)
        router.add({"POST"}, "/reload", self.reload, max_body=0)

    def list(self, request: Request) -> Response:
        if not self._fence.allowed(request):
            return Response.text(403, "forbidden")
        return _json(200, {"tenants": describe(self.companies), "refused": self.companies.errors})

    def reload(self, request: Request) -> Response:
        if not self._fence.allowed(request):
            return Response.text(403, "forbidden")
        refused = self._reload()
        return _json(200, {"tenants": sorted(c.tenant.label for c in self.companies), "refused": refused})


def describe(companies: Companies) -> list[dict[str, Any]]:
    pending = companies.outbox.pending_by_tenant()
    rows = []
    for company in companies:
        row = {"tenant": company.tenant.label, "domains": list(company.tenant.domains),
               "history_pending": pending.get(company.name, 0), **company.state()}
        rows.append(row)
    configured = {c.name for c in companies}
    for name, count in sorted(pending.items()):
        if name not in configured:
            # A removed tenant's calls stay in the outbox (and go out if it comes back).
            rows.append({"tenant": name or "default", "domains": [], "crm": "removed", "history_pending": count})
    return rows


def _json(status: int, payload: Any) -> Response:
    return Response(status, {"Content-Type": "application/json", "Cache-Control": "no-store"},
                    json.dumps(payload, sort_keys=True).encode() + b"\n")
