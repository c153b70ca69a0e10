"""FinishedCall -> one entry of retailCRM's call history (`POST /api/v5/telephony/calls/upload`).

Pure functions of the call and the settings, so the uploader can build entries at send time: a call
quarantined because of a settings mistake (a manager missing from the map, a wrong time zone) is built
afresh from the corrected settings when it is re-queued.
"""

from __future__ import annotations

import datetime
import logging
import os
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fsbridge.calls.model import FinishedCall
from fsbridge.record_links import EXTENSIONS, RecordLinks, valid_record_id

log = logging.getLogger("fsbridge.history")

CRM_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def crm_date(epoch_us: int, zone: datetime.tzinfo) -> str:
    """UTC microseconds -> `Y-m-d H:i:s` on the CRM account's wall clock.

    The CRM's dates carry no zone and are read in the account's zone, while FreeSWITCH's `*_stamp`
    strings are in the PBX's local zone, which need not be the same: only the UTC epochs are safe.
    Seconds are truncated, as FreeSWITCH truncates its own stamps.
    """
    seconds = epoch_us // 1_000_000
    return datetime.datetime.fromtimestamp(seconds, tz=zone).strftime(CRM_DATE_FORMAT)


def record_id_of(path: str) -> tuple[str, str] | None:
    """`/…/recordings/<uuid>.wav` -> ("<uuid>", "wav"), or None if the name is not a recording of ours."""
    stem, dot, ext = os.path.basename(path).rpartition(".")
    if not dot or not valid_record_id(stem) or ext not in EXTENSIONS:
        return None
    return stem, ext


def has_talk_recording(call: FinishedCall) -> bool:
    """A manager talked and the recording has sound in it: the one rule for linking and for converting it.

    An unanswered call's recording is the ring tone or silence. A length FreeSWITCH did not report (None)
    is not a zero length: the talk happened."""
    return call.answered and bool(call.recording_path) and call.recording_ms != 0


@dataclass(frozen=True)
class CdrBuilder:
    """The settings a history entry depends on.

    zone:        the CRM account's time zone (`crm.timezone`)
    managers:    extension -> retailCRM user id (`managers`); adds `userId` beside `code`
    links:       signs recording links (`integration.public_url`, `records.link_secret`); None = no recordUrl
    record_ext:  format the link names (e.g. "mp3" when recordings are converted); None = the file's own
    unassigned_code: `code` for a call that reached no manager (the CRM requires code or userId)
    """

    zone: datetime.tzinfo
    managers: Mapping[str, int] = field(default_factory=dict)
    links: RecordLinks | None = None
    record_ext: str | None = None
    unassigned_code: str | None = None

    @classmethod
    def create(cls, timezone: str, managers: Mapping[str, int] | None = None, *,
               public_url: str | None = None, record_secret: str | None = None,
               previous_record_secrets: tuple[str, ...] = (), record_ext: str | None = None,
               unassigned_code: str | None = None) -> CdrBuilder:
        links = RecordLinks(public_url, record_secret, previous_record_secrets) \
            if public_url and record_secret else None
        return cls(zoneinfo.ZoneInfo(timezone), dict(managers or {}), links, record_ext, unassigned_code)

    def build(self, call: FinishedCall) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "date": crm_date(call.start_us, self.zone),
            "type": call.direction,
            "phone": call.phone,
            "result": call.result,
            "duration": call.duration,
            "durationWaiting": call.duration_waiting,
            "externalId": call.call_id,
        }
        code = call.manager_code or self.unassigned_code
        if code:
            entry["code"] = code
            user_id = self.managers.get(code)
            if user_id is not None:
                entry["userId"] = user_id
        if call.external_phone:
            entry["externalPhone"] = call.external_phone
        if call.site:
            entry["site"] = call.site
        url = self.record_url(call)
        if url:
            entry["recordUrl"] = url
        return entry

    def record_url(self, call: FinishedCall) -> str | None:
        """A link only for a recording of talk (has_talk_recording) named as ours."""
        if self.links is None or not has_talk_recording(call):
            return None
        ref = record_id_of(call.recording_path or "")
        if ref is None:
            log.warning("call %s: recording %s is not named <uuid>.<wav|mp3|ogg>; no recordUrl",
                        call.call_id, os.path.basename(call.recording_path))
            return None
        record_id, ext = ref
        return self.links.url(record_id, self.record_ext or ext)
