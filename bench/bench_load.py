"""Load benchmark: fsbridge in its own process follows a simulated FreeSWITCH at a sustained call rate and
sends call events (cards) and the call history to the strict fake retailCRM.

    python3 -m bench.bench_load                          # 200 calls/s, 5 000 concurrent, 60 s of starts
    python3 -m bench.bench_load --duration 300           # the issue's "several minutes"
    python3 -m bench.bench_load --crm-latency 0.2        # every CRM request takes 200 ms
    python3 -m bench.bench_load --outage 120 --outage-at 60 --duration 240   # the CRM down for 2 minutes
    python3 -m bench.bench_load --rate 2 --concurrency 10 --duration 20 --watch   # watch calls flow

What runs where. Three processes. fsbridge is `python -m fsbridge run --config <tmp>/fsbridge.yaml`, so its
CPU (utime + stime from /proc/<pid>/stat) and peak RSS (VmHWM from /proc/<pid>/status) are its own. The
FreeSWITCH simulator (tests/fakes/freeswitch.py) runs in this process, and the fake retailCRM
(tests/fakes/retailcrm.py) in a third (bench/fake_crm_process.py), which reports each request it received
and when over a pipe: sharing this process's hub, it read no request while the simulator wrote a burst or
this process parsed a scrape, and that wait counted as fsbridge's. The CPU of both and their hub lags are
printed too, since they bound what is measured. With two CPUs or more, fsbridge is pinned to CPU 0, this
process and the fake CRM to CPU 1.

The load. The six captured calls in turn, each with fresh ids (`play_many`), `--rate` started per second for
`--duration` seconds. Their recorded lengths average ~7.7 s, so 5 000 calls at once at 200 calls/s need calls
~25 s long: they are played at speed rate x 7.7 / concurrency (0.31 by default; `--speed` to choose). The
simulator keeps the recorded times, shifted by whole seconds, so fsbridge's own ingest-lag histogram
(Event-Date-Timestamp to handling) reads up to 0.5 s at any speed and far more at speed < 1; the ingest lag
that counts is measured from outside: at each scrape of /metrics, how long ago the simulator wrote the first
event that fsbridge had not yet counted (0 when it has counted them all).

The instrument. A card's time starts when the simulator's write returned, with no yield in between, so a
stall of this process can only delay an event's write (and its stamp), not add to a card's latency; a stall
of the fake CRM process delays the reading of cards, and its hub lag is printed. This process runs without
full collections of its cyclic garbage collector (one of its heap took up to 200 ms). The fake CRM's
sockets get TCP_NODELAY like the real CRM's nginx front (`--fake-nagle` to leave Nagle on).

Cards. 200 calls/s make 400 call events/s, ten times retailCRM's 40 requests/s: for these runs the fake's rate
limits are off and so is fsbridge's pacing (`crm.telephony_rate: 0`; `--telephony-rate 1000` paces at 1000/s
instead, which spaces every request start 1.05 ms apart and so adds its own queueing to the latency).
Event -> CRM latency is taken per card (callExternalId + type): from the moment the simulator's socket write
of the event that caused it returned (the first ringing of a manager leg for `in`, the creation of the
customer leg for `out`, the last CHANNEL_HANGUP_COMPLETE for `hangup`) to the moment the fake CRM had read the
request that delivered it.
The simulator has no public hook for "when was this event written", so TimedSimulator below overrides two
private methods (`_emit`, `_Conn._notify`); it does not change what is sent.

Exit status 1 when a goal is missed.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import array  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import yaml  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import hub_lag  # noqa: E402
from tests.conftest import API_KEY, settings  # noqa: E402
from tests.fakes.esl_captures import load_scenario  # noqa: E402
from tests.fakes.freeswitch import FreeSwitchSimulator, PlayedCall  # noqa: E402

SCENARIOS = ("inbound_answered", "inbound_no_answer", "inbound_busy", "inbound_ext_no_answer",
             "outbound_ext_dial", "outbound_originate_answered")
CARDS_PER_CALL = 2  # every captured call makes an `in` or `out` and a `hangup` (tests/test_bridge.py)
RINGING = frozenset({"CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER"})

# Goals (the issue).
GOAL_P99_MS = 5.0
GOAL_RSS_MB = 200.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the simulator, with write times ------------------------------------------------------------------


class TimedSimulator(FreeSwitchSimulator):
    """The simulator as is, plus: when the event behind each card left the socket, and a log of how many
    event frames the subscriber had been written at each write (for the ingest lag)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.written_at: dict[tuple[str, str], float] = {}  # (call id, card type) -> time.time()
        self._claimed: set[tuple[str, str]] = set()
        self._waiting: collections.deque[tuple[int, tuple[str, str]]] = collections.deque()
        self.subscriber: Any = None  # the _Conn of fsbridge's event subscription
        self.subscribers = 0
        # Arrays, not lists: one entry per write, 700 000 in five minutes.
        self.writes_n = array.array("q")  # event frames written to the subscriber so far ...
        self.writes_t = array.array("d")  # ... as of this time.time()
        self.started = self.finished = 0
        self.first_start = self.last_start = 0.0
        # What the report needs of each call played, not the PlayedCall (60 000 of them in five minutes).
        self.a_legs: list[str] = []
        self.frames_dropped = 0  # event frames the simulator's queue dropped

    def play(self, *args: Any, **kwargs: Any) -> PlayedCall:
        now = time.time()
        self.started += 1
        self.first_start = self.first_start or now
        self.last_start = now
        try:
            played = super().play(*args, **kwargs)
        finally:
            self.finished += 1
        self.a_legs.append(played.a_leg)
        self.frames_dropped += played.dropped
        return played

    @property
    def live(self) -> int:
        return self.started - self.finished

    def _set_events(self, conn: Any, on: bool) -> None:
        super()._set_events(conn, on)
        if on and conn is not self.subscriber:
            self.subscriber = conn
            self.subscribers += 1
            self._waiting.clear()
            notify = conn._notify

            def written() -> None:  # runs right after each sendall() of the writer greenlet
                if conn is self.subscriber and conn.sent != (self.writes_n[-1] if self.writes_n else 0):
                    t = time.time()
                    self.writes_n.append(conn.sent)
                    self.writes_t.append(t)
                    waiting = self._waiting
                    while waiting and waiting[0][0] <= conn.sent:
                        self.written_at[waiting.popleft()[1]] = t
                notify()

            conn._notify = written

    def _emit(self, track: Any, call: Any) -> None:
        ev = track.cap.events[track.pos]
        frames = call.frames
        super()._emit(track, call)
        conn = self.subscriber
        if call.frames == frames or conn is None or call.last_enq.get(conn) != conn.enqueued:
            return  # not sent to fsbridge
        name = ev.name
        if name == "CHANNEL_HANGUP_COMPLETE":
            kind = "hangup"  # the last one wins
        elif name == "CHANNEL_CREATE" or name in RINGING:
            kind = "out" if name == "CHANNEL_CREATE" else "in"
            if call.fresh_map.get(ev.headers.get("unique-id", "")) == call.fresh[0]:
                return  # the first leg: neither the manager ringing nor the customer leg of a call out
        else:
            return
        key = (call.fresh[0], kind)
        if kind != "hangup":
            if key in self._claimed:
                return
            self._claimed.add(key)
        self._waiting.append((conn.enqueued, key))

    def ingest_backlog(self, handled: int, at: float) -> float:
        """Seconds since the simulator wrote the oldest event fsbridge had not handled at `at`."""
        i = bisect.bisect_left(self.writes_n, handled + 1)
        if i >= len(self.writes_n):
            return 0.0
        return max(0.0, at - self.writes_t[i])


