"""conf/nginx/fsbridge.conf, run by Debian's nginx in front of a running fsbridge.

The test config is derived from the shipped file by a few exact edits (plain HTTP on a free loopback port
instead of TLS, this test's fsbridge as the upstream, the access log in a temp dir), so what passes here
is the shipped file. Checked through nginx: the public routes work (Range on recordings included), the
internal ones and every percent-encoded disguise of them are 404, and the access log holds neither
make-call's clientId nor a record link's signature.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLIENT_ID, FIXTURES, internal_url
from tests.waiting import until

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "conf" / "nginx" / "fsbridge.conf"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="no nginx binary (Debian: apt-get install -y nginx-light)")

REC_ID = "31ff8abf-a4ac-4f83-a050-5a0db45e0c55"  # tests/fixtures/recordings/
RECORDING = (FIXTURES / "recordings" / f"{REC_ID}.wav").read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def adapted(shipped: str, port: int, upstream: str, access_log: Path) -> str:
    """The shipped server config with only what a test must change: each edit matches exactly as often as
    expected, or the test fails and says which (the shipped file changed: update the edit)."""
    edits = [
        (r"(?m)^(\s*)listen 443 ssl;$", rf"\g<1>listen 127.0.0.1:{port};", 1),
        (r"(?m)^\s*listen \[::\]:443 ssl;\n", "", 1),
        (r"(?m)^\s*ssl_[a-z_]+ [^\n]*\n", "", 3),
        (r"server 127\.0\.0\.1:8088;", f"server {upstream};", 1),
        (r"access_log /var/log/nginx/fsbridge\.access\.log fsbridge;", f"access_log {access_log} fsbridge;", 1),
    ]
    text = shipped
    for pattern, replacement, expected in edits:
        text, count = re.subn(pattern, replacement, text)
        assert count == expected, f"{SHIPPED.name}: {pattern!r} matched {count} times, expected {expected}"
    assert "ssl" not in re.sub(r"#[^\n]*", "", text), "TLS left in the test config"
    return text


def main_config(tmp: Path, server_conf: Path) -> str:
    """nginx.conf around the shipped file, as Debian's includes conf.d/*.conf inside http {}."""
    temp = "\n".join(f"    {name}_temp_path {tmp / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    return (f"daemon off;\nmaster_process off;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
            f"events {{ worker_connections 128; }}\n"
            f"http {{\n    access_log off;\n{temp}\n    include {server_conf};\n}}\n")


@pytest.fixture
def proxied(start_bridge, tmp_path: Path) -> Iterator[tuple[Any, int, Path]]:
    """(fsbridge, nginx's port, nginx's access log)."""
    bridge = start_bridge(originate={"customer_dial": "sofia/internal/{phone}@127.0.0.1:5092",
                                     "ringing_wait": 2.0})
    yield from _nginx_before(bridge, tmp_path)


