"""kill -9 at random moments: after recovery every call is in the CRM exactly once.

A driver subprocess plays fsbridge's history half: finished calls arrive (as from the call model) into
Uploader.on_finished, i.e. the outbox, while the uploader sends them to the fake CRM run by this test.
The driver prints each call id once on_finished returned: from then on the call must never be lost.
The test SIGKILLs it at random moments (during writes, during requests, between a reply and its mark),
checks the acknowledged calls are in the outbox, restarts it, and finally lets it drain.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from fsbridge.history.outbox import Outbox
from tests.fakes.retailcrm import FakeRetailCRM

ROOT = Path(__file__).resolve().parent.parent
KEY = "crash-test-key"
TOTAL = 900
RATE = 600.0          # finished calls per second fed by the driver
KILLS = 6


# The subprocess: resume feeding calls where the outbox says, upload, exit once all is delivered.
# A script rather than a function of this module, so the child imports what fsbridge imports, not pytest.
DRIVER = """
from gevent import monkey
monkey.patch_all()
import sys
import gevent
from fsbridge.calls.model import FinishedCall
from fsbridge.crm import RetailCRM
from fsbridge.history.cdr import CdrBuilder
from fsbridge.history.outbox import Outbox
from fsbridge.history.uploader import Uploader

outbox_path, crm_url, key, total, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
outbox = Outbox(outbox_path)
crm = RetailCRM(crm_url, key, connect_timeout=1.0, timeout=2.0)
uploader = Uploader(outbox, crm, CdrBuilder.create("Europe/Moscow", {"100": 1}), linger=0.02,
                    retry_base=0.05, retry_max=0.2, request_window=1.0, concurrency=2)
uploader.start()
stats = outbox.stats()
# Calls are written in order, so the rows present are exactly calls 0 .. written-1.
written = stats.pending + stats.sent + stats.quarantined
print(f"start {written}", flush=True)
t0 = 1_706_000_000_000_000
for n in range(written, total):
    start = t0 + n * 1_000_000
    uploader.on_finished(FinishedCall(
        call_id=f"call-{n:05d}", direction="in", phone="79121234567", manager_code="100", codes=("100",),
        answered=True, result="answered", hangup_status="answered", hangup_cause="NORMAL_CLEARING",
        start_us=start, answer_us=start + 4_000_000, end_us=start + 64_000_000, site="shop1"))
    print(f"ack call-{n:05d}", flush=True)
    gevent.sleep(1.0 / rate)
while outbox.stats().pending:
    gevent.sleep(0.02)
print("drained", flush=True)
uploader.close(timeout=1.0)
"""


def spawn(outbox_path: Path, fake: FakeRetailCRM) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(outbox_path), fake.url, KEY, str(TOTAL), str(RATE)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.strip())

    gevent.spawn(read)
    return proc, lines


def wait_for_line(lines: list[str], prefix: str, timeout: float) -> None:
    with gevent.Timeout(timeout, AssertionError(f"driver never printed {prefix!r}: {lines[-3:]}")):
        while not any(line.startswith(prefix) for line in lines):
            gevent.sleep(0.01)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("FSBRIDGE_CRASH_SEED", "20240123")))
    outbox_path = tmp_path / "outbox.sqlite3"
    acked: set[str] = set()
    with FakeRetailCRM(api_key=KEY) as fake:
        # Replies take a little while, so kills often land with a request in flight.
        fake.latency = 0.01
        for round_no in range(KILLS):
            # One round with the CRM down for part of it: kills during retries too.
            fake.outage = "html503" if round_no == 2 else None
            proc, lines = spawn(outbox_path, fake)
            wait_for_line(lines, "ack ", timeout=15)
            gevent.sleep(rng.uniform(0.02, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            gevent.sleep(0.05)           # let the reader greenlet take the last lines
            assert proc.returncode == -signal.SIGKILL, f"round {round_no}: the driver ended by itself"
            acked.update(line[4:] for line in lines if line.startswith("ack "))
            # Every call the driver was told is safe is in the outbox, whatever the moment of death.
            with Outbox(outbox_path) as box:
                missing = [cid for cid in acked if box.state_of(cid) is None]
            assert missing == [], f"round {round_no}: acknowledged calls lost: {missing[:5]}"

        fake.outage = None
        proc, lines = spawn(outbox_path, fake)
        wait_for_line(lines, "drained", timeout=30)
        assert proc.wait(timeout=10) == 0

    everything = [f"call-{n:05d}" for n in range(TOTAL)]
    assert acked <= set(everything)
    assert sorted(fake.calls) == everything, "every call is in the CRM"
    stored = collections.Counter(
        c["externalId"] for u in fake.uploads for c in u.calls if c["externalId"] not in u.duplicates)
    assert set(stored.values()) == {1}, "and each was stored once"
    resent = sum(len(u.duplicates) for u in fake.uploads)
    print(f"{KILLS} kills, {len(acked)} calls acknowledged before a kill, {resent} re-sent after a kill "
          f"and recognised as duplicates")
    with Outbox(outbox_path) as box:
        stats = box.stats()
    assert (stats.pending, stats.sent, stats.quarantined) == (0, TOTAL, 0)
