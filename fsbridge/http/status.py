"""GET /retailcrm/status: retailCRM's changeUserStatusUrl.

`?clientId=..&code=100&userId=1&status=free|busy|dinner|break`. The CRM ignores our answer, so the
status codes are for humans reading logs and for tests: 403 wrong clientId, 400 bad input, 200 stored.
"""

from __future__ import annotations

from collections.abc import Container

from fsbridge.config import EXTENSION_RE
from fsbridge.http.app import Request, Response, Router, check_client_id
from fsbridge.manager_status import STATUSES, USER_ID_RE, ManagerStatus

DEFAULT_PATH = "/retailcrm/status"


class StatusHandler:
    """`managers` holds the configured extension codes (a set, or the managers mapping keyed by code)."""

    def __init__(self, client_id: str, managers: Container[str], store: ManagerStatus) -> None:
        self.client_id = client_id
        self.managers = managers
        self.store = store

    def register(self, router: Router, path: str = DEFAULT_PATH) -> None:
        router.add({"GET"}, path, self)

    def __call__(self, request: Request) -> Response:
        denied = check_client_id(request, self.client_id)
        if denied is not None:
            return denied
        q = request.query
        # Reasons never echo the value: it is client-controlled and ends up in logs and CRM error screens.
        code = q.get("code", "")
        if EXTENSION_RE.fullmatch(code) is None or code not in self.managers:
            return Response.text(400, "unknown manager code")
        status = q.get("status", "")
        if status not in STATUSES:
            return Response.text(400, "unknown status (expected free, busy, dinner or break)")
        user_id = q.get("userId")
        if user_id is not None and USER_ID_RE.fullmatch(user_id) is None:
            return Response.text(400, "malformed userId")
        self.store.set(code, status, user_id)
        return Response.empty(200)
