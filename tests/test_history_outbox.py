"""The durable outbox and `fsbridge outbox`: one row per call, survives a kill, shows what the CRM refused."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fsbridge.calls.model import FinishedCall
from fsbridge.history import outbox_cli
from fsbridge.history.outbox import Outbox, OutboxError, decode_call, encode_call
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_706_000_000_000_000  # 2024-01-23 08:53:20 UTC


def make_call(n: int, **over: Any) -> FinishedCall:
    fields: dict[str, Any] = dict(
        call_id=f"call-{n:05d}", direction="in", phone="79121234567", manager_code="100", codes=("100",),
        answered=True, result="answered", hangup_status="answered", hangup_cause="NORMAL_CLEARING",
        start_us=T0 + n * 1_000_000, answer_us=T0 + n * 1_000_000 + 4_000_000,
        end_us=T0 + n * 1_000_000 + 64_000_000, external_phone="74999999999", site="shop1")
    fields.update(over)
    return FinishedCall(**fields)


def cfg_for(path: Path) -> Any:
    return SimpleNamespace(history=SimpleNamespace(outbox_path=path), crm=SimpleNamespace(timezone="Europe/Moscow"))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "outbox.sqlite3"


def test_payload_round_trip() -> None:
    call = make_call(1, recording_path="/rec/a.wav", recording_ms=1200, codes=("100", "200"))
    assert decode_call(encode_call(call)) == call
    # A row written by a version with another field set still reads.
    assert decode_call(encode_call(call).replace('"site"', '"future_field":1,"site"')) == call


def test_same_call_twice_is_one_row(path: Path) -> None:
    with Outbox(path) as box:
        assert box.add(make_call(1)) is True
        assert box.add(make_call(1)) is False
        # A later report of the same call (a replay after a reconnect) does not replace the first.
        assert box.add(make_call(1, result="busy")) is False
        [entry] = box.claim(50)
        assert entry.call == make_call(1)
        assert box.stats().pending == 1


def test_file_is_wal_private_and_survives_reopen(path: Path) -> None:
    with Outbox(path) as box:
        box.add(make_call(1))
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, oct(mode)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    with Outbox(path) as box:
        assert [e.call for e in box.claim(50)] == [make_call(1)]


def test_a_written_call_survives_sigkill(path: Path) -> None:
    # add() returned => the call is in the WAL; the process dies without closing anything.
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from fsbridge.history.outbox import Outbox
        from tests.test_history_outbox import make_call
        box = Outbox({str(path)!r})
        for n in range(100):
            box.add(make_call(n))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with Outbox(path) as box:
        assert box.stats().pending == 100
        assert [e.call.call_id for e in box.claim(50)] == [f"call-{n:05d}" for n in range(50)]


def test_claims_do_not_overlap_and_settle(path: Path) -> None:
    with Outbox(path) as box:
        for n in range(120):
            box.add(make_call(n))
        first, second, third = box.claim(50), box.claim(50), box.claim(50)
        assert [len(first), len(second), len(third)] == [50, 50, 20]
        ids = [e.call.call_id for e in first + second + third]
        assert ids == sorted(set(ids)) and len(ids) == 120, "oldest first, each once"
        assert box.claim(50) == []
        box.mark_sent([e.row for e in first])
        box.quarantine([third[0].row], "site: The value you selected is not a valid choice.")
        box.release(e.row for e in second)          # abandoned by a stopping uploader
        again = box.claim(50)
        assert [e.call.call_id for e in again] == [e.call.call_id for e in second]
        stats = box.stats()
        assert (stats.pending, stats.sent, stats.quarantined) == (69, 50, 1)
        assert box.state_of("call-00000") == "sent" and box.state_of("call-00100") == "quarantined"


def test_oldest_pending_age(path: Path) -> None:
    with Outbox(path) as box:
        assert box.stats().oldest_pending_age() is None
        box.add(make_call(1))
        written = time.time()
        box.add(make_call(2))
        age = box.stats().oldest_pending_age(now=written + 125)
        assert age is not None and 124 <= age <= 126
        box.mark_sent([e.row for e in box.claim(1)])
        assert box.stats().pending == 1


def test_quarantine_and_requeue(path: Path) -> None:
    with Outbox(path) as box:
        for n in range(4):
            box.add(make_call(n))
        rows = {e.call.call_id: e.row for e in box.claim(50)}
        box.quarantine([rows["call-00001"]], "result: bad")
        box.quarantine([rows["call-00002"], rows["call-00003"]], "site: bad")
        box.mark_sent([rows["call-00000"]])
        listed = box.quarantined()
        assert [(q.external_id, q.reason) for q in listed] == [
            ("call-00001", "result: bad"), ("call-00002", "site: bad"), ("call-00003", "site: bad")]
        assert listed[0].call == make_call(1)
        # Unknown or already delivered ids are not re-queued.
        assert box.requeue(["call-00001", "call-00000", "nope", "call-00001"]) == 1
        assert box.stats().quarantined == 2
        assert box.requeue(None) == 2
        assert [e.call.call_id for e in box.claim(50)] == ["call-00001", "call-00002", "call-00003"]


def test_unreadable_row_is_quarantined_not_fatal(path: Path) -> None:
    with Outbox(path) as box:
        box.add(make_call(1))
        box.add(make_call(2))
    db = sqlite3.connect(path)
    db.execute("UPDATE calls SET payload = '{broken' WHERE external_id = 'call-00001'")
    db.commit()
    db.close()
    with Outbox(path) as box:
        assert [e.call.call_id for e in box.claim(50)] == ["call-00002"]
        [q] = box.quarantined()
        assert q.external_id == "call-00001" and q.call is None and "unreadable" in q.reason


def test_purge_forgets_only_old_deliveries(path: Path) -> None:
    with Outbox(path) as box:
        for n in range(3):
            box.add(make_call(n))
        entries = box.claim(50)
        box.mark_sent([entries[0].row])
        box.quarantine([entries[1].row], "x")
        assert box.purge_sent(older_than=3600) == 0
        assert box.purge_sent(older_than=-1) == 1
        stats = box.stats()
        assert (stats.pending, stats.sent, stats.quarantined) == (1, 0, 1)


def test_outbox_from_a_newer_fsbridge_is_refused(path: Path) -> None:
    Outbox(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(OutboxError, match="newer fsbridge"):
        Outbox(path)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_outbox_of_an_earlier_fsbridge_keeps_its_calls(path: Path, version: int) -> None:
    # An upgrade must not lose the calls still waiting in the file the old version wrote.
    from fsbridge.history import outbox as module

    steps = module._SCHEMA + (module._TENANTS if version >= 2 else "") + (module._RECORD_PATHS if version >= 3 else "")
    path.parent.mkdir()
    db = sqlite3.connect(path)
    db.executescript(f"{steps}PRAGMA user_version={version};")
    db.execute("INSERT INTO calls (external_id, payload, added) VALUES (?, ?, ?)",
               ("call-00001", encode_call(make_call(1)), time.time()))
    db.commit()
    db.close()
    box = Outbox(path)
    try:
        assert [e.call for e in box.claim(10, tenant="")] == [make_call(1)]
        assert [c for c, _ in box.recent(5, tenant="")] == [make_call(1)]
        assert box.recent(5, tenant="acme") == []
    finally:
        box.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == module.SCHEMA_VERSION
    db.close()


def test_recent_and_quarantined_of_one_tenant(path: Path) -> None:
    box = Outbox(path)
    try:
        box.add_many([make_call(n, tenant="acme" if n % 10 == 0 else "beta") for n in range(100)])
        assert [c.call_id for c, _ in box.recent(3, tenant="acme")] == ["call-00090", "call-00080", "call-00070"]
        assert {c.tenant for c, _ in box.recent(50, tenant="beta")} == {"beta"}
        rows = {e.call.call_id: e.row for e in box.claim(100)}
        box.quarantine([rows["call-00010"], rows["call-00011"]], "refused")
        assert [q.external_id for q in box.quarantined(tenant="acme")] == ["call-00010"]
        assert len(box.quarantined()) == 2
    finally:
        box.close()


def test_not_an_outbox(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="cannot open"):
        Outbox(junk)


# -- fsbridge outbox ---------------------------------------------------------------------------------


def run_cli(cfg: Any, *argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    outbox_cli.add_arguments(parser)
    code = outbox_cli.cmd_outbox(cfg, parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


def test_cli_shows_counts_age_and_reasons_while_the_service_writes(
        path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = cfg_for(path)
    assert "no outbox yet" in outbox_cli.show(cfg)
    service = Outbox(path)   # stays open, as in the running fsbridge
    for n in range(5):
        service.add(make_call(n))
    rows = [e.row for e in service.claim(50)]
    service.mark_sent(rows[:2])
    service.quarantine([rows[2]], "retailCRM refused it (HTTP 400): site: The value you selected is not a "
                                  "valid choice. (sent 'shop9')")
    service.release(rows)

    text = outbox_cli.show(cfg)
    assert "pending:     2 (oldest written 0 s ago)" in text
    assert "sent:        2" in text
    assert "quarantined: 1" in text
    # The call in the CRM's zone (08:53:22 UTC = 11:53:22 in Moscow) and the CRM's own words.
    assert "call-00002  2024-01-23 11:53:22  in 79121234567  code 100  answered  since " in text
    assert "site: The value you selected is not a valid choice. (sent 'shop9')" in text

    code, out = run_cli(cfg, "--requeue", "call-00002", "call-00000", capsys=capsys)
    assert code == 1, "call-00000 was delivered, not quarantined"
    assert "re-queued 1 call(s)" in out and "1 of the given id(s) were not quarantined" in out
    assert "quarantined: 0" in out
    # The running service sees the re-queued call at its next claim.
    assert [e.call.call_id for e in service.claim(50)] == ["call-00002", "call-00003", "call-00004"]
    service.close()


def test_cli_requeue_all(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Outbox(path) as box:
        for n in range(3):
            box.add(make_call(n))
        box.quarantine([e.row for e in box.claim(50)], "code: This value should not be blank.")
    cfg = cfg_for(path)
    assert outbox_cli.show(cfg).count("code: This value should not be blank.") == 3
    assert outbox_cli.requeue(cfg, "all") == 3
    code, out = run_cli(cfg, "--requeue-all", capsys=capsys)
    assert (code, "re-queued 0 call(s)" in out, "pending:     3" in out) == (0, True, True)
    # With tenant files each quarantined call says whose it is.
    with Outbox(path) as box:
        box.add(make_call(7, tenant="acme"))
        box.quarantine([e.row for e in box.claim(50, tenant="acme")], "site: unknown")
    assert "call-00007  tenant acme  2024-01-23 11:53:27  in 79121234567" in outbox_cli.show(cfg)


def test_cli_without_outbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = cfg_for(tmp_path / "missing.sqlite3")
    code, out = run_cli(cfg, "--requeue-all", capsys=capsys)
    assert code == 2 and "no outbox" in out
    assert not (tmp_path / "missing.sqlite3").exists(), "looking must not create it"


def test_call_model_fields_are_all_stored() -> None:
    # If FinishedCall gains a field, the outbox must carry it (the entry is built when sent).
    call = make_call(7, recording_path="/r/x.wav", recording_ms=10)
    assert set(dataclasses.asdict(decode_call(encode_call(call)))) == {f.name for f in dataclasses.fields(call)}


def test_background_checkpoints_move_the_wal_into_the_database(path: Path) -> None:
    with Outbox(path, checkpoint_interval=0.05) as box:
        initial = path.stat().st_size
        for n in range(500):
            box.add(make_call(n))
        assert path.stat().st_size == initial, "no checkpoint inside add(): the ESL reader never waits for one"
        until(lambda: path.stat().st_size > initial, what="the worker thread to copy the WAL into the database")
        assert box.stats().pending == 500


def test_purge_goes_in_chunks_and_lets_the_others_run(path: Path) -> None:
    import gevent

    with Outbox(path) as box:
        for n in range(7):
            box.add(make_call(n))
        box.mark_sent([e.row for e in box.claim(50)][:5])
        ran: list[int] = []
        gevent.spawn(lambda: ran.append(box.stats().sent))  # e.g. the ESL reader, between two chunks
        assert box.purge_sent(older_than=-1, chunk=2) == 5
        assert ran and 0 < ran[0] < 5  # it ran while the purge was under way
        stats = box.stats()
        assert (stats.pending, stats.sent) == (2, 0)


def test_claim_decodes_with_the_others_running_and_never_hands_a_row_twice(path: Path) -> None:
    import gevent

    with Outbox(path) as box:
        for n in range(30):
            box.add(make_call(n))
        claimed: list[bool] = []
        wrote_before_claimed: list[bool] = []

        def reader() -> None:  # the ESL reader finishing a call while a batch is being claimed
            box.add(make_call(100))
            wrote_before_claimed.append(not claimed)

        gevent.spawn(reader)
        other = gevent.spawn(box.claim, 20)  # a second upload worker claiming at the same time
        first = box.claim(20)
        claimed.append(True)
        second = other.get()
        assert wrote_before_claimed == [True]
        ids = [e.call.call_id for e in first + second]
        assert len(ids) == len(set(ids))
        rest = [e.call.call_id for e in box.claim(50)]
        assert sorted(ids + rest) == sorted([f"call-{n:05d}" for n in range(30)] + ["call-00100"])


def test_levels_follow_every_change_without_counting(path: Path) -> None:
    with Outbox(path) as box:
        statements: list[str] = []
        box._db.set_trace_callback(statements.append)
        for n in range(5):
            box.add(make_call(n))
        box.add(make_call(0))  # the same call again: still one row
        assert box.levels() == (5, 0)
        entries = box.claim(3)
        box.mark_sent([entries[0].row])
        box.quarantine([entries[1].row, entries[2].row], "refused")
        assert box.levels() == (2, 2)
        box.mark_sent([entries[0].row])  # settled twice: counted once
        assert box.requeue([entries[1].call.call_id]) == 1
        assert box.levels() == (3, 1)
        assert not [s for s in statements if "count(" in s]  # kept, not counted: a scrape costs no scan
        stats = box.stats()
        assert box.levels() == (stats.pending, stats.quarantined)
    with Outbox(path) as again:  # counted from the file when opened
        assert again.levels() == (3, 1)


def test_levels_notice_what_another_process_wrote(path: Path) -> None:
    with Outbox(path) as service:
        for n in range(3):
            service.add(make_call(n))
        service.quarantine([e.row for e in service.claim(3)], "refused")
        assert service.levels() == (0, 3)
        with Outbox(path) as cli:  # `fsbridge outbox --requeue` while the service runs
            assert cli.requeue([make_call(0).call_id]) == 1
        assert service.levels() == (1, 2)
        with Outbox(path) as other:  # a second fsbridge on the same file
            other.add(make_call(7))
        assert service.levels() == (2, 2)
        service.mark_sent([e.row for e in service.claim(50)])
        assert service.levels() == (0, 2)


def test_a_claim_that_cannot_quarantine_an_unreadable_row_keeps_nothing_claimed(path: Path) -> None:
    with Outbox(path) as box:
        for n in range(3):
            box.add(make_call(n))
        box._db.execute("UPDATE calls SET payload = 'not json' WHERE external_id = 'call-00001'")
        box.quarantine = lambda rows, reason: (_ for _ in ()).throw(sqlite3.OperationalError("database is locked"))
        with pytest.raises(sqlite3.OperationalError):
            box.claim(50)
        del box.quarantine  # the file works again
        assert sorted(e.call.call_id for e in box.claim(50)) == ["call-00000", "call-00002"]


def test_a_claim_killed_while_it_decodes_gives_its_rows_back(path: Path) -> None:
    import gevent

    with Outbox(path) as box:
        for n in range(30):
            box.add(make_call(n))
        claiming = gevent.spawn(box.claim, 30)
        gevent.sleep(0)  # it has taken the rows and gives way after the first ten
        assert box.claim(50) == []  # ... so they are its own
        claiming.kill()  # a stop
        assert len(box.claim(50)) == 30