# -- the fake CRM -------------------------------------------------------------------------------------


@dataclass
class Card:
    arrived: float
    call_id: str
    type: str


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class CrmSide:
    """The fake retailCRM in its own process (bench/fake_crm_process.py), and what it reported receiving."""

    proc: subprocess.Popen[bytes]
    url: str = ""
    cards: list[Card] = field(default_factory=list)  # since the last take()
    failed_events: collections.Counter = field(default_factory=collections.Counter)
    uploads: collections.Counter = field(default_factory=collections.Counter)
    upload_times: list[float] = field(default_factory=list)  # when each upload request arrived (--dump)
    duplicates: int = 0
    uploaded: list[tuple[float, list[str]]] = field(default_factory=list)  # since the last look (--watch)
    lag: list[float] = field(default_factory=list)  # its hub lag p50, p99, max (s), with stored_calls()
    _calls: gevent.event.AsyncResult | None = None

    @classmethod
    def start(cls, nagle: bool = False, extra: list[str] | None = None, timeout: float = 20.0) -> Any:
        # On CPU 1 with the simulator (the affinity this process has), leaving CPU 0 to fsbridge alone.
        proc = subprocess.Popen([sys.executable, "-m", "bench.fake_crm_process", "--api-key", API_KEY]
                                + (["--nagle"] if nagle else []) + (extra or []),
                                cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=pinned(1))
        side = cls(proc)
        ready = gevent.event.Event()
        gevent.spawn(side._read, ready)
        if not ready.wait(timeout):
            proc.kill()
            raise SystemExit("the fake CRM process did not start")
        return side

    def _read(self, ready: gevent.event.Event) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                records = json.loads(line)
            except ValueError:
                print(f"  the fake CRM process wrote a line that is not JSON: {line[:80]!r}", flush=True)
                continue
            for record in records:
                if self._record(record):
                    ready.set()
        # End of its output: it exited (stop(), or it died). Whoever waits for it is told.
        if self._calls is not None and not self._calls.ready():
            self._calls.set_exception(SystemExit(f"the fake CRM process exited ({self.proc.wait()})"))

    def _record(self, record: list[Any]) -> bool:
        """Take one report record in; True once the fake is listening."""
        kind = record[0]
        if kind == "card":
            self.cards.append(Card(record[1], record[2], record[3]))
        elif kind == "refused":
            self.failed_events[record[2]] += 1
        elif kind == "upload":
            self.uploads[record[1]] += 1
            self.upload_times.append(record[2])
        elif kind == "stored":
            self.uploaded.append((record[1], record[2]))
            self.duplicates += record[3]
        elif kind == "lag":
            self.lag = record[1]
        elif kind == "calls":
            if self._calls is not None:
                self._calls.set(record[1])
        elif kind == "url":
            self.url = record[1]
            return True
        return False

    def _send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def set_latency(self, seconds: float) -> None:
        self._send(latency=seconds)

    def set_outage(self, kind: str | None) -> None:
        self._send(outage=kind)

    def stored_calls(self, timeout: float = 60.0) -> set[str]:
        """Every call the fake CRM stored; everything it received before is reported by then too."""
        self._calls = gevent.event.AsyncResult()
        self._send(calls=True)
        return set(self._calls.get(timeout=timeout))

    def take(self) -> list[Card]:
        """Card deliveries since the last call."""
        cards, self.cards = self.cards, []
        return cards

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- fsbridge, the process ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Scrape(dict):
    """Prometheus text: name -> {sorted label pairs: value}."""

    def __init__(self, text: str, at: float) -> None:
        super().__init__()
        self.at = at
        self.took = 0.0  # seconds fsbridge took to answer the scrape
        for n, line in enumerate(text.splitlines()):
            if n % 50 == 49:
                gevent.sleep(0)  # the simulator shares this hub: parsing in one go would delay its writes
            if not line or line[0] == "#":
                continue
            m = _SAMPLE.match(line)
            if m:
                labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
                self.setdefault(m.group(1), {})[labels] = float(m.group(3))

    def get_sum(self, name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v for k, v in self.get(name, {}).items() if want <= set(k))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        rows = [(float(dict(k)["le"]), v) for k, v in self.get(name + "_bucket", {}).items()]
        return sorted(rows)


