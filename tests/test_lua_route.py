"""conf/freeswitch/scripts/fsbridge_route.lua, run by a real Lua against a live fsbridge HTTP server.

FreeSWITCH is replaced by a stub `session` / `freeswitch` written in Lua (HARNESS below): it records what
the script asks FreeSWITCH to execute. Both transports the script knows are run: LuaSocket, and curl
through io.popen, under each Lua that mod_lua may embed (5.3, 5.4, LuaJIT) found here. Debian:
`apt-get install -y lua5.3 lua5.4 lua-socket` (curl is usually there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent.pywsgi import WSGIServer
from gevent.server import StreamServer

from fsbridge.config import HttpSettings
from fsbridge.crm import RetailCRM
from fsbridge.http import HttpServer, Router
from fsbridge.http.lookup import RoutingHandler
from fsbridge.manager_status import ManagerStatus
from fsbridge.routing import ManagerLookup
from tests.conftest import API_KEY
from tests.fakes.retailcrm import FakeRetailCRM

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "conf" / "freeswitch" / "scripts" / "fsbridge_route.lua"
INBOUND = ROOT / "conf" / "freeswitch" / "dialplan" / "fsbridge_inbound.xml"
PHONE = "+79121234567"
JOHN = {"id": 1, "firstName": "John", "lastName": "Doe", "email": "john@example.com", "code": "100"}
FALLBACK = "2000 XML default"

# mod_lua embeds the Lua FreeSWITCH was built with: 5.3 on Debian 12 (liblua5.3-dev), 5.4 on newer systems, LuaJIT
# on some packages. Every test runs under each of those found here; LUA is the one of the running test.
LUAS = {name: path for name in ("lua5.3", "lua5.4", "luajit") if (path := shutil.which(name))}
if not LUAS:
    LUAS = {name: path for name in ("lua5.2", "lua") if (path := shutil.which(name))}
LUA: str | None = next(iter(LUAS.values()), None)
pytestmark = pytest.mark.skipif(
    not LUAS, reason="no `lua` binary (Debian: apt-get install -y lua5.3 lua5.4 lua-socket)")


@functools.cache
def _has_luasocket(lua: str) -> bool:
    probe = subprocess.run([lua, "-e", 'require("socket.http")'], capture_output=True, timeout=10)
    return probe.returncode == 0


@pytest.fixture(autouse=True, params=sorted(LUAS) or [None])
def lua(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    if request.param is None:
        return None
    path = LUAS[request.param]
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("transport") == "socket" and not _has_luasocket(path):
        pytest.skip(f"no LuaSocket for {request.param} (Debian: apt-get install -y lua-socket)")
    monkeypatch.setattr(sys.modules[__name__], "LUA", path)
    return path


TRANSPORTS = [
    "socket",
    pytest.param("curl", marks=pytest.mark.skipif(shutil.which("curl") is None, reason="no curl binary")),
]

# A FreeSWITCH stand-in: channel variables from a file, every session:execute printed as "EXECUTE app data",
# a few variables the script must set printed at the end, consoleLog to stderr.
HARNESS = r"""
local vars = {}
for line in io.lines(os.getenv("HARNESS_VARS")) do
  local name, value = string.match(line, "^([^\t]*)\t(.*)$")
  if name then vars[name] = value end
end
local bridge_result = os.getenv("HARNESS_BRIDGE_RESULT") or "SUCCESS"
local ready = true
session = {}
function session:getVariable(name)
  if name == "caller_id_number" and os.getenv("HARNESS_BROKEN_CALLER") then return {} end
  return vars[name]
end
function session:setVariable(name, value) vars[name] = value end
function session:ready() return ready end
function session:execute(app, data)
  print("EXECUTE " .. app .. " " .. tostring(data))
  if app == "bridge" then
    vars.originate_disposition = bridge_result
    -- hangup_after_bridge: a conversation that took place ends the call
    if bridge_result == "SUCCESS" then ready = false end
  end
