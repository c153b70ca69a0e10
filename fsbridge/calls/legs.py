"""Who is on a channel: a manager's phone, a customer, or neither.

`Call-Direction` only says who sent FreeSWITCH the INVITE (freeswitch-notes.md), so the
role of a leg is decided from what the PBX admin told us: manager extensions, trunk
gateways / contexts / profiles, and the shape of the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fsbridge.config import Config, normalize_number
from fsbridge.esl.protocol import Event

if TYPE_CHECKING:
    from fsbridge.calls.tracker import Call

CUSTOMER = "customer"
MANAGER = "manager"
OTHER = "other"

# Shorter numbers are internal (extensions, feature codes, voicemail), not customers.
MIN_CUSTOMER_DIGITS = 5


@dataclass(slots=True, eq=False)
class Leg:
    uuid: str
    role: str
    inbound: bool                 # FreeSWITCH received this leg's INVITE
    code: str | None              # the manager's extension, for manager legs
    number: str                   # the customer's number, for customer legs
    dialled: str                  # Caller-Destination-Number
    caller_id: str                # Caller-Caller-ID-Number
    created_us: int
    tenant: str | None = None     # the company whose directory classified it; None: nobody's (see attribution.py)
    call: Call | None = None
    rang: bool = False
    ended: bool = False
    end_us: int = 0
    hangup_cause: str = ""
    last_seen: int = 0            # the tracker's event counter when this leg was last touched
    loopback_peer: str = ""       # the other half of a loopback/ pair (loopback-a <-> loopback-b)
    partner: str = ""             # the leg it was last bridged to (kept after an unbridge)


@dataclass(frozen=True, slots=True)
class Directory:
    """The admin's knowledge of the PBX, in the form the classifier needs."""

    managers: frozenset[str]
    external_phones: dict[str, str]
    gateways: frozenset[str] = frozenset()
    contexts: frozenset[str] = frozenset()
    profiles: frozenset[str] = frozenset()
    # The company this directory is: "" for the single company, None for "nobody's" (no tenant claims a leg).
    tenant: str | None = ""

    @classmethod
    def from_config(cls, cfg: Config) -> Directory:
        return cls(managers=cfg.manager_codes, external_phones=dict(cfg.external_phones),
                   gateways=frozenset(cfg.trunks.gateways), contexts=frozenset(cfg.trunks.contexts),
                   profiles=frozenset(cfg.trunks.profiles))

    # A single company's directory is its own attribution: every leg is its (see tenants/attribution.py).
    def for_event(self, ev: Event) -> Directory | None:
        return self

    def named(self, tenant: str | None) -> Directory | None:
        return self

    def is_trunk(self, ev: Event) -> bool:
        gateway = ev.get("variable_sip_gateway_name") or ev.get("variable_sip_gateway")
        if gateway and (not self.gateways or gateway in self.gateways):
            return True
        if self.profiles and ev.get("variable_sofia_profile_name") in self.profiles:
            return True
        return bool(self.contexts) and ev.get("Call-Direction") == "inbound" \
            and ev.get("Caller-Context") in self.contexts

    def site_of(self, number: str | None) -> str | None:
        return self.external_phones.get(number.lstrip("+")) if number else None

    def external(self, number: str) -> str | None:
        """A number worth sending as `externalPhone`: a known DID, or at least not an extension."""
        if not number or number in self.managers:
            return None
        if number.lstrip("+") in self.external_phones or len(number.lstrip("+")) >= MIN_CUSTOMER_DIGITS:
            return number
        return None


def classify(ev: Event, directory: Directory, created_us: int) -> Leg:
    inbound = ev.get("Call-Direction") == "inbound"
    caller_id = ev.get("Caller-Caller-ID-Number", "")
    dialled = ev.get("Caller-Destination-Number", "")
    trunk = directory.is_trunk(ev)
    managers = directory.managers
    role, code, number = OTHER, None, ""
    if ev.get("Channel-Name", "").startswith("loopback/"):
        # Rule (loopback legs): a loopback/ pair (FusionPBX ring groups and follow-me dial through it) is
        # FreeSWITCH talking to itself. Its -a half carries the customer's caller id and the extension
        # dialled, its -b half enters the dialplan like a new inbound call: neither is a customer or a
        # manager. The tracker joins both to the customer's call and looks through them at bridges.
        return Leg(uuid=ev["Unique-ID"], role=OTHER, inbound=inbound, code=None, number="",
                   dialled=normalize_number(dialled), caller_id=normalize_number(caller_id), created_us=created_us,
                   tenant=directory.tenant, loopback_peer=ev.get("variable_other_loopback_leg_uuid", ""))
    dialed_user = ev.get("variable_dialed_user", "")
    if not inbound and dialed_user in managers:
        # Rule (forwarding): FreeSWITCH sets dialed_user on the leg it creates for `user/100`. That leg
        # is manager 100's wherever the directory sends it: their desk phone, or their mobile through a
        # trunk when 100 forwards its calls (call forwarding, follow-me). Not a customer.
        return Leg(uuid=ev["Unique-ID"], role=MANAGER, inbound=False, code=dialed_user, number="",
                   dialled=normalize_number(dialled), caller_id=normalize_number(caller_id), created_us=created_us,
                   tenant=directory.tenant)
    if inbound:
        # A phone registered as extension 100 calls in with its user name and caller id.
        user = ev.get("variable_sip_from_user") or ev.get("Caller-Username") or caller_id
        who = user if user in managers else caller_id if caller_id in managers else None
        if who and not trunk:
            role, code = MANAGER, who
        else:
            number = normalize_number(caller_id)
    else:
        target = ev.get("variable_dialed_user") or dialled or ev.get("Caller-Callee-ID-Number", "")
        if target in managers and not trunk:
            role, code = MANAGER, target
        else:
            number = normalize_number(dialled or ev.get("Caller-Callee-ID-Number", ""))
    if role == OTHER and number and (trunk or len(number.lstrip("+")) >= MIN_CUSTOMER_DIGITS):
        role = CUSTOMER
    return Leg(uuid=ev["Unique-ID"], role=role, inbound=inbound, code=code, number=number,
               dialled=normalize_number(dialled), caller_id=normalize_number(caller_id), created_us=created_us,
               tenant=directory.tenant)
