"""The call-history entry of each captured scenario, field by field, as retailCRM stores it."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import pytest

from fsbridge.calls.legs import Directory
from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.crm import RetailCRM
from fsbridge.history.cdr import CdrBuilder, crm_date
from fsbridge.record_links import RecordLinks
from tests import capture
from tests.fakes.retailcrm import FakeRetailCRM

# Unlike conftest's lab config (both numbers on shop1), the second number belongs to another shop here: the
# entries below prove that each call's site follows the number it came in on.
DIRECTORY = Directory(managers=frozenset({"100", "200"}),
                      external_phones={"74999999999": "shop1", "74999999998": "shop2"})
MANAGERS = {"100": 1, "200": 2}
PUBLIC_URL = "https://pbx.example.com"
SECRET = "record-link-secret-0123456789"
BUILDER = CdrBuilder.create("Europe/Moscow", MANAGERS, public_url=PUBLIC_URL, record_secret=SECRET)
LINK_RE = re.compile(r"^https://pbx\.example\.com/records/([A-Za-z0-9_-]{22})/([0-9a-f-]{36})\.wav$")

# What retailCRM must store for each capture (the CRM account in Moscow, UTC+3; the PBX's own
# `*_stamp` strings are UTC, three hours behind every `date` below). recordUrl is checked on its own.
EXPECTED: dict[tuple[str, str], dict] = {
    ("inbound_answered", "plain"): {
        "date": "2026-11-26 22:37:38", "type": "in", "phone": "75555555555", "result": "answered",
        "duration": 8, "durationWaiting": 1, "externalId": "31ff8abf-a4ac-4f83-a050-5a0db45e0c55",
        "code": "100", "userId": 1, "externalPhone": "74999999999", "site": "shop1"},
    ("inbound_answered", "json"): {
        "date": "2026-11-26 22:37:53", "type": "in", "phone": "75555555555", "result": "answered",
        "duration": 8, "durationWaiting": 1, "externalId": "f7091dd4-78b3-424a-a28d-b6a35219cb02",
        "code": "100", "userId": 1, "externalPhone": "74999999999", "site": "shop1"},
    ("inbound_no_answer", "plain"): {
        "date": "2026-11-26 22:38:08", "type": "in", "phone": "75555555555", "result": "no answer",
        "duration": 0, "durationWaiting": 5, "externalId": "ce59db37-b237-4035-bcaa-99ae1e2ea3c8",
        "code": "100", "userId": 1, "externalPhone": "74999999999", "site": "shop1"},
    ("inbound_no_answer", "json"): {
        "date": "2026-11-26 22:38:20", "type": "in", "phone": "75555555555", "result": "no answer",
        "duration": 0, "durationWaiting": 5, "externalId": "17699f14-dc95-497b-9e2f-96961dd62c4a",
        "code": "100", "userId": 1, "externalPhone": "74999999999", "site": "shop1"},
    ("inbound_busy", "plain"): {
        "date": "2026-11-26 22:38:32", "type": "in", "phone": "75555555555", "result": "busy",
        "duration": 0, "durationWaiting": 1, "externalId": "e4f7b893-21bd-4cd6-95cf-2de33c1d36ce",
        "code": "200", "userId": 2, "externalPhone": "74999999998", "site": "shop2"},
    ("inbound_busy", "json"): {
        "date": "2026-11-26 22:38:40", "type": "in", "phone": "75555555555", "result": "busy",
        "duration": 0, "durationWaiting": 1, "externalId": "7fa17b20-bf1b-41e4-8bfc-588d841131e1",
        "code": "200", "userId": 2, "externalPhone": "74999999998", "site": "shop2"},
    ("inbound_ext_no_answer", "plain"): {
        "date": "2026-11-26 22:38:47", "type": "in", "phone": "75555555555", "result": "no answer",
        "duration": 0, "durationWaiting": 14, "externalId": "3a6dc75f-fc9a-4a9a-9593-db53acda5864",
        "code": "200", "userId": 2, "externalPhone": "74999999998", "site": "shop2"},
    ("inbound_ext_no_answer", "json"): {
        "date": "2026-11-26 22:39:08", "type": "in", "phone": "75555555555", "result": "no answer",
        "duration": 0, "durationWaiting": 14, "externalId": "f3499abf-ac04-4d87-8151-a17ef75d41de",
        "code": "200", "userId": 2, "externalPhone": "74999999998", "site": "shop2"},
    ("outbound_ext_dial", "plain"): {
        "date": "2026-11-26 22:40:05", "type": "out", "phone": "79121234567", "result": "answered",
        "duration": 6, "durationWaiting": 1, "externalId": "d81f861e-3f68-4e7e-b3e0-69f23301af37",
        "code": "100", "userId": 1},
    ("outbound_ext_dial", "json"): {
        "date": "2026-11-26 22:40:19", "type": "out", "phone": "79121234567", "result": "answered",
        "duration": 6, "durationWaiting": 1, "externalId": "6f4cc028-fd4b-4d7a-a60d-9b0acabdda05",
        "code": "100", "userId": 1},
    ("outbound_originate_answered", "plain"): {
        "date": "2026-11-26 22:39:29", "type": "out", "phone": "79121234567", "result": "answered",
        "duration": 5, "durationWaiting": 2, "externalId": "50015a91-171f-4080-882c-acf73e4f9a7d",
        "code": "100", "userId": 1},
    ("outbound_originate_answered", "json"): {
        "date": "2026-11-26 22:39:47", "type": "out", "phone": "79121234567", "result": "answered",
        "duration": 5, "durationWaiting": 2, "externalId": "4df64e99-43dd-4953-89b0-2898333ab4a6",
        "code": "100", "userId": 1},
}
# Answered with a recording: a link. Unanswered calls' recordings hold only ring tone; the click-to-call
# capture recorded nothing.
WITH_RECORDING = {"inbound_answered", "outbound_ext_dial"}


def finished(name: str, fmt: str) -> FinishedCall:
    done: list[FinishedCall] = []
    tracker = CallTracker(DIRECTORY, lambda event: None, done.append)
    for event in capture.events(name, fmt):
        tracker.handle(event)
    [call] = done
    return call


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeRetailCRM]:
    with FakeRetailCRM(known_sites=("shop1", "shop2")) as server:
        yield server


@pytest.mark.parametrize(("name", "fmt"), sorted(EXPECTED))
def test_scenario_entry(name: str, fmt: str, fake: FakeRetailCRM) -> None:
    call = finished(name, fmt)
    entry = BUILDER.build(call)
    link = entry.pop("recordUrl", None)
    assert entry == EXPECTED[name, fmt]
    if name in WITH_RECORDING:
        match = LINK_RE.match(link or "")
        assert match, link
        assert match[2] == call.call_id, "the recording is named after the call's first leg"
        assert RecordLinks(PUBLIC_URL, SECRET).verify(match[1], match[2], "wav"), "the proxy must accept it"
    else:
        assert link is None

    # The strict fake stores exactly what was built.
    with RetailCRM(fake.url, fake.api_key) as crm:
        reply = crm.upload_calls([BUILDER.build(call)])
    assert reply["processedCallsCount"] == 1
    assert fake.calls[call.call_id] == BUILDER.build(call)


def test_date_comes_from_the_utc_epoch_not_the_local_stamp() -> None:
    call = finished("inbound_answered", "plain")
    start_stamp = next(e["variable_start_stamp"] for e in capture.events("inbound_answered")
                       if e.get("Event-Name") == "CHANNEL_HANGUP_COMPLETE" and "variable_start_stamp" in e)
    assert start_stamp == "2026-11-26 19:37:38"  # the PBX's clock (UTC here)
    assert BUILDER.build(call)["date"] == "2026-11-26 22:37:38"
    utc = CdrBuilder.create("UTC", MANAGERS)
    assert utc.build(call)["date"] == start_stamp


# 23:59:30 UTC is already tomorrow in Moscow and still the afternoon in New York; both sides of DST.
@pytest.mark.parametrize(("utc", "zone", "expected"), [
    ("2024-01-15 23:59:30", "Europe/Moscow", "2024-01-16 02:59:30"),
    ("2024-01-15 23:59:30", "America/New_York", "2024-01-15 18:59:30"),
    ("2024-07-15 23:59:30", "Europe/Moscow", "2024-07-16 02:59:30"),
    ("2024-07-15 23:59:30", "America/New_York", "2024-07-15 19:59:30"),
    ("2024-12-31 23:59:30", "Europe/Moscow", "2025-01-01 02:59:30"),
])
def test_time_zone_conversion(utc: str, zone: str, expected: str) -> None:
    import datetime

    start = datetime.datetime.strptime(utc, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.UTC)
    start_us = int(start.timestamp()) * 1_000_000 + 999_999   # fractions are cut, never rounded up
    call = dataclasses.replace(finished("inbound_answered", "plain"), start_us=start_us,
                               answer_us=start_us + 3_000_000, end_us=start_us + 40_000_000)
    entry = CdrBuilder.create(zone, MANAGERS).build(call)
    assert entry["date"] == expected
    assert (entry["duration"], entry["durationWaiting"]) == (37, 3)
    assert crm_date(start_us, datetime.UTC) == utc


def test_record_url_only_for_talk_that_was_recorded() -> None:
    answered = finished("inbound_answered", "plain")
    assert "recordUrl" in BUILDER.build(answered)
    assert "recordUrl" not in BUILDER.build(dataclasses.replace(answered, recording_ms=0))
    assert "recordUrl" not in BUILDER.build(dataclasses.replace(answered, recording_path=None))
    # A file not named by a uuid cannot be served by the proxy: no link rather than a dead one.
    assert "recordUrl" not in BUILDER.build(dataclasses.replace(answered, recording_path="/rec/../etc/x.wav"))
    # Without a secret there is no signed link.
    assert "recordUrl" not in CdrBuilder.create("Europe/Moscow", MANAGERS).build(answered)
    missed = finished("inbound_no_answer", "plain")
    assert missed.recording_path and missed.recording_ms, "the missed call did leave a file"
    assert "recordUrl" not in BUILDER.build(missed)
    # Converted recordings: the link names the format the proxy is told to prefer.
    mp3 = dataclasses.replace(BUILDER, record_ext="mp3").build(answered)["recordUrl"]
    assert mp3.endswith(f"/{answered.call_id}.mp3")


def test_manager_fields() -> None:
    call = finished("inbound_busy", "plain")
    # An extension the managers map does not know still goes as `code`; userId only where known.
    unknown = dataclasses.replace(call, manager_code="300")
    entry = BUILDER.build(unknown)
    assert (entry["code"], "userId" in entry) == ("300", False)
    # A call that reached no manager (abandoned in the IVR): the configured fallback, else nothing.
    nobody = dataclasses.replace(call, manager_code=None, codes=())
    assert "code" not in BUILDER.build(nobody) and "userId" not in BUILDER.build(nobody)
    fallback = dataclasses.replace(BUILDER, unassigned_code="200").build(nobody)
    assert (fallback["code"], fallback["userId"]) == ("200", 2)