end
freeswitch = { consoleLog = function(level, message) io.stderr:write("LOG " .. level .. " " .. message) end }
argv = { [0] = os.getenv("HARNESS_SCRIPT") }
local n = 1
while os.getenv("HARNESS_ARG" .. n) do argv[n] = os.getenv("HARNESS_ARG" .. n); n = n + 1 end
dofile(os.getenv("HARNESS_SCRIPT"))
for _, name in ipairs({ "continue_on_fail", "hangup_after_bridge", "fsbridge_manager" }) do
  print("VAR " .. name .. "=" .. tostring(vars[name]))
end
"""


@dataclass
class Outcome:
    executed: list[tuple[str, str]]
    variables: dict[str, str]
    log: str
    elapsed: float

    @property
    def bridged(self) -> list[str]:
        return [data for app, data in self.executed if app == "bridge"]

    @property
    def transferred(self) -> list[str]:
        return [data for app, data in self.executed if app == "transfer"]


def run_script(tmp_path: Path, url: str, transport: str, *, caller: str = PHONE, args: tuple[str, ...] = (),
               bridge_result: str = "SUCCESS", broken_caller: bool = False, **channel: str) -> Outcome:
    assert LUA is not None
    variables = {"uuid": "test-uuid", "caller_id_number": caller, "fsbridge_url": url,
                 "fsbridge_fallback": FALLBACK, "fsbridge_transport": transport,
                 "fsbridge_connect_timeout": "0.3", "fsbridge_timeout": "0.8", **channel}
    vars_file = tmp_path / "channel_vars.tsv"
    vars_file.write_text("".join(f"{k}\t{v}\n" for k, v in variables.items() if v is not None))
    harness = tmp_path / "harness.lua"
    harness.write_text(HARNESS)
    env = {**os.environ, "HARNESS_VARS": str(vars_file), "HARNESS_SCRIPT": str(SCRIPT),
           "HARNESS_BRIDGE_RESULT": bridge_result}
    env.pop("http_proxy", None)
    if broken_caller:
        env["HARNESS_BROKEN_CALLER"] = "1"
    for n, arg in enumerate(args, start=1):
        env[f"HARNESS_ARG{n}"] = arg
    start = time.monotonic()
    proc = subprocess.run([LUA, str(harness)], capture_output=True, text=True, env=env, timeout=30,
                          cwd=tmp_path)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    executed, found = [], {}
    for line in proc.stdout.splitlines():
        if line.startswith("EXECUTE "):
            app, _, data = line[len("EXECUTE "):].partition(" ")
            executed.append((app, data))
        elif line.startswith("VAR "):
            name, _, value = line[len("VAR "):].partition("=")
            found[name] = value
    return Outcome(executed, found, proc.stderr, elapsed)


# --- servers the script talks to -----------------------------------------------------------------------


@contextlib.contextmanager
def fsbridge(fake_crm: FakeRetailCRM, tmp_path: Path, routing_timeout: float = 0.5) -> Iterator[str]:
    """fsbridge's real routing endpoint; yields its URL."""
    lookup = ManagerLookup(RetailCRM(fake_crm.url, API_KEY, timeout=10), {"100": 1, "200": 2},
                           ManagerStatus(tmp_path / "status.json"), timeout=routing_timeout)
    router = Router()
    RoutingHandler(lookup).register(router)
    server = HttpServer("127.0.0.1:0", router, timeout=10)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.address[1]}/routing/manager"
    finally:
        server.stop(timeout=0.2)


@dataclass
class Canned:
    """A stand-in for fsbridge that answers what a test says, and remembers the query strings it got."""

    status: str = "200 OK"
    body: bytes = b""
    queries: list[str] | None = None

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        assert self.queries is not None
        self.queries.append(environ.get("QUERY_STRING", ""))
        start_response(self.status, [("Content-Type", "text/plain"), ("Content-Length", str(len(self.body)))])
        return [self.body]


