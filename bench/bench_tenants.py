"""Virtual PBX benchmark (issue 13): one fsbridge, 1 000 companies, each with its own retailCRM account, some
of whose CRMs are down or slow.

    python3 -m bench.bench_tenants                          # 1 000 tenants, 200 calls/s, 20 s per phase (~4 min)
    python3 -m bench.bench_tenants --tenants 100 --rate 50 --duration 10 --warmup 5   # a short run

What runs where (as bench_load.py, whose pieces it uses). Three processes. fsbridge is `python -m fsbridge run
--config <tmp>/fsbridge.yaml` with a `tenants_dir` of N `<tenant>.yaml` files, so its CPU and peak RSS (VmHWM)
are its own; it is pinned to CPU 0 when there are two. The FreeSWITCH simulator (bench_load.TimedSimulator:
it notes when the event behind each card left its socket) runs in this process; the fake retailCRM of every
tenant's account in a third (`bench/fake_crm_process.py --accounts N`: N strict fakes, each on its own
loopback port with its own API key and retailCRM's 40 requests/s limit to /telephony ENFORCED), which reports
over a pipe what each account received and when. Both on CPU 1.

The load. The captured inbound_answered and inbound_busy calls in turn, fresh ids each, at recorded speed, at
--rate per second spread over the tenants unevenly: tenant i gets calls in proportion to 1/(i+1) (a few large
tenants, a long tail). A call is made tenant i's by writing one of its DIDs on the wire (Caller-Destination-
Number). Each call makes two call events (cards: `in` and `hangup`) and one history entry.

Retailcrm's budget, and why the weights are capped. Uncapped, 1/(i+1) over 1 000 tenants at 200 calls/s gives
tenant 0 ~27 calls/s, i.e. ~54 card requests/s plus its history uploads, more than its account's 40 requests/s
to /telephony: fsbridge's pacing (crm.telephony_rate 40, x0.95) would let its card queue grow until cards go
stale, and the fake's limit would answer 503 to whatever went faster. That is a tenant asking more of retailCRM
than retailCRM allows, not a property of fsbridge, so the load is capped: no tenant gets more than
--max-calls-per-tenant (default 10 calls/s = 20 cards/s + ~2 uploads/s, 58 % of the paced budget), and what the
cap takes off the top is spread over the others in the same 1/(i+1) proportion. The run prints the largest
tenants' rates, how many requests the fake refused for the rate limit (per account, should be 0), and fsbridge's
cards dropped as stale (counted per phase; none expected from a healthy tenant).

Phases. --warmup seconds of calls (not measured: each tenant's first card opens its CRM connection). Phase 1
(--duration s): every CRM healthy. Phase 2 (--duration s): the same load with --bad of the tenants (chosen at
random, seeded) down (HTML 503) or answering in 2 s, half each. A card's latency: from the simulator's write of
the event that caused it to the fake CRM's reading of the request; p99 over the healthy tenants' cards caused in
each phase, and their ratio (the same tenants in both: in phase 1, the last cards of the others wait behind
their CRM's outage). Then the load stops, the outages end, and every call's history must reach its own
tenant's CRM exactly once. Last, every tenant file is rewritten (a changed card_max_age) and `POST /reload` is
sent to fsbridge's internal listener (what `fsbridge reload` does; SIGHUP gives no answer to time) while calls go
on: the answer comes when the reload is done, so its time is the reload's. Every call started from --reload-calls
seconds before it to as long after must get all its cards and its history.

Exit status 1 when a goal is missed: p99 <= 5 ms in both phases, ratio <= 1.2, history exactly once, peak RSS
< 300 MB, reload < 2 s, no card or history missed around it, no request refused for the rate limit.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
import yaml  # noqa: E402

from bench import hub_lag  # noqa: E402
from bench.bench_load import (  # noqa: E402
    CrmSide,
    Fsbridge,
    TimedSimulator,
    bench_cpu,
    free_port,
    hist_quantile,
    ms,
    pct,
    pinned,
    shut_down,
    start_profile,
    summarize_profile,
    verdict,
    wait_until,
)
from tests.conftest import API_KEY, settings  # noqa: E402

SCENARIOS = {"inbound_answered": "74999999999", "inbound_busy": "74999999998"}  # their DIDs as captured
GOAL_P99_MS = 5.0
GOAL_RATIO = 1.2
GOAL_RSS_MB = 300.0
GOAL_RELOAD_S = 2.0


def did(i: int, n: int) -> str:
    return f"7495{i:05d}{n}"


def tenant_name(i: int) -> str:
    return f"t{i:04d}"


def tenant_file(i: int, url: str, card_max_age: float) -> str:
    return yaml.safe_dump({
        "domains": [f"{tenant_name(i)}.pbx.bench"],
        "crm": {"url": url, "api_key": f"{API_KEY}-{i:06d}", "timezone": "Europe/Moscow",
                "card_max_age": card_max_age},
        "integration": {"client_id": f"bench-client-id-{i:06d}-0123456789"},
        "managers": {"100": 1, "200": 2},
        "external_phones": {did(i, 0): "shop1", did(i, 1): "shop1"},
    })


def rates(tenants: int, total: float, cap: float) -> list[float]:
    """Calls/s per tenant: in proportion to 1/(i+1), none above `cap`, what the cap removes spread over the
    others in the same proportion (water filling)."""
    weights = [1.0 / (i + 1) for i in range(tenants)]
    capped: set[int] = set()
    while True:
        free = total - cap * len(capped)
        spread = sum(w for i, w in enumerate(weights) if i not in capped)
        out = [cap if i in capped else free * w / spread for i, w in enumerate(weights)]
        over = {i for i, r in enumerate(out) if r > cap * (1 + 1e-9)}
        if not over:
            return out
        capped |= over


@dataclass
class Accounts(CrmSide):
    """bench/fake_crm_process.py --accounts N: every tenant's retailCRM account, in one process."""

    urls: list[str] = field(default_factory=list)
    delivered: list[tuple[float, str, str, int]] = field(default_factory=list)  # (arrived, call, type, account)
    refused: collections.Counter = field(default_factory=collections.Counter)  # (account, status) -> n
    limited: collections.Counter = field(default_factory=collections.Counter)  # account -> n refused for the limit
    stored_in: dict[str, list[int]] = field(default_factory=dict)  # call -> accounts that stored it

    def _record(self, record: list[Any]) -> bool:
        kind = record[0]
        if kind == "urls":
            self.urls = record[1]
            return True
        if kind == "card":
            self.delivered.append((record[1], record[2], record[3], record[4]))
        elif kind == "refused":
            self.refused[(record[3], record[2])] += 1
        elif kind == "limited":
            self.limited[record[2]] += record[1]
        elif kind == "stored":
            for call in record[2]:
                self.stored_in.setdefault(call, []).append(record[4])
            self.duplicates += record[3]
            self.uploads[200] += 1
        elif kind != "upload":
            return super()._record(record)
        return False

    def set_outage_of(self, kind: str | None, accounts: list[int]) -> None:
        self._send(outage=kind, accounts=accounts)

    def set_latency_of(self, seconds: float, accounts: list[int]) -> None:
        self._send(latency=seconds, accounts=accounts)

    def settle(self) -> None:
        """Returns once the fake reported everything it received before this call."""
        self._calls = gevent.event.AsyncResult()
        self._send(calls=True)
        self._calls.get(timeout=60)


