"""The integration's own page in retailCRM (`accountUrl`): is the telephony working, who is mapped, last calls.

retailCRM POSTs the module's `clientId` as a form when the company's admin follows the telephony's settings
link. A clientId that is no company's gets a 403 page and nothing else (compared in constant time, by
Companies.by_client_id). A known one starts a short-lived session: an HMAC-signed cookie naming the company
and its expiry, keyed by a secret drawn at start (a restart ends every session; the admin follows the link
again). The page's actions are POSTs carrying a CSRF token derived from the session.

Server-rendered with string.Template and html.escape: every value from FreeSWITCH, the CRM or the config is
escaped where it is put in. One stylesheet, inlined and allowed by its hash in the CSP; no script, no
external asset. The CRM shows the page in a frame: `frame-ancestors` names exactly the company's CRM origin.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import importlib.resources
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from string import Template
from typing import TYPE_CHECKING, Any

from fsbridge.crm.errors import CRMError
from fsbridge.history.outbox import QUARANTINED, SENT
from fsbridge.http.app import BadRequest, Request, Response, parse_form, same_secret

if TYPE_CHECKING:
    from fsbridge.tenants.company import Company
    from fsbridge.tenants.registry import Companies

log = logging.getLogger("fsbridge.account")

DEFAULT_PATH = "/account"
MAX_BODY = 16 * 1024  # a clientId or an action with its token; nginx allows the same
SESSION_SECONDS = 30 * 60
COOKIE = "fsbridge_session"
LAST_CALLS = 20
# How long the page shows what it read of retailCRM's side (the mapping) before asking again; an action that
# changes it (register) asks at once.
MAPPING_SECONDS = 60.0

_FILES = importlib.resources.files("fsbridge.http") / "account_page"
_PAGE = Template((_FILES / "page.html").read_text(encoding="utf-8"))
_CSS = (_FILES / "style.css").read_text(encoding="utf-8")
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def mask(phone: str) -> str:
    """All but the last 4 digits hidden: the page is for the admin, not a customer list."""
    return "•••" + phone[-4:] if len(phone) > 4 else "•••"


class Sessions:
    """Signed cookie values `<company b64>.<expiry>.<mac>`; the key lives only in this process."""

    def __init__(self, key: bytes | None = None, ttl: float = SESSION_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.key = key or os.urandom(32)
        self.ttl = ttl
        self.clock = clock

    def _mac(self, text: str) -> str:
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()

    def issue(self, company: str) -> str:
        name = base64.urlsafe_b64encode(company.encode()).decode().rstrip("=") or "-"
        text = f"{name}.{int(self.clock() + self.ttl)}"
        return f"{text}.{self._mac(text)}"

    def company(self, value: str) -> str | None:
        """The company of a valid, unexpired session value; None for anything else."""
        parts = value.split(".")
        # ASCII digits only: int() takes some Unicode digits ('²' raised).
        if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
            return None
        text = f"{parts[0]}.{parts[1]}"
        if not same_secret(self._mac(text), parts[2]) or int(parts[1]) < self.clock():
            return None
        name = parts[0]
        if name == "-":
            return ""
        try:
            return base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None

    def csrf(self, session: str) -> str:
        return self._mac("csrf:" + session)


def _cookie(request: Request) -> str:
    for part in request.headers.get("Cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return ""


class AccountPage:
    """GET/POST /account on the public listener."""

    def __init__(self, companies: Companies, fs_connected: Callable[[], bool],
                 sessions: Sessions | None = None) -> None:
        self.companies = companies
        self.fs_connected = fs_connected
        self.sessions = sessions or Sessions()
        # company name -> (the CRM client asked, when, what it said): see _crm_side.
        self._crm_read: dict[str, tuple[Any, float, tuple[dict[str, str], dict[str, str], str]]] = {}

    def __call__(self, request: Request) -> Response:
        form: dict[str, str] = {}
        if request.method == "POST":
            try:
                form = parse_form(request.body)   # UTF-8, bounded, no repeated field
            except BadRequest:
                return self._refusal(400, "The request could not be read.")
        if "clientId" in form:
            company = self.companies.by_client_id(form["clientId"])
            if company is None:
                return self._refusal(403, "Wrong link: open this page from the telephony settings in retailCRM.")
            session = self.sessions.issue(company.name)
            return self._page(company, session, "", set_cookie=True)
        session = _cookie(request)
        name = self.sessions.company(session) if session else None
        company = self.companies.get(name) if name is not None else None
        if company is None:
            return self._refusal(403, "Your session has ended: open this page again from retailCRM.")
        message = ""
        if request.method == "POST":
            if not same_secret(form.get("csrf", ""), self.sessions.csrf(session)):
                return self._refusal(403, "This form has expired: open the page again from retailCRM.")
            message = self._act(company, form.get("action", ""))
        return self._page(company, session, message)

    # -- actions ------------------------------------------------------------------------------------

    def _act(self, company: Company, action: str) -> str:
        if action == "register":
            from fsbridge import registration  # it imports this module's path: late, to avoid the cycle

            try:
                return registration.register(company.cfg, company.crm)
            except registration.RegistrationError as exc:
                return str(exc)
            finally:
                self._crm_read.pop(company.name, None)   # the page after it shows the CRM's new side
        if action == "requeue":
            ids = [q.external_id for q in self._quarantined(company)]
            count = company.history.outbox.requeue(ids) if ids else 0
            company.history.wake()
            return f"{count} quarantined call(s) queued again."
        return "Unknown action."

    # -- rendering ----------------------------------------------------------------------------------

    def _headers(self, company: Company | None) -> dict[str, str]:
        ancestors = "'none'"
        if company is not None:
            url = urllib.parse.urlsplit(company.cfg.crm.url)
            ancestors = f"{url.scheme}://{url.netloc}"
        return {
            "Content-Type": "text/html; charset=utf-8",
            "Content-Security-Policy": (f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; media-src 'self'; "
                                        f"form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"),
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        }

    def _refusal(self, status: int, text: str) -> Response:
        body = (f"<!doctype html><html lang=en><meta charset=utf-8><title>fsbridge</title>"
                f"<style>{_CSS}</style><p class=bad>{e(text)}</p></html>")
        return Response(status, self._headers(None), body.encode())

    def _quarantined(self, company: Company) -> list[Any]:
        return company.history.outbox.quarantined(200)

    def _page(self, company: Company, session: str, message: str, set_cookie: bool = False) -> Response:
        headers = self._headers(company)
        if set_cookie:
            secure = company.cfg.integration.public_url.startswith("https://")
            # Framed by the CRM (another site), the cookie is only sent back with SameSite=None, which
            # browsers accept only with Secure; over plain http Lax is the most that works.
            same_site = "None; Secure" if secure else "Lax"
            headers["Set-Cookie"] = (f"{COOKIE}={session}; Path=/; Max-Age={int(self.sessions.ttl)}; HttpOnly; "
                                     f"SameSite={same_site}")
        mapping_note, managers, phones = self._mapping(company)
        body = _PAGE.substitute(
            css=_CSS, company=e(company.tenant.label if company.name else company.cfg.integration.name),
            message=f'<p class="msg">{e(message)}</p>' if message else "",
            status=self._status(company), quarantined=self._quarantined_html(company),
            mapping_note=e(mapping_note), managers=managers, phones=phones,
            calls=self._calls(company), csrf=e(self.sessions.csrf(session)))
        return Response(200, headers, body.encode())

    def _status(self, company: Company) -> str:
        state = company.state()
        cards = company.cards
        pending = company.history.outbox.pending_here()
        oldest = company.history.outbox.oldest_pending()
        connected = self.fs_connected()
        rows = [
            ("FreeSWITCH", "connected" if connected else "NOT connected", connected),
            ("retailCRM with this API key", state["crm"], state["crm"] == "answering"),
            ("module in retailCRM", state["activity"], company.activity.delivering),
            ("cards delivered since start", f"{cards.sent} (typical delivery {cards.typical * 1000:.0f} ms)", True),
            ("cards dropped", str(state["cards_dropped"]), state["cards_dropped"] == 0),
            ("calls waiting for the history", str(pending) + (f", the oldest {time.time() - oldest:.0f} s old"
                                                             if oldest else ""), pending == 0),
        ]
        return "".join(f'<tr><th>{e(k)}</th><td class="{"ok" if good else "bad"}">{e(v)}</td></tr>'
                       for k, v, good in rows)

    def _quarantined_html(self, company: Company) -> str:
        items = self._quarantined(company)
        if not items:
            return '<p class="ok">No quarantined calls.</p>'
        rows = "".join(f"<tr><td>{e(mask(q.call.phone) if q.call else q.external_id)}</td><td>{e(q.reason)}</td></tr>"
                       for q in items)
        return (f'<p class="bad">{len(items)} call(s) refused by retailCRM (quarantined):</p>'
                f"<table><thead><tr><th>customer</th><th>retailCRM's reason</th></tr></thead><tbody>{rows}</tbody>"
                "</table>")

    def _crm_side(self, company: Company) -> tuple[dict[str, str], dict[str, str], str]:
        """(extension -> user id, DID -> shop, note) as retailCRM has them, read at most every MAPPING_SECONDS.

        Not at every view: a read spends a request of the company's 40/s budget, the one its cards and history
        live on, and waits up to crm.timeout when the CRM is slow."""
        now = time.monotonic()
        cached = self._crm_read.get(company.name)
        if cached is not None and cached[0] is company.crm and now - cached[1] < MAPPING_SECONDS:
            known_codes, known_phones, known_note = cached[2]
            return known_codes, known_phones, known_note.replace("has it now", f"had it {now - cached[1]:.0f} s ago")
        codes: dict[str, str] = {}
        phones: dict[str, str] = {}
        note = "As retailCRM has it now."
        try:
            module = company.crm.get_integration_module(company.cfg.integration.code,
                                                        deadline=now + company.cfg.crm.timeout)
            tel = (module.get("integrations") or {}).get("telephony") or {}
            codes = {str(i.get("code")): str(i.get("userId")) for i in tel.get("additionalCodes") or []
                     if isinstance(i, dict)}
            phones = {str(i.get("externalPhone", "")).lstrip("+"): str(i.get("siteCode"))
                      for i in tel.get("externalPhones") or [] if isinstance(i, dict)}
        except CRMError as exc:
            note = f"retailCRM's side could not be read: {exc}"
        self._crm_read[company.name] = (company.crm, time.monotonic(), (codes, phones, note))
        return codes, phones, note

    def _mapping(self, company: Company) -> tuple[str, str, str]:
        have_codes, have_phones, note = self._crm_side(company)
        managers = _compared({code: str(user) for code, user in company.cfg.managers.items()}, have_codes, "")
        phones = _compared(dict(company.cfg.external_phones), have_phones, "+")
        return note, managers, phones

    def _calls(self, company: Company) -> str:
        rows = []
        for call, state in company.history.outbox.recent(LAST_CALLS):
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(call.start_us / 1e6))
            seconds = (call.end_us - (call.answer_us or call.start_us)) / 1e6
            delivered = {SENT: "delivered", QUARANTINED: "refused"}.get(state, "waiting")
            url = company.history.builder.record_url(call)
            play = (f'<audio controls preload="none" src="{e(urllib.parse.urlsplit(url).path)}"></audio>'
                    if url else "")
            rows.append(f"<tr><td>{e(started)}</td><td>{e(call.direction)}</td><td>{e(mask(call.phone))}</td>"
                        f"<td>{e(call.manager_code or '')}</td><td>{e(call.result)}</td><td>{seconds:.0f} s</td>"
                        f"<td>{e(delivered)}</td><td>{play}</td></tr>")
        return "".join(rows) or '<tr><td colspan="8">No calls yet.</td></tr>'


def _compared(mine: dict[str, str], theirs: dict[str, str], prefix: str) -> str:
    """Table rows of fsbridge's mapping beside retailCRM's, each flagged where the two differ."""
    rows = []
    for key in sorted(set(mine) | set(theirs)):
        ours, crm = mine.get(key, ""), theirs.get(key, "")
        flag = ("" if ours == crm else "unknown to fsbridge" if not ours
                else "missing in retailCRM" if not crm else "differs")
        rows.append(f'<tr><td>{e(prefix + key)}</td><td>{e(ours)}</td><td>{e(crm)}</td>'
                    f'<td class="{"bad" if flag else "ok"}">{e(flag or "ok")}</td></tr>')
    return "".join(rows)
