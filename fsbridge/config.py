"""Declarative, self-validating settings.

Every setting is a dataclass field that carries its own documentation, its check and
(for secrets) the environment variable that overrides it, in the spirit of gunicorn's
config.py. `load()` turns a YAML file into a `Config`, or raises `ConfigError` with one
line that names the key and says what was expected: fsbridge runs unattended, and a
traceback on start-up helps nobody.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names the key."""


_REQUIRED: Any = object()
# A manager extension: the one rule for the config, /retailcrm/status, click-to-call and the Lua script.
EXTENSION_RE = re.compile(r"[0-9]{1,16}")
# A FreeSWITCH domain as FusionPBX names them: a host name (it also names a directory of recordings, and
# goes into dial strings as {domain}).
DOMAIN_RE = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_SITE_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def setting(default: Any, doc: str, check: Callable[[Any], Any] | None = None,
            env: str | None = None, secret: bool = False) -> Any:
    """Declare a setting: its default (or `_REQUIRED`), doc line, check and env override."""
    meta = {"doc": doc, "check": check, "env": env, "secret": secret, "required": default is _REQUIRED}
    if default is _REQUIRED:
        return field(default=None, metadata=meta)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# -- checks: each returns the normalised value or raises ValueError("expected ...") --

def _string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a string")
    text = str(value)
    if _CONTROL.search(text):
        raise ValueError("expected a single-line string")
    return text


# A reload of a thousand tenant files checks ~10 000 strings: a regex, not a Python loop per character.
_CONTROL = re.compile(r"[\x00-\x1f]")


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text.strip():
        raise ValueError("expected a non-empty string")
    return text


def _secret(min_len: int) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _nonempty(value)
        if len(text) < min_len:
            raise ValueError(f"expected at least {min_len} characters (it is a secret)")
        # Secrets travel in HTTP headers and ESL command lines, which carry ASCII only.
        if not (text.isascii() and text.isprintable()):
            raise ValueError("expected printable ASCII characters only")
        return text
    return check


