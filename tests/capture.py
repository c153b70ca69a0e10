"""Captured FreeSWITCH events as Python dicts, for tests that drive the call model directly.

Scenarios the lab did not capture (ring groups, transfers) are composed from captured
legs: real headers, with only ids, destinations and causes changed.
"""

from __future__ import annotations

import functools
import pathlib
import uuid as uuidlib

from fsbridge.esl.protocol import FrameReader, parse_event

ESL = pathlib.Path(__file__).parent / "fixtures" / "esl"
SCENARIOS = ("inbound_answered", "inbound_no_answer", "inbound_busy", "inbound_ext_no_answer",
             "outbound_ext_dial", "outbound_originate_answered")


@functools.cache
def _load(name: str, fmt: str) -> tuple[dict, ...]:
    frames = FrameReader().feed((ESL / f"{name}.{fmt}.raw").read_bytes())
    return tuple(parse_event(f) for f in frames if f.content_type.startswith("text/event-"))


def events(name: str, fmt: str = "plain") -> list[dict]:
    return [dict(e) for e in _load(name, fmt)]


def legs(evs: list[dict]) -> list[str]:
    """Channel uuids in order of first appearance (the a-leg first)."""
    seen: dict[str, None] = {}
    for e in evs:
        if e.get("Unique-ID"):
            seen.setdefault(e["Unique-ID"])
    return list(seen)


def rename(evs: list[dict], old: str, new: str | None = None) -> tuple[list[dict], str]:
    """The same events with one uuid replaced everywhere it appears."""
    new = new or str(uuidlib.uuid4())
    return [{k: v.replace(old, new) if isinstance(v, str) else v for k, v in e.items()} for e in evs], new


def set_fields(evs: list[dict], **fields: str) -> list[dict]:
    out = []
    for e in evs:
        e = dict(e)
        for key, value in fields.items():
            if key.replace("__", "-") in e:
                e[key.replace("__", "-")] = value
        out.append(e)
    return out


def of_leg(evs: list[dict], uuid: str) -> list[dict]:
    return [e for e in evs if e.get("Unique-ID") == uuid]
