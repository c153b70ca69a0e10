"""A real FreeSWITCH for the e2e suite, found in one of three ways, in this order. All three need SIPp
(`sipp`, Debian's sip-tester); without it, or without any of them, every e2e test is skipped with one reason.

1. A FreeSWITCH you run yourself: `FSBRIDGE_E2E_ESL=host:port` (and `FSBRIDGE_E2E_ESL_PASSWORD`, default
   ClueCon), with tests/e2e/freeswitch/ as its conf, on vars.xml's default ports (event socket 18021,
   SIP 15060, the SIPp phones on 15090-15096, RTP 26000-26999). Started from the checkout with:

       mkdir -p /tmp/fs-e2e/log /tmp/fs-e2e/db /tmp/fs-e2e/run /tmp/fs-e2e/recordings
       freeswitch -nonat -nf -nc -conf "$PWD/tests/e2e/freeswitch" -log /tmp/fs-e2e/log \
           -db /tmp/fs-e2e/db -run /tmp/fs-e2e/run -recordings /tmp/fs-e2e/recordings \
           -scripts "$PWD/conf/freeswitch/scripts"
       FSBRIDGE_E2E_ESL=127.0.0.1:18021 FSBRIDGE_E2E_RECORDINGS=/tmp/fs-e2e/recordings \
           python -m pytest -q tests/e2e

   (-nf -nc: in the foreground, without a console; -conf needs -log and -db beside it.) Covers every
   scenario but the Lua routing ones (its dialplan/public/ and dialplan/tenants/<domain>/ are empty: the
   suite cannot install the routed DIDs in someone else's conf) and the restart ones (it cannot restart
   someone else's FreeSWITCH); recordings are checked only with `FSBRIDGE_E2E_RECORDINGS` naming its
   recordings directory, and the recovery from CDRs only with `FSBRIDGE_E2E_CDR_DIR` naming its
   mod_json_cdr log-dir.
2. A FreeSWITCH binary the suite starts itself: `FSBRIDGE_E2E_FREESWITCH=/path/to/bin/freeswitch`, or a
   `freeswitch` on PATH when no Docker engine answers. It runs in a temp dir on free loopback ports with
   the routed DIDs installed (conf/freeswitch/dialplan/fsbridge_inbound.xml, harness.routed_dialplan: in the
   public context, and in each virtual-PBX domain's context) and conf/freeswitch/scripts/ as -scripts, and
   is stopped after: every scenario runs.
3. Docker: a Docker engine answers (`docker info`) and Compose is installed (`docker compose`, else
   Debian's `docker-compose`). pytest-docker starts tests/e2e/compose.e2e.yaml's `freeswitch` (the image
   of docker/compose.yaml, host network, vars.xml's default ports) with a copy of this conf that has the
   routed DIDs installed, conf/freeswitch/scripts/ as its scripts directory and the recordings in a
   temp dir of the host; it is removed after (`down -v`). Every scenario runs, the restarts through
   Compose (`kill -s SIGKILL` / `restart`); the Lua routing ones need curl in the image and are skipped
   without it (a warning in the log says why). Just `python -m pytest -q tests/e2e` with no FSBRIDGE_E2E_* set.

The same FreeSWITCH is also a virtual PBX (issue 13; tests/e2e/test_tenants.py, fixture `tenant_world`): two
customer companies, each a FreeSWITCH domain laid out as FusionPBX lays out a provider's customers —
a.pbx.test and b.pbx.test, users 100 and 200 in each (directory/tenants.xml, a SIPp phone each), a dialplan
context per domain named after it (dialplan/tenants.xml, tenants/context.inc: recording into
<recordings>/<domain>/archive/<YYYY>/<Mon>/<DD>/<uuid>.wav, `user/<ext>@${domain_name}`, 5<ext> for the
other company's extension), and public-context routes that set domain_name and transfer each company's DIDs
(harness.TENANT_DIDS, TENANT_ROUTED) and its phones (by their From host, as a registered phone's realm)
into its context. fsbridge runs with a tenants_dir of two look-alike tenant files (harness.tenant_file:
same extensions and customer, DIDs one digit apart, different retailCRM user ids), each company with its own
strict fake retailCRM (World.crms). The tests cover: calls into both domains at once (each CRM gets exactly
its cards, history and archived recording), click-to-call with each company's clientId (its own domain's
100 rings; the other company's DID is refused, an unknown clientId is 403), the shipped Lua routing in each
domain's context asking the CRM of the call's ${domain_name}, a call between the two companies'
extensions (nobody's card, in neither CRM), and a's customer transferred to b's 200 (a's call, credited to
a's 100; b's phone is neither a's manager nor b's customer). With FSBRIDGE_E2E_CAPTURE_DIR they record
tests/fixtures/esl/tenants_*.raw, which tests/test_tenant_flows.py replays.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import pytest

from tests.conftest import settings
from tests.e2e.harness import (
    DID_100,
    DID_200,
    DID_GROUP,
    DID_ROUTED,
    E2E_CONF,
    FLOW_DIDS,
    ROOT,
    SHIPPED_INBOUND,
    SHIPPED_SCRIPTS,
    TENANT_DOMAINS,
    TENANT_KEYS,
    TENANT_ROUTED,
    TENANT_USER_IDS,
    Admin,
    AdminError,
    EslRecorder,
    Ports,
    SippFactory,
    admin_api,
    free_port,
    pick_ports,
    routed_dialplan,
    tenant_file,
)
from tests.waiting import until

log = logging.getLogger("tests.e2e")

COMPOSE_FILE = ROOT / "tests" / "e2e" / "compose.e2e.yaml"
HOW_TO_ENABLE = (
    "no FreeSWITCH for the e2e tests: set FSBRIDGE_E2E_FREESWITCH=/path/to/bin/freeswitch (the suite "
    "starts it), or FSBRIDGE_E2E_ESL=host:port of a FreeSWITCH running tests/e2e/freeswitch/, "
    "or run a Docker engine with Compose (tests/e2e/compose.e2e.yaml)"
)
READY_TIMEOUT = 90.0
RECORD_SECRET = "e2e-record-secret-0123456789abcdef"
CLICK_RING_TIMEOUT = 6  # seconds a clicked manager's phone rings (originate.ring_timeout; vars.xml's e2e_ring_timeout)
_NO_BACKEND: list[str] = []  # why there is no FreeSWITCH, once the session fixture has looked


# -- the FreeSWITCH under test ----------------------------------------------------------------------

@dataclass
class FreeSwitch:
    kind: str
    host: str
    password: str
    ports: Ports
    recordings: Path | None
    can_restart: bool = False
    restart_hint: str = ""
    # DID_ROUTED goes through the shipped fsbridge_inbound.xml and fsbridge_route.lua (harness.routed_dialplan)
    routed_did: bool = False
    # mod_json_cdr's log-dir as this machine sees it (vars.xml's e2e_cdr_dir); None: not readable here
    cdr_dir: Path | None = None

    def api(self, command: str, timeout: float = 10.0) -> str:
        return admin_api(self.host, self.ports.esl, self.password, command, timeout)

    def ready(self) -> bool:
        try:
            with Admin(self.host, self.ports.esl, self.password, timeout=2.0) as admin:
                # `sofia status` lists the profile as RUNNING once its SIP port is bound.
                return admin.api("status").startswith("UP") and "RUNNING" in admin.api("sofia status")
        except (OSError, AdminError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"FreeSWITCH ({self.kind}) not ready after {timeout:g} s\n{self.log_tail()}")
            gevent.sleep(0.25)
        self.warm_up()

    def check_alive(self) -> None:
        pass

    def warm_up(self) -> None:
        """Start mod_sofia's presence thread before the first call. mod_sofia starts it on the first
        presence event FreeSWITCH fires (PRESENCE_IN, ...), and then sleeps 0.5 s inside the handler
        (sofia_presence.c, sofia_presence_event_handler: switch_yield(500000)), which runs on the core's
        event-dispatch thread: every event of every call, to every Event Socket client, is held up that
        long, once per FreeSWITCH start. A PBX with phones registering pays it before any call; the e2e
        PBX (no registrations, manage-presence off) paid it on the first call that played music or
        rang a `user/` dial string, whose `in` card then reached the CRM 0.5 s after the phone's 180."""
        # mod_dptools' `presence` API fires a PRESENCE_IN for a user nobody watches (docs/deploy.md, section 2).
        reply = self.api("presence in warm-up@127.0.0.1 available warm-up")
        assert reply.startswith("Event Sent"), f"presence in: {reply}"

    def restart(self, crash: bool) -> None:
        pytest.skip(self.restart_hint or f"cannot restart a {self.kind} FreeSWITCH")

    def log_tail(self, lines: int = 80) -> str:
        return ""

    def hang_up_everything(self) -> None:
        """Leave no channel behind for the next test (its fsbridge would see its events)."""
        try:
            if '"row_count":0' in self.api("show channels as json").replace(" ", ""):
                return
            self.api("hupall MANAGER_REQUEST")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if '"row_count":0' in self.api("show channels as json").replace(" ", ""):
                    return
                gevent.sleep(0.2)
        except (OSError, AdminError) as exc:
            log.warning("could not clean up channels: %s", exc)

    def close(self) -> None:
        pass


