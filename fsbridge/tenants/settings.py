"""Tenant files: one `<tenant>.yaml` per customer company in `tenants_dir` (the virtual PBX setup).

    domains: [acme.pbx.example.com]
    crm: {url: https://acme.retailcrm.ru, api_key: "...", timezone: Europe/Moscow}
    integration: {code: fsbridge, client_id: "..."}
    managers: {"100": 1, "200": 2}
    external_phones: {"74951234567": shop1}
    # optional overrides of the provider's top-level values:
    routing: {timeout: 1.0, ignore_status: false, ...}
    originate: {manager_dial: "user/{code}@{domain}", ring_timeout: 30, ...}
    history: {strategy: periodic, period: 10, unassigned_code: "100"}

A tenant's settings are a whole `Config`: the provider's top-level one with the company's sections
replaced, each value checked by the same `setting()` declarations as config.py, so everything that takes a
`Config` (the CRM client, the history builder, registration, click-to-call) serves a tenant unchanged. An
error is one line naming the file and the key. Without `tenants_dir`, the top-level file is the one
implicit tenant (name "") and matches every domain: the single-company setup, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fsbridge.config import (
    DOMAIN_RE,
    Config,
    ConfigError,
    CrmSettings,
    HistorySettings,
    IntegrationSettings,
    OriginateSettings,
    RoutingSettings,
    _apply,
    _managers,
    _phones,
)

TENANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
IMPLICIT = ""   # the tenant of a single-company config
TENANT_MANAGER_DIAL = "user/{code}@{domain}"

# What a tenant file may set, section by section; the rest is the provider's (event socket, listeners,
# storage, recordings, trunks).
_OVERRIDES: dict[str, tuple[type, frozenset[str]]] = {
    "crm": (CrmSettings, frozenset({"url", "api_key", "timezone", "timeout", "telephony_rate", "card_max_age",
                                    "card_workers", "card_queue_size"})),
    "integration": (IntegrationSettings, frozenset({"code", "client_id", "name"})),
    "routing": (RoutingSettings, frozenset({"timeout", "cache_ttl", "negative_ttl", "cache_size", "ignore_status",
                                            "breaker", "breaker_max"})),
    "originate": (OriginateSettings, frozenset({"manager_dial", "customer_dial", "gateway", "ring_timeout",
                                               "ringing_wait", "dedupe_window"})),
    "history": (HistorySettings, frozenset({"strategy", "period", "unassigned_code"})),
}
# Never inherited from the top level: each company has its own account and secret.
_OWN = {"crm": ("url", "api_key"), "integration": ("client_id",)}
_TOP_KEYS = frozenset({"domains", "managers", "external_phones", *_OVERRIDES})


@dataclass(frozen=True)
class Tenant:
    """One company's settings, as read from its file (or the implicit one)."""

    name: str
    cfg: Config                       # the effective settings: provider-wide + this company's
    domains: tuple[str, ...] = ()     # () for the implicit tenant: every domain
    path: Path | None = None
    fingerprint: str = ""             # of the file's bytes: a reload rebuilds only what changed

    @property
    def label(self) -> str:
        """How logs, metrics and the CLI name it."""
        return self.name or "default"

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "config"


def implicit(cfg: Config) -> Tenant:
    return Tenant(IMPLICIT, cfg)


def _domains(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("expected a list of FreeSWITCH domains, e.g. [acme.pbx.example.com]")
    out = []
    for item in value:
        text = str(item).strip().lower().rstrip(".")
        if not DOMAIN_RE.fullmatch(text):
            raise ValueError(f"expected domain names (letters, digits, '-', '.'), got {item!r}")
        out.append(text)
    return tuple(dict.fromkeys(out))


def _only(raw: Mapping[str, Any], allowed: frozenset[str], prefix: str, why: str) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{prefix}{key}: {why} {', '.join(sorted(allowed))})")


