"""A strict fake of retailCRM API v5's telephony methods, over real HTTP.

It is deliberately at least as strict as the real service (see
docs/retailcrm-api-v5-telephony.md): every shape the real API would refuse is refused
here too, so a test cannot pass only because the fake is lenient. Where the real
behaviour is unknown it errs on the strict side.

Run standalone for a demo:  python -m tests.fakes.retailcrm --port 8089 --api-key KEY
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import re
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

# Symfony's stock constraint messages: the real API answers with these.
BLANK = "This value should not be blank."
CHOICE = "The value you selected is not a valid choice."
INVALID = "This value is not valid."
EXTRA = "This form should not contain extra fields."
MUST_BE_BLANK = "This value should be blank."
ENTITY_FORMAT = "Errors in the entity format"

EVENT_TYPES = {"in", "out", "hangup"}
HANGUP_STATUSES = {"answered", "busy", "cancel", "failed", "no answered"}
EVENT_FIELDS = {
    "phone", "type", "codes", "userIds", "hangupStatus",
    "externalPhone", "callExternalId", "site", "webAnalyticsData",
}
CALL_TYPES = {"in", "out"}
CALL_RESULTS = {"answered", "busy", "failed", "no answer", "not allowed", "unknown"}
CALL_FIELDS = {
    "date", "type", "phone", "code", "userId", "result", "duration", "durationWaiting",
    "externalId", "recordUrl", "externalPhone", "site", "source",
}
SOURCE_FIELDS = {"source", "medium", "campaign", "keyword", "content"}
MAX_CALLS_PER_UPLOAD = 50
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
MODULE_FIELDS = {
    "code", "integrationCode", "active", "freeze", "name", "logo", "clientId", "baseUrl",
    "accountUrl", "availableCountries", "actions", "integrations",
}
TELEPHONY_FIELDS = {
    "makeCallUrl", "changeUserStatusUrl", "allowEdit", "inputEventSupported",
    "outputEventSupported", "hangupEventSupported", "additionalCodes", "externalPhones",
}
MODULE_PATH_RE = re.compile(r"^/api/v5/integration-modules/(?P<code>[^/]+)(?P<edit>/edit)?$")

DEFAULT_CREDENTIALS = [
    "/api/integration-modules/{code}",
    "/api/integration-modules/{code}/edit",
    "/api/telephony/call/event",
    "/api/telephony/calls/upload",
    "/api/telephony/manager",
]

# The real service answers these from its nginx front, not from the API: HTML, not JSON.
_HTML_PAGES = {
    405: "<html>\r\n<head><title>405 Not Allowed</title></head>\r\n<body>\r\n"
         "<center><h1>405 Not Allowed</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
    502: "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
         "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
    503: "<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
         "<center><h1>Service temporary unavailable</h1></center>\r\n<hr><center>nginx</center>\r\n"
         "</body>\r\n</html>\r\n",
}
_REASONS = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Not Allowed", 502: "Bad Gateway", 503: "Service Temporarily Unavailable"}


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: dict[str, str]
    form: dict[str, str]
    received: float  # time.time() when the request arrived
    status: int = 0  # 0 while still being handled (or when the connection was reset)


@dataclass
class Upload:
    received: float
    calls: list[dict[str, Any]]
    processed: int
    duplicates: list[str]


@dataclass
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json; charset=utf-8"


class _ResetConnection(Exception):
    """Raised by the app to make the handler drop the connection without a reply."""


class _Handler(WSGIHandler):
    def handle(self) -> None:
        # Without it every kept-alive reply waits for the client's delayed ACK (~40 ms): a latency the
        # real CRM behind nginx does not add, and one that would swamp fsbridge's own in benchmarks.
        if getattr(self.server, "nodelay", True):  # FakeRetailCRM.nodelay = False shows that stall
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def run_application(self) -> None:
        try:
            super().run_application()
        except _ResetConnection:
            # SO_LINGER 0 turns close() into a TCP RST: what a crashed proxy looks like.
            sock = self.socket
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # The makefile() reader holds a reference; without closing it the fd stays open.
                self.rfile.close()
                sock.close()
            except OSError:
                pass
            self.close_connection = True


def _let_others_in() -> None:
    # The real CRM serves requests side by side: a 50-call upload being parsed and validated (~2 ms here)
    # must not keep the call events arriving meanwhile unread (load benchmarks time those). Bounded, as
    # fsbridge's own give_way: a test's busy greenlet must not hold the fake up.
    with gevent.Timeout(0.01, False):
        gevent.idle()


class _Invalid(Exception):
    """A 400 the handler turns into the API's error envelope."""

    def __init__(self, message: str, errors: dict[str, str] | list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors


def _json_reply(status: int, payload: dict[str, Any]) -> _Reply:
    return _Reply(status, json.dumps(payload, ensure_ascii=False).encode("utf-8"))


def _error(status: int, message: str, errors: Any = None) -> _Reply:
    payload: dict[str, Any] = {"success": False, "errorMsg": message}
    if errors:
        payload["errors"] = errors
    return _json_reply(status, payload)


def _html(status: int) -> _Reply:
    return _Reply(status, _HTML_PAGES[status].encode("ascii"), "text/html")


def _digits(phone: str) -> str:
    return re.sub(r"\D", "", phone)


def _is_nonblank_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _is_int(value: Any) -> bool:
    # bool is an int subclass; JSON true must not pass for a number.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parts = urllib.parse.urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _is_real_date(value: Any) -> bool:
    if not isinstance(value, str) or not DATE_RE.match(value):
        return False
    try:
        datetime.datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True


class FakeRetailCRM:
    """In-process retailCRM on 127.0.0.1; switch `outage`, `latency`, ... at any time."""

    def __init__(
        self,
        api_key: str = "test-key",
        known_codes: Iterable[str] = ("100", "200"),
        known_user_ids: Iterable[int] = (1, 2),
        known_sites: Iterable[str] = ("shop1",),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.known_codes = set(known_codes)
        self.known_user_ids = set(known_user_ids)
        self.known_sites = set(known_sites)
        self.host = host
        self.port = port

        # Failure switches.
        self.outage: str | None = None  # None | "html502" | "html503" | "timeout" | "reset"
        self.latency = 0.0  # seconds added to every request
        self.manager_latency = 0.0  # seconds added to /telephony/manager only
        self.nodelay = True  # TCP_NODELAY on accepted connections, as the real CRM's nginx front (set before start)
        # Requests allowed per sliding 1 s window; None disables the limit.
        self.telephony_rate_limit: int | None = 40
        self.general_rate_limit: int | None = 10

        # State and logs.
        self.events: list[dict[str, Any]] = []
        self.calls: dict[str, dict[str, Any]] = {}
        self.uploads: list[Upload] = []
        self.requests: list[RecordedRequest] = []
        self.on_request: Callable[[RecordedRequest], None] | None = None  # after each reply (the command line prints)
        self.rate_limited = 0
        self.managers_by_phone: dict[str, dict[str, Any] | None] = {}
        self.refused_phones: set[str] = set()   # digits of numbers the manager lookup answers 400 for
        # The actions integration-modules/edit takes. Our API notes say unknown `actions` keys are refused and
        # do not confirm `activity`: a test sets this to set() to play the CRM that refuses it too.
        self.known_actions: set[str] = {"activity"}
        self.customers_by_phone: dict[str, dict[str, Any]] = {}
        # Manager id -> status; managers not listed are "free".
        self.manager_status: dict[int, str] = {}
        self.modules: dict[str, dict[str, Any]] = {}
        self.credentials = list(DEFAULT_CREDENTIALS)

        self._windows: dict[str, collections.deque[float]] = {
            "telephony": collections.deque(), "general": collections.deque(),
        }
        self._server: WSGIServer | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> FakeRetailCRM:
        self._stopping = False
        self._server = WSGIServer(
            (self.host, self.port), self._app, handler_class=_Handler, log=None, error_log=None
        )
        self._server.nodelay = self.nodelay  # type: ignore[attr-defined]
        self._server.start()
        self.port = self._server.server_port
        return self

    def send_activity(self, code: str, *, active: bool, freeze: bool = False, base: str | None = None,
                      client_id: str | None = None) -> Any:
        """What retailCRM does when the admin switches the module off/on or the account is frozen: a form POST
        of clientId and activity={"active":..,"freeze":..} to the registered baseUrl + actions.activity
        (`base` replaces the registered baseUrl: tests reach fsbridge on loopback)."""
        import requests

        module = self.modules[code]
        module["active"], module["freeze"] = active, freeze
        url = (base or module["baseUrl"]) + module["actions"]["activity"]
        form = {"clientId": module["clientId"] if client_id is None else client_id,
                "activity": json.dumps({"active": active, "freeze": freeze}), "systemUrl": self.url}
        return requests.post(url, data=form, timeout=5)

    def stop(self) -> None:
        self._stopping = True  # releases requests held by a "timeout" outage
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    def __enter__(self) -> FakeRetailCRM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def serve_forever(self) -> None:
        if self._server is None:
            self.start()
        assert self._server is not None
        self._server.serve_forever()

    # -- WSGI ----------------------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        params = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        body = environ["wsgi.input"].read()
        record = RecordedRequest(method, path, params, {}, time.time())
        self.requests.append(record)

        reply = self._handle(environ, method, path, params, body, record)
        record.status = reply.status
        if self.on_request is not None:
            self.on_request(record)
        start_response(
            f"{reply.status} {_REASONS.get(reply.status, 'Status')}",
            [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))],
        )
        return [reply.body]

    def _handle(
        self,
        environ: dict[str, Any],
        method: str,
        path: str,
        params: dict[str, str],
        body: bytes,
        record: RecordedRequest,
    ) -> _Reply:
        if self.latency:
            gevent.sleep(self.latency)

        # Outages and the rate limit live in the front proxy: they hit before the API.
        if self.outage == "timeout":
            while self.outage == "timeout" and not self._stopping:
                gevent.sleep(0.01)
        if self.outage == "reset":
            raise _ResetConnection()
        if self.outage == "html502":
            return _html(502)
        if self.outage == "html503":
            return _html(503)
        if self._over_rate_limit(path):
            self.rate_limited += 1
            return _html(503)

        route = self._route(method, path)
        if isinstance(route, _Reply):
            return route

        form: dict[str, str] = {}
        if method == "POST":
            if len(body) > 4096:
                _let_others_in()  # a long body takes a while to parse
            try:
                form = self._parse_form(environ, body)
            except _Invalid as exc:
                return _error(400, exc.message, exc.errors)
            record.form = form

        denied = self._check_auth(environ, params, form)
        if denied is not None:
            return denied
        try:
            return route(params, form)
        except _Invalid as exc:
            return _error(400, exc.message, exc.errors)

    def _over_rate_limit(self, path: str) -> bool:
        klass = "telephony" if path.startswith("/api/v5/telephony/") else "general"
        limit = self.telephony_rate_limit if klass == "telephony" else self.general_rate_limit
        if limit is None:
            return False
        now = time.monotonic()
        window = self._windows[klass]
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= limit:
            return True
        window.append(now)
        return False

    def _route(self, method: str, path: str) -> _Reply | Callable[[dict[str, str], dict[str, str]], _Reply]:
        routes: dict[str, dict[str, Callable[[dict[str, str], dict[str, str]], _Reply]]] = {
            "/api/v5/telephony/call/event": {"POST": self._call_event},
            "/api/v5/telephony/calls/upload": {"POST": self._calls_upload},
            "/api/v5/telephony/manager": {"GET": self._manager},
            "/api/credentials": {"GET": self._credentials},
        }
        allowed = routes.get(path)
        if allowed is None:
            match = MODULE_PATH_RE.match(path)
            if match:
                code = urllib.parse.unquote(match["code"])
                if match["edit"]:
                    allowed = {"POST": lambda p, f: self._module_edit(code, f)}
                else:
                    allowed = {"GET": lambda p, f: self._module_get(code)}
        if allowed is None:
            return _error(404, "API method not found")
        handler = allowed.get(method)
        if handler is None:
            return _html(405)
        return handler

    def _parse_form(self, environ: dict[str, Any], body: bytes) -> dict[str, str]:
        ctype = environ.get("CONTENT_TYPE", "")
        mime, _, rest = ctype.partition(";")
        charset = "utf-8"
        for part in rest.split(";"):
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset":
                charset = value.strip().strip('"').lower()
        if mime.strip().lower() != "application/x-www-form-urlencoded" or charset not in ("utf-8", "utf8"):
            # PHP only parses urlencoded bodies into parameters: anything else arrives empty.
            return {}
        try:
            pairs = urllib.parse.parse_qsl(
                body.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict"
            )
        except UnicodeDecodeError as exc:
            raise _Invalid(ENTITY_FORMAT) from exc
        form: dict[str, str] = {}
        for key, value in pairs:
            name = key.split("[", 1)[0]
            if "[" in key:
                raise _Invalid(f'Input value "{name}" contains a non-scalar value')
            form[key] = value
        return form

    def _check_auth(
        self, environ: dict[str, Any], params: dict[str, str], form: dict[str, str]
    ) -> _Reply | None:
        key = environ.get("HTTP_X_API_KEY")
        if key is None:
            key = params.get("apiKey", form.get("apiKey"))
        if not key:
            return _error(403, '"apiKey" is missing.')
        if key != self.api_key:
            return _error(403, 'Wrong "apiKey" value.')
        return None

    @staticmethod
    def _json_param(form: dict[str, str], name: str, kind: type) -> Any:
        if name not in form:
            raise _Invalid(f"Parameter '{name}' is missing")
        try:
            value = json.loads(form[name])
        except ValueError as exc:
            raise _Invalid(ENTITY_FORMAT) from exc
        if not isinstance(value, kind):
            raise _Invalid(ENTITY_FORMAT)
        return value

    # -- POST /api/v5/telephony/call/event -------------------------------------

    def _call_event(self, params: dict[str, str], form: dict[str, str]) -> _Reply:
        event = self._json_param(form, "event", dict)
        errors = self._validate_event(event)
        if errors:
            raise _Invalid(ENTITY_FORMAT, errors)
        codes = [c for c in event.get("codes") or [] if c not in self.known_codes]
        users = [u for u in event.get("userIds") or [] if int(u) not in self.known_user_ids]
        self.events.append({**event, "_received": time.time()})
        return _json_reply(200, {"success": True, "notExistCodes": codes, "notExistUsers": users})

    def _validate_event(self, event: dict[str, Any]) -> dict[str, str]:
        errors: dict[str, str] = {}
        for key in event:
            if key not in EVENT_FIELDS:
                errors[key] = EXTRA
        if not _is_nonblank_str(event.get("phone")):
            errors["phone"] = BLANK
        etype = event.get("type")
        if etype is None or etype == "":
            errors["type"] = BLANK
        elif etype not in EVENT_TYPES:
            errors["type"] = CHOICE

        codes, user_ids = event.get("codes"), event.get("userIds")
        if codes is not None and not (
            isinstance(codes, list) and all(_is_nonblank_str(c) for c in codes)
        ):
            errors["codes"] = INVALID
        if user_ids is not None and not (
            isinstance(user_ids, list)
            and all(_is_int(u) or (isinstance(u, str) and u.isdigit()) for u in user_ids)
        ):
            errors["userIds"] = INVALID
        if not codes and not user_ids and "codes" not in errors and "userIds" not in errors:
            errors["codes"] = BLANK

        status = event.get("hangupStatus")
        if etype == "hangup":
            if status is None or status == "":
                errors["hangupStatus"] = BLANK
            elif status not in HANGUP_STATUSES:
                errors["hangupStatus"] = CHOICE
        elif status is not None:
            errors["hangupStatus"] = MUST_BE_BLANK

        for name in ("externalPhone", "callExternalId"):
            if event.get(name) is not None and not isinstance(event[name], str):
                errors[name] = INVALID
        self._check_site(event.get("site"), "site", errors)

        analytics = event.get("webAnalyticsData")
        if analytics is not None:
            if not isinstance(analytics, dict) or set(analytics) - {"campaign", "queryString"}:
                errors["webAnalyticsData"] = EXTRA if isinstance(analytics, dict) else INVALID
            else:
                campaign = analytics.get("campaign")
                if campaign is not None and (
                    not isinstance(campaign, dict) or set(campaign) - {"name", "code"}
                ):
                    errors["webAnalyticsData[campaign]"] = INVALID
        return errors

    def _check_site(self, site: Any, key: str, errors: dict[str, str]) -> None:
        if site is None:
            return
        if not isinstance(site, str) or site not in self.known_sites:
            errors[key] = CHOICE

    # -- POST /api/v5/telephony/calls/upload -----------------------------------

    def _calls_upload(self, params: dict[str, str], form: dict[str, str]) -> _Reply:
        calls = self._json_param(form, "calls", list)
        if not calls:
            raise _Invalid(ENTITY_FORMAT, {"calls": "This collection should contain 1 element or more."})
        if len(calls) > MAX_CALLS_PER_UPLOAD:
            raise _Invalid(
                ENTITY_FORMAT,
                {"calls": f"This collection should contain {MAX_CALLS_PER_UPLOAD} elements or less."},
            )
        errors: dict[str, str] = {}
        for index, call in enumerate(calls):
            if index % 10 == 0:
                _let_others_in()
            if not isinstance(call, dict):
                errors[f"calls[{index}]"] = INVALID
                continue
            for name, message in self._validate_call(call).items():
                errors[f"calls[{index}][{name}]"] = message
        if errors:
            raise _Invalid(ENTITY_FORMAT, errors)

        duplicates: list[str] = []
        for call in calls:
            external_id = call.get("externalId")
            if external_id is None:
                # Without an id the real CRM cannot de-duplicate either: store it blindly.
                self.calls[f"_no_external_id_{len(self.calls)}"] = call
            elif external_id in self.calls:
                duplicates.append(external_id)
            else:
                self.calls[external_id] = call
        processed = len(calls) - len(duplicates)
        self.uploads.append(Upload(time.time(), calls, processed, duplicates))
        return _json_reply(
            200, {"success": True, "processedCallsCount": processed, "duplicateCalls": duplicates}
        )

    def _validate_call(self, call: dict[str, Any]) -> dict[str, str]:
        errors: dict[str, str] = {}
        for key in call:
            if key not in CALL_FIELDS:
                errors[key] = EXTRA
        if call.get("date") in (None, ""):
            errors["date"] = BLANK
        elif not _is_real_date(call["date"]):
            errors["date"] = INVALID
        if call.get("type") in (None, ""):
            errors["type"] = BLANK
        elif call["type"] not in CALL_TYPES:
            errors["type"] = CHOICE
        if not _is_nonblank_str(call.get("phone")):
            errors["phone"] = BLANK
        if call.get("result") in (None, ""):
            errors["result"] = BLANK
        elif call["result"] not in CALL_RESULTS:
            errors["result"] = CHOICE

        code, user_id = call.get("code"), call.get("userId")
        if code is not None and not _is_nonblank_str(code):
            errors["code"] = INVALID
        if user_id is not None and not (_is_int(user_id) or (isinstance(user_id, str) and user_id.isdigit())):
            errors["userId"] = INVALID
        if code is None and user_id is None:
            errors["code"] = BLANK

        for name in ("duration", "durationWaiting"):
            value = call.get(name)
            if value is not None and not (_is_int(value) and value >= 0):
                errors[name] = INVALID
        for name in ("externalId", "externalPhone"):
            if call.get(name) is not None and not _is_nonblank_str(call[name]):
                errors[name] = INVALID
        if call.get("recordUrl") is not None and not _is_http_url(call["recordUrl"]):
            errors["recordUrl"] = INVALID
        self._check_site(call.get("site"), "site", errors)
        source = call.get("source")
        if source is not None and not (
            isinstance(source, dict)
            and not set(source) - SOURCE_FIELDS
            and all(v is None or isinstance(v, str) for v in source.values())
        ):
            errors["source"] = INVALID
        return errors

    # -- GET /api/v5/telephony/manager -----------------------------------------

    def _manager(self, params: dict[str, str], form: dict[str, str]) -> _Reply:
        errors: dict[str, str] = {}
        phone = params.get("phone", "")
        if not phone.strip():
            raise _Invalid("Parameter 'phone' is missing")
        for name in ("details", "ignoreStatus"):
            if name in params and params[name] not in ("0", "1"):
                errors[name] = INVALID
        if errors:
            raise _Invalid(ENTITY_FORMAT, errors)
        if self.manager_latency:
            gevent.sleep(self.manager_latency)

        wanted = _digits(phone)
        if wanted in self.refused_phones:
            raise _Invalid(ENTITY_FORMAT, {"phone": INVALID})
        listed = next((p for p in self.managers_by_phone if _digits(p) == wanted), None)
        manager = self.managers_by_phone[listed] if listed is not None else None
        if (
            manager is not None
            and params.get("ignoreStatus") != "1"
            and self.manager_status.get(manager.get("id", 0), "free") != "free"
        ):
            manager = None
        reply: dict[str, Any] = {"success": True}
        if manager is not None:
            reply["manager"] = manager
        elif listed is not None and self.managers_by_phone[listed] is None:
            # A phone mapped to None answers "manager": null, the other shape the doc allows.
            reply["manager"] = None
        if params.get("details") == "1":
            customer = next(
                (c for p, c in self.customers_by_phone.items() if _digits(p) == wanted), None
            )
            if customer is not None:
                reply["customer"] = customer
            reply["links"] = {
                "newOrderLink": f"{self.url}/orders/add",
                "newCustomerLink": f"{self.url}/customers/add",
            }
        return _json_reply(200, reply)

    # -- integration modules -----------------------------------------------------

    def _module_edit(self, code: str, form: dict[str, str]) -> _Reply:
        module = self._json_param(form, "integrationModule", dict)
        errors: dict[str, str] = {}
        for key in module:
            if key not in MODULE_FIELDS:
                errors[key] = EXTRA
        if module.get("code") != code:
            errors["code"] = BLANK if not module.get("code") else "The code in the URL and the body differ."
        if not isinstance(module.get("active"), bool):
            errors["active"] = BLANK if module.get("active") is None else INVALID
        for name in ("name", "clientId", "baseUrl"):
            if not _is_nonblank_str(module.get(name)):
                errors[name] = BLANK
        logo = module.get("logo")
        if not _is_nonblank_str(logo):
            errors["logo"] = BLANK
        elif not urllib.parse.urlsplit(logo).path.lower().endswith(".svg"):
            errors["logo"] = "Logo image must be svg"
        actions = module.get("actions")
        if actions is not None:
            # `activity` is the one action a telephony module declares: a path relative to baseUrl. The real
            # API refuses unknown ones.
            if not isinstance(actions, dict) or set(actions) - self.known_actions:
                errors["actions"] = EXTRA
            elif not _is_nonblank_str(actions.get("activity")):
                errors["actions[activity]"] = INVALID

        info: dict[str, list[Any]] = {"notExistUsersIds": [], "notExistSiteCodes": []}
        integrations = module.get("integrations")
        if integrations is not None:
            if not isinstance(integrations, dict) or set(integrations) - {"telephony"}:
                errors["integrations"] = EXTRA if isinstance(integrations, dict) else INVALID
            elif isinstance(integrations.get("telephony"), dict):
                self._validate_telephony(integrations["telephony"], errors, info)
            elif integrations.get("telephony") is not None:
                errors["integrations[telephony]"] = INVALID
        if errors:
            raise _Invalid(ENTITY_FORMAT, errors)

        created = code not in self.modules
        self.modules[code] = module
        reply: dict[str, Any] = {"success": True}
        # PHP serialises an empty map as [], and the real API does just that.
        reply["info"] = {k: v for k, v in info.items() if v} or []
        return _json_reply(201 if created else 200, reply)

    def _validate_telephony(
        self, telephony: dict[str, Any], errors: dict[str, str], info: dict[str, list[Any]]
    ) -> None:
        prefix = "integrations[telephony]"
        for key in telephony:
            if key not in TELEPHONY_FIELDS:
                errors[f"{prefix}[{key}]"] = EXTRA
        for name in ("makeCallUrl", "changeUserStatusUrl"):
            if telephony.get(name) is not None and not _is_http_url(telephony[name]):
                errors[f"{prefix}[{name}]"] = INVALID
        for name in ("allowEdit", "inputEventSupported", "outputEventSupported", "hangupEventSupported"):
            if telephony.get(name) is not None and not isinstance(telephony[name], bool):
                errors[f"{prefix}[{name}]"] = INVALID
        for index, item in enumerate(telephony.get("additionalCodes") or []):
            if not isinstance(item, dict) or set(item) != {"userId", "code"}:
                errors[f"{prefix}[additionalCodes][{index}]"] = INVALID
                continue
            user_id = item["userId"]
            if not (_is_int(user_id) or (isinstance(user_id, str) and user_id.isdigit())):
                errors[f"{prefix}[additionalCodes][{index}][userId]"] = INVALID
            elif int(user_id) not in self.known_user_ids:
                info["notExistUsersIds"].append(user_id)
        for index, item in enumerate(telephony.get("externalPhones") or []):
            if not isinstance(item, dict) or set(item) != {"siteCode", "externalPhone"}:
                errors[f"{prefix}[externalPhones][{index}]"] = INVALID
            elif item["siteCode"] not in self.known_sites:
                info["notExistSiteCodes"].append(item["siteCode"])

    def _module_get(self, code: str) -> _Reply:
        module = self.modules.get(code)
        if module is None:
            return _error(404, "Not found")
        return _json_reply(200, {"success": True, "integrationModule": module})

    # -- GET /api/credentials ----------------------------------------------------

    def _credentials(self, params: dict[str, str], form: dict[str, str]) -> _Reply:
        return _json_reply(200, {
            "success": True,
            "credentials": list(self.credentials),
            "siteAccess": "access_full",
            "sitesAvailable": sorted(self.known_sites),
        })