@contextlib.contextmanager
def canned(status: str = "200 OK", body: bytes = b"") -> Iterator[tuple[str, Canned]]:
    answer = Canned(status, body, [])
    server = WSGIServer(("127.0.0.1", 0), answer.app, log=None, error_log=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/routing/manager", answer
    finally:
        server.stop(timeout=0.2)


@contextlib.contextmanager
def trickling() -> Iterator[str]:
    """Answers 200 "100", one header line every 0.2 s: no single read ever waits long."""

    def handle(sock: socket.socket, _address: Any) -> None:
        with contextlib.suppress(OSError):
            sock.recv(4096)
            sock.sendall(b"HTTP/1.1 200 OK\r\n")
            for n in range(50):
                gevent.sleep(0.2)
                sock.sendall(b"X-Slow-%d: 1\r\n" % n)
            sock.sendall(b"Content-Length: 3\r\n\r\n100")

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/routing/manager"
    finally:
        server.stop(timeout=0.2)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/routing/manager"


# --- the tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rings_the_responsible_manager(fake_crm: FakeRetailCRM, tmp_path: Path, transport: str) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    with fsbridge(fake_crm, tmp_path) as url:
        out = run_script(tmp_path, url, transport, fsbridge_dial="user/{ext}@pbx.example.com")
    assert out.executed == [("bridge", "{leg_timeout=25}user/100@pbx.example.com")]
    # Without these a busy phone would hang up on the caller, a finished call would go on to the fallback.
    assert out.variables["continue_on_fail"] == "true"
    assert out.variables["hangup_after_bridge"] == "true"
    assert out.variables["fsbridge_manager"] == "100"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_manager_who_does_not_answer_hands_over_to_the_fallback(
        fake_crm: FakeRetailCRM, tmp_path: Path, transport: str) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    with fsbridge(fake_crm, tmp_path) as url:
        out = run_script(tmp_path, url, transport, bridge_result="NO_ANSWER", fsbridge_ring_timeout="15",
                         fsbridge_dial="{ignore_early_media=true}user/{ext}")
    assert out.executed == [("bridge", "{leg_timeout=15,ignore_early_media=true}user/100"),
                            ("transfer", FALLBACK)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_no_manager_goes_straight_to_the_fallback(fake_crm: FakeRetailCRM, tmp_path: Path, transport: str) -> None:
    with fsbridge(fake_crm, tmp_path) as url:
        out = run_script(tmp_path, url, transport)
    assert out.executed == [("transfer", FALLBACK)]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stalled_fsbridge_costs_the_caller_only_the_timeout(
        fake_crm: FakeRetailCRM, tmp_path: Path, transport: str) -> None:
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    fake_crm.manager_latency = 10.0
    with fsbridge(fake_crm, tmp_path, routing_timeout=10.0) as url:  # fsbridge itself waits far too long
        out = run_script(tmp_path, url, transport, fsbridge_timeout="0.8")
    assert out.executed == [("transfer", FALLBACK)]
    assert 0.7 < out.elapsed < 2.0
    assert "lookup failed" in out.log


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_answer_that_trickles_in_is_cut_off_at_the_total_timeout(tmp_path: Path, transport: str) -> None:
    with trickling() as url:
        out = run_script(tmp_path, url, transport, fsbridge_timeout="0.8")
    assert out.executed == [("transfer", FALLBACK)]
    assert out.elapsed < 2.0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_refused_goes_to_the_fallback(tmp_path: Path, transport: str) -> None:
    out = run_script(tmp_path, closed_port_url(), transport)
    assert out.executed == [("transfer", FALLBACK)]
    assert out.elapsed < 1.5


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("status", "body"), [
    ("200 OK", b"100; hangup"),
    ("200 OK", b"100\nuser/200"),
    ("200 OK", b"user/100"),
    ("200 OK", b"100@evil.example.com"),
    ("200 OK", b"12345678901234567"),
    ("200 OK", b"<html>100</html>"),
    ("200 OK", b"-100"),
    ("200 OK", "١٠٠".encode()),
    ("500 Internal Server Error", b"100"),
    ("403 Forbidden", b"100"),
    ("302 Found", b"100"),
])
def test_never_bridges_to_anything_but_an_extension(tmp_path: Path, transport: str, status: str,
                                                    body: bytes) -> None:
    with canned(status, body) as (url, _):
        out = run_script(tmp_path, url, transport)
    assert out.bridged == []
    assert out.transferred == [FALLBACK]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_surrounding_whitespace_is_not_a_reason_to_fall_back(tmp_path: Path, transport: str) -> None:
    with canned(body=b" 200\r\n") as (url, _):
        out = run_script(tmp_path, url, transport, fsbridge_dial="user/{ext}")
    assert out.executed == [("bridge", "{leg_timeout=25}user/200")]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_caller_number_is_url_encoded(tmp_path: Path, transport: str) -> None:
    with canned(body=b"") as (url, answer):
        run_script(tmp_path, url, transport, caller="+7 (912) 123&x=1")
        run_script(tmp_path, url + "?via=fs", transport, caller=PHONE)
    assert answer.queries == ["phone=%2B7%20%28912%29%20123%26x%3D1", "via=fs&phone=%2B79121234567"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_calls_domain_is_passed_for_a_virtual_pbx(tmp_path: Path, transport: str) -> None:
    with canned(body=b"") as (url, answer):
        run_script(tmp_path, url, transport, caller=PHONE, domain_name="acme.pbx.example.com")
        run_script(tmp_path, url, transport, caller=PHONE, domain_name="a&b=c")
    assert answer.queries == ["phone=%2B79121234567&domain=acme.pbx.example.com",
                              "phone=%2B79121234567&domain=a%26b%3Dc"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_hostile_caller_id_does_not_reach_the_shell(tmp_path: Path, transport: str) -> None:
    marker = tmp_path / "pwned"
    with canned(body=b"") as (url, answer):
        for caller in (f"'; touch {marker}; '", f"$(touch {marker})", f"`touch {marker}`"):
            out = run_script(tmp_path, url, transport, caller=caller)
            assert out.executed == [("transfer", FALLBACK)]
    assert not marker.exists()
    assert len(answer.queries or []) == 3


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_fallback_can_come_from_the_script_arguments(
        fake_crm: FakeRetailCRM, tmp_path: Path, transport: str) -> None:
    with fsbridge(fake_crm, tmp_path) as url:
        out = run_script(tmp_path, url, transport, args=("operator", "XML", "public"))
    assert out.executed == [("transfer", "operator XML public")]


def test_without_a_fallback_the_dialplan_goes_on(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    with fsbridge(fake_crm, tmp_path) as url:
        out = run_script(tmp_path, url, "curl", fsbridge_fallback="")
    assert out.executed == []  # the snippet's own transfer after the script then runs
    assert "LOG err" in out.log and "no fsbridge_fallback" in out.log


def test_a_script_error_still_ends_in_the_fallback(tmp_path: Path) -> None:
    with canned(body=b"100") as (url, _):
        out = run_script(tmp_path, url, "curl", broken_caller=True)
    assert out.executed == [("transfer", FALLBACK)]
    assert "script error" in out.log


def test_runs_as_a_command_outside_freeswitch(fake_crm: FakeRetailCRM, tmp_path: Path) -> None:
    assert LUA is not None
    fake_crm.managers_by_phone[PHONE] = dict(JOHN)
    with fsbridge(fake_crm, tmp_path) as url:
        env = {**os.environ, "FSBRIDGE_URL": url}
        found = subprocess.run([LUA, str(SCRIPT), PHONE, "2000", "XML", "default"], capture_output=True,
                               text=True, env=env, timeout=30)
        nobody = subprocess.run([LUA, str(SCRIPT), "+79990000000", "2000", "XML", "default"],
                                capture_output=True, text=True, env=env, timeout=30)
    assert found.stdout == "bridge {leg_timeout=25}user/100\n"
    assert nobody.stdout == "fallback 2000 XML default\n"


def test_the_default_url_is_fsbridges_internal_listener() -> None:
    # Routing lives on the internal listener only: the public one answers 404 there.
    assert LUA is not None
    expected = f"http://{HttpSettings().internal_listen}/routing/manager"
    out = subprocess.run([LUA, "-e", f"print(dofile({str(SCRIPT)!r}).DEFAULTS.url)"], capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip() == expected, out.stderr
    assert f'data="fsbridge_url={expected}"' in INBOUND.read_text()
