"""`fsbridge register` and `fsbridge info`: the integration module in retailCRM, built from the config.

The module is the whole of what the CRM knows about fsbridge: the callback URLs, the clientId that
authenticates them, and which extension belongs to which user and which number to which shop. It is built
from the config every time and sent whole, because the CRM presumably replaces the lists it is sent
(docs/retailcrm-api-v5-telephony.md, section 1): a partial list would unassign the rest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from fsbridge.activity import DEFAULT_PATH as ACTIVITY_PATH
from fsbridge.config import Config
from fsbridge.crm.client import RetailCRM
from fsbridge.crm.errors import CRMAuthError, CRMError, CRMRejected
from fsbridge.http.account import DEFAULT_PATH as ACCOUNT_PATH
from fsbridge.http.logo import DEFAULT_PATH as LOGO_PATH
from fsbridge.http.make_call import DEFAULT_PATH as MAKE_CALL_PATH
from fsbridge.http.status import DEFAULT_PATH as STATUS_PATH


class RegistrationError(Exception):
    """register/info could not do their job; the message is the whole report, in plain words."""


# Where each field of the module comes from, to tell the admin which setting to fix.
_SOURCES = {
    "code": "integration.code",
    "active": None,
    "name": "integration.name",
    "logo": "integration.public_url",
    "baseUrl": "integration.public_url",
    "clientId": "integration.client_id",
    "accountUrl": "integration.public_url",
    "actions": None,
    "makeCallUrl": "integration.public_url",
    "changeUserStatusUrl": "integration.public_url",
    "additionalCodes": "managers",
    "externalPhones": "external_phones",
}
_TOP_FIELDS = ("code", "active", "name", "logo", "baseUrl", "clientId", "accountUrl")
_TELEPHONY_FLAGS = ("makeCallUrl", "changeUserStatusUrl", "allowEdit", "inputEventSupported",
                    "outputEventSupported", "hangupEventSupported")
_SECRET_FIELDS = frozenset({"clientId"})


def build_module(cfg: Config) -> dict[str, Any]:
    """The integrationModule for `integration-modules/{code}/edit`, exactly in the shape of the doc's example."""
    base = cfg.integration.public_url  # validated without a trailing slash
    return {
        "code": cfg.integration.code,
        "active": True,
        "name": cfg.integration.name,
        "logo": base + LOGO_PATH,
        "baseUrl": base,
        "clientId": cfg.integration.client_id,
        "accountUrl": base + ACCOUNT_PATH,
        # Relative to baseUrl: where retailCRM says the module was deactivated, frozen or activated.
        "actions": {"activity": ACTIVITY_PATH},
        "integrations": {
            "telephony": {
                "makeCallUrl": base + MAKE_CALL_PATH,
                "changeUserStatusUrl": base + STATUS_PATH,
                # Editable only through the API: a change made in the CRM's UI would be undone by the next
                # `fsbridge register` anyway, the config being the one source of truth.
                "allowEdit": False,
                "inputEventSupported": True,
                "outputEventSupported": True,
                "hangupEventSupported": True,
                "additionalCodes": [{"userId": str(user), "code": code} for code, user in cfg.managers.items()],
                "externalPhones": [{"siteCode": site, "externalPhone": "+" + phone}
                                   for phone, site in cfg.external_phones.items()],
            },
        },
    }


def _client(cfg: Config) -> RetailCRM:
    return RetailCRM(cfg.crm.url, cfg.crm.api_key, timeout=cfg.crm.timeout)


def _deadline(cfg: Config) -> float:
    """crm.timeout bounds the whole command, retries included: a CRM that trickles its reply must not hold
    `fsbridge register` or `info` for ever."""
    return time.monotonic() + cfg.crm.timeout