def _number(lo: float, hi: float, kind: type = float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'} from {lo} to {hi}")
        if not lo <= value <= hi:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'} from {lo} to {hi}")
        return kind(value)
    return check


def _rate(value: Any) -> float:
    if value == 0 and not isinstance(value, bool):
        return 0.0
    try:
        return float(_number(1, 1000)(value))
    except ValueError:
        raise ValueError("expected 0 (no pacing) or a number from 1 to 1000") from None


def _host(value: Any) -> str:
    text = _nonempty(value)
    if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", text):
        raise ValueError("expected a host name or IP address")
    return text


def _url(value: Any) -> str:
    text = _nonempty(value).rstrip("/")
    if not text.isascii() or any(c.isspace() or not c.isprintable() for c in text):
        # It goes into request lines and Host headers as is: an internationalised domain in its xn-- form.
        raise ValueError("expected an http(s) URL of ASCII characters without spaces "
                         "(an internationalised domain in its xn-- form)")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("expected an http(s) URL such as https://example.retailcrm.ru")
    return text


def _listen(value: Any) -> str:
    text = _nonempty(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError('expected "host:port", e.g. "127.0.0.1:8088"')
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host not in ("localhost", ""):
            raise ValueError('expected "IP:port", e.g. "127.0.0.1:8088"') from None
    return text


def _timezone(value: Any) -> str:
    text = _nonempty(value)
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone such as Europe/Moscow") from None
    return text


def _code(value: Any) -> str:
    text = _nonempty(value)
    if not _NAME.fullmatch(text):
        raise ValueError("expected letters, digits, '-', '_' or '.' (at most 64)")
    return text


def _managers(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping) or not value:
        raise ValueError('expected a mapping of extension to retailCRM user id, e.g. {"100": 1}')
    out: dict[str, int] = {}
    for ext, user in value.items():
        ext_s = str(ext)
        if not EXTENSION_RE.fullmatch(ext_s):
            raise ValueError(f"expected digit-only extensions of 1 to 16 digits, got {ext_s!r}")
        if isinstance(user, bool) or not isinstance(user, int) or user <= 0:
            raise ValueError(f"expected a positive integer user id for extension {ext_s}, got {user!r}")
        out[ext_s] = user
    return out


def _phones(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError('expected a mapping of external number to shop code, e.g. {"74999999999": shop1}')
    out: dict[str, str] = {}
    for phone, site in value.items():
        digits = normalize_number(str(phone))
        if not digits or not 5 <= len(digits.lstrip("+")) <= 16:
            raise ValueError(f"expected external numbers of 5 to 16 digits, got {phone!r}")
        site_s = str(site)
        if not _SITE_CODE.fullmatch(site_s):
            raise ValueError(f"expected a shop (site) code for {phone}, got {site!r}")
        out[digits.lstrip("+")] = site_s
    return out


def _networks(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError('expected a list of IP addresses or networks, e.g. ["127.0.0.0/8", "::1"]')
    out: list[str] = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ValueError(f"expected IP addresses or networks (CIDR), got {item!r}") from None
    return out


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and _NAME.fullmatch(v) for v in value):
        raise ValueError("expected a list of names (letters, digits, '-', '_', '.')")
    return list(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value
    return check


def _path(value: Any) -> Path:
    return Path(_nonempty(value)).expanduser()


def normalize_number(raw: str) -> str:
    """'+7 (912) 123-45-67' -> '+79121234567'; anything but digits and a leading '+' is dropped."""
    text = raw.strip()
    digits = "".join(c for c in text if c.isdigit() and c.isascii())
    return ("+" + digits) if text.startswith("+") and digits else digits


# -- the settings, section by section --

@dataclass(frozen=True)
class FreeSwitchSettings:
    host: str = setting("127.0.0.1", "Event socket address of FreeSWITCH", _host)
    port: int = setting(8021, "Event socket port", _number(1, 65535, int))
    password: str = setting("ClueCon", "Event socket password", _nonempty, env="FSBRIDGE_ESL_PASSWORD", secret=True)
    connect_timeout: float = setting(5.0, "Seconds to connect and authenticate", _number(0.1, 120))
    command_timeout: float = setting(10.0, "Seconds to wait for the reply to any ESL command", _number(0.1, 300))
    heartbeat_timeout: float = setting(
        65.0, "Seconds of silence after which the connection is considered dead (FreeSWITCH sends HEARTBEAT "
        "every 20 s)", _number(5, 3600))
    reconnect_max_delay: float = setting(30.0, "Upper bound of the reconnect backoff, seconds", _number(0.1, 600))
    reconcile_interval: float = setting(
        300.0, "Seconds between checks of tracked calls against `show channels` (catches lost events)",
        _number(5, 86400))
    cdr_dir: Path | None = setting(
        "", "Where mod_json_cdr writes one <uuid>.cdr.json per finished leg (its log-dir, file mode; "
        "conf/freeswitch/autoload_configs/json_cdr.conf.xml): the calls that end while fsbridge is down or cut "
        "off are recovered from it. Empty: off (such calls are lost)",
        lambda value: _optional_path(value))  # defined further down, with the other path checks
    cdr_keep_days: int = setting(
        7, "Days fsbridge keeps a CDR document it has accounted for before deleting it (it never deletes one it "
        "has not); 0: never delete (clean the directory yourself)", _number(0, 3650, int))


@dataclass(frozen=True)
class CrmSettings:
    url: str = setting(_REQUIRED, "retailCRM account URL, e.g. https://example.retailcrm.ru", _url)
    api_key: str = setting(_REQUIRED, "retailCRM API key (needs the telephony scopes)", _secret(8),
                           env="FSBRIDGE_CRM_API_KEY", secret=True)
    timezone: str = setting(_REQUIRED, "The CRM account's time zone (history dates carry no zone)", _timezone)
    timeout: float = setting(10.0, "Seconds to wait for one CRM request", _number(0.5, 300))
    telephony_rate: float = setting(
        40.0, "Requests per second allowed to /api/v5/telephony; 0 sends without pacing (only for an endpoint "
        "without retailCRM's limit, such as a test bed)", _rate)
    card_max_age: float = setting(
        30.0, "A call event (pop-up card) not delivered within this many seconds is dropped and counted",
        _number(1, 3600))
    card_workers: int = setting(
        8, "Concurrent deliveries of call events (8 keep retailCRM's 40 requests/s even at 200 ms a request)",
        _number(1, 64, int))
    card_queue_size: int = setting(
        10000, "Call events waiting per worker; when full, the oldest makes room (counted as queue_full)",
        _number(10, 1_000_000, int))


@dataclass(frozen=True)
class IntegrationSettings:
    code: str = setting("fsbridge", "Integration module code in retailCRM", _code)
    client_id: str = setting(_REQUIRED, "Long random secret the CRM sends back on every callback",
                             _secret(16), env="FSBRIDGE_CLIENT_ID", secret=True)
    public_url: str = setting(_REQUIRED, "Where the CRM reaches fsbridge's HTTP API (usually a TLS proxy)", _url)
    name: str = setting("FreeSWITCH", "Name shown in the CRM's integration list", _nonempty)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value




def _secrets(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("expected a list of secrets")
    return [_secret(16)(v) for v in value]


def _same_socket(a: str, b: str) -> bool:
    """Whether two checked listen addresses would bind the same port (port 0: each gets its own)."""
    (host_a, _, port_a), (host_b, _, port_b) = a.rpartition(":"), b.rpartition(":")
    if port_a != port_b or int(port_a) == 0:
        return False
    hosts = {"127.0.0.1" if h == "localhost" else h.strip("[]") for h in (host_a, host_b)}
    return len(hosts) == 1 or bool(hosts & {"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class HttpSettings:
    listen: str = setting("127.0.0.1:8088", "Address of the public HTTP listener, the one the TLS reverse proxy "
                          "forwards to: retailCRM's callbacks (/retailcrm/...), record links (/records/...), "
                          "/logo.svg", _listen)
    internal_listen: str = setting("127.0.0.1:8090", "Address of the internal HTTP listener, never to be "
                                   "proxied: /routing/manager (the dialplan's Lua script), /metrics, /healthz, "
                                   "/healthz/live", _listen)
    timeout: float = setting(60.0, "Seconds a connection may stay idle or stalled before it is closed",
                             _number(1, 3600))
    max_connections: int = setting(1000, "Concurrent HTTP connections at most", _number(1, 100_000, int))
    zero_copy: bool = setting(True, "Send recordings with sendfile()", _bool)

    def __post_init__(self) -> None:
        if _same_socket(self.listen, self.internal_listen):
            raise ConfigError(f"http.internal_listen: expected an address other than http.listen's, got "
                              f"{self.internal_listen!r} (the internal routes must not be served publicly)")


def _optional_path(value: Any) -> Path | None:
    text = _string(value)
    return Path(text).expanduser() if text else None


def _optional(pattern: re.Pattern[str], expected: str) -> Callable[[Any], str]:
    """A string that is empty or matches `pattern`."""
    def check(value: Any) -> str:
        text = _string(value)
        if text and not pattern.fullmatch(text):
            raise ValueError(f"expected {expected} (or empty)")
        return text
    return check


@dataclass(frozen=True)
class HistorySettings:
    strategy: str = setting("immediate", "immediate: upload within a second of hangup; periodic: every `period`",
                            _choice("immediate", "periodic"))
    period: float = setting(10.0, "Minutes between uploads with the periodic strategy", _number(0.1, 1440))
    outbox_path: Path | None = setting("", "The call outbox (SQLite); empty: <storage.dir>/calls-outbox.sqlite3",
                                       _optional_path)
    concurrency: int = setting(4, "Upload requests in flight (to reach 40/s when the CRM is far away)",
                               _number(1, 16, int))
    upload_workers: int = setting(
        8, "With tenants_dir: upload workers shared by all tenants, taking turns (one batch each, round robin) "
        "over the tenants with pending calls; a tenant has one upload in flight at most", _number(1, 256, int))
    retry_max_delay: float = setting(60.0, "Longest wait between retries while the CRM is down (retries never stop)",
                                     _number(1, 3600))
    keep_sent_days: int = setting(30, "Days delivered calls stay in the outbox (0: forever)", _number(0, 3650, int))
    fsync: bool = setting(False, "fsync every outbox write: survives a power cut, not only a crash (slower)", _bool)
    unassigned_code: str = setting(
        "", "Extension credited with calls that reached no manager (the CRM needs one); empty: such calls are "
        "quarantined", _optional(EXTENSION_RE, "a manager extension (digits)"))


@dataclass(frozen=True)
class LogSettings:
    level: str = setting("info", "debug, info, warning or error", _choice("debug", "info", "warning", "error"))
    format: str = setting("text", "text (one readable line per thing) or json (one object per line)",
                          _choice("text", "json"))


@dataclass(frozen=True)
class StorageSettings:
    dir: Path = setting("/var/lib/fsbridge", "Where fsbridge keeps its state (call outbox, manager statuses)",
                        _path)


@dataclass(frozen=True)
class RecordsSettings:
    dir: Path = setting("/usr/local/freeswitch/var/lib/freeswitch/recordings",
                        "Where record_session writes <uuid>.wav (FreeSWITCH's $${recordings_dir})", _path)
    link_secret: str = setting(_REQUIRED, "HMAC key of the recordUrl links the CRM stores forever",
                               _secret(16), env="FSBRIDGE_RECORD_SECRET", secret=True)
    previous_link_secrets: list = setting([], "Old link secrets still accepted after a rotation", _secrets,
                                          secret=True)
    prefer_mp3: bool = setting(False, "Convert recordings to MP3 after the call and link the MP3", _bool)
    mp3_encoder: str = setting("auto", "MP3 encoder: auto, lame or ffmpeg (WAV is kept if none works)",
                               _choice("auto", "lame", "ffmpeg"))
    mp3_bitrate_kbps: int = setting(32, "MP3 bitrate", _number(8, 320, int))
    accel_redirect_prefix: str = setting(
        "", 'Behind nginx: answer with X-Accel-Redirect to this internal location (e.g. "/_records/")',
        _optional(re.compile(r"/[A-Za-z0-9_/-]*/"), 'an nginx internal location such as "/_records/"'))


@dataclass(frozen=True)
class RoutingSettings:
    timeout: float = setting(
        1.0, "Seconds GET /routing/manager waits for retailCRM's responsible manager before answering empty (the "
        "dialplan then takes its fallback); keep it below the Lua script's fsbridge_timeout", _number(0.1, 10))
    cache_ttl: float = setting(60.0, "Seconds a caller's responsible manager is remembered (0: ask every call)",
                               _number(0, 86400))
    negative_ttl: float = setting(10.0, "Seconds an answer of \"no manager\" is remembered (0: ask every call)",
                                  _number(0, 3600))
    cache_size: int = setting(10000, "Callers remembered at most; the least recently used are forgotten first",
                              _number(1, 1_000_000, int))
    ignore_status: bool = setting(
        False, "Ask retailCRM with ignoreStatus=1 and leave the decision to the statuses it sends fsbridge "
        "(changeUserStatusUrl); by default a manager must be free in both", _bool)
    breaker: float = setting(
        2.0, "Seconds lookups leave a failing retailCRM alone (the fallback rings at once) after a failed lookup; "
        "doubles with each further failure, up to breaker_max (0: always ask, once)", _number(0, 60))
    breaker_max: float = setting(30.0, "Longest such pause, in seconds", _number(0, 600))
    allow_from: list = setting(["127.0.0.0/8", "::1/128"],
                               "Who may ask GET /routing/manager (FreeSWITCH on this host by default); requests "
                               "that came through a reverse proxy are refused whatever this says", _networks)


@dataclass(frozen=True)
class TrunkSettings:
    gateways: list = setting([], "Sofia gateways that lead to customers (legs through them are customer legs)",
                             _names)
    contexts: list = setting([], "Dialplan contexts of calls arriving from trunks (e.g. public)", _names)
    profiles: list = setting([], "Sofia profiles that face trunks only (e.g. external)", _names)


# What a dial-string template may contain besides its placeholders: an endpoint, a profile or
# gateway name, a host. No spaces, commas, braces, pipes, quotes or '&' (freeswitch-notes.md).
DIAL_TEMPLATE_RE = re.compile(r"(?:[A-Za-z0-9_./@:+-]|\{code\}|\{phone\}|\{gateway\}|\{domain\})+")


def _template(value: Any) -> str:
    text = _nonempty(value)
    if not DIAL_TEMPLATE_RE.fullmatch(text):
        raise ValueError("expected a dial string of letters, digits, '_./@:+-' and {code}, {phone}, {gateway}, "
                         "{domain}")
    return text


@dataclass(frozen=True)
class OriginateSettings:
    manager_dial: str = setting("user/{code}", "Dial string of a manager's phone; {code} is the extension",
                                _template)
    customer_dial: str = setting("sofia/gateway/{gateway}/{phone}",
                                 "Dial string of a customer; {phone} is the number clicked in the CRM", _template)
    gateway: str = setting("", "Sofia gateway for {gateway} in the dial strings (click-to-call is off while the "
                                "dial strings need one and it is empty)",
                          _optional(_NAME, "a sofia gateway name (letters, digits, '-', '_', '.')"))
    ring_timeout: int = setting(30, "Seconds the manager's phone rings before the click gives up",
                                _number(5, 300, int))
    ringing_wait: float = setting(5.0, "Seconds make-call waits for the manager's phone to start ringing",
                                  _number(0.5, 30))
    dedupe_window: float = setting(5.0, "The same click again within this many seconds starts no second call",
                                   _number(0, 60))


@dataclass(frozen=True)
class Config:
    freeswitch: FreeSwitchSettings
    crm: CrmSettings
    integration: IntegrationSettings
    http: HttpSettings
    storage: StorageSettings
    records: RecordsSettings
    history: HistorySettings
    log: LogSettings
    routing: RoutingSettings
    trunks: TrunkSettings
    originate: OriginateSettings
    managers: dict = setting(_REQUIRED, "Manager extension -> retailCRM user id", _managers)
    external_phones: dict = setting({}, "External number (DID) -> shop (site) code", _phones)
    tenants_dir: Path | None = setting(
        None, "Virtual PBX: a directory of <tenant>.yaml files, one per customer company (its domains, CRM, "
        "managers, DIDs; see fsbridge/tenants/settings.py); empty: this file describes the one company",
        _optional_path)

    @property
    def manager_codes(self) -> frozenset[str]:
        return frozenset(self.managers)

    @property
    def secrets(self) -> list[str]:
        """Every secret value, for the log filter that masks them (a tenant's own are added as loaded)."""
        values = [self.crm.api_key, self.integration.client_id, self.freeswitch.password,
                  self.records.link_secret, *self.records.previous_link_secrets]
        return [v for v in values if v]


_SECTIONS: dict[str, type] = {
    "freeswitch": FreeSwitchSettings,
    "crm": CrmSettings,
    "integration": IntegrationSettings,
    "http": HttpSettings,
    "storage": StorageSettings,
    "records": RecordsSettings,
    "history": HistorySettings,
    "log": LogSettings,
    "routing": RoutingSettings,
    "trunks": TrunkSettings,
    "originate": OriginateSettings,
}


# With tenants_dir these describe each company in its own file, so the top level may leave them out.
COMPANY_KEYS = frozenset({"crm.url", "crm.api_key", "crm.timezone", "integration.client_id", "managers"})


@functools.cache
def _declared(cls: type) -> dict[str, dataclasses.Field]:
    """The settings `cls` declares, by name (asked once per section of every tenant file at a reload)."""
    return {f.name: f for f in dataclasses.fields(cls) if "doc" in f.metadata}


def _apply(cls: type, raw: Any, prefix: str, env: Mapping[str, str], optional: frozenset[str] = frozenset()) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}: expected a mapping of settings")
    known = _declared(cls)
    for key in raw:
        if key not in known and key not in _SECTIONS:
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            did_you_mean = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(f"{prefix}{key}: unknown setting{did_you_mean}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        meta = f.metadata
        key = f"{prefix}{name}"
        if meta["env"] and env.get(meta["env"]):
            value = env[meta["env"]]
        elif name in raw and raw[name] is not None:
            value = raw[name]
        elif meta["required"] and key not in optional:
            via = f" (or set {meta['env']})" if meta["env"] else ""
            raise ConfigError(f"{key}: missing; {meta['doc']}{via}")
        else:
            continue
        try:
            values[name] = meta["check"](value) if meta["check"] else value
        except ValueError as exc:
            message = str(exc)
            if " got " not in message:
                message += ", got " + ("***" if meta["secret"] else repr(value))
            raise ConfigError(f"{key}: {message}") from None
    return values


def from_mapping(raw: Any, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("config: expected a YAML mapping at the top level")
    optional = COMPANY_KEYS if raw.get("tenants_dir") else frozenset()
    sections = {name: cls(**_apply(cls, raw.get(name), f"{name}.", env, optional))
                for name, cls in _SECTIONS.items()}
    top = _apply(Config, raw, "", env, optional)
    cfg = Config(**sections, **top)
    _cross_check(cfg)
    return cfg


def _cross_check(cfg: Config) -> None:
    if cfg.tenants_dir is not None and (cfg.managers or cfg.external_phones):
        key = "managers" if cfg.managers else "external_phones"
        raise ConfigError(f"{key}: with tenants_dir each company's {key} go in its own tenant file")
    if cfg.managers is None:
        return  # tenants_dir: the company settings are checked per tenant file
    if cfg.history.unassigned_code and cfg.history.unassigned_code not in cfg.managers:
        raise ConfigError("history.unassigned_code: expected one of the managers' extensions")
    if "{code}" not in cfg.originate.manager_dial:
        raise ConfigError("originate.manager_dial: expected {code} in it")
    if "{domain}" in cfg.originate.manager_dial + cfg.originate.customer_dial:
        raise ConfigError("originate: {domain} is a tenant's domain; expected it only in a tenant file")
    if "{phone}" not in cfg.originate.customer_dial:
        raise ConfigError("originate.customer_dial: expected {phone} in it")
    overlap = set(cfg.managers) & set(cfg.external_phones)
    if overlap:
        raise ConfigError(f"external_phones: {sorted(overlap)[0]} is also a manager extension")


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config: {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: cannot read {p}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config: {p} is not valid YAML{where}") from None
    return from_mapping(raw, env)


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every setting: documentation generated from the declarations."""
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(Config):
        if f.name in _SECTIONS:
            for sf in dataclasses.fields(_SECTIONS[f.name]):
                rows.append((f"{f.name}.{sf.name}", _default_of(sf), sf.metadata["doc"]))
        else:
            rows.append((f.name, _default_of(f), f.metadata["doc"]))
    return rows


def _default_of(f: dataclasses.Field) -> Any:
    if f.metadata.get("required"):
        return "(required)"
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]
