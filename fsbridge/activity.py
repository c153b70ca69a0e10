"""retailCRM's `actions.activity` callback: the company switched the module off, froze it, or back on.

retailCRM POSTs `{baseUrl}{actions.activity}` with the form fields `clientId` and `activity`, a JSON object
`{"active": bool, "freeze": bool}` (`systemUrl` may come too and is ignored). While the module is inactive or
frozen the company's cards are dropped and counted (a card minutes late is worse than none) and its history
waits in the outbox; when it is active again the history that waited goes out. The state is kept in the
company's state directory, so a restart does not start sending to an account that switched fsbridge off.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fsbridge.http.app import BadRequest, Request, Response, parse_form

if TYPE_CHECKING:
    from fsbridge.tenants.registry import Companies

log = logging.getLogger("fsbridge.activity")

DEFAULT_PATH = "/retailcrm/activity"
# clientId (~64 chars) + a small JSON object + systemUrl: far below this.
MAX_BODY = 4096


@dataclass
class ActivityState:
    active: bool = True
    freeze: bool = False
    since: float | None = None  # when retailCRM last said so; None: never told (active by default)

    @property
    def delivering(self) -> bool:
        return self.active and not self.freeze

    def describe(self) -> str:
        if self.delivering:
            return "active"
        return "frozen in retailCRM" if self.freeze else "deactivated in retailCRM"


class Activity:
    """A company's activity flags, persisted in `path` (JSON). `on_resume` runs when delivery resumes."""

    def __init__(self, path: Path, on_resume: Callable[[], None] | None = None) -> None:
        self.path = path
        self.on_resume = on_resume
        self.state = self._load()

    def _load(self) -> ActivityState:
        try:
            raw = json.loads(self.path.read_text())
            return ActivityState(active=bool(raw["active"]), freeze=bool(raw["freeze"]),
                                 since=float(raw["since"]) if raw.get("since") is not None else None)
        except FileNotFoundError:
            return ActivityState()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: deliver (the CRM says again on its next change) rather than stay silent for good.
            log.error("cannot read %s (%s): the module is taken as active", self.path, exc)
            return ActivityState()

    @property
    def delivering(self) -> bool:
        return self.state.delivering

    def set(self, active: bool, freeze: bool) -> None:
        was = self.state.delivering
        self.state = ActivityState(active=active, freeze=freeze, since=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self.state)))
        os.replace(tmp, self.path)
        log.warning("retailCRM: the module is now %s", self.state.describe())
        if self.state.delivering and not was and self.on_resume is not None:
            self.on_resume()


def parse(form: dict[str, str]) -> tuple[str, bool, bool] | None:
    """(clientId, active, freeze) from the callback's form; None when it is not of that shape."""
    try:
        activity = json.loads(form["activity"])
    except (ValueError, KeyError):
        return None
    if not isinstance(activity, dict):
        return None
    active, freeze = activity.get("active"), activity.get("freeze", False)
    if not isinstance(active, bool) or not isinstance(freeze, bool):
        return None
    return form.get("clientId", ""), active, freeze


class ActivityHandler:
    """POST /retailcrm/activity: the company whose clientId the form carries takes the flags; 403 else."""

    def __init__(self, companies: Companies) -> None:
        self.companies = companies

    def __call__(self, request: Request) -> Response:
        try:
            form = parse_form(request.body)   # UTF-8, bounded, no repeated field: like every callback's query
        except BadRequest:
            form = {}
        # The clientId is checked before the shape is told: a stranger learns nothing but "forbidden".
        company = self.companies.by_client_id(form.get("clientId", ""))
        if company is None:
            return Response.text(403, "forbidden")
        parsed = parse(form)
        if parsed is None:
            return _json(400, {"success": False, "errorMsg": "activity must be {\"active\": bool, \"freeze\": bool}"})
        _, active, freeze = parsed
        company.activity.set(active, freeze)
        return _json(200, {"success": True})


def _json(status: int, body: dict[str, object]) -> Response:
    return Response(status, {"Content-Type": "application/json"}, json.dumps(body).encode())