def install_conf(dest: Path) -> bool:
    """tests/e2e/freeswitch/ copied to `dest`, with the shipped inbound dialplan installed as docs/deploy.md
    says (into the context the customers' calls arrive in; for the virtual PBX, into each company's domain
    context) when it is there; whether it was."""
    shutil.copytree(E2E_CONF, dest)
    if not (SHIPPED_INBOUND.is_file() and (SHIPPED_SCRIPTS / "fsbridge_route.lua").is_file()):
        return False
    shipped = SHIPPED_INBOUND.read_text("utf-8")
    public = dest / "dialplan" / "public"
    public.mkdir(exist_ok=True)
    (public / "00_fsbridge_inbound.xml").write_text(routed_dialplan(shipped))
    for tenant, domain in TENANT_DOMAINS.items():
        # dialplan/tenants/context.inc includes tenants/<domain>/*.xml at the top of the domain's context.
        context = dest / "dialplan" / "tenants" / domain
        context.mkdir(parents=True, exist_ok=True)
        (context / "00_fsbridge_inbound.xml").write_text(routed_dialplan(shipped, TENANT_ROUTED[tenant], domain))
    return True


@dataclass
class LocalFreeSwitch(FreeSwitch):
    """A FreeSWITCH binary started by the suite in a temp dir, with tests/e2e/freeswitch/ as conf."""

    binary: str = ""
    base: Path = field(default_factory=Path)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @classmethod
    def create(cls, binary: str, base: Path) -> LocalFreeSwitch:
        fs = cls(kind=f"local {binary}", host="127.0.0.1", password="ClueCon", ports=pick_ports(),
                 recordings=base / "recordings", can_restart=True, binary=binary, base=base,
                 cdr_dir=base / "json_cdr")
        fs.routed_did = install_conf(base / "conf")
        for name in ("log", "db", "run", "storage", "recordings", "temp", "cache", "sounds", "certs"):
            (base / name).mkdir(parents=True, exist_ok=True)
        return fs

    def _argv(self) -> list[str]:
        b = self.base
        # The shipped scripts themselves, not a copy: the Lua routing under test is the one we ship.
        scripts = SHIPPED_SCRIPTS
        if not scripts.is_dir():
            scripts = b / "scripts"
            scripts.mkdir(exist_ok=True)
        # -nf -nc: in the foreground (so the suite owns the process) without a console reading stdin.
        return [self.binary, "-nonat", "-nf", "-nc",
                "-conf", str(b / "conf"), "-log", str(b / "log"), "-db", str(b / "db"), "-run", str(b / "run"),
                "-storage", str(b / "storage"), "-recordings", str(b / "recordings"), "-temp", str(b / "temp"),
                "-cache", str(b / "cache"), "-sounds", str(b / "sounds"), "-certs", str(b / "certs"),
                "-scripts", str(scripts)]

    def start(self) -> None:
        env = {**os.environ, **self.ports.env(), "FSBRIDGE_E2E_ESL_PASSWORD": self.password,
               "FSBRIDGE_E2E_CDR_DIR": str(self.cdr_dir)}
        self.starts += 1
        out = (self.base / "log" / f"stdout-{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(self._argv(), cwd=self.base, env=env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        try:
            self.wait_ready()
        except BaseException:
            self._stop(signal.SIGKILL, timeout=10)
            raise

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"FreeSWITCH exited with {self.proc.returncode}\n{self.log_tail()}")

    def _stop(self, sig: int, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, crash: bool) -> None:
        # SIGKILL is a crash: FreeSWITCH sends nothing more about the calls it had.
        # SIGTERM is `systemctl restart`: it hangs the calls up as it shuts down.
        self._stop(signal.SIGKILL if crash else signal.SIGTERM, timeout=30)
        self.start()

    def log_tail(self, lines: int = 80) -> str:
        path = self.base / "log" / "freeswitch.log"
        if not path.exists():
            outs = sorted((self.base / "log").glob("stdout-*.log"))
            path = outs[-1] if outs else path
        if not path.exists():
            return "(no FreeSWITCH log)"
        text = path.read_text("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:])

    def close(self) -> None:
        self._stop(signal.SIGTERM, timeout=30)


@dataclass
class DockerFreeSwitch(FreeSwitch):
    compose: Any = None

    def restart(self, crash: bool) -> None:
        if crash:
            self.compose.execute("kill -s SIGKILL freeswitch")
            self.compose.execute("up -d freeswitch")
        else:
            self.compose.execute("restart freeswitch")
        self.wait_ready()

    def has_http_client(self) -> bool:
        """fsbridge_route.lua asks fsbridge over LuaSocket or curl: without either in the image, every routed
        call would go to the fallback (the routing tests are then skipped, and the log says why)."""
        try:
            self.compose.execute("exec -T freeswitch sh -c 'command -v curl'")
            return True
        except Exception as exc:  # pytest-docker raises its own error for a non-zero exit
            log.warning("no curl in the FreeSWITCH image (%s): the routed DID's tests are skipped", exc)
            return False

    def log_tail(self, lines: int = 80) -> str:
        # mod_logfile's file (-log /tmp in compose.e2e.yaml), as for a local FreeSWITCH: the container's own
        # output has only what FreeSWITCH printed before its loggers started.
        why = ""
        for command in (f"exec -T freeswitch tail -n {lines} /tmp/freeswitch.log", f"logs --tail {lines} freeswitch"):
            try:
                return self.compose.execute(command).decode("utf-8", "replace")
            except Exception as exc:  # a failing `docker compose` must not hide the test's own failure
                why = str(exc)
        return f"(no logs: {why})"


def _succeeds(argv: list[str]) -> bool:
    if not shutil.which(argv[0]):
        return False
    try:
        return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _docker_answers() -> bool:
    return _succeeds(["docker", "info"])


def compose_command() -> str:
    """Compose v2 (the docker CLI plugin) where it is installed, else v1 (Debian's docker-compose), else ""."""
    if _succeeds(["docker", "compose", "version"]):
        return "docker compose"
    if _succeeds(["docker-compose", "version"]):
        return "docker-compose"
    return ""


def choose_backend() -> tuple[str, str]:
    """("external" | "local" | "docker", detail), or ("", why not)."""
    if not shutil.which("sipp"):
        return "", "SIPp not found (`sipp`): the e2e calls need it; on Debian/Ubuntu: apt-get install sip-tester"
    esl = os.environ.get("FSBRIDGE_E2E_ESL", "").strip()
    if esl:
        return "external", esl
    binary = os.environ.get("FSBRIDGE_E2E_FREESWITCH", "").strip()
    if binary:
        if not os.access(binary, os.X_OK):
            return "", f"FSBRIDGE_E2E_FREESWITCH={binary} is not an executable file"
        return "local", binary
    if _docker_answers():
        if compose_command():
            return "docker", str(COMPOSE_FILE.relative_to(ROOT))
        log.warning("a Docker engine answers, but neither `docker compose` nor `docker-compose` is installed")
    found = shutil.which("freeswitch")
    if found:
        return "local", found
    return "", HOW_TO_ENABLE


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    return compose_command() or "docker compose"


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    # Only FreeSWITCH: the suite runs fsbridge, the fake CRM and SIPp itself. No --wait (Compose v1 has
    # none): the fixture waits for the event socket and the SIP profile itself.
    return ["up -d freeswitch"]


@pytest.fixture(scope="session")
def freeswitch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FreeSwitch]:
    kind, detail = choose_backend()
    if not kind:
        _NO_BACKEND.append(detail)
        pytest.skip(detail)
    fs: FreeSwitch
    if kind == "external":
        host, _, port = detail.rpartition(":")
        if not host or not port.isdigit():
            pytest.fail(f"FSBRIDGE_E2E_ESL must be host:port, got {detail!r}")
        recordings = os.environ.get("FSBRIDGE_E2E_RECORDINGS")
        cdr_dir = os.environ.get("FSBRIDGE_E2E_CDR_DIR")
        fs = FreeSwitch(kind=f"external {detail}", host=host,
                        password=os.environ.get("FSBRIDGE_E2E_ESL_PASSWORD", "ClueCon"),
                        ports=Ports(esl=int(port)), recordings=Path(recordings) if recordings else None,
                        cdr_dir=Path(cdr_dir) if cdr_dir else None,
                        restart_hint="the restart scenario needs a FreeSWITCH the suite started itself "
                                     "(FSBRIDGE_E2E_FREESWITCH or Docker), not FSBRIDGE_E2E_ESL")
        fs.wait_ready(timeout=10)
    elif kind == "local":
        fs = LocalFreeSwitch.create(detail, tmp_path_factory.mktemp("freeswitch"))
        fs.start()
    else:
        from pytest_docker.plugin import DockerComposeExecutor

        recordings = tmp_path_factory.mktemp("recordings")
        recordings.chmod(0o777)  # FreeSWITCH in the container may run as a user of its own
        # The conf the container mounts: ours, with the routed DID installed as for a local FreeSWITCH.
        conf = tmp_path_factory.mktemp("freeswitch") / "conf"
        routed = install_conf(conf)
        for path in (conf, *conf.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        cdr_dir = tmp_path_factory.mktemp("json_cdr")
        cdr_dir.chmod(0o777)
        os.environ["FSBRIDGE_E2E_RECORDINGS"] = str(recordings)
        os.environ["FSBRIDGE_E2E_CDR_DIR"] = str(cdr_dir)   # vars.xml's e2e_cdr_dir, in the container too
        os.environ["FSBRIDGE_E2E_CONF"] = str(conf)
        request.getfixturevalue("docker_services")
        compose = DockerComposeExecutor(request.getfixturevalue("docker_compose_command"),
                                        request.getfixturevalue("docker_compose_file"),
                                        request.getfixturevalue("docker_compose_project_name"))
        fs = DockerFreeSwitch(kind="docker", host="127.0.0.1", password="ClueCon", ports=Ports(),
                              recordings=recordings, can_restart=True, compose=compose, cdr_dir=cdr_dir)
        fs.wait_ready()
        fs.routed_did = routed and fs.has_http_client()
    version = fs.api("version").strip()
    log.info("e2e FreeSWITCH: %s, %s", fs.kind, version)
    yield fs
    fs.close()


# -- one test's world: SIPp, the fake CRM, fsbridge ---------------------------------------------------

@dataclass
class World:
    fs: FreeSwitch
    crm: Any
    bridge: Any
    sipp: SippFactory
    finished: list[Any]
    uploader: Any = None
    records_url: str | None = None
    recorders: dict[str, Any] = field(default_factory=dict)
    crms: dict[str, Any] = field(default_factory=dict)   # the virtual PBX's (tenant_world): its CRM by company

    def capture(self, name: str) -> None:
        """With FSBRIDGE_E2E_CAPTURE_DIR set, record this test's Event Socket traffic as the capture `name`
        (`event plain ALL` and `event json ALL` connections), saved when the test ends, passed or not."""
        where = os.environ.get("FSBRIDGE_E2E_CAPTURE_DIR")
        if not where:
            return
        for fmt in ("plain", "json"):
            self.recorders[str(Path(where) / f"{name}.{fmt}.raw")] = EslRecorder(
                self.fs.host, self.fs.ports.esl, self.fs.password, fmt)
        gevent.sleep(0.3)

    def save_captures(self) -> None:
        # The last DESTROYs and a HEARTBEAT or two come after the call: keep them, as the lab did.
        gevent.sleep(1.5)
        for path, recorder in self.recorders.items():
            recorder.save(Path(path))

    def events(self) -> list[tuple[str, str, list[str], str | None, str | None]]:
        return [(e["type"], e["phone"], e["codes"], e.get("externalPhone"), e.get("hangupStatus"))
                for e in self.crm.events]

    def wait_events(self, count: int, timeout: float = 20.0) -> None:
        until(lambda: len(self.crm.events) >= count, timeout, f"{count} call events in the CRM")
        # Anything more would arrive right after: give it the chance to, so == catches it.
        gevent.sleep(0.5)

    def wait_finished(self, timeout: float = 20.0) -> Any:
        until(lambda: self.finished, timeout, "fsbridge to finish the call")
        return self.finished[0]

    def wait_cdr(self, call_id: str, timeout: float = 20.0) -> dict[str, Any]:
        if self.uploader is None:
            pytest.skip("fsbridge.history (the call history uploader) is not there yet")
        until(lambda: call_id in self.crm.calls, timeout, f"call {call_id} in the CRM's call history")
        return dict(self.crm.calls[call_id])


def _history(cfg: Any, crm_client: Any, outbox_path: Path) -> Any:
    """fsbridge's call history uploader if it exists, wired as `fsbridge run` would (the links it signs are
    the ones the Bridge's own record proxy verifies)."""
    try:
        from fsbridge.history import CdrBuilder, Outbox, Uploader
    except ImportError:
        return None
    builder = CdrBuilder.create(cfg.crm.timezone, cfg.managers, public_url=cfg.integration.public_url,
                                record_secret=cfg.records.link_secret)
    return Uploader(Outbox(outbox_path), crm_client, builder, linger=0.05, retry_base=0.2, retry_max=1.0)


def _world_settings(freeswitch: FreeSwitch, tmp_path: Path, crm_url: str) -> tuple[dict[str, Any], str]:
    """The e2e fsbridge's raw config (the single company of the lab PBX) and its public URL."""
    # The record proxy is the Bridge's own HTTP server: its public URL must be known before it starts.
    http_port = free_port()
    public_url = f"http://127.0.0.1:{http_port}"
    recordings = freeswitch.recordings
    raw = settings(
        fs_port=freeswitch.ports.esl, crm_url=crm_url, state_dir=str(tmp_path / "state"),
        freeswitch={"host": freeswitch.host, "password": freeswitch.password, "reconnect_max_delay": 0.5,
                    "reconcile_interval": 5.0},
        http={"listen": f"127.0.0.1:{http_port}", "internal_listen": "127.0.0.1:0"},
        integration={"public_url": public_url},
        records={"dir": str(recordings or tmp_path / "no-recordings"), "link_secret": RECORD_SECRET},
        external_phones={DID_100: "shop1", DID_200: "shop1", DID_GROUP: "shop1", DID_ROUTED: "shop1",
                         **dict.fromkeys(FLOW_DIDS, "shop1")},
        # Click-to-call: the manager's phone by the default template (user/{code}: the directory's users
        # dial the SIPp phones), the customer on the SIPp UAS that plays the customer.
        originate={"customer_dial": f"sofia/internal/{{phone}}@127.0.0.1:{freeswitch.ports.customer}",
                   "ring_timeout": CLICK_RING_TIMEOUT},
    )
    return raw, public_url


def _run_world(freeswitch: FreeSwitch, cfg: Any, crm: Any, tmp_path: Path, request: pytest.FixtureRequest,
               public_url: str, crms: dict[str, Any] | None = None) -> Iterator[World]:
    """fsbridge of `cfg` started in-process against the e2e FreeSWITCH, SIPp ready; everything stopped and
    every channel hung up after the test (SIPp's and FreeSWITCH's logs printed when it failed)."""
    from fsbridge.service import Bridge

    finished: list[Any] = []
    sinks: list[Callable[[Any], None]] = [finished.append]
    bridge = Bridge(cfg, on_finished=lambda call: [sink(call) for sink in sinks])
    # The Bridge's own history uploader, as `fsbridge run` has it; one of ours for a Bridge without.
    uploader = getattr(bridge, "history", None)
    own_uploader = None
    if uploader is None:
        uploader = own_uploader = _history(cfg, bridge.crm, tmp_path / "outbox.sqlite3")
        if own_uploader is not None:
            sinks.append(own_uploader.on_finished)
            own_uploader.start()
    bridge.start()
    if freeswitch.routed_did:
        # The routed DID's fsbridge_url names this test's fsbridge's internal listener (harness.routed_dialplan).
        freeswitch.api(f"global_setvar e2e_fsbridge_port={bridge.internal_http.address[1]}")
    sipp = SippFactory(freeswitch.ports, tmp_path / "sipp", fs_host=freeswitch.host)
    # Recordings are checked only where this machine can read FreeSWITCH's recordings directory.
    w = World(fs=freeswitch, crm=crm, bridge=bridge, sipp=sipp, finished=finished, uploader=uploader,
              records_url=public_url if freeswitch.recordings is not None else None, crms=crms or {})
    try:
        until(lambda: bridge.listener.connected, 15, "fsbridge to connect to FreeSWITCH's event socket")
        yield w
    finally:
        failed = getattr(request.node, "rep_call", None)
        if w.recorders:
            w.save_captures()
        if failed is not None and failed.failed:
            print(f"\n===== SIPp =====\n{sipp.logs()}\n===== FreeSWITCH ({freeswitch.kind}) =====\n"
                  f"{freeswitch.log_tail()}")
        sipp.stop_all()
        bridge.stop()
        if own_uploader is not None:
            own_uploader.close()
        freeswitch.hang_up_everything()


@pytest.fixture
def world(freeswitch: FreeSwitch, fake_crm: Any, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[World]:
    from fsbridge import config

    freeswitch.hang_up_everything()
    raw, public_url = _world_settings(freeswitch, tmp_path, fake_crm.url)
    if hasattr(config, "HistorySettings"):
        # Retry quickly: the outage scenarios wait for the history to go out once the CRM is back.
        # A customer who gave up in a queue before any agent was offered the call is credited to 200.
        raw["history"] = {"retry_max_delay": 1, "unassigned_code": "200"}
    cfg = config.from_mapping(raw, env={})
    yield from _run_world(freeswitch, cfg, fake_crm, tmp_path, request, public_url)


# -- the virtual PBX: two companies, each with its own fake retailCRM ------------------------------------

@pytest.fixture
def tenant_world(freeswitch: FreeSwitch, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """fsbridge as a virtual PBX provider runs it: tenants_dir with one file per company (tenant_file) of
    the e2e FreeSWITCH's two domains, each company with its own strict fake retailCRM (World.crms)."""
    from fsbridge import config
    from tests.fakes.retailcrm import FakeRetailCRM

    freeswitch.hang_up_everything()
    crms = {t: FakeRetailCRM(api_key=TENANT_KEYS[t], known_codes={"100", "200"},
                             known_user_ids=set(TENANT_USER_IDS[t].values()), known_sites={"shop1"}).start()
            for t in TENANT_DOMAINS}
    try:
        tenants_dir = tmp_path / "tenants.d"
        tenants_dir.mkdir()
        for tenant, crm in crms.items():
            (tenants_dir / f"{tenant}.yaml").write_text(tenant_file(tenant, crm.url))
        raw, public_url = _world_settings(freeswitch, tmp_path, "http://127.0.0.1:9")
        # The provider's file: no company of its own (its crm account, clientId, managers and DIDs are the
        # tenants'), everything else as for the single company.
        for key in ("managers", "external_phones"):
            del raw[key]
        raw["crm"] = {"timezone": "Europe/Moscow"}
        raw["integration"] = {"public_url": public_url}
        raw["history"] = {"retry_max_delay": 1}
        raw["tenants_dir"] = str(tenants_dir)
        cfg = config.from_mapping(raw, env={})
        yield from _run_world(freeswitch, cfg, crms["a"], tmp_path, request, public_url, crms)
    finally:
        for crm in crms.values():
            crm.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # The world fixture prints SIPp's and FreeSWITCH's logs when the test itself failed.
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    elif report.skipped and _NO_BACKEND and isinstance(report.longrepr, tuple) \
            and report.longrepr[2].endswith(_NO_BACKEND[0]):
        # One summary line for the whole suite (-ra folds skips by location and reason), not one per test.
        report.longrepr = (__file__, 1, report.longrepr[2])