class Run:
    def __init__(self, args: argparse.Namespace, sim: TimedSimulator, crm: Accounts, fsb: Fsbridge,
                 tenants_dir: pathlib.Path) -> None:
        self.args = args
        self.sim = sim
        self.crm = crm
        self.fsb = fsb
        self.tenants_dir = tenants_dir
        self.per_tenant = rates(args.tenants, args.rate, args.max_calls_per_tenant)
        self.rng = random.Random(7)
        self.tenant_of: dict[str, int] = {}      # call id -> tenant
        self.started_at: dict[str, float] = {}  # call id -> when its playback began
        self.arrived: dict[tuple[str, str], tuple[float, int]] = {}  # card -> (when the CRM read it, account)
        self.twice = 0
        self.hub_lags: list[float] = []
        self.hwm = 0.0
        self.cpu: list[tuple[float, float, float, float]] = []  # (time, CPU s so far: fsbridge, fake CRM, this)
        self._stop = False

    # -- load --

    def play(self, i: int) -> None:
        scenario = self.rng.choice(list(SCENARIOS))
        n = list(SCENARIOS).index(scenario)
        subs = {f'"Caller-Destination-Number":"{SCENARIOS[scenario]}"': f'"Caller-Destination-Number":"{did(i, n)}"'}
        a_leg = str(uuid.uuid4())
        self.tenant_of[a_leg] = i
        self.started_at[a_leg] = time.time()
        self.sim.play(scenario, self.args.speed, subs, a_leg=a_leg)

    def load(self, seconds: float) -> list[str]:
        """Calls at --rate for `seconds`; their ids, once every one was played to its end."""
        rate = self.args.rate
        tenants = self.rng.choices(range(self.args.tenants), weights=self.per_tenant, k=int(rate * seconds))
        before = len(self.tenant_of)
        group = gevent.pool.Group()
        t0 = time.monotonic()
        for k, i in enumerate(tenants):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                gevent.sleep(delay)
            group.spawn(self.play, i)
        group.join(raise_error=True)
        return list(self.tenant_of)[before:]

    # -- what the CRMs received --

    def collect(self) -> None:
        cards, self.crm.delivered = self.crm.delivered, []
        for arrived, call, kind, account in cards:
            key = (call, kind)
            if key in self.arrived:
                self.twice += 1
                continue
            self.arrived[key] = (arrived, account)

    def latencies(self, since: float, until: float, tenants: set[int]) -> dict[str, list[float]]:
        """Latency of each card caused between `since` and `until` by a call of `tenants`, by card type."""
        out: dict[str, list[float]] = {"in": [], "hangup": [], "out": []}
        for (call, kind), written in self.sim.written_at.items():
            if since <= written <= until and self.tenant_of.get(call) in tenants:
                got = self.arrived.get((call, kind))
                if got is not None:
                    out[kind].append(got[0] - written)
        return out

    def missing_cards(self, calls: list[str]) -> list[tuple[str, str]]:
        # The simulator notes a possible `out` for every call's second leg too: inbound calls make `in` cards.
        wanted = set(calls)
        return [key for key in self.sim.written_at
                if key[0] in wanted and key[1] != "out" and key not in self.arrived]

    def wrong_account(self) -> int:
        return sum(1 for (call, _), (_, account) in self.arrived.items() if self.tenant_of.get(call) != account)

    # -- fsbridge from outside --

    def watch(self) -> None:
        """Every second: fsbridge's CPU and peak RSS from /proc; what the CRMs received. No /metrics scrape
        (a thousand tenants' series take fsbridge a while to render): it is asked at the phase boundaries."""
        while not self._stop:
            gevent.sleep(1.0)
            try:
                _, hwm = self.fsb.memory_mb()
                self.hwm = max(self.hwm, hwm)
                self.cpu.append((time.time(), self.fsb.cpu_seconds(), self.crm.cpu_seconds(), bench_cpu()))
            except OSError:
                pass
            self.collect()

    def hub_lag(self) -> None:
        hub_lag.watch(self.hub_lags, lambda: self._stop)

    def cpu_share(self, since: float, until: float, who: int = 1) -> float:
        """Share of a core used between `since` and `until`: 1 fsbridge, 2 the fake CRM, 3 this process."""
        inside = [row for row in self.cpu if since <= row[0] <= until]
        if len(inside) < 2:
            return math.nan
        return (inside[-1][who] - inside[0][who]) / (inside[-1][0] - inside[0][0])

    def pending(self) -> float:
        m = self.fsb.scrape()
        return m.get_sum("fsbridge_outbox_calls", state="pending")

    def drained(self) -> bool:
        m = self.fsb.scrape()
        return (m.get_sum("fsbridge_outbox_calls", state="pending") == 0
                and m.get_sum("fsbridge_calls_finished_total") >= len(self.tenant_of))

    def outcomes(self) -> dict[str, float]:
        m = self.fsb.scrape()
        return {o: m.get_sum("fsbridge_call_events_done_total", outcome=o)
                for o in ("sent", "stale", "queue_full", "rejected")}

    def reload(self) -> tuple[float, dict[str, Any]]:
        url = self.fsb.metrics_url.rsplit("/", 1)[0] + "/reload"
        t = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=60) as reply:
            answer = json.loads(reply.read())
        return time.perf_counter() - t, answer

    def history(self, calls: list[str] | None = None) -> tuple[int, int, int, int]:
        """(delivered, missing, delivered more than once, in another tenant's CRM) over `calls` (all)."""
        self.crm.settle()
        ids = list(self.tenant_of) if calls is None else calls
        where = self.crm.stored_in
        missing = sum(1 for c in ids if c not in where)
        twice = sum(1 for c in ids if len(where.get(c, ())) > 1)
        wrong = sum(1 for c in ids if any(a != self.tenant_of[c] for a in where.get(c, ())))
        return len(ids) - missing, missing, twice, wrong

    def stop(self) -> None:
        self._stop = True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="calls started per second")
    parser.add_argument("--max-calls-per-tenant", type=float, default=10.0,
                        help="cap of one tenant's calls/s (its CRM account allows 40 requests/s)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of calls per phase")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of unmeasured calls first")
    parser.add_argument("--speed", type=float, default=1.0, help="replay speed of the captures")
    parser.add_argument("--bad", type=float, default=0.1, help="share of tenants whose CRM is down or slow")
    parser.add_argument("--slow", type=float, default=2.0, help="seconds a slow CRM takes to answer")
    parser.add_argument("--reload-calls", type=float, default=4.0,
                        help="seconds of calls before and after the reload whose cards and history are checked")
    parser.add_argument("--card-max-age", type=float, default=30.0, help="the tenants' crm.card_max_age")
    parser.add_argument("--telephony-rate", type=float, default=None,
                        help="fsbridge's crm.telephony_rate (default: fsbridge's own, 40)")
    parser.add_argument("--drain-timeout", type=float, default=180.0)
    parser.add_argument("--log-level", default="info", help="fsbridge's log.level")
    parser.add_argument("--profile", metavar="FILE", help="py-spy fsbridge during the two phases into FILE")
    parser.add_argument("--blocking-report", type=float, metavar="MS", default=0.0,
                        help="log the stack of any fsbridge greenlet that holds the hub longer than MS (with --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, log, outbox)")
    parser.add_argument("--dump", metavar="CSV", help="write every card: when its event was written (s from "
                        "phase 1), latency, type, tenant, its CRM in phase 2")
    args = parser.parse_args()
    pin = pinned(1)
    if pin is not None:
        pin()  # fsbridge gets CPU 0 (Fsbridge)
    # As bench_load: this process collects young objects only, so that full collections do not stall its writes.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 1_000_000_000)

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fsbridge-tenants-"))
    tenants_dir = tmp / "tenants.d"
    tenants_dir.mkdir()
    crm = Accounts.start(extra=["--accounts", str(args.tenants)], timeout=120)
    sim = TimedSimulator(password="ClueCon", heartbeat_interval=20.0)
    sim.start()
    for i, url in enumerate(crm.urls):
        (tenants_dir / f"{tenant_name(i)}.yaml").write_text(tenant_file(i, url, args.card_max_age))
    cfg = settings(fs_port=sim.port, state_dir=str(tmp / "state"),
                   http={"listen": f"127.0.0.1:{free_port()}", "internal_listen": f"127.0.0.1:{free_port()}"},
                   log={"level": args.log_level})
    cfg["crm"] = {"timezone": "Europe/Moscow"}
    if args.telephony_rate is not None:
        cfg["crm"]["telephony_rate"] = args.telephony_rate
    cfg["integration"] = {"public_url": "https://pbx.example.com"}
    cfg["originate"] = {"gateway": "bench-trunk"}  # click-to-call on: else a warning per tenant at each reload
    del cfg["managers"], cfg["external_phones"]
    cfg["tenants_dir"] = str(tenants_dir)
    monitor = ({"GEVENT_MONITOR_THREAD_ENABLE": "1", "GEVENT_MAX_BLOCKING_TIME": str(args.blocking_report / 1e3)}
               if args.blocking_report else None)
    t = time.monotonic()
    fsb = Fsbridge(tmp, cfg, env=monitor)
    run = Run(args, sim, crm, fsb, tenants_dir)
    profiler = None
    ok = True
    try:
        fsb.wait_ready(timeout=120)
        sim.wait_for_subscriber(timeout=60)
        started = time.monotonic() - t
        _, idle_hwm = fsb.memory_mb()
        print(f"fsbridge pid {fsb.pid} with {args.tenants} tenant files: ready in {started:.1f} s, {idle_hwm:.0f} MB; "
              f"simulator pid {os.getpid()}, fake CRM pid {crm.proc.pid} ({args.tenants} accounts, 40 req/s each "
              f"enforced); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
        top = run.per_tenant
        budget = 40 * 0.95 if args.telephony_rate is None else args.telephony_rate
        print(f"load: {args.rate:g} calls/s spread 1/(i+1), at most {args.max_calls_per_tenant:g} calls/s per tenant: "
              f"the largest {', '.join(f'{r:.1f}' for r in top[:5])} calls/s (uncapped the first would get "
              f"{args.rate / sum(1 / (i + 1) for i in range(args.tenants)):.1f}), i.e. "
              f"{2 * top[0]:.0f} card requests/s + history uploads against fsbridge's pacing of {budget:g}/s; "
              f"the smallest {top[-1]:.3f} calls/s", flush=True)
        gevent.spawn(run.hub_lag)
        watcher = gevent.spawn(run.watch)

        run.load(args.warmup)
        gevent.sleep(2)
        before1 = run.outcomes()
        scrape1 = fsb.scrape()

        if args.profile:
            profiler = start_profile(fsb.pid, pathlib.Path(args.profile), 2 * args.duration)
        p1_from = time.time()
        calls1 = run.load(args.duration)
        p1_to = time.time()

        bad = sorted(run.rng.sample(range(args.tenants), int(args.tenants * args.bad)))
        down, slow = bad[0::2], bad[1::2]
        crm.set_outage_of("html503", down)
        crm.set_latency_of(args.slow, slow)
        healthy = set(range(args.tenants)) - set(bad)
        gevent.sleep(0.5)  # the commands reach the fake before phase 2's first call
        p2_from = time.time()
        calls2 = run.load(args.duration)
        p2_to = time.time()
        gevent.sleep(3)
        run.collect()
        after2 = run.outcomes()
        scrape2 = fsb.scrape()

        # The outages end; every call's history must reach its own tenant's CRM exactly once.
        crm.set_outage_of(None, down)
        crm.set_latency_of(0.0, slow)
        back = time.time()
        wait_until(run.drained, args.drain_timeout, step=1.0)
        drained = time.time() - back
        hist = run.history()

        # Reload every tenant file (a changed card age) while calls go on.
        for i, url in enumerate(crm.urls):
            (tenants_dir / f"{tenant_name(i)}.yaml").write_text(tenant_file(i, url, args.card_max_age - 1))
        during = gevent.spawn(run.load, 2 * args.reload_calls)
        gevent.sleep(args.reload_calls)
        took, answer = run.reload()
        calls3 = during.get()
        wait_until(run.drained, args.drain_timeout, step=1.0)
        gevent.sleep(2)
        run.collect()
        hist3 = run.history(calls3)
        hist_all = run.history()
        run.stop()
        watcher.join()
        if profiler is not None:
            profiler.wait(timeout=60)
        log_levels = fsb.log_levels()
        reload_lines = [line for line in fsb.log_path.read_text(errors="replace").splitlines() if "reload" in line]
    finally:
        rc = shut_down(run, fsb, profiler, sim, crm)

    # -- report ---------------------------------------------------------------------------------------
    # The same tenants in both phases: in phase 1 the others' last cards wait behind their CRM's outage.
    lat1 = run.latencies(p1_from, p1_to, healthy)
    lat2 = run.latencies(p2_from, p2_to, healthy)
    all1 = lat1["in"] + lat1["hangup"] + lat1["out"]
    all2 = lat2["in"] + lat2["hangup"] + lat2["out"]
    q1, q2 = pct(all1, 0.99), pct(all2, 0.99)
    ratio = q2 / q1 if q1 else math.nan
    print()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end; fsbridge used "
          f"{run.cpu_share(p1_from, p1_to):.0%} of a core in phase 1, {run.cpu_share(p2_from, p2_to):.0%} in phase 2 "
          f"(the fake CRM process {run.cpu_share(p1_from, p1_to, 2):.0%} and {run.cpu_share(p2_from, p2_to, 2):.0%}, "
          f"this one {run.cpu_share(p1_from, p1_to, 3):.0%} and {run.cpu_share(p2_from, p2_to, 3):.0%}); "
          f"this process's hub lag p99 {ms(pct(run.hub_lags, 0.99))} (delays the simulator's writes, not the "
          f"latencies); the fake CRM process's hub lag p50/p99/max "
          f"{' / '.join(ms(x) for x in crm.lag) if crm.lag else 'n/a'} (delays its reading of cards: in the latencies)")
    for name, lat, calls, q, who in (("phase 1, every CRM healthy", lat1, calls1, q1,
                                      f"the {len(healthy)} tenants healthy in both phases"),
                                     (f"phase 2, {len(down)} CRMs down (HTML 503) and {len(slow)} answering in "
                                      f"{args.slow:g} s", lat2, calls2, q2, f"the {len(healthy)} healthy tenants")):
        cards = lat["in"] + lat["hangup"] + lat["out"]
        print(f"{name}: {len(calls)} calls; {who}' cards: {len(cards)}, p50 {ms(pct(cards, 0.5))}, "
              f"p99 {ms(q)}, max {ms(max(cards, default=math.nan))} (in p99 {ms(pct(lat['in'], 0.99))}, hangup p99 "
              f"{ms(pct(lat['hangup'], 0.99))})   goal p99 <= {GOAL_P99_MS:g} ms: {verdict(q * 1e3 <= GOAL_P99_MS)}")
        ok &= q * 1e3 <= GOAL_P99_MS
    print(f"ratio of the healthy tenants' p99, phase 2 / phase 1: {ratio:.2f}   goal <= {GOAL_RATIO}: "
          f"{verdict(ratio <= GOAL_RATIO)}")
    ok &= ratio <= GOAL_RATIO
    blocked = [hist_quantile(scrape1.buckets("fsbridge_hub_blocked_seconds"),
                             scrape2.buckets("fsbridge_hub_blocked_seconds"), q) for q in (0.5, 0.99, 0.999)]
    gcs = []
    for g in "012":
        n = (scrape2.get_sum("fsbridge_gc_pause_seconds_count", generation=g)
             - scrape1.get_sum("fsbridge_gc_pause_seconds_count", generation=g))
        total = (scrape2.get_sum("fsbridge_gc_pause_seconds_sum", generation=g)
                 - scrape1.get_sum("fsbridge_gc_pause_seconds_sum", generation=g))
        gcs.append(f"gen {g} {n:.0f}x, {ms(total / n) if n else 'n/a'} each")
    print(f"  fsbridge over both phases: fsbridge_hub_blocked_seconds p50 {ms(blocked[0])}, p99 {ms(blocked[1])}, "
          f"p99.9 {ms(blocked[2])}; garbage collections: {', '.join(gcs)}; /metrics took {ms(scrape2.took)} to answer")
    healthy_missing = [k for k in run.missing_cards(calls1 + calls2) if run.tenant_of[k[0]] in healthy]
    print("cards: fsbridge's outcomes over both phases: "
          + ", ".join(f"{o} {after2[o] - before1[o]:.0f}" for o in after2)
          + f"; healthy tenants' cards never delivered: {len(healthy_missing)}; delivered twice: {run.twice}; "
          f"delivered to another tenant's CRM: {run.wrong_account()}")
    limited = sum(crm.limited.values())
    print(f"requests the fake CRMs refused for retailCRM's rate limit: {limited}"
          + (f" (accounts {', '.join(f'{tenant_name(a)} {n}' for a, n in crm.limited.most_common(5))})"
             if limited else "") + f"   goal 0: {verdict(limited == 0)}")
    ok &= limited == 0
    got, missing, twice, wrong = hist
    once = not missing and not twice and not wrong
    print(f"history: {got} of {len(run.tenant_of) - len(calls3)} calls in their tenant's CRM {drained:.1f} s after "
          f"the outages ended, {missing} missing, {twice} stored twice ({run.crm.duplicates} re-sent and refused as "
          f"duplicates), {wrong} in another tenant's CRM   exactly once: {verdict(once)}")
    ok &= once
    missed3 = run.missing_cards(calls3)
    got3, missing3, twice3, wrong3 = hist3
    print(f"reload of {args.tenants} changed tenant files (POST /reload) with {args.rate:g} calls/s going on: "
          f"{took:.2f} s   goal < {GOAL_RELOAD_S:g} s: {verdict(took < GOAL_RELOAD_S)}; "
          f"{len(answer.get('refused') or {})} refused, {len(answer.get('tenants') or [])} running")
    print(f"  {len(calls3)} calls started in the {2 * args.reload_calls:g} s around it: {len(missed3)} cards never "
          f"delivered ({collections.Counter(k for _, k in missed3)}); history {got3} delivered, {missing3} "
          f"missing, {twice3} twice, {wrong3} elsewhere   nothing missed: "
          f"{verdict(not missed3 and not missing3 and not twice3 and not wrong3)}")
    ok &= took < GOAL_RELOAD_S and not answer.get("refused") and not missed3 and not missing3 and not twice3
    if hist_all[1] or hist_all[2] or hist_all[3]:
        print(f"  history of every call at the end: {hist_all}")
        ok = False
    print(f"  fsbridge's log about it: {reload_lines[-1][:200] if reload_lines else '(none)'}")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of fsbridge (VmHWM): {run.hwm:.0f} MB   goal < {GOAL_RSS_MB:.0f} MB: "
          f"{verdict(run.hwm < GOAL_RSS_MB)}   (after start-up {idle_hwm:.0f} MB; this process {own:.0f} MB)")
    ok &= run.hwm < GOAL_RSS_MB
    print(f"fsbridge exit status {rc}; its log: {', '.join(f'{n} {k}' for k, n in log_levels.most_common())}"
          + (f" (kept in {tmp})" if args.keep else ""))
    if args.dump:
        with open(args.dump, "w") as f:
            f.write("written_at,latency_ms,type,tenant,crm\n")
            for (call, kind), written in sorted(run.sim.written_at.items(), key=lambda kv: kv[1]):
                got = run.arrived.get((call, kind))
                if got is not None:
                    i = run.tenant_of[call]
                    state = "down" if i in down else "slow" if i in slow else "healthy"
                    f.write(f"{written - p1_from:.4f},{(got[0] - written) * 1e3:.3f},{kind},{i},{state}\n")
    if args.profile:
        summarize_profile(pathlib.Path(args.profile))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print("all goals met" if ok else "GOALS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