def pinned(cpu: int) -> Any:
    """Keep fsbridge and this process on CPUs of their own: woken by each other over loopback, the scheduler
    would otherwise often put both on one CPU, and each would wait for the other's time slice."""
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


class Fsbridge:
    def __init__(self, tmp: pathlib.Path, cfg: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.cfg_path = tmp / "fsbridge.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.log_path = tmp / "fsbridge.log"
        self.metrics_url = f"http://{cfg['http']['internal_listen']}/metrics"  # the internal listener
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fsbridge", "run", "--config", str(self.cfg_path)],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=pinned(0),
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) in MB."""
        values = {}
        for line in pathlib.Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kb, _ = line.split()
                values[key] = int(kb) / 1024
        return values["VmRSS:"], values["VmHWM:"]

    def scrape(self) -> Scrape:
        t = time.perf_counter()
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        scrape = Scrape(text, time.time())
        scrape.took = time.perf_counter() - t
        return scrape

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"fsbridge exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.scrape()
                return
            except OSError:
                gevent.sleep(0.1)
        raise SystemExit(f"fsbridge's /metrics did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_levels(self) -> collections.Counter:
        counts: collections.Counter = collections.Counter()
        with self.log_path.open(errors="replace") as f:
            for line in f:
                parts = line.split(" ", 4)
                counts[parts[2] if len(parts) > 3 else "?"] += 1
        return counts


# -- sampling -----------------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float
    cpu: float  # fsbridge CPU seconds so far
    bench_cpu: float  # this process's
    crm_cpu: float  # the fake CRM process's
    rss: float
    hwm: float
    m: Scrape
    live: int  # calls playing at the simulator
    started: int
    sim_queue: int  # event frames waiting in the simulator for fsbridge's socket
    backlog: float  # ingest lag seen from outside (seconds)
    load1: float

    @property
    def handled(self) -> float:
        return self.m.get_sum("fsbridge_esl_events_total")


def bench_cpu() -> float:
    t = os.times()
    return t.user + t.system


class Run:
    def __init__(self, args: argparse.Namespace, sim: TimedSimulator, crm: CrmSide, fsb: Fsbridge) -> None:
        self.args = args
        self.sim = sim
        self.crm = crm
        self.fsb = fsb
        self.samples: list[Sample] = []
        self.hub_lags: list[float] = []
        self.latencies: list[tuple[float, float, str]] = []  # (cause written at, latency s, type)
        self.unmatched = 0
        self.duplicate_cards = 0
        self.delivered_keys: set[tuple[str, str]] = set()
        self.cards_total = 0
        self.t0 = time.time()
        self._stop = False

    def sample(self) -> Sample:
        m = self.fsb.scrape()
        sim = self.sim
        conn = sim.subscriber
        rss, hwm = self.fsb.memory_mb()
        s = Sample(at=m.at, cpu=self.fsb.cpu_seconds(), bench_cpu=bench_cpu(), crm_cpu=self.crm.cpu_seconds(),
                   rss=rss, hwm=hwm, m=m,
                   live=sim.live, started=sim.started, sim_queue=len(conn.queue) if conn is not None else 0,
                   backlog=0.0, load1=os.getloadavg()[0])
        s.backlog = sim.ingest_backlog(int(s.handled), m.at)
        self.samples.append(s)
        return s

    def collect_cards(self) -> None:
        cards = self.crm.take()
        uploaded, self.crm.uploaded = self.crm.uploaded, []
        lines: list[tuple[float, str]] = []
        for received, ids in uploaded:
            lines.append((received, f"history: {len(ids)} call(s) uploaded "
                                    f"({', '.join(i[:8] for i in ids[:5])}{', ...' if len(ids) > 5 else ''})"))
        for card in cards:
            self.cards_total += 1
            key = (card.call_id, card.type)
            if key in self.delivered_keys:
                self.duplicate_cards += 1
                continue
            self.delivered_keys.add(key)
            sent = self.sim.written_at.pop(key, None)
            if sent is None:
                self.unmatched += 1
                continue
            self.latencies.append((sent, card.arrived - sent, card.type))
            lines.append((card.arrived, f"card {card.type:6s}  call {card.call_id[:8]}  "
                                        f"{(card.arrived - sent) * 1e3:6.1f} ms after the event"))
        if self.args.watch:
            for at, line in sorted(lines):
                print(f"  {at - self.t0:7.2f} s  {line}", flush=True)

    def loop(self, interval: float = 1.0) -> None:
        last_print = 0.0
        while not self._stop:
            gevent.sleep(interval)
            try:
                s = self.sample()
            except OSError as exc:
                print(f"  sample failed: {exc}", flush=True)
                continue
            self.collect_cards()
            if not self.args.watch and s.at - last_print >= self.args.progress:
                last_print = s.at
                self.progress(s)

    def progress(self, s: Sample) -> None:
        prev = self.samples[-min(len(self.samples), 11)]
        span = max(s.at - prev.at, 1e-9)
        m = s.m
        print(f"  t={s.at - self.t0:6.1f}s  started {s.started:6d}  playing {s.live:5d}  "
              f"events {(s.handled - prev.handled) / span:6.0f}/s  fsbridge cpu {(s.cpu - prev.cpu) / span:4.0%} "
              f"rss {s.rss:4.0f} MB  simulator cpu {(s.bench_cpu - prev.bench_cpu) / span:4.0%}  "
              f"fake CRM cpu {(s.crm_cpu - prev.crm_cpu) / span:4.0%}  "
              f"backlog {s.backlog * 1e3:5.0f} ms  cards sent "
              f"{m.get_sum('fsbridge_call_events_done_total', outcome='sent'):6.0f} stale "
              f"{m.get_sum('fsbridge_call_events_done_total', outcome='stale'):5.0f} queued "
              f"{m.get_sum('fsbridge_call_events_queued'):5.0f}  outbox "
              f"{m.get_sum('fsbridge_outbox_calls', state='pending'):5.0f}  load {s.load1:.2f}", flush=True)

    def hub_lag(self) -> None:
        hub_lag.watch(self.hub_lags, lambda: self._stop)

    def stop(self) -> None:
        self._stop = True


# -- statistics ---------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def hist_quantile(before: list[tuple[float, float]], after: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile over the window between two scrapes."""
    prev = dict(before)
    rows = [(le, n - prev.get(le, 0.0)) for le, n in after]
    if not rows or rows[-1][1] <= 0:
        return math.nan
    rank = q * rows[-1][1]
    lo_le, lo_n = 0.0, 0.0
    for le, n in rows:
        if n >= rank:
            if math.isinf(le):
                return lo_le  # beyond the last finite bucket
            return lo_le + (le - lo_le) * ((rank - lo_n) / (n - lo_n) if n > lo_n else 1.0)
        lo_le, lo_n = le, n
    return math.nan


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1e3:.1f} ms"


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def mean_length(names: list[str]) -> float:
    """Seconds from a call's first event to its last, as recorded, averaged over the mix."""
    lengths = [max(cap.duration_us for cap in load_scenario(n).captures()) / 1e6 for n in names]
    return sum(lengths) / len(lengths)


