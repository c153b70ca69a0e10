"""GET /retailcrm/make-call: retailCRM's makeCallUrl (a manager clicked a phone number).

`?clientId=..&code=100&phone=+7%20(912)%20123-45-67&userId=1[&externalPhone=..]`. retailCRM shows
any status but 200 as a failure to the manager, so the reason line is meant for them and for logs.

The vendor's guide sends `phone=+79121234567` with a literal `+` (a space in form encoding): the leading
`+` of `phone` is kept as a plus, as `%2B` is (Router.add's literal_plus).
"""

from __future__ import annotations

import logging

from fsbridge.http.app import Request, Response, Router, check_client_id
from fsbridge.manager_status import USER_ID_RE
from fsbridge.originate import ClickFailed, ClickRejected, Originator, validate_click

log = logging.getLogger("fsbridge.http")

DEFAULT_PATH = "/retailcrm/make-call"


class MakeCallHandler:
    def __init__(self, client_id: str, managers: dict[str, int], external_phones: dict[str, str],
                 originator: Originator | None, off_reason: str = "") -> None:
        self.client_id = client_id
        # Without an originator (the config does not allow one) the CRM still gets a reason, not a 404.
        self.off_reason = off_reason or "click-to-call is not configured"
        self.managers = managers
        self.external_phones = external_phones
        self.originator = originator

    def register(self, router: Router, path: str = DEFAULT_PATH) -> None:
        router.add({"GET"}, path, self, literal_plus=("phone",))

    def __call__(self, request: Request) -> Response:
        denied = check_client_id(request, self.client_id)
        if denied is not None:
            return denied
        if self.originator is None:
            return Response.text(503, self.off_reason)
        q = request.query
        try:
            click = validate_click(q.get("code"), q.get("phone"), q.get("externalPhone"), self.managers,
                                   self.external_phones)
        except ClickRejected as exc:
            return Response.text(400, str(exc))
        user_id = q.get("userId")
        if user_id is not None and USER_ID_RE.fullmatch(user_id) is None:
            return Response.text(400, "userId: expected digits")
        if user_id is not None and int(user_id) != self.managers[click.code]:
            log.warning("make-call: retailCRM user %s clicked as extension %s, which the config gives to user %s",
                        user_id, click.code, self.managers[click.code])
        try:
            self.originator.click(click)
        except ClickFailed as exc:
            return Response.text(exc.status, str(exc))
        return Response.empty(200)
