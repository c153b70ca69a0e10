"""retailCRM API v5 client for the telephony methods fsbridge uses.

One instance is shared by every greenlet (the process is gevent monkey-patched, so
blocking socket calls yield); the bytes travel through a transport (transport.py). The contract is
docs/retailcrm-api-v5-telephony.md.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote_plus

import gevent

from fsbridge import __version__
from fsbridge.background import give_way
from fsbridge.crm.backoff import backoff_delay
from fsbridge.crm.errors import CRMAuthError, CRMError, CRMNoReply, CRMRejected, CRMUnavailable
from fsbridge.crm.ratelimit import RateLimiter
from fsbridge.crm.transport import (
    ConnectionFailed,
    ConnectTimeout,
    NoReply,
    ReadTimeout,
    Reply,
    RequestsTransport,
    Transport,
    TransportError,
    proxy_in_environment,
)

log = logging.getLogger("fsbridge.crm")

TELEPHONY_PREFIX = "/api/v5/telephony/"
MAX_CALLS_PER_UPLOAD = 50
DEFAULT_ATTEMPTS = 5
# The vendor's Go client backs off from 25 ms on /telephony and 100 ms elsewhere.
TELEPHONY_BACKOFF_BASE = 0.025
GENERAL_BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
# A card retried after an outage must not sleep through the first seconds of the CRM's return: the
# cards of calls ringing then wait behind it. Eight card workers at this cap probe at ~21 requests/s
# on average (each waits 0.25-0.5 s), 32/s at most: under retailCRM's 40.
CALL_EVENT_BACKOFF_CAP = 0.5
# retailCRM counts requests when they arrive, and arrival gaps shrink by whatever delay
# the network and our own scheduler add to one request but not the next. Pacing at 95 %
# of the limit leaves ~50 ms per second for that jitter.
PACING = 0.95
# /telephony requests that may start back to back (ratelimit.py): spaced strictly, a company's cards
# waited for their slot whenever two calls rang within 26 ms; never more than the rate in one second.
TELEPHONY_BURST = 4
# Every greenlet holding a request in flight needs its own connection; fewer kept idle
# would make the rest open and throw away connections.
POOL_MAXSIZE = 64
# Statuses that mean "overloaded or in the way", not "your request is wrong".
_RETRYABLE_4XX = frozenset({408, 425, 429})
_MAX_MESSAGE = 400


class _NotSent(CRMUnavailable):
    """The deadline came before a request could go out: after a failed attempt, that attempt's error is
    the one worth reporting (an outage's 502 page, not the rate limiter that had no slot left)."""


class _DeadlineHit(Exception):
    """Raised by gevent.Timeout inside one attempt; private so an outer Timeout is never swallowed."""


def encode_form(form: Mapping[str, Any]) -> dict[str, str]:
    """The API's form encoding: nested values travel as ONE field holding JSON text."""
    encoded: dict[str, str] = {}
    for name, value in form.items():
        if value is None:
            continue
        if isinstance(value, dict | list | tuple):
            # ensure_ascii=False keeps Cyrillic names readable in the CRM's own logs;
            # the form encoding then percent-encodes the UTF-8 bytes.
            encoded[name] = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        elif isinstance(value, bool):
            encoded[name] = "1" if value else "0"
        else:
            encoded[name] = str(value)
    return encoded


def encode_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Query parameters; booleans become 1/0 because the API refuses `True`."""
    encoded: dict[str, str] = {}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            encoded[name] = "1" if value else "0"
        elif isinstance(value, str | int | float):
            encoded[name] = str(value)
        else:
            raise TypeError(f"query parameter {name!r} must be a scalar, got {type(value).__name__}")
    return encoded


# Percent-encoding runs in Python a byte at a time: a 50-call upload (~27 KB) took ~0.8 ms in one go,
# during which no event was read and no card sent.
_FORM_SLICE = 4096


def form_body(fields: Mapping[str, str]) -> bytes:
    """`urllib.parse.urlencode(fields)`, byte for byte, letting other greenlets run between slices of long values."""
    parts = []
    for name, value in fields.items():
        raw = value.encode()
        if len(raw) <= _FORM_SLICE:
            parts.append(f"{quote_plus(name)}={quote_plus(raw)}")
            continue
        pieces = [quote_plus(name), "="]
        for start in range(0, len(raw), _FORM_SLICE):
            if start:
                give_way()
            pieces.append(quote_plus(raw[start:start + _FORM_SLICE]))
        parts.append("".join(pieces))
    return "&".join(parts).encode("ascii")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _summarise_errors(errors: dict[str, Any] | list[Any] | None) -> str:
    if not errors:
        return ""
    if isinstance(errors, dict):
        parts = [f"{_one_line(k)}: {_one_line(v)}" for k, v in errors.items()]
    else:
        parts = [_one_line(v) for v in errors]
    return " (" + "; ".join(parts) + ")"


def _describe_body(reply: Reply) -> str:
    body = reply.content.lstrip()
    if not body:
        return "an empty body"
    if "html" in reply.headers.get("content-type", "").lower() or body[:1] == b"<":
        return "an HTML page"
    return "a non-JSON body"


class RetailCRM:
    """retailCRM API v5, telephony methods. One instance per account, shared by all greenlets."""

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        connect_timeout: float = 3.0,
        timeout: float = 10.0,
        telephony_rate: float = 40.0,
        general_rate: float = 10.0,
        transport: Transport | RequestsTransport | None = None,
        observer: Callable[[str, str, int | None, float], None] | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"retailCRM URL must be http(s)://host, got {url!r}")
        if not api_key:
            raise ValueError("retailCRM API key is empty")
        # People paste the API base from the docs; the methods below add /api/... themselves.
        path = parts.path.rstrip("/")
        for suffix in ("/api/v5", "/api"):
            if path.endswith(suffix):
                path = path[: -len(suffix)]
                break
        self.url = f"{parts.scheme}://{parts.netloc}{path}"
        self._path_prefix = path
        self._host = parts.netloc
        self._api_key = api_key
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._limiters: dict[str, RateLimiter | None] = {
            # 0: no pacing (a test bed without retailCRM's limit).
            "telephony": RateLimiter(telephony_rate * PACING, burst=TELEPHONY_BURST) if telephony_rate else None,
            "general": RateLimiter(general_rate * PACING) if general_rate else None,
        }
        # Told of every attempt: (method, path, HTTP status or None when no reply, seconds); for metrics.
        self.observer = observer
        if transport is None:
            # requests knows how to go through a proxy; without one, the lean transport.
            transport = (RequestsTransport(self.url, pool_size=POOL_MAXSIZE) if proxy_in_environment()
                         else Transport(self.url, pool_size=POOL_MAXSIZE))
        self._transport = transport
        self._headers = {
            "X-API-KEY": api_key,
            "User-Agent": f"fsbridge/{__version__}",
            "Accept": "application/json",
        }
        self._form_headers = {**self._headers, "Content-Type": "application/x-www-form-urlencoded"}

    def __repr__(self) -> str:
        return f"RetailCRM({self.url!r})"  # never the key

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> RetailCRM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the API methods -------------------------------------------------------------

    def send_call_event(self, event: dict[str, Any], *, deadline: float | None = None) -> dict[str, Any]:
        # Not sent again once it may have arrived (CRMNoReply): the CRM documents no de-duplication of call
        # events, and a card shown twice is worse than one late card lost. Uploads are de-duplicated by
        # externalId (API notes, calls/upload), so they are retried.
        _, reply = self._call("POST", "/api/v5/telephony/call/event", params=None, form={"event": event},
                              deadline=deadline, backoff_cap=CALL_EVENT_BACKOFF_CAP, resend_unanswered=False)
        return reply

    def upload_calls(self, calls: list[dict[str, Any]], *, deadline: float | None = None) -> dict[str, Any]:
        if not calls:
            raise ValueError("no calls to upload")
        if len(calls) > MAX_CALLS_PER_UPLOAD:
            raise ValueError(f"at most {MAX_CALLS_PER_UPLOAD} calls per upload, got {len(calls)}")
        return self.request(
            "POST", "/api/v5/telephony/calls/upload", form={"calls": calls}, deadline=deadline
        )

    def responsible_manager(
        self,
        phone: str,
        *,
        details: bool = False,
        ignore_status: bool = False,
        timeout: float | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any] | None:
        """The manager the CRM would route `phone` to, or None.

        `timeout` bounds the whole call, retries included: routing happens while the
        caller hears ringing, so a late answer is worth no more than none. `attempts` caps the tries.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        reply = self.request(
            "GET",
            "/api/v5/telephony/manager",
            params={"phone": phone, "details": details, "ignoreStatus": ignore_status},
            deadline=deadline,
            attempts=attempts,
        )
        manager = reply.get("manager")
        # The reply omits the key or sends null alike when nobody is free.
        return manager if isinstance(manager, dict) and manager else None

    def edit_integration_module(self, module: dict[str, Any], *,
                                deadline: float | None = None) -> tuple[bool, dict[str, Any]]:
        """Create or update the module; returns (created, reply)."""
        code = module.get("code")
        if not code:
            raise ValueError("integration module needs a code")
        path = f"/api/v5/integration-modules/{urllib.parse.quote(str(code), safe='')}/edit"
        status, reply = self._call("POST", path, params=None, form={"integrationModule": module}, deadline=deadline)
        return status == 201, reply

    def get_integration_module(self, code: str, *, deadline: float | None = None) -> dict[str, Any]:
        """The stored module; CRMRejected with status 404 when there is none."""
        path = f"/api/v5/integration-modules/{urllib.parse.quote(code, safe='')}"
        status, reply = self._call("GET", path, params=None, form=None, deadline=deadline)
        module = reply.get("integrationModule")
        if not isinstance(module, dict):
            raise CRMError(status, "retailCRM reply has no integrationModule")
        return module

    def credentials(self, *, deadline: float | None = None) -> dict[str, Any]:
        """The key's rights: `credentials` (method list), `siteAccess`, `sitesAvailable`."""
        return self.request("GET", "/api/credentials", deadline=deadline)

    # -- transport ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        form: Mapping[str, Any] | None = None,
        deadline: float | None = None,
        attempts: int | None = None,
    ) -> dict[str, Any]:
        """One API call with retries; returns the decoded JSON reply.

        `path` starts at the host (`/api/v5/...`). `deadline` is a time.monotonic() value
        bounding everything including retries; `attempts` caps tries. With neither, 5 tries.
        """
        _, reply = self._call(method, path, params=params, form=form, deadline=deadline, attempts=attempts)
        return reply

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None,
        form: Mapping[str, Any] | None,
        deadline: float | None = None,
        attempts: int | None = None,
        backoff_cap: float = BACKOFF_CAP,
        resend_unanswered: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        if not path.startswith("/"):
            raise ValueError(f"path must start with /, got {path!r}")
        if attempts is not None and attempts < 1:
            raise ValueError("attempts must be at least 1")
        if deadline is None and attempts is None:
            attempts = DEFAULT_ATTEMPTS
        telephony = path.startswith(TELEPHONY_PREFIX)
        base = TELEPHONY_BACKOFF_BASE if telephony else GENERAL_BACKOFF_BASE
        limiter = self._limiters["telephony" if telephony else "general"]
        query = encode_params(params) if params else None
        body = form_body(encode_form(form)) if form is not None else None

        tried = 0
        failed: CRMUnavailable | None = None
        while True:
            tried += 1
            try:
                return self._attempt(method, path, limiter, query, body, deadline)
            except _NotSent:
                if failed is None:
                    raise
                raise failed from None
            except CRMUnavailable as exc:
                failed = exc
                if isinstance(exc, CRMNoReply) and not resend_unanswered:
                    log.debug("retailCRM %s %s: %s; not sent again (it may have arrived)", method, path, exc)
                    raise
                if attempts is not None and tried >= attempts:
                    # Debug only: callers report failures their own way (aggregated: during an outage
                    # every card fails, and a line each would flood the log).
                    log.debug("retailCRM %s %s failed after %d attempt(s): %s", method, path, tried, exc)
                    raise
                delay = backoff_delay(base, tried, backoff_cap)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    log.debug(
                        "retailCRM %s %s failed, deadline reached after %d attempt(s): %s",
                        method, path, tried, exc,
                    )
                    raise
                log.debug("retailCRM %s %s: %s; retry %d in %.3f s", method, path, exc, tried, delay)
                gevent.sleep(delay)
            except CRMRejected as exc:
                log.debug("retailCRM %s %s rejected: %s", method, path, exc)
                raise

    def _attempt(
        self,
        method: str,
        path: str,
        limiter: RateLimiter | None,
        query: dict[str, str] | None,
        data: bytes | None,
        deadline: float | None,
    ) -> tuple[int, dict[str, Any]]:
        if limiter is not None and not limiter.acquire(deadline):
            raise _NotSent(None, "no request slot under the client rate limit before the deadline")
        connect_timeout, read_timeout = self.connect_timeout, self.timeout
        remaining: float | None = None
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _NotSent(None, "deadline passed before the request was sent")
            connect_timeout = min(connect_timeout, remaining)
            read_timeout = min(read_timeout, remaining)
        target = self._path_prefix + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        started = time.monotonic()
        status: int | None = None
        try:
            # The transport ends the exchange at the deadline itself; the gevent timeout also covers what
            # it does not bound (a DNS lookup; requests' per-read timeouts behind a proxy).
            with gevent.Timeout(remaining, _DeadlineHit):
                reply = self._transport.request(method, target, self._form_headers if data is not None
                                                else self._headers, data, connect_timeout, read_timeout,
                                                deadline=deadline)
            status = reply.status
        except _DeadlineHit:
            raise CRMUnavailable(None, "retailCRM did not answer before the deadline") from None
        except ConnectTimeout:
            raise CRMUnavailable(
                None, f"cannot connect to retailCRM at {self._host} within {connect_timeout:.1f} s"
            ) from None
        except ReadTimeout:
            raise CRMNoReply(None, f"retailCRM did not answer within {read_timeout:.1f} s") from None
        except NoReply as exc:
            raise CRMNoReply(None, f"connection to retailCRM at {self._host} failed: {exc}") from None
        except ConnectionFailed as exc:
            raise CRMUnavailable(None, f"connection to retailCRM at {self._host} failed: {exc}") from None
        except TransportError as exc:
            raise CRMUnavailable(None, f"request to retailCRM failed: {exc}") from None
        finally:
            if self.observer is not None:
                self.observer(method, path, status, time.monotonic() - started)
        return self._interpret(reply)

    def _interpret(self, reply: Reply) -> tuple[int, dict[str, Any]]:
        status = reply.status
        if 300 <= status < 400:
            target = urllib.parse.urlsplit(reply.headers.get("location", ""))
            where = f"{target.scheme}://{target.netloc}" if target.netloc else "another path"
            raise CRMRejected(status, f"retailCRM answered HTTP {status} redirecting to {where}: fix the URL")

        try:
            data = json.loads(reply.content) if reply.content.strip() else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            message = f"retailCRM answered HTTP {status} with {_describe_body(reply)} (not the API)"
            if 400 <= status < 500 and status not in _RETRYABLE_4XX:
                # 404/405 pages come from a wrong URL or a deleted account: no retry fixes that.
                raise CRMRejected(status, message)
            raise CRMUnavailable(status, message)

        if status < 300 and data.get("success") is True:
            return status, data

        raw_errors = data.get("errors")
        errors = raw_errors if isinstance(raw_errors, dict | list) and raw_errors else None
        reason = _one_line(data.get("errorMsg")) or "success is not true"
        message = _clip(f"retailCRM answered HTTP {status}: {reason}{_summarise_errors(errors)}")
        # The CRM may echo what it was sent; the key must not reach a log through it.
        message = message.replace(self._api_key, "***")
        if status >= 500 or status in _RETRYABLE_4XX:
            raise CRMUnavailable(status, message, errors)
        if status in (401, 403):
            raise CRMAuthError(status, message, errors)
        raise CRMRejected(status, message, errors)
