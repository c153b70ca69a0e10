"""Record proxy throughput: fsbridge (gevent.pywsgi) against nginx serving the same recording.

    python3 -m bench.bench_records [--clients 50] [--duration 10] [--requests 5000] [--tool auto|wrk|gevent]

Each server runs in its own process pinned to CPU 0, the load generator on CPU 1 (when there are two), so
one fsbridge process is compared with one nginx worker. Load comes from `wrk` when installed, else from a
small keep-alive gevent client. nginx is Debian's (`apt-get install -y nginx`); without it the nginx rows
are skipped with a message. Access logs are off on both sides. Variants measured:

  fsbridge sendfile    the default: os.sendfile on the gevent socket (server.py)
  fsbridge read        zero_copy off: 256 KiB reads yielded to pywsgi
  nginx+X-Accel        nginx proxies to fsbridge, which answers X-Accel-Redirect (records.py)
  nginx                nginx serving the directory itself (the reference)

It also checks that a few Range / HEAD answers are byte-for-byte the same from fsbridge and nginx.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "recordings" / "31ff8abf-a4ac-4f83-a050-5a0db45e0c55.wav"
REC_ID = FIXTURE.stem
SECRET = "bench-secret-bench-secret-0123456789"
PUBLIC_URL = "http://127.0.0.1"


# --- child process modes -----------------------------------------------------------------------------


def serve(rec_dir: str, port_file: str, zero_copy: bool, accel: bool) -> None:
    """Run fsbridge's record proxy until SIGTERM; writes the bound port to port_file."""
    from gevent import monkey

    monkey.patch_all()
    import logging

    import gevent

    from fsbridge.http import HttpServer, Router
    from fsbridge.http.records import RecordsHandler
    from fsbridge.record_links import RecordLinks
    from fsbridge.recordings import Recordings

    logging.basicConfig(level=logging.WARNING)
    router = Router()
    RecordsHandler(RecordLinks(PUBLIC_URL, SECRET), Recordings(rec_dir),
                   accel_redirect_prefix="/_records/" if accel else None).register(router)
    server = HttpServer("127.0.0.1:0", router, zero_copy=zero_copy, max_connections=10000)
    server.start()
    Path(port_file + ".tmp").write_text(str(server.address[1]))
    os.replace(port_file + ".tmp", port_file)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def gevent_client(url: str, clients: int, total: int) -> None:
    """Keep-alive GET load from `clients` greenlets, `total` requests in all; prints a JSON summary."""
    from gevent import monkey

    monkey.patch_all()
    from urllib.parse import urlsplit

    import gevent

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    left = [total]
    stats = {"requests": 0, "bytes": 0, "errors": 0, "non2xx": 0}

    def worker() -> None:
        sock = socket.create_connection((host, port))
        f = sock.makefile("rb", buffering=256 * 1024)
        try:
            while left[0] > 0:
                left[0] -= 1
                sock.sendall(request)
                status = f.readline()
                length = 0
                while True:
                    line = f.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                remaining = length
                while remaining:
                    chunk = f.read(min(remaining, 256 * 1024))
                    if not chunk:
                        raise ConnectionError("short body")
                    remaining -= len(chunk)
                stats["requests"] += 1
                stats["bytes"] += length
                if not status.split(b" ")[1].startswith(b"2"):
                    stats["non2xx"] += 1
        except OSError:
            stats["errors"] += 1
        finally:
            f.close()
            sock.close()

    start = time.perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(clients)])
    elapsed = time.perf_counter() - start
    print(json.dumps({**stats, "seconds": elapsed}))


# --- orchestration -----------------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    mbps: float
    cpu_us: float  # server CPU time (user + system, all its processes) per request
    note: str = ""


@dataclass
class Variant:
    name: str
    url: str
    pids: Callable[[], list[int]]
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int) -> Callable[[], None] | None:
    if (os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextlib.contextmanager
def fsbridge_server(work: Path, rec_dir: Path, zero_copy: bool, accel: bool = False) -> Iterator[tuple[int, int]]:
    """(port, pid) of a record proxy in its own process."""
    port_file = work / f"port-{zero_copy}-{accel}"
    cmd = [sys.executable, "-m", "bench.bench_records", "--serve", str(rec_dir), "--port-file", str(port_file)]
    if not zero_copy:
        cmd.append("--no-zero-copy")
    if accel:
        cmd.append("--accel")
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), preexec_fn=pinned(0))
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fsbridge bench server did not start")
            time.sleep(0.05)
        port = int(port_file.read_text())
        wait_port(port)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        port_file.unlink(missing_ok=True)