# -- py-spy -------------------------------------------------------------------------------------------


def start_profile(pid: int, path: pathlib.Path, seconds: float) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("py-spy")
    if exe is None:
        print("  --profile: py-spy is not installed (pip install py-spy); no profile")
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(path),
                             "--duration", str(max(1, int(seconds))), "--rate", "200", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: pathlib.Path, top: int = 20) -> None:
    """Collapsed stacks (py-spy --format raw, idle time not sampled): self and inclusive time by function."""
    if not path.exists():
        print("  (no profile written)")
        return
    own: collections.Counter = collections.Counter()
    inside: collections.Counter = collections.Counter()
    total = 0
    frame_re = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        names = []
        for frame in stack.split(";"):
            m = frame_re.match(frame)
            names.append(f"{m.group(1)} ({m.group(2)})" if m else frame)
        own[names[-1]] += count
        for name in set(names):
            inside[name] += count
    if not total:
        print("  (empty profile)")
        return
    print(f"  py-spy: {total} samples of fsbridge busy (idle not sampled); self time, top {top}:")
    for name, n in own.most_common(top):
        print(f"    {n / total:6.1%}  {name}")
    print(f"  inclusive time, top {top}:")
    for name, n in inside.most_common(top):
        print(f"    {n / total:6.1%}  {name}")


# -- the run ------------------------------------------------------------------------------------------


def shut_down(run: Any, fsb: Fsbridge, profiler: subprocess.Popen[bytes] | None, sim: FreeSwitchSimulator,
              crm: CrmSide) -> int | None:
    """Stop everything a run started, fsbridge first (its exit status is returned)."""
    run.stop()
    rc = fsb.stop()
    if profiler is not None and profiler.poll() is None:
        profiler.terminate()
    sim.stop()
    crm.stop()
    return rc


