"""How a call ended, in the CRM's two vocabularies (freeswitch-notes.md, "Hangup cause -> CRM value").

The history's `result` and the call event's `hangupStatus` are different enums
(`no answer` vs `no answered`), so both are decided here, once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outcome:
    result: str          # calls/upload `result`
    hangup_status: str   # call/event `hangupStatus`


ANSWERED = Outcome("answered", "answered")
BUSY = Outcome("busy", "busy")
NO_ANSWER = Outcome("no answer", "no answered")
CANCEL = Outcome("no answer", "cancel")
FAILED = Outcome("failed", "failed")
NOT_ALLOWED = Outcome("not allowed", "failed")
UNKNOWN = Outcome("unknown", "failed")

_BY_CAUSE: dict[str, Outcome] = {
    **dict.fromkeys(("USER_BUSY", "CALL_REJECTED", "BUSY_EVERYWHERE", "DECLINE"), BUSY),
    **dict.fromkeys(("NO_ANSWER", "NO_USER_RESPONSE", "PROGRESS_TIMEOUT", "ALLOTTED_TIMEOUT",
                     "MEDIA_TIMEOUT"), NO_ANSWER),
    # The caller hung up while it rang; NORMAL_CLEARING on a leg nobody answered means the same.
    **dict.fromkeys(("ORIGINATOR_CANCEL", "NORMAL_CLEARING", "NORMAL_UNSPECIFIED"), CANCEL),
    **dict.fromkeys(("OUTGOING_CALL_BARRED", "INCOMING_CALL_BARRED"), NOT_ALLOWED),
    **dict.fromkeys((
        "UNALLOCATED_NUMBER", "NO_ROUTE_TRANSIT_NET", "NO_ROUTE_DESTINATION", "CHANNEL_UNACCEPTABLE",
        "NUMBER_CHANGED", "DESTINATION_OUT_OF_ORDER", "INVALID_NUMBER_FORMAT", "FACILITY_REJECTED",
        "NORMAL_CIRCUIT_CONGESTION", "NETWORK_OUT_OF_ORDER", "NORMAL_TEMPORARY_FAILURE",
        "SWITCH_CONGESTION", "REQUESTED_CHAN_UNAVAIL", "BEARERCAPABILITY_NOTAVAIL",
        "BEARERCAPABILITY_NOTIMPL", "SERVICE_UNAVAILABLE", "SERVICE_NOT_IMPLEMENTED",
        "INCOMPATIBLE_DESTINATION", "RECOVERY_ON_TIMER_EXPIRE", "GATEWAY_DOWN", "USER_NOT_REGISTERED",
        "SUBSCRIBER_ABSENT", "MANDATORY_IE_MISSING", "INVALID_GATEWAY", "INVALID_URL", "INVALID_PROFILE",
        "DESTINATION_OUT_OF_ORDER", "EXCHANGE_ROUTING_ERROR", "CRASH", "SYSTEM_SHUTDOWN",
        "MANAGER_REQUEST", "NO_PICKUP",
    ), FAILED),
}

# Causes that end one leg of a call without saying anything about the call: the
# losers of a ring group, and legs left behind by a transfer.
NOT_THE_CALLS_END = frozenset({"LOSE_RACE", "PICKED_OFF", "BLIND_TRANSFER", "ATTENDED_TRANSFER"})

# When several legs give reasons, the most telling one wins.
_RANK = {CANCEL: 4, BUSY: 3, NO_ANSWER: 2, NOT_ALLOWED: 1, FAILED: 1, UNKNOWN: 0}


def outcome_of_cause(cause: str) -> Outcome:
    return _BY_CAUSE.get(cause, UNKNOWN)


def unanswered_outcome(counterpart_causes: list[str], own_cause: str) -> Outcome:
    """Why nobody talked: the legs that were called say more than the caller's own leg."""
    telling = [outcome_of_cause(c) for c in counterpart_causes if c and c not in NOT_THE_CALLS_END]
    if telling:
        return max(telling, key=_RANK.__getitem__)
    return outcome_of_cause(own_cause) if own_cause not in NOT_THE_CALLS_END else CANCEL