def _nginx_before(bridge: Any, tmp_path: Path, extra: str = "") -> Iterator[tuple[Any, int, Path]]:
    """nginx with the shipped config (plus `extra` inside its server block) in front of `bridge`."""
    host, upstream_port = bridge.http.address
    port = free_port()
    access_log = tmp_path / "access.log"
    server_conf = tmp_path / "fsbridge.conf"
    text = adapted(SHIPPED.read_text(), port, f"{host}:{upstream_port}", access_log)
    if extra:
        text, count = re.subn(r"(?m)^(\s*)location / \{", lambda m: f"{extra}\n{m[0]}", text)
        assert count == 1, "no `location /` to put the extra block before"
    server_conf.write_text(text)
    main = tmp_path / "nginx.conf"
    main.write_text(main_config(tmp_path, server_conf))
    assert NGINX is not None
    proc = subprocess.Popen([NGINX, "-p", str(tmp_path), "-c", str(main), "-e", str(tmp_path / "error.log")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        until(lambda: proc.poll() is not None or _listening(port), 15, "nginx to listen")
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            error_log = tmp_path / "error.log"
            pytest.fail(f"nginx exited: {out}{error_log.read_text() if error_log.exists() else ''}")
        yield bridge, port, access_log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def request(port: int, target: str, method: str = "GET", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with `target` sent exactly as written."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, target, body=body, headers={"Host": "pbx.example.com", **(headers or {})})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def test_public_routes_pass_through_nginx(proxied, simulator) -> None:
    bridge, port, _ = proxied
    status, headers, body = request(port, "/logo.svg")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml") and b"<svg" in body
    # retailCRM's make-call as its guide writes it (a literal + in phone): rings, and dials the +.
    simulator.originate_plays = "outbound_originate_answered"
    status, _, _ = request(port, f"/retailcrm/make-call?clientId={CLIENT_ID}&code=100&phone=+79121234567&userId=1")
    assert status == 200
    assert "sofia/internal/+79121234567@127.0.0.1:5092" in simulator.originates[0].args
    status, _, _ = request(port, f"/retailcrm/status?clientId={CLIENT_ID}&code=200&userId=2&status=dinner")
    assert status == 200 and bridge.statuses.get("200") == "dinner"
    assert request(port, "/retailcrm/make-call?clientId=wrong&code=100&phone=%2B79121234567")[0] == 403


def test_recordings_pass_through_with_range(proxied) -> None:
    bridge, port, _ = proxied
    link = bridge.links.path(REC_ID)
    status, headers, body = request(port, link)
    assert status == 200 and body == RECORDING
    status, headers, body = request(port, link, headers={"Range": "bytes=100-199"})
    assert status == 206 and body == RECORDING[100:200]
    assert headers["content-range"] == f"bytes 100-199/{len(RECORDING)}"
    status, headers, body = request(port, link, headers={"Range": "bytes=-16"})
    assert status == 206 and body == RECORDING[-16:]
    etag = headers["etag"]
    assert request(port, link, headers={"If-None-Match": etag})[0] == 304
    assert request(port, link, headers={"Range": f"bytes={len(RECORDING)}-"})[0] == 416
    assert request(port, link, method="HEAD")[0] == 200
    forged = link.replace(link.split("/")[2], "A" * 22)
    assert request(port, forged)[0] == 403


@pytest.mark.parametrize("target", [
    "/metrics", "/healthz", "/healthz/live", "/routing/manager?phone=%2B79121234567",
    "/%6detrics", "/%6Detrics", "/metric%73", "/%2Fmetrics", "//metrics", "/./metrics", "/%68ealthz",
    "/retailcrm/../metrics", "/retailcrm/%2e%2e/metrics", "/retailcrm/..%2fmetrics", "/records/../healthz",
    "/records/%2e%2e/routing/manager?phone=%2B79121234567", "/retailcrm/%2e%2e/routing/manager",
    "/", "/index.html", "/logo.svg/../metrics", "/%72etailcrm/%2e%2e/metrics",
])
def test_internal_routes_are_not_reachable_through_nginx(proxied, target: str) -> None:
    bridge, port, _ = proxied
    status, _, body = request(port, target)
    assert status in (400, 404), target
    assert b"fsbridge_" not in body and b'"checks"' not in body and body.strip() != b"100", target
    # They exist, on the internal listener that nginx does not point at.
    assert request(int(internal_url(bridge).rsplit(":", 1)[1]), "/metrics")[0] == 200


def test_nginx_refuses_request_bodies_over_the_limit(proxied) -> None:
    _, port, _ = proxied
    status, _, _ = request(port, f"/retailcrm/make-call?clientId={CLIENT_ID}", method="POST", body=b"x" * 20_000)
    assert status == 413


def test_access_log_holds_no_client_id_and_no_signature(proxied, simulator) -> None:
    bridge, port, access_log = proxied
    link = bridge.links.path(REC_ID)
    signature = link.split("/")[2]
    simulator.originate_result = "-ERR USER_NOT_REGISTERED"
    targets = [f"/retailcrm/make-call?clientId={CLIENT_ID}&code=100&phone=+79121234567&userId=1",
               f"/retailcrm/status?clientId={CLIENT_ID}&code=100&userId=1&status=free",
               link, f"{link}?clientId={CLIENT_ID}", link.replace("/records/", "/%72ecords/"),
               f"/metrics?clientId={CLIENT_ID}", f"/records/{signature}"]
    for target in targets:
        request(port, target)
    until(lambda: access_log.exists() and len(access_log.read_text().splitlines()) == len(targets), 10,
          "nginx to log every request")
    text = access_log.read_text()
    assert CLIENT_ID not in text and "clientId" not in text
    assert signature not in text
    assert f'"GET /records/*/{REC_ID}.wav HTTP/1.1" 200 ' in text
    assert '"GET /retailcrm/make-call HTTP/1.1" 502 ' in text  # the path and fsbridge's answer: enough to debug


def test_accel_redirect_behind_nginx_with_the_documented_location(start_bridge, tmp_path: Path) -> None:
    """records.accel_redirect_prefix with the location block fsbridge/http/records.py documents: nginx sends
    the recording (fsbridge only authorises), except a WAV cut short by a FreeSWITCH crash, which fsbridge
    serves repaired (nginx would send its header claiming no data: silence in the player)."""
    from fsbridge.http import records
    from tests.conftest import RECORD_SECRET

    rec_dir = tmp_path / "recordings"
    rec_dir.mkdir()
    (rec_dir / f"{REC_ID}.wav").write_bytes(RECORDING)
    crashed_id = "c4a5bed0-0000-4000-8000-00000000c4a5"
    crashed = bytearray(RECORDING)
    assert crashed[36:40] == b"data"
    crashed[4:8] = crashed[40:44] = b"\0\0\0\0"
    (rec_dir / f"{crashed_id}.wav").write_bytes(crashed)
    documented = re.search(r"(?ms)^ *location /_records/ \{.*?^ *\}$", records.__doc__ or "")
    assert documented, "records.py no longer documents the nginx location"
    location, count = re.subn(r"alias [^;]+;", f"alias {rec_dir}/;", documented[0])
    assert count == 1
    bridge = start_bridge(records={"dir": str(rec_dir), "link_secret": RECORD_SECRET,
                                   "accel_redirect_prefix": "/_records/"})
    (tmp_path / "nginx").mkdir()
    for _, port, _ in _nginx_before(bridge, tmp_path / "nginx", extra=location):
        status, headers, body = request(port, bridge.links.path(REC_ID))
        assert status == 200 and body == RECORDING and "x-accel-redirect" not in headers
        assert "x-content-type-options" not in headers   # nginx's own answer (fsbridge's carry nosniff)
        status, _, body = request(port, bridge.links.path(REC_ID), headers={"Range": "bytes=100-199"})
        assert status == 206 and body == RECORDING[100:200]
        assert request(port, "/_records/" + f"{REC_ID}.wav")[0] == 404   # internal: not reachable directly
        status, headers, body = request(port, bridge.links.path(crashed_id))
        assert status == 200 and body == RECORDING   # the lengths FreeSWITCH would have written on close
        assert headers.get("x-content-type-options") == "nosniff"   # fsbridge's answer
