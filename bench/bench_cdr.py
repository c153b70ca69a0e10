"""Reconciling a day of FreeSWITCH CDR documents (mod_json_cdr), as fsbridge does at start-up after a day down.

    python3 -m bench.bench_cdr [--calls 25000]

Writes --calls copies of the real answered call's two documents (tests/fixtures/json_cdr/, fresh ids and
times) into a temp directory, then runs one CdrSpool pass into a real outbox and ledger: every document read,
grouped, replayed through the call model and written to the history. Measured: the pass's wall time and legs
per second (goal: a day, 50 000 legs, in seconds), and a second pass over the same directory (documents
accounted for are not read again: it should read none).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from gevent import monkey

monkey.patch_all()

from fsbridge.calls.cdr_spool import CdrSpool  # noqa: E402
from fsbridge.calls.legs import Directory  # noqa: E402
from fsbridge.calls.model import FinishedCall  # noqa: E402
from fsbridge.history.outbox import Outbox  # noqa: E402

GOAL_S = 30.0
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakes.freeswitch import write_cdr_pairs  # noqa: E402


class OutboxSink:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def known(self, call_ids: list[str]) -> set[str]:
        return self.outbox.known(call_ids)

    def record(self, calls: list[FinishedCall]) -> bool:
        self.outbox.add_many(calls)
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=25_000, help="calls (two legs each)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        spool_dir = base / "json_cdr"
        spool_dir.mkdir()
        day_us = int((time.time() - 86400) * 1e6)
        write_cdr_pairs(spool_dir, [day_us + n * (86400_000_000 // args.calls) for n in range(args.calls)])
        outbox = Outbox(base / "outbox.sqlite3")

        def spool() -> CdrSpool:
            return CdrSpool(spool_dir, base / "ledger.sqlite3",
                            Directory(managers=frozenset({"100", "200"}), external_phones={"74999999999": "shop1"}),
                            OutboxSink(outbox), records_dir=base / "recordings", live=lambda uuid: False,
                            view_ready=lambda: True)

        first = spool()
        started = time.perf_counter()
        first.reconcile()
        took = time.perf_counter() - started
        legs = 2 * args.calls
        print(f"first pass:  {legs} legs in {took:.1f} s = {legs / took:,.0f} legs/s "
              f"({first.stats.recovered} calls recovered, {first.stats.reads} documents read; goal: a day of "
              f"50 000 legs in <= {GOAL_S:.0f} s)")
        first.ledger.close()
        second = spool()
        started = time.perf_counter()
        second.reconcile()
        print(f"second pass (a restart): {time.perf_counter() - started:.2f} s, {second.stats.reads} documents read "
              f"(goal 0)")
        complete = outbox.stats().pending == args.calls
        outbox.close()
    met = complete and second.stats.reads == 0 and took * 50_000 / legs <= GOAL_S
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