def register(cfg: Config, crm: RetailCRM | None = None) -> str:
    """Create or update the module; the report's lines. RegistrationError when the CRM refused it."""
    module = build_module(cfg)
    code = module["code"]
    client = crm or _client(cfg)
    notes: list[str] = []
    try:
        try:
            created, reply = client.edit_integration_module(module, deadline=_deadline(cfg))
        except CRMRejected as exc:
            if not _names_actions(exc.errors):
                raise
            # Our API notes say retailCRM refuses `actions` it does not know, and `activity` is not confirmed
            # there: registered without it rather than not at all.
            module = {k: v for k, v in module.items() if k != "actions"}
            created, reply = client.edit_integration_module(module, deadline=_deadline(cfg))
            notes.append("  warning: retailCRM refused actions.activity: switching the module off in retailCRM "
                         "will not stop fsbridge's cards and history")
    except CRMError as exc:
        raise RegistrationError(_explain_failure(exc, f"register the integration module {code!r}")) from None
    finally:
        if crm is None:
            client.close()

    telephony = module["integrations"]["telephony"]
    lines = [
        f"{'created' if created else 'updated'} integration module {code!r} in {cfg.crm.url}",
        f"  callbacks: {telephony['makeCallUrl']} and {telephony['changeUserStatusUrl']}",
        f"  {len(telephony['additionalCodes'])} manager extension(s), "
        f"{len(telephony['externalPhones'])} external number(s)",
    ]
    info = reply.get("info")
    info = info if isinstance(info, Mapping) else {}  # PHP sends an empty map as []
    users = _as_strings(info.get("notExistUsersIds"))
    if users:
        by_user: dict[str, list[str]] = {}
        for ext, user in cfg.managers.items():
            by_user.setdefault(str(user), []).append(ext)
        for user in users:
            exts = ", ".join(by_user.get(user, [])) or "?"
            lines.append(f"  warning: retailCRM has no user with id {user} (extension {exts} in managers): "
                         "that extension is tied to nobody in the CRM")
    sites = _as_strings(info.get("notExistSiteCodes"))
    if sites:
        by_site: dict[str, list[str]] = {}
        for phone, site in cfg.external_phones.items():
            by_site.setdefault(site, []).append("+" + phone)
        for site in sites:
            phones = ", ".join(by_site.get(site, [])) or "?"
            lines.append(f"  warning: retailCRM has no shop with code {site!r} (number {phones} in "
                         "external_phones): calls on that number will not be tied to a shop")
    return "\n".join(lines + notes)


def _names_actions(errors: Any) -> bool:
    """Whether the CRM's field errors are about `actions` (and nothing else)."""
    keys = list(errors) if isinstance(errors, Mapping) else []
    return bool(keys) and all(str(k).startswith("actions") for k in keys)


def info(cfg: Config, crm: RetailCRM | None = None) -> str:
    """The module as the CRM has it, and every field where it differs from the config."""
    wanted = build_module(cfg)
    code = wanted["code"]
    client = crm or _client(cfg)
    try:
        stored = client.get_integration_module(code, deadline=_deadline(cfg))
    except CRMRejected as exc:
        if exc.status == 404 and "not the API" not in exc.message:
            raise RegistrationError(
                f"integration module {code!r} is not registered in {cfg.crm.url}: run `fsbridge register`"
            ) from None
        raise RegistrationError(_explain_failure(exc, f"read the integration module {code!r}")) from None
    except CRMError as exc:
        raise RegistrationError(_explain_failure(exc, f"read the integration module {code!r}")) from None
    finally:
        if crm is None:
            client.close()

    state = "active" if stored.get("active") is True else "NOT active"
    if stored.get("freeze") is True:
        state += " and FROZEN (fsbridge sends no cards; the history waits)"
    lines = [f"integration module {code!r} in {cfg.crm.url}: {state}, name {stored.get('name')!r}"]
    diffs = differences(wanted, stored)
    if diffs:
        lines.append(f"{len(diffs)} difference(s) from the config (`fsbridge register` sends the config):")
        lines.extend("  " + d for d in diffs)
    else:
        lines.append("no differences from the config")
    return "\n".join(lines)


# -- comparing ------------------------------------------------------------------------------------------

def differences(wanted: Mapping[str, Any], stored: Mapping[str, Any]) -> list[str]:
    """One line per field where `stored` (from the CRM) differs from `wanted` (from the config)."""
    out: list[str] = []
    for name in _TOP_FIELDS:
        out.extend(_compare_scalar(name, wanted.get(name), stored.get(name), name in stored))
    want_tel = (wanted.get("integrations") or {}).get("telephony") or {}
    integrations = stored.get("integrations")
    have_tel = integrations.get("telephony") if isinstance(integrations, Mapping) else None
    if not isinstance(have_tel, Mapping):
        out.append("telephony settings: missing in the CRM")
        return out
    for name in _TELEPHONY_FLAGS:
        out.extend(_compare_scalar(name, want_tel.get(name), have_tel.get(name), name in have_tel))
    out.extend(_compare_codes(want_tel.get("additionalCodes") or [], have_tel.get("additionalCodes")))
    out.extend(_compare_phones(want_tel.get("externalPhones") or [], have_tel.get("externalPhones")))
    return out


def _where(name: str) -> str:
    source = _SOURCES.get(name)
    return f" (from {source})" if source else ""