NGINX_CONF = """
worker_processes 1;
daemon off;
master_process on;
error_log {work}/nginx-error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {work}/ngx-body;
    proxy_temp_path {work}/ngx-proxy;
    fastcgi_temp_path {work}/ngx-fastcgi;
    uwsgi_temp_path {work}/ngx-uwsgi;
    scgi_temp_path {work}/ngx-scgi;
    types {{ audio/wav wav; audio/mpeg mp3; audio/ogg ogg; }}
    server {{
        listen 127.0.0.1:{port};
        location /records/ {{ alias {rec_dir}/; add_header Cache-Control private; }}
    }}
    upstream fsbridge {{ server 127.0.0.1:{accel_upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{accel_port};
        location /records/ {{
            proxy_pass http://fsbridge;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location /_records/ {{ internal; alias {rec_dir}/; add_header Cache-Control private; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(work: Path, rec_dir: Path, accel_upstream: int) -> Iterator[tuple[int, int, int] | None]:
    """(port, accel_port, master pid), or None when nginx is not available."""
    exe = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if exe is None:
        print("nginx is not installed (apt-get install -y nginx): skipping the nginx comparison")
        yield None
        return
    port, accel_port = free_port(), free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, accel_port=accel_port, rec_dir=rec_dir,
                                      accel_upstream=accel_upstream))
    proc = subprocess.Popen([exe, "-p", str(work), "-c", str(conf)], preexec_fn=pinned(0),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            wait_port(port)
            wait_port(accel_port)
        except RuntimeError:
            proc.kill()
            err = proc.communicate()[1].decode(errors="replace").strip()
            print(f"nginx did not start ({err.splitlines()[-1] if err else 'no message'}): skipping it")
            yield None
            return
        yield port, accel_port, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful stop of master and worker
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_load(variant: Variant, args: argparse.Namespace, tool: str, size: int) -> Run:
    pids = variant.pids()
    cpu0 = cpu_seconds(pids)
    if tool == "wrk":
        out = subprocess.run(
            ["wrk", "-t", str(args.threads), "-c", str(args.clients), "-d", f"{args.duration}s", variant.url],
            capture_output=True, text=True, check=True, preexec_fn=pinned(1),
        ).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        total = re.search(r"(\d+) requests in", out)
        if match is None or total is None:
            raise RuntimeError(f"cannot read wrk's output:\n{out}")
        rps, requests = float(match.group(1)), int(total.group(1))
        problems = [line.strip() for line in out.splitlines() if "Non-2xx" in line or "Socket errors" in line]
        mbps, note = rps * size / 1e6, "; ".join(problems)
    else:
        out = subprocess.run(
            [sys.executable, "-m", "bench.bench_records", "--client", variant.url, "--clients", str(args.clients),
             "--requests", str(args.requests)],
            capture_output=True, text=True, check=True, cwd=REPO, env=child_env(), preexec_fn=pinned(1),
        ).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        requests = stats["requests"]
        rps = requests / stats["seconds"]
        mbps = stats["bytes"] / stats["seconds"] / 1e6
        note = f"errors={stats['errors']} non2xx={stats['non2xx']}" if stats["errors"] or stats["non2xx"] else ""
    cpu = cpu_seconds(pids) - cpu0
    return Run(rps, mbps, cpu / max(requests, 1) * 1e6, note)


def compare_ranges(name: str, fs_url: str, ngx_url: str) -> list[str]:
    import requests

    failures = []
    cases: list[tuple[str, dict[str, str]]] = [
        ("GET", {}),
        ("GET", {"Range": "bytes=0-99"}),
        ("GET", {"Range": "bytes=1000-"}),
        ("GET", {"Range": "bytes=-500"}),
        ("GET", {"Range": "bytes=44-44"}),
        ("GET", {"Range": "bytes=263000-999999999"}),
        ("GET", {"Range": "bytes=-999999999"}),
        ("GET", {"Range": "bytes=999999999-"}),
        ("HEAD", {}),
    ]
    for method, headers in cases:
        a = requests.request(method, fs_url, headers=headers)
        b = requests.request(method, ngx_url, headers=headers)
        diffs = []
        if a.status_code != b.status_code:
            diffs.append("status")
        if a.status_code != 416 and a.content != b.content:
            diffs.append("body")
        for h in ("Content-Range", "Content-Length", "Content-Type", "Accept-Ranges"):
            if a.status_code == 416 and h != "Content-Range":
                continue  # error bodies differ (nginx sends an HTML page)
            if a.status_code == 206 and h == "Accept-Ranges":
                continue  # optional on a 206; nginx leaves it out
            if a.headers.get(h) != b.headers.get(h):
                diffs.append(f"{h} {a.headers.get(h)!r} vs {b.headers.get(h)!r}")
        label = f"{method} {headers.get('Range', '(whole file)')}"
        verdict = "same" if not diffs else "DIFFERENT: " + ", ".join(diffs)
        print(f"  {label:34} {name} {a.status_code} / nginx {b.status_code}  {verdict}")
        if diffs:
            failures.append(f"{name}: {label}")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=int, default=5, help="seconds per run (wrk)")
    p.add_argument("--requests", type=int, default=5000, help="requests per run (gevent client)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs per variant; medians are reported")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--tool", choices=("auto", "wrk", "gevent"), default="auto")
    p.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--no-zero-copy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--accel", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.serve:
        serve(args.serve, args.port_file, not args.no_zero_copy, args.accel)
        return 0
    if args.client:
        gevent_client(args.client, args.clients, args.requests)
        return 0

    sys.path.insert(0, str(REPO))
    from fsbridge.record_links import RecordLinks

    link_path = RecordLinks(PUBLIC_URL, SECRET).path(REC_ID)
    size = FIXTURE.stat().st_size
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "gevent")
    load = f"{args.duration}s" if tool == "wrk" else f"{args.requests} requests"
    print(f"file {FIXTURE.name} ({size} bytes), {args.clients} keep-alive clients, {load} per run, "
          f"{args.rounds} interleaved rounds, load via {tool}; {os.cpu_count()} CPUs, servers on CPU 0")

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fsbridge-bench-"))
        work = Path(tmp)
        work.chmod(0o755)  # nginx's worker runs as nobody
        rec_dir = work / "recordings"
        rec_dir.mkdir(mode=0o755)
        shutil.copy(FIXTURE, rec_dir / FIXTURE.name)
        (rec_dir / FIXTURE.name).chmod(0o644)

        fs_port, fs_pid = stack.enter_context(fsbridge_server(work, rec_dir, zero_copy=True))
        rd_port, rd_pid = stack.enter_context(fsbridge_server(work, rec_dir, zero_copy=False))
        ac_port, ac_pid = stack.enter_context(fsbridge_server(work, rec_dir, zero_copy=True, accel=True))
        ngx = stack.enter_context(nginx_server(work, rec_dir, ac_port))
        fs_url = f"http://127.0.0.1:{fs_port}{link_path}"
        variants = [
            Variant("fsbridge sendfile", fs_url, lambda: [fs_pid]),
            Variant("fsbridge read (zero_copy off)", f"http://127.0.0.1:{rd_port}{link_path}", lambda: [rd_pid]),
        ]
        failures: list[str] = []
        if ngx is not None:
            ngx_port, accel_port, master = ngx
            ngx_url = f"http://127.0.0.1:{ngx_port}/records/{FIXTURE.name}"
            accel_url = f"http://127.0.0.1:{accel_port}{link_path}"
            print("Range / HEAD answers compared with nginx serving the file itself:")
            failures = compare_ranges("fsbridge", fs_url, ngx_url)
            failures += compare_ranges("X-Accel ", accel_url, ngx_url)
            variants.append(Variant("nginx", ngx_url, lambda: children(master)))
            variants.append(Variant("nginx + X-Accel from fsbridge", accel_url, lambda: [*children(master), ac_pid]))
        for _ in range(args.rounds):
            for v in variants:
                v.runs.append(run_load(v, args, tool, size))

    ref = next((v for v in variants if v.name == "nginx"), None)
    print(f"\n{'server (medians)':32} {'req/s':>8} {'MB/s':>8} {'CPU us/req':>11} {'req/s vs nginx':>15}")
    for v in variants:
        ratio = f"{v.median('rps') / ref.median('rps'):.2f}" if ref else "-"
        notes = "; ".join(sorted({r.note for r in v.runs if r.note}))
        print(f"{v.name:32} {v.median('rps'):8.0f} {v.median('mbps'):8.1f} {v.median('cpu_us'):11.0f} "
              f"{ratio:>15}  {notes}")
        print(f"{'':32} runs: " + ", ".join(f"{r.rps:.0f}" for r in v.runs))
    if ref:
        ratio = variants[0].median("rps") / ref.median("rps")
        print(f"\nfsbridge/nginx = {ratio:.2f} (goal >= 0.8): {'met' if ratio >= 0.8 else 'NOT met'}")
    if failures:
        print(f"Range answers differ from nginx: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