def _print_request(record: RecordedRequest) -> None:
    """One line per request, so a demo shows what reached the CRM: the query and form without the secrets."""
    fields = {k: v for k, v in {**record.params, **record.form}.items() if k not in ("apiKey", "clientId")}
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{record.method} {record.path} -> {record.status} {text[:2000]}".rstrip(), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Strict fake retailCRM API for demos and tests.")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 inside a container")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--codes", default="100,200", help="known extension codes, comma-separated")
    parser.add_argument("--users", default="1,2", help="known user ids, comma-separated")
    parser.add_argument("--sites", default="shop1", help="known shop codes, comma-separated")
    parser.add_argument(
        "--manager", action="append", default=[], metavar="PHONE=CODE",
        help="route PHONE to the manager with extension CODE (repeatable)",
    )
    parser.add_argument("--log-requests", action="store_true",
                        help="print each request (query and form, without apiKey/clientId) and its status")
    args = parser.parse_args(argv)
    split = [s for s in args.codes.split(",") if s]
    fake = FakeRetailCRM(
        args.api_key, split, [int(u) for u in args.users.split(",") if u],
        [s for s in args.sites.split(",") if s], host=args.host, port=args.port,
    )
    for index, spec in enumerate(args.manager, start=1):
        phone, _, code = spec.partition("=")
        fake.managers_by_phone[phone] = {
            "id": index, "firstName": "Manager", "lastName": code, "email": f"m{index}@example.com",
            "code": code,
        }
    if args.log_requests:
        fake.on_request = _print_request
    fake.start()
    print(f"fake retailCRM listening on {fake.url}", flush=True)
    try:
        fake.serve_forever()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
