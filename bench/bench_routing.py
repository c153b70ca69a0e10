"""What GET /routing/manager adds to an inbound call's set-up, cached and uncached.

    python3 -m bench.bench_routing [--uncached 300] [--cached 3000] [--rate 30] [--crm-latency 0.02] [--fake-nagle]

Three processes, as in production: the strict fake retailCRM answering /telephony/manager in --crm-latency
seconds (20 ms), fsbridge's HTTP server with the routing endpoint, and this process asking the way the
dialplan script does: one request at a time on a fresh connection (curl and LuaSocket do not keep
connections between calls). Measured:

  CRM direct        this process -> the fake CRM, the same request fsbridge sends: the CRM's own time
  routing uncached  every caller a new number: fsbridge asks the CRM; paced at --rate lookups/s, under
                    retailCRM's 40 requests/s so that the client's rate limiter never waits
  routing cached    one number again and again: answered from fsbridge's cache

"added" is what the dialplan waits beyond the CRM's own answer (uncached) or at all (cached).

The fake CRM's server gets TCP_NODELAY here, as nginx in front of the real one has: without it each reply on
fsbridge's kept-alive connection stalls 40 ms on the client's delayed ACK (--fake-nagle shows that).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
KEY = "bench-api-key-0123456789"
KNOWN_PHONES = 20_000
HIT_PHONE = "+79000000000"


def phone(n: int) -> str:
    return f"+79{n:09d}"


# --- child processes -----------------------------------------------------------------------------------


def serve_crm(port_file: str, latency: float, nodelay: bool) -> None:
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, str(ROOT))
    from tests.fakes.retailcrm import FakeRetailCRM

    crm = FakeRetailCRM(KEY)
    # Off, each reply on fsbridge's kept-alive connection waits for its delayed ACK (40 ms on Linux), a stall
    # the real retailCRM (nginx: tcp_nodelay on) makes nobody wait.
    crm.nodelay = nodelay
    crm.manager_latency = latency
    crm.telephony_rate_limit = None  # pacing keeps us under it; its bookkeeping is not what we measure
    manager = {"id": 1, "firstName": "Bench", "lastName": "Manager", "email": "b@example.com", "code": "100"}
    # The fake looks numbers up by scanning: keep the scan out of the CRM's 20 ms by listing only the hit.
    crm.managers_by_phone[HIT_PHONE] = manager
    crm.start()
    Path(port_file).write_text(str(crm.port))
    crm.serve_forever()


def serve_fsbridge(port_file: str, crm_url: str, state_dir: str) -> None:
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, str(ROOT))
    from fsbridge.crm import RetailCRM
    from fsbridge.http import HttpServer, Router
    from fsbridge.http.lookup import RoutingHandler
    from fsbridge.manager_status import ManagerStatus
    from fsbridge.routing import ManagerLookup

    lookup = ManagerLookup(RetailCRM(crm_url, KEY, timeout=5), {"100": 1}, ManagerStatus(Path(state_dir) / "s.json"),
                           timeout=1.0, cache_ttl=600, negative_ttl=600, cache_size=KNOWN_PHONES)
    router = Router()  # the internal listener's (http.internal_listen), where the Lua script asks
    RoutingHandler(lookup).register(router)
    server = HttpServer("127.0.0.1:0", router, timeout=10)
    server.start()
    Path(port_file).write_text(str(server.address[1]))
    server.serve_forever()


@contextlib.contextmanager
def child(*args: str) -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        proc = subprocess.Popen([sys.executable, "-m", "bench.bench_routing", *args, str(port_file)], cwd=ROOT,
                                stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"child {args[0]} did not start")
                time.sleep(0.02)
            yield int(port_file.read_text())
        finally:
            proc.terminate()
            proc.wait(timeout=10)


# --- measuring -------------------------------------------------------------------------------------------


def get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[float, bytes]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", target, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"GET {target} answered {response.status}: {body[:100]!r}")
    finally:
        conn.close()
    return time.perf_counter() - start, body


def measure(count: int, rate: float | None, one: Callable[[int], tuple[float, bytes]],
            expect: bytes | None) -> list[float]:
    samples = []
    interval = 1.0 / rate if rate else 0.0
    start = time.perf_counter()
    for n in range(count):
        if interval:
            wait = start + n * interval - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        elapsed, body = one(n)
        if expect is not None and body != expect:
            raise SystemExit(f"unexpected answer {body!r}")
        samples.append(elapsed)
    return samples


def pct(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1000 if q < 100 else max(samples) * 1000


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-crm":
        serve_crm(sys.argv[4], float(sys.argv[2]), sys.argv[3] == "nodelay")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-fsbridge":
        serve_fsbridge(sys.argv[4], sys.argv[2], sys.argv[3])
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uncached", type=int, default=300, help="lookups of new numbers (default 300)")
    parser.add_argument("--cached", type=int, default=3000, help="lookups of a cached number (default 3000)")
    parser.add_argument("--rate", type=float, default=30.0, help="uncached lookups per second (default 30)")
    parser.add_argument("--crm-latency", type=float, default=0.02, help="the fake CRM's answer time, s")
    parser.add_argument("--fake-nagle", action="store_true",
                        help="leave the fake CRM's Nagle on (adds its 40 ms delayed-ACK stall to uncached lookups)")
    args = parser.parse_args()
    crm_ms = args.crm_latency * 1000

    with tempfile.TemporaryDirectory() as state, child("--serve-crm", str(args.crm_latency),
                                                      "nagle" if args.fake_nagle else "nodelay") as crm_port, \
            child("--serve-fsbridge", f"http://127.0.0.1:{crm_port}", state) as fs_port:
        headers = {"X-API-KEY": KEY}

        def crm_direct(n: int) -> tuple[float, bytes]:
            return get(crm_port, f"/api/v5/telephony/manager?phone={quote(phone(n + 1))}&details=0&ignoreStatus=0",
                       headers)

        def uncached(n: int) -> tuple[float, bytes]:
            # Numbers the CRM knows nobody for: a new number each time, so fsbridge must ask.
            return get(fs_port, f"/routing/manager?phone={quote(phone(100_000 + n))}")

        def cached(n: int) -> tuple[float, bytes]:
            return get(fs_port, f"/routing/manager?phone={quote(HIT_PHONE)}")

        # Warm-up: imports, first connections, the cache entry for the hit.
        measure(20, None, crm_direct, None)
        measure(1, None, cached, b"100")
        rows = [
            ("CRM direct (reference)", measure(args.uncached, args.rate, crm_direct, None), None),
            ("routing uncached", measure(args.uncached, args.rate, uncached, b""), "crm"),
            ("routing cached", measure(args.cached, None, cached, b"100"), "all"),
        ]

    print(f"GET /routing/manager, fake CRM answering in {crm_ms:.0f} ms"
          f"{' (Nagle left on)' if args.fake_nagle else ''}; one request at a time, new connection each"
          f" (Python {sys.version.split()[0]}, {os.cpu_count()} CPU)")
    print(f"{'':24} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}   added to the call set-up (p50 / p99)")
    direct_p50 = direct_p99 = 0.0
    for name, samples, kind in rows:
        p50, p99 = pct(samples, 50), pct(samples, 99)
        if kind is None:
            direct_p50, direct_p99 = p50, p99
            note = f"the CRM's own {crm_ms:.0f} ms, as seen from here"
        elif kind == "crm":
            note = (f"{p50 - direct_p50:+.2f} / {p99 - direct_p99:+.2f} ms over the CRM "
                    f"({p50 - crm_ms:+.2f} / {p99 - crm_ms:+.2f} ms over {crm_ms:.0f} ms)")
        else:
            note = f"{p50:.2f} / {p99:.2f} ms, no CRM request (vs {crm_ms:.0f} ms uncached)"
        print(f"{name:24} {len(samples):>6} {p50:>8.2f} {p99:>8.2f}   {note}")


if __name__ == "__main__":
    main()
