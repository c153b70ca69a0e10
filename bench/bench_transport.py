"""CPU per request of fsbridge's CRM transport next to urllib3's PoolManager and a requests.Session.

    python3 -m bench.bench_transport [--requests 3000] [--rounds 5]

One local keep-alive HTTP/1.1 server in its own process (tests/fakes/raw_http.py, so that its CPU is not
counted) answers every request with retailCRM's `{"success":true}` behind nginx's usual fields. This
process sends it the same request through each client in turn, one at a time on one kept-alive connection:
a call event as fsbridge sends it (a form POST to /api/v5/telephony/call/event with the API key and a
~260-byte body). The process is gevent monkey-patched, as `fsbridge run` is, so every client uses the sockets it
would use in production. Measured: CPU time of this process (user + system) per request, the median over
--rounds interleaved rounds, and wall time.

Issue 11 keeps fsbridge's own transport only while it stays far ahead of urllib3 (goal: urllib3 costs at
least 3× its CPU per request) and passes tests/test_crm_transport_hostile.py; otherwise fsbridge should use
urllib3 directly. Exits 1 when the goal is missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 3.0  # urllib3's CPU per request over fsbridge's, at least
PATH = "/api/v5/telephony/call/event"
HEADERS = {
    "X-API-KEY": "bench-api-key-0123456789",
    "User-Agent": "fsbridge/bench",
    "Accept": "application/json",
    "Content-Type": "application/x-www-form-urlencoded",
}
REPLY_BODY = b'{"success":true}'


def call_event_body() -> bytes:
    sys.path.insert(0, str(ROOT))
    from fsbridge.crm.client import encode_form, form_body

    event = {"phone": "+79001234567", "type": "in", "codes": ["100", "200"], "userIds": [1, 2],
             "callExternalId": "4f2b1c7e-9a3d-4e61-8c5f-2d7e9b0a1c3f", "externalPhone": "+74999999999"}
    return form_body(encode_form({"event": event}))


# -- the clients ----------------------------------------------------------------------------------------


def fsbridge_client(url: str, body: bytes) -> Callable[[], None]:
    from fsbridge.crm.transport import Transport

    transport = Transport(url)

    def send() -> None:
        reply = transport.request("POST", PATH, HEADERS, body, 3.0, 10.0, deadline=time.monotonic() + 10.0)
        assert reply.status == 200 and reply.content == REPLY_BODY
    return send


def urllib3_client(url: str, body: bytes) -> Callable[[], None]:
    import urllib3

    pool = urllib3.PoolManager(maxsize=64, retries=False, timeout=urllib3.Timeout(connect=3.0, read=10.0))

    def send() -> None:
        reply = pool.request("POST", url + PATH, body=body, headers=HEADERS, redirect=False)
        assert reply.status == 200 and reply.data == REPLY_BODY
    return send


def requests_client(url: str, body: bytes) -> Callable[[], None]:
    import requests

    session = requests.Session()
    session.trust_env = False  # no proxy from the environment between the bench and its server

    def send() -> None:
        reply = session.post(url + PATH, data=body, headers=HEADERS, timeout=(3.0, 10.0), allow_redirects=False)
        assert reply.status_code == 200 and reply.content == REPLY_BODY
    return send


CLIENTS = {"fsbridge Transport": fsbridge_client, "urllib3 PoolManager": urllib3_client,
           "requests.Session": requests_client}


def measure(send: Callable[[], None], n: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for n requests."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        send()
    return time.process_time() - cpu, time.perf_counter() - wall


def main(argv: list[str] | None = None) -> int:
    from gevent import monkey

    monkey.patch_all()  # as `fsbridge run` does; the server process stays plain
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from tests.fakes.raw_http import canned_reply_process

    with canned_reply_process(len(REPLY_BODY)) as url:
        body = call_event_body()
        clients = {name: make(url, body) for name, make in CLIENTS.items()}
        for send in clients.values():  # connect, import lazily loaded modules, warm caches
            measure(send, 200)
        cpu: dict[str, list[float]] = {name: [] for name in clients}
        wall: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.rounds):
            for name, send in clients.items():
                c, w = measure(send, args.requests)
                cpu[name].append(c / args.requests * 1e6)
                wall[name].append(w / args.requests * 1e6)

    base = statistics.median(cpu["fsbridge Transport"])
    print(f"{args.rounds} rounds x {args.requests} form POSTs ({len(body)} bytes) per client, one kept-alive "
          "connection, loopback, gevent-patched; median of the rounds")
    print(f"{'client':<22}{'µs CPU/request':>16}{'(min-max)':>16}{'µs wall/request':>17}{'× fsbridge':>12}")
    for name in clients:
        median = statistics.median(cpu[name])
        spread = f"{min(cpu[name]):.0f}-{max(cpu[name]):.0f}"
        print(f"{name:<22}{median:>16.1f}{spread:>16}{statistics.median(wall[name]):>17.1f}{median / base:>12.1f}")
    ratio = statistics.median(cpu["urllib3 PoolManager"]) / base
    verdict = "met" if ratio >= GOAL else "MISSED: switch to urllib3"
    print(f"goal: urllib3 ≥ {GOAL:g}× fsbridge's CPU per request: {ratio:.1f}× ({verdict})")
    return 0 if ratio >= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
