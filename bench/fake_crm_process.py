"""The strict fake retailCRM (tests/fakes/retailcrm.py) in a process of its own, for the load benchmark.

In the benchmark's own process the fake shared one gevent hub with the FreeSWITCH simulator: whenever the
simulator wrote a burst of events or the benchmark parsed a scrape, the fake read no request, and that wait
was counted as fsbridge's latency. Here only its own work delays its reads (it runs on the simulator's CPU,
beside it, not on its hub; it reports its own hub lag), and it reports what it received over a pipe:

  stdout (JSON, one list of records per line, every 0.1 s):
    ["url", "http://127.0.0.1:PORT"]               once, when listening
    ["card", received, callExternalId, type]        a call event it accepted (received: time.time())
    ["refused", path, status]                       a call event it answered with an error
    ["upload", status, received]                    a calls/upload request and its answer
    ["stored", received, [externalId, ...], dups]   calls an upload stored, and how many it refused as known
    ["lag", [p50, p99, max]]                        its own hub lag in seconds (5 ms timer), then ...
    ["calls", [externalId, ...]]                    every call stored so far (both asked with {"calls": true})
  stdin (JSON, one object per line): {"latency": s}, {"outage": "html503" | ... | null}, {"calls": true};
    end of input stops it.

With --accounts N (bench_tenants.py, the virtual PBX): N fakes, one retailCRM account each, each on its own
loopback port with its own API key (`--api-key` followed by -000000, -000001, ...) and retailCRM's rate limits
ENFORCED (40 requests/s to /telephony, 10/s elsewhere, as one account has them). Each record then ends with
the account's index, `url` becomes ["urls", [url, ...]], ["limited", n, account] says how many requests an
account answered 503 for its rate limit since the last report, and ["calls", [[externalId, ...], ...]] lists
every account's calls. "latency" and "outage" commands take "accounts": [index, ...] (default: all of them).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.lock  # noqa: E402
from gevent.fileobject import FileObjectPosix  # noqa: E402

from bench import hub_lag  # noqa: E402

EVENT_PATH = "/api/v5/telephony/call/event"
UPLOAD_PATH = "/api/v5/telephony/calls/upload"


class Reporter:
    """Turns what the fake recorded into report lines, forgetting it (a long run would pile it up).

    One writer at a time (a lock): the periodic flush and the answer to a command must not interleave
    their lines, and a line is never cut, since nothing is killed while it writes."""

    def __init__(self, fakes: list[Any], out: Any, multi: bool = False) -> None:
        self.fakes = fakes
        self.multi = multi  # records end with the account's index
        self.limited = [0] * len(fakes)  # rate_limited already reported, per account
        self.out = out
        self.unfinished: list[Any] = []
        self.lock = gevent.lock.Semaphore()
        self.stopped = False
        self.lags: list[float] = []  # this process's hub lag, 5 ms timer (its stalls delay what it reads)

    def flush(self, *extra: list[Any]) -> None:
        """Report what arrived since the last flush, then `extra` records, in one ordered write."""
        with self.lock:
            records = self._take()
            records.extend(extra)
            if records:
                self.out.write(json.dumps(records, separators=(",", ":")).encode() + b"\n")
                self.out.flush()

    def _take(self) -> list[list[Any]]:
        records: list[list[Any]] = []
        keep = []
        now = time.time()
        for account, fake in enumerate(self.fakes):
            tail = [account] if self.multi else []
            fresh, fake.requests = fake.requests, []
            for r in fresh:
                if r.status == 0:
                    keep.append((account, r))
                    continue
                records.append(self._record(r, tail))
            for upload in fake.uploads:
                records.append(["stored", upload.received, [str(c.get("externalId")) for c in upload.calls],
                                len(upload.duplicates), *tail])
            fake.uploads.clear()
            fake.events.clear()
            if self.multi and fake.rate_limited != self.limited[account]:
                records.append(["limited", fake.rate_limited - self.limited[account], account])
                self.limited[account] = fake.rate_limited
        unfinished, self.unfinished = self.unfinished, []
        for account, r in unfinished:
            if r.status == 0:
                if now - r.received < 120:  # a reset connection never gets a status
                    self.unfinished.append((account, r))
                continue
            records.append(self._record(r, [account] if self.multi else []))
        self.unfinished.extend(keep)
        return [r for r in records if r]

    @staticmethod
    def _record(r: Any, tail: list[int]) -> list[Any]:
        if r.path == EVENT_PATH:
            if r.status == 200:
                event = json.loads(r.form["event"])
                return ["card", r.received, event["callExternalId"], event["type"], *tail]
            return ["refused", r.path, r.status, *tail]
        if r.path == UPLOAD_PATH:
            return ["upload", r.status, r.received, *tail]
        return []

    def run(self, interval: float = 0.1) -> None:
        while not self.stopped:
            gevent.sleep(interval)
            self.flush()

    def watch_lag(self) -> None:
        hub_lag.watch(self.lags, lambda: self.stopped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--codes", default="100,200")
    parser.add_argument("--users", default="1,2")
    parser.add_argument("--sites", default="shop1")
    parser.add_argument("--nagle", action="store_true", help="leave Nagle on (replies wait for delayed ACKs)")
    parser.add_argument("--accounts", type=int, default=0,
                        help="serve this many accounts, each on its own port with its own key and rate limits")
    args = parser.parse_args()

    from tests.fakes.retailcrm import FakeRetailCRM

    multi = args.accounts > 0
    keys = [f"{args.api_key}-{i:06d}" for i in range(args.accounts)] if multi else [args.api_key]
    fakes = []
    for key in keys:
        fake = FakeRetailCRM(api_key=key, known_codes=args.codes.split(","),
                             known_user_ids=[int(u) for u in args.users.split(",")],
                             known_sites=args.sites.split(","))
        if not multi:
            # 400 cards/s are ten times retailCRM's limit: these runs measure fsbridge, not the limiter.
            fake.telephony_rate_limit = None
            fake.general_rate_limit = None
        fake.nodelay = not args.nagle
        fakes.append(fake.start())
    if multi:
        # A thousand servers' objects: a full collection of them stalled this hub for up to ~1 s, and every
        # card waiting to be read meanwhile counted as fsbridge's latency. Young objects only, as bench_load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 1_000_000_000)
    out = FileObjectPosix(sys.stdout.fileno(), "wb", close=False)
    reporter = Reporter(fakes, out, multi=multi)
    reporter.flush(["urls", [f.url for f in fakes]] if multi else ["url", fakes[0].url])
    workers = [gevent.spawn(reporter.run), gevent.spawn(reporter.watch_lag)]
    commands = FileObjectPosix(sys.stdin.fileno(), "rb", close=False)
    for line in commands:
        command = json.loads(line)
        chosen = [fakes[i] for i in command["accounts"]] if "accounts" in command else fakes
        for fake in chosen:
            if "latency" in command:
                fake.latency = float(command["latency"])
            if "outage" in command:
                fake.outage = command["outage"]
        if command.get("calls"):
            lags = sorted(reporter.lags)
            reporter.flush(["lag", [lags[len(lags) // 2], lags[int(len(lags) * 0.99)], lags[-1]] if lags else []],
                           ["calls", [list(f.calls) for f in fakes] if multi else list(fakes[0].calls)])
    reporter.stopped = True
    gevent.joinall(workers)
    reporter.flush()
    for fake in fakes:
        fake.stop()


if __name__ == "__main__":
    main()
