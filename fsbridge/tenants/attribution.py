"""Which company a leg is: the call model asks once per new leg (tracker.py), and a call is then the
company of its first claimed leg.

A leg is claimed by the tenant whose domain its headers name, else (a call from a trunk) by the tenant
whose DID it came in on. Where the domain is, in FreeSWITCH 1.10 (freeswitch-notes.md, and FusionPBX, whose
dialplan contexts are the domain names):
- a phone calling in: `variable_domain_name` (set by directory authentication), the From host
  (`variable_sip_from_host`, the realm it registered in), the request host, the context;
- a leg to a user (`user/100@acme...`): `variable_dialed_domain` first (a bridge may carry the caller's
  `domain_name` over to it), then `variable_domain_name`, the context;
- a leg from a trunk: never its From host (anyone on the Internet writes what they like there), only what
  the dialplan set (`variable_domain_name`) or the DID.
Only configured domains count, so IP addresses and the trunks' hosts never match anything. A host may carry
its port: FreeSWITCH writes `variable_sip_to_host` of a leg it dials as host:port (the e2e captures,
tests/fixtures/esl/tenants_*.raw), so `sofia/internal/100@acme...:5060` is acme's like `user/100@acme...`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from fsbridge.calls.legs import Directory
from fsbridge.config import TrunkSettings, normalize_number
from fsbridge.esl.protocol import Event
from fsbridge.tenants.settings import Tenant

_FROM_PHONE = ("variable_domain_name", "variable_sip_from_host", "variable_sip_req_host", "variable_sip_to_host",
               "Caller-Context")
_TO_USER = ("variable_dialed_domain", "variable_domain_name", "variable_sip_req_host", "variable_sip_to_host",
            "Caller-Context")
_FROM_TRUNK = ("variable_domain_name", "Caller-Context")
_PORT = re.compile(r":[0-9]{1,5}$")


def directory_of(tenant: Tenant, trunks: TrunkSettings) -> Directory:
    cfg = tenant.cfg
    return Directory(managers=cfg.manager_codes, external_phones=dict(cfg.external_phones),
                     gateways=frozenset(trunks.gateways), contexts=frozenset(trunks.contexts),
                     profiles=frozenset(trunks.profiles), tenant=tenant.name)


class Attribution:
    """The tracker's directory when there are tenant files: each leg gets its company's directory."""

    def __init__(self, tenants: Iterable[Tenant], trunks: TrunkSettings) -> None:
        self.directories: dict[str, Directory] = {}
        self.by_domain: dict[str, Directory] = {}
        self.by_did: dict[str, Directory] = {}
        for tenant in tenants:
            directory = self.directories[tenant.name] = directory_of(tenant, trunks)
            self.by_domain.update(dict.fromkeys(tenant.domains, directory))
            self.by_did.update(dict.fromkeys(tenant.cfg.external_phones, directory))
        # Trunk settings are the provider's: any directory answers is_trunk() the same.
        self._trunks = Directory(managers=frozenset(), external_phones={}, gateways=frozenset(trunks.gateways),
                                 contexts=frozenset(trunks.contexts), profiles=frozenset(trunks.profiles))

    def for_event(self, ev: Event) -> Directory | None:
        inbound = ev.get("Call-Direction") == "inbound"
        trunk = self._trunks.is_trunk(ev)
        keys = _FROM_TRUNK if trunk else _FROM_PHONE if inbound else _TO_USER
        for key in keys:
            value = ev.get(key)
            if value:
                found = self.by_domain.get(_PORT.sub("", value.lower()))
                if found is not None:
                    return found
        if inbound:
            return self.by_did.get(normalize_number(ev.get("Caller-Destination-Number", "")).lstrip("+"))
        return None

    def named(self, tenant: str | None) -> Directory | None:
        return None if tenant is None else self.directories.get(tenant)

    def tenant_of_domain(self, domain: str | None) -> str | None:
        """The tenant of a domain (e.g. a CDR document's variables.domain_name), None if nobody's."""
        found = self.by_domain.get((domain or "").lower())
        return None if found is None else found.tenant