def _checked(where: str, key: str, check: Any, value: Any) -> Any:
    try:
        return check(value)
    except ValueError as exc:
        raise ConfigError(f"{where}: {key}: {exc}") from None


def parse(name: str, raw: Any, top: Config, *, where: str, fingerprint: str = "") -> Tenant:
    """A tenant from its file's mapping; ConfigError("<file>: <key>: ...") when something is wrong."""
    if not TENANT_NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: the file name must be <tenant>.yaml with a tenant of lower-case letters, "
                          "digits and '-'")
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a YAML mapping at the top level")
    _only(raw, _TOP_KEYS, f"{where}: ", "not a tenant setting (the provider's settings stay in the main config; "
          "a tenant file has")
    for section, (_cls, allowed) in _OVERRIDES.items():
        given = raw.get(section) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"{where}: {section}: expected a mapping of settings")
        _only(given, allowed, f"{where}: {section}.", "not a per-tenant setting (allowed:")
    domains = _checked(where, "domains", _domains, raw.get("domains"))
    managers = _checked(where, "managers", _managers, raw.get("managers"))
    phones = _checked(where, "external_phones", _phones, raw.get("external_phones"))
    replaced: dict[str, Any] = {"managers": managers, "external_phones": phones, "tenants_dir": None}
    for section, (cls, _allowed) in _OVERRIDES.items():
        given = raw.get(section) or {}
        current = getattr(top, section)
        base = _inherited(top, section)
        if not given and section not in _OWN and section != "originate":
            replaced[section] = current   # nothing of its own: the provider's settings as they are
            continue
        if section == "originate" and "manager_dial" not in given and base.get("manager_dial") == "user/{code}":
            base = {**base, "manager_dial": TENANT_MANAGER_DIAL}   # extension 100 exists in every domain
        try:
            # No environment: FSBRIDGE_CRM_API_KEY and the like are the single company's, not every tenant's.
            # What the tenant does not set is the provider's value, checked when the main config was read:
            # only the file's own values are checked here (a reload of a thousand files did it all again).
            values = _apply(cls, given, f"{section}.", env={}, optional=_optional(section, cls, base))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        replaced[section] = dataclasses.replace(current, **{**base, **values})
    cfg = dataclasses.replace(top, **replaced)
    _cross_check(cfg, where)
    return Tenant(name, cfg, domains, None, fingerprint)


# The provider's values a tenant file inherits, per (main config, section): the same for every file.
_INHERITED: dict[tuple[int, str], tuple[Config, dict[str, Any]]] = {}


def _inherited(top: Config, section: str) -> dict[str, Any]:
    key = (id(top), section)
    cached = _INHERITED.get(key)
    if cached is None or cached[0] is not top:
        if len(_INHERITED) > 64:
            _INHERITED.clear()
        allowed = _OVERRIDES[section][1]
        current = getattr(top, section)
        base = {k: getattr(current, k) for k in sorted(allowed) if k not in _OWN.get(section, ())}
        cached = _INHERITED[key] = (top, {k: v for k, v in base.items() if v is not None})
    return dict(cached[1])


@functools.cache
def _provider_only(section: str, cls: type) -> frozenset[str]:
    allowed = _OVERRIDES[section][1]
    return frozenset(f"{section}.{f.name}" for f in dataclasses.fields(cls) if f.name not in allowed)


def _optional(section: str, cls: type, base: Mapping[str, Any]) -> frozenset[str]:
    """Required settings a tenant file may leave out: the provider's own, and those it inherits."""
    return _provider_only(section, cls) | {f"{section}.{k}" for k in base}


def _cross_check(cfg: Config, where: str) -> None:
    if cfg.history.unassigned_code and cfg.history.unassigned_code not in cfg.managers:
        raise ConfigError(f"{where}: history.unassigned_code: expected one of the managers' extensions")
    o = cfg.originate
    if "{code}" not in o.manager_dial:
        raise ConfigError(f"{where}: originate.manager_dial: expected {{code}} in it")
    if "{phone}" not in o.customer_dial:
        raise ConfigError(f"{where}: originate.customer_dial: expected {{phone}} in it")
    overlap = set(cfg.managers) & set(cfg.external_phones)
    if overlap:
        raise ConfigError(f"{where}: external_phones: {sorted(overlap)[0]} is also a manager extension")