def wait_until(pred: Any, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        gevent.sleep(step)
    return pred()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="calls started per second")
    parser.add_argument("--concurrency", type=int, default=5000, help="calls playing at once (sets the speed)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of call starts")
    parser.add_argument("--speed", type=float, default=None,
                        help="replay speed of the captures (default: what gives --concurrency)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="captured calls to cycle through")
    parser.add_argument("--crm-latency", type=float, default=0.0, help="seconds the fake CRM adds to each request")
    parser.add_argument("--outage", type=float, default=0.0, help="seconds the fake CRM is down")
    parser.add_argument("--outage-at", type=float, default=60.0, help="seconds into the load the outage starts")
    parser.add_argument("--outage-kind", default="html503", choices=("html503", "html502", "timeout", "reset"),
                        help="how the CRM is down (the fake's outage switch)")
    parser.add_argument("--fake-nagle", action="store_true",
                        help="leave Nagle on in the fake CRM's server (its replies may wait for a delayed ACK)")
    parser.add_argument("--card-max-age", type=float, default=30.0, help="fsbridge's crm.card_max_age")
    parser.add_argument("--card-workers", type=int, default=8, help="fsbridge's crm.card_workers")
    parser.add_argument("--telephony-rate", type=float, default=0.0,
                        help="fsbridge's crm.telephony_rate (0: no pacing, the default here)")
    parser.add_argument("--log-level", default="info", help="fsbridge's log.level")
    parser.add_argument("--baseline-calls", type=int, default=30,
                        help="calls played one at a time at recorded speed before the load: the unloaded latency")
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait after the last call for fsbridge to deliver everything")
    parser.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument("--watch", action="store_true", help="print every card as the fake CRM receives it")
    parser.add_argument("--profile", metavar="FILE", help="py-spy fsbridge during the load into FILE (raw stacks)")
    parser.add_argument("--dump", metavar="CSV", help="write every card's cause time, latency and type to CSV, "
                        "with rows for each /metrics scrape and each history upload")
    parser.add_argument("--blocking-report", type=float, metavar="MS", default=0.0,
                        help="log the stack of any fsbridge greenlet that holds the hub longer than MS (with --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (config, log, outbox)")
    args = parser.parse_args()
    pin = pinned(1)
    if pin is not None:
        pin()  # fsbridge gets CPU 0 (Fsbridge below)

    names = [n for n in args.scenarios.split(",") if n]
    length = mean_length(names)
    speed = args.speed or args.rate * length / args.concurrency
    calls = max(1, round(args.rate * args.duration))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fsbridge-load-"))
    # A full collection of this process's heap (5 000 calls in play, every card received) stalls its hub for
    # up to ~200 ms, the simulator's writes with it. It collects its young objects only (cheap, and most
    # garbage cycles die young); the memory it keeps is printed at the end.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 1_000_000_000)
    crm = CrmSide.start(nagle=args.fake_nagle)
    sim = TimedSimulator(password="ClueCon", heartbeat_interval=20.0)
    sim.start()
    http_port, internal_port = free_port(), free_port()
    cfg = settings(fs_port=sim.port, crm_url=crm.url, state_dir=str(tmp / "state"),
                   crm={"telephony_rate": args.telephony_rate, "card_max_age": args.card_max_age,
                        "card_workers": args.card_workers},
                   http={"listen": f"127.0.0.1:{http_port}", "internal_listen": f"127.0.0.1:{internal_port}"},
                   log={"level": args.log_level})
    # gevent's monitor thread writes the stack of any greenlet holding the hub longer than this to the log.
    monitor = ({"GEVENT_MONITOR_THREAD_ENABLE": "1", "GEVENT_MAX_BLOCKING_TIME": str(args.blocking_report / 1e3)}
               if args.blocking_report else None)
    fsb = Fsbridge(tmp, cfg, env=monitor)
    run = Run(args, sim, crm, fsb)
    profiler = None
    try:
        fsb.wait_ready()
        sim.wait_for_subscriber(timeout=30)
        print(f"fsbridge pid {fsb.pid} (python -m fsbridge run), simulator pid {os.getpid()}, fake CRM pid "
              f"{crm.proc.pid}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
        pacing = f"{args.telephony_rate:g}/s" if args.telephony_rate else "0 (no pacing)"
        print(f"crm.telephony_rate {pacing} and the fake CRM's rate limits off "
              f"(retailCRM allows 40/s: {args.rate * CARDS_PER_CALL:.0f} cards/s would not fit); "
              f"card_max_age {args.card_max_age:g} s, card_workers {args.card_workers}")
        gevent.spawn(run.hub_lag)
        sampler = gevent.spawn(run.loop)

        # Baseline: a quiet PBX, one call at a time at recorded speed.
        gevent.sleep(2)
        idle = run.sample()
        base_from = time.time()
        if args.baseline_calls:
            sim.play_many(names, args.baseline_calls, rate=2.0, speed=1.0)
            wait_until(lambda: len(run.latencies) >= CARDS_PER_CALL * args.baseline_calls, 15)
        baseline_ids = set(sim.a_legs)
        base_lat = [lat for sent, lat, _ in run.latencies if sent >= base_from]

        # The load.
        print(f"load: {calls} calls, {args.rate:g}/s for {args.duration:g} s, mix {'+'.join(names)} "
              f"({length:.1f} s long on average as recorded) at speed {speed:.2f}: "
              f"{args.rate * length / speed:.0f} calls at once expected"
              + (f"; CRM latency {args.crm_latency * 1e3:.0f} ms" if args.crm_latency else "")
              + (f"; CRM down ({args.outage_kind}) from {args.outage_at:g} s for {args.outage:g} s"
                 if args.outage else ""), flush=True)
        if args.crm_latency:
            crm.set_latency(args.crm_latency)
        load_from = time.time()
        start = run.sample()
        if args.profile:
            profiler = start_profile(fsb.pid, pathlib.Path(args.profile), args.duration + length / speed)
        outage: list[float] = []

        def crm_outage() -> None:
            gevent.sleep(args.outage_at)
            crm.set_outage(args.outage_kind)
            outage.append(time.time())
            print(f"  t={time.time() - run.t0:6.1f}s  CRM down ({args.outage_kind})", flush=True)
            gevent.sleep(args.outage)
            crm.set_outage(None)
            outage.append(time.time())
            print(f"  t={time.time() - run.t0:6.1f}s  CRM back", flush=True)

        outage_g = gevent.spawn(crm_outage) if args.outage else None
        player = gevent.spawn(sim.play_many, names, calls, rate=args.rate,
                              concurrency=int(args.concurrency * 1.25) + 10, speed=speed)
        player.join()
        last_call = time.time()
        if outage_g is not None:
            outage_g.join()
        end_of_load = run.sample()
        total_calls = len(sim.a_legs)

        # Drain: every call finished in fsbridge, every card decided, every call uploaded.
        def drained() -> bool:
            m = run.samples[-1].m
            done = m.get_sum("fsbridge_call_events_done_total")
            return (m.get_sum("fsbridge_calls_finished_total") >= total_calls
                    and done >= CARDS_PER_CALL * total_calls
                    and m.get_sum("fsbridge_outbox_calls", state="pending") == 0)
        wait_until(drained, args.drain_timeout)
        drained_at = time.time()
        gevent.sleep(1.5)
        run.stop()
        sampler.join()
        final = run.sample()
        crm_stored = crm.stored_calls()
        run.collect_cards()
        if profiler is not None:
            profiler.wait(timeout=60)
    finally:
        rc = shut_down(run, fsb, profiler, sim, crm)

    # -- report ---------------------------------------------------------------------------------------
    m = final.m
    load_played = set(sim.a_legs) - baseline_ids
    steady = [s for s in run.samples if load_from + length / speed <= s.at <= sim.last_start]
    in_load = [s for s in run.samples if load_from <= s.at <= last_call] or run.samples[-2:]
    start_span = max(sim.last_start - load_from, 1e-9)
    print()
    print(f"{len(load_played)} calls started in {start_span:.1f} s = {len(load_played) / start_span:.1f} calls/s "
          f"(asked {args.rate:g}/s); playing at once: median {pct([s.live for s in steady], 0.5):.0f}, "
          f"max {max((s.live for s in in_load), default=0)} (asked {args.concurrency}); fsbridge followed up to "
          f"{max((s.m.get_sum('fsbridge_calls_tracked') for s in in_load), default=0):.0f} channels")
    print(f"machine: {os.cpu_count()} CPUs, load average {pct([s.load1 for s in in_load], 0.5):.2f} (median "
          f"during the load), max {max((s.load1 for s in in_load), default=0):.2f}")
    span = max(end_of_load.at - start.at, 1e-9)
    lag = crm.lag or [math.nan] * 3
    print(f"the fake CRM process: {(end_of_load.crm_cpu - start.crm_cpu) / span:.0%} of a core; its hub lag "
          f"p50 {ms(lag[0])}, p99 {ms(lag[1])}, max {ms(lag[2])} (delays its reading of cards: counted in the "
          f"latencies below)")
    print(f"this process (simulator): {(end_of_load.bench_cpu - start.bench_cpu) / span:.0%} of a "
          f"core; its hub lag p50 {ms(pct(run.hub_lags, 0.5))}, p99 {ms(pct(run.hub_lags, 0.99))} "
          f"max {ms(max(run.hub_lags, default=math.nan))} (delays the simulator's writes, not the latencies); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB without full garbage collections")

    ok = True
    # Latency.
    outage_from, outage_to = [*outage, math.inf, math.inf][:2]
    loaded = [(sent, lat, kind) for sent, lat, kind in run.latencies if sent >= load_from]
    kept_sent = [(sent, lat, kind) for sent, lat, kind in loaded
                 if not (outage_from - args.card_max_age <= sent <= outage_to)]
    kept = [(lat, kind) for _, lat, kind in kept_sent]
    clean = [lat for lat, _ in kept]
    p50, p99 = pct(clean, 0.5), pct(clean, 0.99)
    slow = args.crm_latency > 0
    print(f"event -> CRM request latency under load ({len(clean)} cards"
          + (", cards caused during the outage or its last card_max_age before excluded" if args.outage else "")
          + f"): p50 {ms(p50)}, p99 {ms(p99)}, max {ms(max(clean, default=math.nan))}   goal p99 <= "
          f"{GOAL_P99_MS:g} ms: " + (verdict(p99 * 1e3 <= GOAL_P99_MS) if not slow else
                                    "not applicable (the CRM answers in "
                                    f"{args.crm_latency * 1e3:.0f} ms)"))
    if not slow:
        ok &= p99 * 1e3 <= GOAL_P99_MS
    for kind in ("in", "out", "hangup"):
        lats = [lat for lat, k in kept if k == kind]
        if lats:
            print(f"  {kind:7s} p50 {ms(pct(lats, 0.5)):>9s}  p99 {ms(pct(lats, 0.99)):>9s}  ({len(lats)} cards)")
    req_n = (end_of_load.m.get_sum("fsbridge_crm_request_seconds_count", endpoint="telephony/call/event")
             - start.m.get_sum("fsbridge_crm_request_seconds_count", endpoint="telephony/call/event"))
    req_s = (end_of_load.m.get_sum("fsbridge_crm_request_seconds_sum", endpoint="telephony/call/event")
             - start.m.get_sum("fsbridge_crm_request_seconds_sum", endpoint="telephony/call/event"))
    if not slow:
        took = [s.m.took for s in in_load]
        print(f"  fsbridge's own hub, seen as the time it took to answer /metrics each second: p50 "
              f"{ms(pct(took, 0.5))}, max {ms(max(took, default=math.nan))}")
        blocked = [hist_quantile(start.m.buckets("fsbridge_hub_blocked_seconds"),
                                 end_of_load.m.buckets("fsbridge_hub_blocked_seconds"), q) for q in (0.5, 0.99, 0.999)]
        print(f"  fsbridge_hub_blocked_seconds over the load: p50 {ms(blocked[0])}, p99 {ms(blocked[1])}, "
              f"p99.9 {ms(blocked[2])}; garbage collections: " + ", ".join(
                  f"gen {g} {n:.0f}x, {ms(t / n) if n else 'n/a'} each, {c:.0f} cyclic objects freed"
                  for g in "012"
                  for n, t, c in [(end_of_load.m.get_sum("fsbridge_gc_pause_seconds_count", generation=g)
                                   - start.m.get_sum("fsbridge_gc_pause_seconds_count", generation=g),
                                   end_of_load.m.get_sum("fsbridge_gc_pause_seconds_sum", generation=g)
                                   - start.m.get_sum("fsbridge_gc_pause_seconds_sum", generation=g),
                                   end_of_load.m.get_sum("python_gc_objects_collected_total", generation=g)
                                   - start.m.get_sum("python_gc_objects_collected_total", generation=g))]))
    if req_n:
        print(f"  mean: {ms(sum(clean) / max(len(clean), 1))}, of which the HTTP request as fsbridge times it "
              f"(fsbridge_crm_request_seconds, until the reply): {ms(req_s / req_n)} over {req_n:.0f} requests")
    if base_lat and not slow:
        print(f"  unloaded baseline, same run ({len(base_lat)} cards, {args.baseline_calls} calls one at a time): "
              f"p50 {ms(pct(base_lat, 0.5))}, p99 {ms(pct(base_lat, 0.99))}; under load p50 "
              f"{p50 / pct(base_lat, 0.5):.1f}x, p99 {p99 / pct(base_lat, 0.99):.1f}x")
    if outage:
        before = [lat for sent, lat, _ in loaded if sent < outage_from - args.card_max_age]
        after = [(sent, lat) for sent, lat, _ in loaded if sent > outage_to]
        late = [sent for sent, lat in after if lat > 1.0]
        print(f"  caused before the outage: p50 {ms(pct(before, 0.5))}, p99 {ms(pct(before, 0.99))}; caused after "
              f"the CRM came back: p50 {ms(pct([lat for _, lat in after], 0.5))}, p99 "
              f"{ms(pct([lat for _, lat in after], 0.99))}; {len(late)} of them later than 1 s, the last caused "
              f"{(max(late) - outage_to) if late else 0:.1f} s after the CRM came back (queued behind the backlog)")
    if run.unmatched or run.duplicate_cards:
        print(f"  cards not matched to an event: {run.unmatched}; delivered twice: {run.duplicate_cards}")

    # Cards.
    outcomes = {o: m.get_sum("fsbridge_call_events_done_total", outcome=o)
                for o in ("sent", "stale", "queue_full", "rejected")}
    expected = CARDS_PER_CALL * total_calls
    print(f"cards: {expected} expected, {outcomes['sent']:.0f} sent, {outcomes['stale']:.0f} dropped as older "
          f"than {args.card_max_age:g} s (outcome=\"stale\"), {outcomes['queue_full']:.0f} queue_full, "
          f"{outcomes['rejected']:.0f} rejected; the fake CRM got {len(run.delivered_keys)} distinct cards"
          + (f" and refused {sum(crm.failed_events.values())} card requests "
             f"({', '.join(f'{n}x HTTP {s}' for s, n in sorted(crm.failed_events.items()))})"
             if crm.failed_events else ""))
    accounted = sum(outcomes.values()) == expected and outcomes["sent"] == len(run.delivered_keys)
    print(f"  every card accounted for (sent + dropped + rejected = expected, sent = received): {verdict(accounted)}")
    if len(run.delivered_keys) > outcomes["sent"]:
        late = sorted(lat for _, lat, _ in run.latencies)
        print(f"  the CRM received {len(run.delivered_keys) - outcomes['sent']:.0f} cards more than fsbridge counts "
              f"as sent: requests it gave up on at the card's deadline (reply not in yet) had already arrived; "
              f"{sum(1 for lat in late if lat > args.card_max_age / 2)} cards reached the CRM more than "
              f"{args.card_max_age / 2:g} s after their event")
    ok &= accounted and outcomes["rejected"] == 0
    if args.outage or slow:
        stale_ok = outcomes["stale"] > 0 or outcomes["sent"] == expected
        print(f"  cards older than the age limit dropped and counted: {outcomes['stale']:.0f} "
              f"{'(counted)' if stale_ok else '(none counted)'}")

    # Drops.
    sim_dropped = sim.frames_dropped
    lost = m.get_sum("fsbridge_esl_events_lost_total")
    dropped = sim_dropped + lost + outcomes["queue_full"]
    written = sim.writes_n[-1] if sim.writes_n else 0
    lost_by = ", ".join(f"{dict(k).get('how', '?')} {v:.0f}"
                        for k, v in m.get("fsbridge_esl_events_lost_total", {}).items())
    print(f"events dropped: {dropped:.0f}   goal 0: {verdict(dropped == 0)}   (simulator queue {sim_dropped}, "
          f"fsbridge_esl_events_lost_total {lost:.0f} [{lost_by}], "
          f"call events queue_full {outcomes['queue_full']:.0f}; "
          f"{written} event frames written, {final.handled:.0f} handled by fsbridge; "
          f"{sim.subscribers} subscription(s))")
    ok &= dropped == 0 and sim.subscribers == 1

    # Ingest.
    backlog = [s.backlog for s in in_load]
    lag_hist = [hist_quantile(start.m.buckets("fsbridge_esl_ingest_lag_seconds"),
                              end_of_load.m.buckets("fsbridge_esl_ingest_lag_seconds"), q) for q in (0.5, 0.99)]
    print(f"ingest lag seen from outside (sampled each second): median {ms(pct(backlog, 0.5))}, "
          f"p99 {ms(pct(backlog, 0.99))}, max {ms(max(backlog, default=math.nan))}; simulator queue max "
          f"{max((s.sim_queue for s in in_load), default=0)} frames")
    if outage:
        during = [s.backlog for s in in_load if outage_from <= s.at <= outage_to]
        before = [s.backlog for s in in_load if s.at < outage_from]
        print(f"  before the outage max {ms(max(before, default=math.nan))}, during it max "
              f"{ms(max(during, default=math.nan))}")
    print(f"  fsbridge_esl_ingest_lag_seconds over the load: p50 {ms(lag_hist[0])}, p99 {ms(lag_hist[1])}"
          + " (not fsbridge's: the simulator shifts recorded times by whole seconds, so stamps are up to 0.5 s"
          + (" old when written, and more at speed < 1, where events keep their recorded times)" if speed < 1
             else " old when written)"))
    if outage:
        o_s = [s for s in run.samples if outage_from <= s.at <= outage_to]
        b_s = [s for s in run.samples if s.at < outage_from and s.at >= load_from]
        if len(o_s) > 1 and len(b_s) > 1:
            during_h = hist_quantile(o_s[0].m.buckets("fsbridge_esl_ingest_lag_seconds"),
                                     o_s[-1].m.buckets("fsbridge_esl_ingest_lag_seconds"), 0.99)
            before_h = hist_quantile(b_s[0].m.buckets("fsbridge_esl_ingest_lag_seconds"),
                                     b_s[-1].m.buckets("fsbridge_esl_ingest_lag_seconds"), 0.99)
            print(f"  its p99 before the outage {ms(before_h)}, during it {ms(during_h)}")

    # Memory, CPU.
    print(f"peak RSS (VmHWM): {final.hwm:.0f} MB   goal < {GOAL_RSS_MB:.0f} MB: {verdict(final.hwm < GOAL_RSS_MB)}   "
          f"(idle {idle.rss:.0f} MB)")
    ok &= final.hwm < GOAL_RSS_MB
    cpu = final.cpu - start.cpu
    steady_cpu = ((steady[-1].cpu - steady[0].cpu) / (steady[-1].at - steady[0].at)
                  if len(steady) > 1 else math.nan)
    print(f"CPU per 1 000 calls: {cpu / len(load_played) * 1000:.2f} s (fsbridge used {cpu:.1f} s from the "
          f"first call to the last upload); at the steady {args.rate:g} calls/s it used "
          f"{'n/a' if math.isnan(steady_cpu) else f'{steady_cpu:.0%}'} of a core")

    # History.
    stored = crm_stored
    everyone = set(sim.a_legs)
    missing, extra = everyone - stored, stored - everyone
    print(f"history: {len(everyone & stored)} of {len(everyone)} calls in the fake CRM, {len(missing)} missing, "
          f"{len(extra)} unknown, {crm.duplicates} re-sent and refused as duplicates; quarantined "
          f"{m.get_sum('fsbridge_outbox_calls', state='quarantined'):.0f}; uploads "
          f"{', '.join(f'{n}x HTTP {s}' for s, n in sorted(crm.uploads.items()))}; complete "
          f"{drained_at - last_call:.1f} s after the last call ended   "
          f"every call exactly once: {verdict(not missing and not extra)}")
    ok &= not missing and not extra
    if args.dump:
        with open(args.dump, "w") as f:
            f.write("written_at,latency_ms,type\n")
            for sent, lat, kind in run.latencies:
                f.write(f"{sent - run.t0:.4f},{lat * 1e3:.3f},{kind}\n")
            for s in run.samples:  # when /metrics was asked (latency: how long fsbridge took to answer)
                f.write(f"{s.m.at - s.m.took - run.t0:.4f},{s.m.took * 1e3:.3f},scrape\n")
            for at in crm.upload_times:  # when a history upload reached the CRM (latency: none)
                f.write(f"{at - run.t0:.4f},0,upload\n")
    levels = fsb.log_levels()
    print(f"fsbridge exit status {rc}; its log: {', '.join(f'{n} {k}' for k, n in levels.most_common())}"
          + (f" (kept in {tmp})" if args.keep else ""))
    if args.profile:
        summarize_profile(pathlib.Path(args.profile))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
