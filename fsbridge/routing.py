"""Who should take an inbound call: retailCRM's responsible manager for the caller, if free.

The dialplan asks while the caller waits, so every path here is bounded by `timeout` and ends in an
answer: the manager's extension, or "" for "use the fallback". Nothing raises to the caller: a CRM that is
down or slow must cost a call at most `timeout`, never the call itself.

A CRM that is failing is not asked harder: after a failed lookup the next ones try once, with no retry, and
for a short while (`breaker` seconds, doubling with each further failure up to `breaker_max`) not at all,
so the fallback rings at once and an outage is not multiplied by the callers (retailCRM's general limit is
10 requests/s). The first lookup after that while is the probe: it tries once, and its success ends it all.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
from gevent.event import AsyncResult

from fsbridge.crm.backoff import backoff_ceiling
from fsbridge.crm.errors import CRMAuthError, CRMError, CRMRejected

log = logging.getLogger("fsbridge.routing")

# E.164 allows 15 digits; one more for trunks that prefix a 0 or an 8. Fewer than 5 digits is an
# internal extension or a short code, which no customer card holds.
MIN_DIGITS = 5
MAX_DIGITS = 16
# Separators people and some trunks put into numbers; everything else is refused rather than stripped,
# so "1;DROP 2" never becomes the valid-looking "12".
_SEPARATORS = str.maketrans("", "", " -().")
_PHONE_RE = re.compile(rf"\+?[0-9]{{{MIN_DIGITS},{MAX_DIGITS}}}", re.ASCII)
# A caller id is a few characters; bounding the raw value keeps a hostile one cheap to refuse.
_MAX_RAW = 64


class ManagerSource(Protocol):
    def responsible_manager(self, phone: str, *, details: bool = ..., ignore_status: bool = ...,
                            timeout: float | None = ..., attempts: int | None = ...) -> dict[str, Any] | None: ...


class StatusSource(Protocol):
    def is_free(self, code: str) -> bool: ...


def normalize_phone(raw: str | None) -> str | None:
    """'+7 (912) 123-45-67' -> '+79121234567'; None for anything that is not plausibly a phone number."""
    if not raw or len(raw) > _MAX_RAW:
        return None
    text = raw.strip().translate(_SEPARATORS)
    return text if _PHONE_RE.fullmatch(text) else None


def mask(phone: str) -> str:
    """Enough of a number to tell two apart in a debug log, not enough to call it back."""
    return "***" + phone[-4:]


@dataclass
class LookupStats:
    """Counters for tests, benchmarks and a future status page."""

    refused: int = 0  # phone failed the allow-list, the CRM was not asked
    cache_hits: int = 0
    crm_requests: int = 0
    failures: int = 0  # CRM error or timeout: answered ""
    skipped: int = 0  # the CRM was failing: not asked, answered "" at once


@dataclass(frozen=True, slots=True)
class _Entry:
    expires: float
    code: str | None  # None: the CRM named nobody


class _Failed(Exception):
    """Internal: the CRM did not give a usable answer; the message is safe to log."""


class _Deadline(Exception):
    """Raised by our own gevent.Timeout; private so an outer Timeout is never swallowed."""


_FAILED = object()
# Tries of one lookup while the CRM works: a second one covers a dropped connection or a lone 502.
HEALTHY_ATTEMPTS = 2


class ManagerLookup:
    """phone -> extension of the caller's responsible manager, or "".

    The extension is returned only if it is one of `managers` (the configured extensions) and
    `status.is_free(code)`; the status is checked on every call, cache hit or not, so a manager who just
    went on a break stops getting calls at once. `cache_ttl` keeps a named manager, `negative_ttl` keeps
    "nobody" (shorter: a customer may be assigned a manager any minute); at most `cache_size` numbers are
    remembered, the least recently used forgotten first. `timeout` bounds one lookup end to end.
    `breaker`/`breaker_max`: how long the CRM is left alone after failures (module docstring; 0: never).
    Safe to share between greenlets; concurrent lookups of one number share one CRM request.
    """

    def __init__(
        self,
        crm: ManagerSource,
        managers: Container[str],
        status: StatusSource,
        *,
        timeout: float = 1.0,
        cache_ttl: float = 60.0,
        negative_ttl: float = 10.0,
        cache_size: int = 10_000,
        details: bool = False,
        ignore_status: bool = False,
        breaker: float = 2.0,
        breaker_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if breaker < 0 or breaker_max < 0:
            raise ValueError("breaker periods cannot be negative")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.crm = crm
        self.managers = managers
        self.status = status
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.negative_ttl = negative_ttl
        self.cache_size = cache_size
        self.details = details
        self.ignore_status = ignore_status
        self.breaker = breaker
        self.breaker_max = breaker_max
        self.clock = clock
        self.stats = LookupStats()
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, AsyncResult] = {}
        # Problems already logged since the last successful lookup: an outage is one warning, not one per
        # caller, and a flapping A/B/A outage is two.
        self._problems: set[str] = set()
        self._failed_since_ok = 0
        self._failing = 0  # lookups that failed in a row
        self._quiet_until = 0.0  # clock() before which the CRM is not asked

    def lookup(self, raw_phone: str | None) -> str:
        """The extension to bridge the caller to, or "" (fall back). Never raises, never outlasts `timeout`."""
        phone = normalize_phone(raw_phone)
        if phone is None:
            self.stats.refused += 1
            log.debug("manager lookup: caller id is not a phone number, not asking the CRM")
            return ""
        try:
            return self._routable(self._manager_of(phone), phone)
        except Exception as exc:  # a bug here must not cost the caller the call
            self._failure(f"unexpected {type(exc).__name__}")
            return ""

    def _routable(self, code: str | None, phone: str) -> str:
        if code is None:
            log.debug("manager lookup %s: no manager", mask(phone))
            return ""
        if code not in self.managers:
            log.debug("manager lookup %s: manager %s is not a configured extension", mask(phone), code)
            return ""
        if not self.status.is_free(code):
            log.debug("manager lookup %s: manager %s is not free", mask(phone), code)
            return ""
        return code

    def _manager_of(self, phone: str) -> str | None:
        key = phone.lstrip("+")  # the CRM matches on digits: +7912.. and 7912.. are one customer
        now = self.clock()
        entry = self._cache.get(key)
        if entry is not None:
            if entry.expires > now:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return entry.code
            del self._cache[key]

        asking = self._inflight.get(key)
        if asking is not None:
            # Someone is asking the CRM about this number right now: wait for that answer, not longer.
            try:
                shared = asking.get(timeout=self.timeout)
            except gevent.Timeout:
                return None
            return None if shared is _FAILED else shared

        if self._failing:
            if now < self._quiet_until:
                self.stats.skipped += 1
                self._failed_since_ok += 1
                return None
            # The probe: lookups arriving while it is out are not sent too.
            self._quiet_until = now + self._quiet_period()

        pending = AsyncResult()
        self._inflight[key] = pending
        result: Any = _FAILED
        try:
            result = self._ask(phone, attempts=1 if self._failing else HEALTHY_ATTEMPTS)
            self._remember(key, result)
            self._recovered()
        except _Failed as exc:
            self._failure(str(exc))
            self._failing += 1
            self._quiet_until = self.clock() + self._quiet_period()
        finally:
            del self._inflight[key]
            pending.set(result)
        return None if result is _FAILED else result

    def _quiet_period(self) -> float:
        # No jitter: one breaker per company, nothing to spread out.
        return backoff_ceiling(self.breaker, self._failing, self.breaker_max)

    def _ask(self, phone: str, attempts: int) -> str | None:
        self.stats.crm_requests += 1
        try:
            # The client's own deadline covers its retries and rate limiter; ours also covers anything it
            # does not (DNS, a slow TLS handshake), so the dialplan's wait has a hard ceiling.
            with gevent.Timeout(self.timeout, _Deadline):
                manager = self.crm.responsible_manager(
                    phone, details=self.details, ignore_status=self.ignore_status, timeout=self.timeout,
                    attempts=attempts,
                )
        except _Deadline:
            raise _Failed(f"retailCRM did not name a manager within {self.timeout:g} s") from None
        except CRMRejected as exc:
            if isinstance(exc, CRMAuthError):
                raise _Failed(str(exc)) from None   # the key: every lookup would fail alike
            # About this number only (the CRM refused it): nobody for this caller, the CRM is fine.
            log.debug("retailCRM refused the lookup of one number: %s", exc)
            return None
        except CRMError as exc:
            raise _Failed(str(exc)) from None
        if manager is None:
            return None
        code = manager.get("code")
        if isinstance(code, int) and not isinstance(code, bool):
            code = str(code)
        if not isinstance(code, str) or not code.isascii() or not code.isdigit():
            # A manager without an extension code cannot be dialled; the CRM should not send one.
            return None
        return code

    def _remember(self, key: str, code: str | None) -> None:
        ttl = self.cache_ttl if code is not None else self.negative_ttl
        if ttl <= 0:
            return
        self._cache[key] = _Entry(self.clock() + ttl, code)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _failure(self, problem: str) -> None:
        self.stats.failures += 1
        self._failed_since_ok += 1
        if problem not in self._problems:
            self._problems.add(problem)
            log.warning("responsible manager lookup failed: %s; inbound calls go to the dialplan's fallback "
                        "until it works again", problem)

    def _recovered(self) -> None:
        if self._problems:
            log.warning("responsible manager lookups work again (%d failed meanwhile)", self._failed_since_ok)
            self._problems.clear()
        self._failed_since_ok = 0
        self._failing = 0
        self._quiet_until = 0.0

    def clear(self) -> None:
        """Forget every cached answer (e.g. after the managers' assignment changed in the CRM)."""
        self._cache.clear()