def _compare_scalar(name: str, want: Any, have: Any, present: bool) -> list[str]:
    if present and want == have:
        return []
    if name in _SECRET_FIELDS:
        if not present:
            return []  # the CRM need not show a secret back; nothing to compare
        return [f"{name}: differs from the config{_where(name)} (values not shown: it is a secret); fsbridge "
                "refuses the CRM's make-call and status callbacks until you register again"]
    if not present:
        return [f"{name}: {_show(want)} in the config{_where(name)}, missing in the CRM"]
    return [f"{name}: {_show(want)} in the config{_where(name)}, {_show(have)} in the CRM"]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def _pairs(items: Any, key: str, value: str) -> dict[str, str] | None:
    """[{key: k, value: v}, ...] -> {k: v} with both sides as strings; None if it is not such a list."""
    if not isinstance(items, list):
        return None
    out: dict[str, str] = {}
    for item in items:
        if isinstance(item, Mapping) and key in item and value in item:
            out[str(item[key])] = str(item[value])
    return out


def _compare_codes(want_items: list[Any], have_items: Any) -> list[str]:
    want = _pairs(want_items, "code", "userId") or {}
    have = _pairs(have_items, "code", "userId")
    if have is None:
        return [f"additionalCodes: {len(want)} extension(s) in the config{_where('additionalCodes')}, "
                "none in the CRM"]
    out = []
    for code in sorted(want.keys() | have.keys(), key=_natural):
        if code not in have:
            out.append(f"extension {code}: user {want[code]} in the config (managers), not in the CRM")
        elif code not in want:
            out.append(f"extension {code}: user {have[code]} in the CRM, not in the config (managers)")
        elif want[code] != have[code]:
            out.append(f"extension {code}: user {want[code]} in the config (managers), user {have[code]} in the CRM")
    return out


def _compare_phones(want_items: list[Any], have_items: Any) -> list[str]:
    want = {_digits(k): (k, v) for k, v in (_pairs(want_items, "externalPhone", "siteCode") or {}).items()}
    pairs = _pairs(have_items, "externalPhone", "siteCode")
    if pairs is None:
        return [f"externalPhones: {len(want)} number(s) in the config{_where('externalPhones')}, none in the CRM"]
    # The CRM may keep a number as it was typed in its UI (+7-499-...): compare digits.
    have = {_digits(k): (k, v) for k, v in pairs.items()}
    out = []
    for digits in sorted(want.keys() | have.keys()):
        if digits not in have:
            phone, site = want[digits]
            out.append(f"number {phone}: shop {site!r} in the config (external_phones), not in the CRM")
        elif digits not in want:
            phone, site = have[digits]
            out.append(f"number {phone}: shop {site!r} in the CRM, not in the config (external_phones)")
        elif want[digits][1] != have[digits][1]:
            out.append(f"number {want[digits][0]}: shop {want[digits][1]!r} in the config (external_phones), "
                       f"shop {have[digits][1]!r} in the CRM")
    return out


def _digits(phone: str) -> str:
    return re.sub(r"\D", "", phone)


def _natural(code: str) -> tuple[int, str]:
    return (int(code), code) if code.isdigit() else (1 << 62, code)


def _as_strings(values: Any) -> list[str]:
    return [str(v) for v in values] if isinstance(values, list) else []


# -- explaining failures --------------------------------------------------------------------------------

def _explain_failure(exc: CRMError, doing: str) -> str:
    if isinstance(exc, CRMAuthError):
        return (f"could not {doing}: retailCRM refused the API key (crm.api_key or FSBRIDGE_CRM_API_KEY): "
                f"{exc.message}. Check the key, and that it is allowed the integration-modules methods.")
    if isinstance(exc, CRMRejected) and exc.errors:
        lines = [f"could not {doing}: retailCRM refused it (HTTP {exc.status}):"]
        lines.extend("  " + line for line in _explain_errors(exc.errors))
        return "\n".join(lines)
    if isinstance(exc, CRMRejected):
        return f"could not {doing}: {exc.message}. Check crm.url."
    return f"could not {doing}: {exc.message}. Nothing was changed; try again when retailCRM is reachable."


def _explain_errors(errors: dict[str, Any] | list[Any]) -> Iterable[str]:
    if isinstance(errors, list):
        yield from (str(e) for e in errors)
        return
    for key, message in errors.items():
        yield f"{_field_name(key)}: {message}"


def _field_name(key: str) -> str:
    """'integrations[telephony][additionalCodes][1][userId]' -> 'additionalCodes #2 userId (from managers)'."""
    parts = re.findall(r"[^\[\]]+", key)
    if parts[:2] == ["integrations", "telephony"]:
        parts = parts[2:] or ["telephony"]
    if not parts:
        return key
    words = [parts[0]] + [f"#{int(p) + 1}" if p.isdigit() else p for p in parts[1:]]
    return " ".join(words) + _where(parts[0])