# libyaml's parser when PyYAML has it: a reload of a thousand files parses them all while events wait.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_file(path: Path, top: Config, keep: Tenant | None = None) -> Tenant:
    """The tenant of `path`; `keep` itself when the file has not changed since it was read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    fingerprint = hashlib.sha256(data).hexdigest()
    if keep is not None and keep.fingerprint == fingerprint:
        return keep
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_LOADER)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise ConfigError(f"{path}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}") from None
    tenant = parse(path.stem, raw, top, where=str(path), fingerprint=fingerprint)
    return dataclasses.replace(tenant, path=path)


def tenant_files(directory: Path) -> list[Path]:
    """The `<tenant>.yaml` files of `directory`, by name; other files (editor backups, .tmp) are ignored."""
    try:
        names = sorted(p for p in directory.iterdir() if p.suffix == ".yaml" and p.is_file())
    except FileNotFoundError:
        raise ConfigError(f"tenants_dir: {directory} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"tenants_dir: cannot list {directory}: {exc.strerror}") from None
    return names


@dataclass
class Loaded:
    tenants: dict[str, Tenant]
    errors: dict[str, str]      # tenant name -> the one-line reason its file was refused


def load_all(top: Config, keep: Mapping[str, Tenant] | None = None) -> Loaded:
    """Every tenant of `top` (the implicit one without tenants_dir).

    `keep`: the tenants running now (a reload). A file that did not change keeps its tenant as is; a file
    refused now keeps its last good settings (reported in `errors`); a tenant whose file is gone is gone.
    Two files claiming one domain, DID or client_id: the later one (by name; a changed one after the
    unchanged) is refused, with an error naming both files."""
    if top.tenants_dir is None:
        return Loaded({IMPLICIT: implicit(top)}, {})
    keep = keep or {}
    candidates: dict[str, Tenant] = {}
    errors: dict[str, str] = {}
    for path in tenant_files(top.tenants_dir):
        try:
            tenant = read_file(path, top, keep.get(path.stem))
        except ConfigError as exc:
            errors[path.stem] = str(exc)
            if path.stem in keep:
                candidates[path.stem] = keep[path.stem]
            continue
        candidates[tenant.name] = tenant
    unchanged = [t for t in candidates.values() if keep.get(t.name) is t]
    changed = [t for t in candidates.values() if keep.get(t.name) is not t]
    accepted: dict[str, Tenant] = {}
    claims: dict[tuple[str, str], Tenant] = {}
    for tenant in [*unchanged, *changed]:
        clash = next(((kind, value) for kind, value in claims_of(tenant) if (kind, value) in claims), None)
        if clash is not None:
            other = claims[clash]
            errors[tenant.name] = (f"{tenant.where}: {clash[0]}: {_shown(clash)} is already {other.label}'s "
                                   f"({other.where})")
            fallback = keep.get(tenant.name)
            if fallback is None or fallback is tenant:
                continue
            tenant = fallback   # the last good settings, if they do not clash too
            if any(c in claims for c in claims_of(tenant)):
                continue
        accepted[tenant.name] = tenant
        claims.update((c, tenant) for c in claims_of(tenant))
    return Loaded(dict(sorted(accepted.items())), errors)


def claims_of(tenant: Tenant) -> Iterable[tuple[str, str]]:
    """What no two tenants may share."""
    for domain in tenant.domains:
        yield "domains", domain
    for did in tenant.cfg.external_phones:
        yield "external_phones", did
    yield "integration.client_id", tenant.cfg.integration.client_id


def _shown(clash: tuple[str, str]) -> str:
    kind, value = clash
    return "the same client_id" if kind == "integration.client_id" else repr(value)
