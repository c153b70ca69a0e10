"""The pieces of the e2e suite that are not fixtures: ports, a minimal ESL client for the
suite's own checks, the shipped inbound dialplan as the suite installs it, SIPp processes, the
customer's voice, and reading a WAV back.

The admin client is deliberately not fsbridge's: the suite must be able to tell "FreeSWITCH
is up" and "no channels are left" even when fsbridge's own event socket code is broken.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import socket
import struct
import subprocess
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.waiting import until

ROOT = Path(__file__).resolve().parents[2]
E2E_CONF = ROOT / "tests" / "e2e" / "freeswitch"
SIP_DIR = ROOT / "tests" / "sip"

CUSTOMER = "75555555555"
DID_100 = "74999999999"    # rings extension 100
DID_200 = "74999999998"    # rings extension 200
DID_GROUP = "74999999997"  # rings 100 and 200 at once
DID_ROUTED = "74999999996"  # conf/freeswitch/dialplan/fsbridge_inbound.xml: the Lua script asks fsbridge
ROUTED_FALLBACK = "100"     # where the routed DID goes without a responsible manager
# The contact-center flows (tests/e2e/test_flows.py, dialplan/public.xml)
DID_QUEUE_RINGALL = "74999999990"  # mod_callcenter queue, ring-all, agents 100 and 200
DID_QUEUE_IDLE = "74999999989"     # mod_callcenter queue, longest-idle-agent
DID_QUEUE_EMPTY = "74999999988"    # a queue without agents
DID_VOICEMAIL = "74999999987"      # 100 rings 4 s, then 100's voicemail
DID_FORWARD = "74999999986"        # user/100@forward.e2e: 100 forwarded to a mobile through a gateway
DID_LOOPBACK = "74999999985"       # ring group 100 + 200 through loopback/
DID_PICKUP = "74999999984"         # rings 100; **100 intercepts it
FLOW_DIDS = (DID_QUEUE_RINGALL, DID_QUEUE_IDLE, DID_QUEUE_EMPTY, DID_VOICEMAIL, DID_FORWARD, DID_LOOPBACK,
             DID_PICKUP)
# The virtual PBX (tests/e2e/test_tenants.py; directory/tenants.xml, dialplan/tenants.xml): two companies, one
# FreeSWITCH domain each, with look-alike extensions (100, 200 in both) and DIDs.
TENANT_DOMAINS = {"a": "a.pbx.test", "b": "b.pbx.test"}
TENANT_DIDS = {"a": "74951110001", "b": "74951110002"}         # each rings 100 of its own domain
TENANT_ROUTED = {"a": "74951110011", "b": "74951110012"}       # fsbridge_inbound.xml in the domain's context
# Only their retailCRM accounts (keys, clientIds, the managers' user ids) tell the companies apart.
TENANT_KEYS = {"a": "tenant-a-api-key-0123456789", "b": "tenant-b-api-key-0123456789"}
TENANT_CLIENT_IDS = {"a": "tenant-a-client-id-0123456789abcdef", "b": "tenant-b-client-id-0123456789abcdef"}
TENANT_USER_IDS = {"a": {"100": 11, "200": 12}, "b": {"100": 21, "200": 22}}


def tenant_file(tenant: str, crm_url: str, *, dids: bool = True) -> str:
    """tenants.d/<tenant>.yaml of one company of the e2e virtual PBX; dids=False: its DIDs left out of
    external_phones (its calls are then known by their domain only)."""
    managers = ", ".join(f'"{code}": {uid}' for code, uid in TENANT_USER_IDS[tenant].items())
    phones = f'{{"{TENANT_DIDS[tenant]}": shop1, "{TENANT_ROUTED[tenant]}": shop1}}' if dids else "{}"
    return (f"domains: [{TENANT_DOMAINS[tenant]}]\n"
            f'crm: {{url: "{crm_url}", api_key: "{TENANT_KEYS[tenant]}", timezone: Europe/Moscow, card_max_age: 5}}\n'
            f'integration: {{client_id: "{TENANT_CLIENT_IDS[tenant]}"}}\n'
            f"managers: {{{managers}}}\n"
            f"external_phones: {phones}\n"
            'history: {unassigned_code: "200"}\n')


SHIPPED_INBOUND = ROOT / "conf" / "freeswitch" / "dialplan" / "fsbridge_inbound.xml"
SHIPPED_SCRIPTS = ROOT / "conf" / "freeswitch" / "scripts"


@dataclass(frozen=True)
class Ports:
    """Where everything listens. The defaults are tests/e2e/freeswitch/vars.xml's."""

    esl: int = 18021
    sip: int = 15060
    ext100: int = 15090
    ext200: int = 15091
    customer: int = 15092
    a100: int = 15093        # 100@a.pbx.test, 200@a.pbx.test, 100@b.pbx.test, 200@b.pbx.test
    a200: int = 15094
    b100: int = 15095
    b200: int = 15096
    rtp_start: int = 26000
    rtp_end: int = 26999

    def of_phone(self, phone: str) -> int:
        """The port of the SIPp UAS playing `phone`: "100", "200", "customer", or "100@a.pbx.test"."""
        ext, _, domain = phone.partition("@")
        if not domain:
            return {"100": self.ext100, "200": self.ext200, "customer": self.customer}[ext]
        tenant = next(t for t, d in TENANT_DOMAINS.items() if d == domain)
        return int(getattr(self, f"{tenant}{ext}"))

    def env(self) -> dict[str, str]:
        """The variables vars.xml reads with env-set."""
        return {
            "FSBRIDGE_E2E_ESL_PORT": str(self.esl),
            "FSBRIDGE_E2E_SIP_PORT": str(self.sip),
            "FSBRIDGE_E2E_EXT100_PORT": str(self.ext100),
            "FSBRIDGE_E2E_EXT200_PORT": str(self.ext200),
            "FSBRIDGE_E2E_CUSTOMER_PORT": str(self.customer),
            "FSBRIDGE_E2E_A100_PORT": str(self.a100),
            "FSBRIDGE_E2E_A200_PORT": str(self.a200),
            "FSBRIDGE_E2E_B100_PORT": str(self.b100),
            "FSBRIDGE_E2E_B200_PORT": str(self.b200),
            "FSBRIDGE_E2E_RTP_START": str(self.rtp_start),
            "FSBRIDGE_E2E_RTP_END": str(self.rtp_end),
        }


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(count: int, kind: int = socket.SOCK_DGRAM) -> list[int]:
    """`count` distinct free ports, held open together so none is handed out twice."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, kind)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def pick_ports() -> Ports:
    esl = free_port(socket.SOCK_STREAM)
    sip, ext100, ext200, customer, a100, a200, b100, b200 = free_ports(8)
    # An RTP range of its own, away from the ephemeral ports the kernel hands out.
    base = 20000 + (os.getpid() % 400) * 20
    return Ports(esl=esl, sip=sip, ext100=ext100, ext200=ext200, customer=customer, a100=a100, a200=a200,
                 b100=b100, b200=b200, rtp_start=base, rtp_end=base + 19)


def udp_port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class AdminError(Exception):
    pass


class Admin:
    """Just enough of the event socket for the suite's own checks: auth and `api`."""

    def __init__(self, host: str, port: int, password: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""
        headers, _ = self._read()
        if headers.get("Content-Type") != "auth/request":
            self.close()
            raise AdminError(f"not an event socket: {headers}")
        self.sock.sendall(f"auth {password}\n\n".encode())
        headers, _ = self._read()
        if not headers.get("Reply-Text", "").startswith("+OK"):
            self.close()
            raise AdminError(f"auth refused: {headers.get('Reply-Text')}")

    def _read_line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AdminError("event socket closed")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def _read(self) -> tuple[dict[str, str], bytes]:
        headers: dict[str, str] = {}
        while True:
            line = self._read_line()
            if not line:
                if headers:
                    break
                continue
            name, _, value = line.decode("utf-8", "replace").partition(":")
            headers[name.strip()] = value.strip()
        length = int(headers.get("Content-Length", "0"))
        while len(self._buf) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AdminError("event socket closed")
            self._buf += chunk
        body, self._buf = self._buf[:length], self._buf[length:]
        return headers, body

    def api(self, command: str) -> str:
        self.sock.sendall(f"api {command}\n\n".encode())
        while True:
            headers, body = self._read()
            if headers.get("Content-Type") == "api/response":
                return body.decode("utf-8", "replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def admin_api(host: str, port: int, password: str, command: str, timeout: float = 5.0) -> str:
    with Admin(host, port, password, timeout) as admin:
        return admin.api(command)


# -- the shipped inbound dialplan -----------------------------------------------------------------

def routed_dialplan(shipped: str, did: str = DID_ROUTED, context: str = "public") -> str:
    """conf/freeswitch/dialplan/fsbridge_inbound.xml as an admin installs it (docs/deploy.md, section 4):
    only the lines marked EDIT change. The DIDs: `did`. The fallback: extension 100 of `context`.
    fsbridge_url: each test's fsbridge, whose port FreeSWITCH reads from a global variable when the call
    comes in. In a company's domain context (a virtual PBX), also the line its Virtual PBX comment names:
    the manager is dialled in the call's domain, user/{ext}@${domain_name}. Everything else (timeouts, the
    recording, ring_ready, the script and the transfer after it) is the shipped text.
    """
    edits = [
        (r'(<condition field="destination_number" expression=")[^"]*(")', rf"\g<1>^\\+?({did})$\g<2>"),
        (r'(data="fsbridge_fallback=)[^"]*(")', rf"\g<1>{ROUTED_FALLBACK} XML {context}\g<2>"),
        (r'(data="fsbridge_url=http://127\.0\.0\.1:)[0-9]+(/routing/manager")', r"\g<1>${e2e_fsbridge_port}\g<2>"),
    ]
    if context != "public":
        edits.append((r'(data="fsbridge_dial=user/\{ext\}@)\$\$\{domain\}(")', r"\g<1>${domain_name}\g<2>"))
    text = shipped
    for pattern, replacement in edits:
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise AssertionError(f"{SHIPPED_INBOUND.name}: expected one line matching {pattern!r} (an EDIT line "
                                 f"of docs/deploy.md), found {count}: update routed_dialplan()")
    return text


# -- SIPp ---------------------------------------------------------------------------------------

class Sipp:
    """One SIPp process playing one scenario of tests/sip/ for one call."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.out = (workdir / f"{name}.out").open("wb")
        self.proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=self.out,
                                     stderr=subprocess.STDOUT)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"SIPp {self.name} still running after {timeout:g} s\n{self.logs()}") from None

    def ok(self, timeout: float = 60.0) -> None:
        """The scenario ran to its end (exit 0): every message came as the scenario expects."""
        code = self.wait(timeout)
        assert code == 0, f"SIPp {self.name} exited {code}\n{self.logs()}"

    def messages(self) -> str:
        """The SIP messages this SIPp sent and received so far (its -trace_msg log)."""
        path = self.workdir / f"{self.name}.messages.log"
        return path.read_text("utf-8", "replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.out.close()

    def logs(self, limit: int = 4000) -> str:
        if not self.out.closed:
            self.out.flush()
        parts = []
        for path in sorted(self.workdir.glob(f"{self.name}*")):
            if path.is_file():
                text = path.read_text("utf-8", "replace")
                parts.append(f"--- {path.name}\n{text[-limit:]}")
        return "\n".join(parts)


_TRACE_STAMP = re.compile(r"^-+ (\d{4}-\d\d-\d\d\s+\d\d:\d\d:\d\d\.\d+)")


def ringing_sent_at(phone: Sipp) -> float:
    """When a SIPp phone sent its first 180 Ringing, from its message trace (epoch seconds; SIPp stamps
    the trace with this machine's local wall clock)."""
    import datetime

    stamp = None
    for line in phone.messages().splitlines():
        m = _TRACE_STAMP.match(line)
        if m:
            stamp = m.group(1)
        elif line.startswith("SIP/2.0 180") and stamp:
            return datetime.datetime.strptime(" ".join(stamp.split()), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    raise AssertionError(f"SIPp {phone.name} sent no 180 Ringing\n{phone.messages()[-2000:]}")


class SippFactory:
    """Starts SIPp phones and customers against one FreeSWITCH; stops what is left at the end."""

    def __init__(self, ports: Ports, workdir: Path, fs_host: str = "127.0.0.1") -> None:
        self.ports = ports
        self.workdir = workdir
        self.fs_host = fs_host
        self.running: list[Sipp] = []
        self._counter = 0
        workdir.mkdir(parents=True, exist_ok=True)
        # The customer's voice: SIPp looks for the pcap in its working directory.
        write_voice_pcap(workdir / "customer.pcap")

    def _media_port(self) -> int:
        # SIPp uses the media port and the next ones (RTP, RTCP, video, echo): keep them apart, and off the
        # phones' SIP ports, which are free until their SIPp starts (seen: a phone failing to bind its own).
        p = self.ports
        reserved = {p.sip, p.ext100, p.ext200, p.customer, p.a100, p.a200, p.b100, p.b200}
        while True:
            port = free_port(socket.SOCK_DGRAM)
            near = (port, port + 1, port + 2, port + 3)
            if port % 2 == 0 and reserved.isdisjoint(near) and not any(udp_port_taken(n) for n in near[1:]):
                return port

    def _common(self, name: str, scenario: str, local_port: int) -> list[str]:
        sipp = shutil.which("sipp") or "sipp"
        return [sipp, "-sf", str(SIP_DIR / scenario), "-i", "127.0.0.1", "-p", str(local_port),
                "-mi", "127.0.0.1", "-mp", str(self._media_port()), "-m", "1", "-l", "1",
                "-nostdin", "-timeout", "120s", "-timeout_error",
                "-trace_err", "-error_file", str(self.workdir / f"{name}.errors.log"),
                "-trace_msg", "-message_file", str(self.workdir / f"{name}.messages.log")]

    def _name(self, what: str) -> str:
        self._counter += 1
        return f"{self._counter:02d}-{what}"

    def _start(self, name: str, argv: list[str]) -> Sipp:
        sipp = Sipp(name, argv, self.workdir)
        self.running.append(sipp)
        return sipp

    def phone(self, ext: str, behaviour: str, *, ring_ms: int = 1000, transfer_to: str = "",
              hold_ms: int = 3000) -> Sipp:
        """Extension `ext`'s phone ("100", or "100@a.pbx.test" in a company's domain), or with ext="customer"
        the customer a manager calls: "answer" (talks until the other side hangs up), "talk" (answers, talks
        for hold_ms, hangs up), "busy" (rings, then 486), "dnd" (486 at once), "ring" (never picked up) or
        "transfer"."""
        port = self.ports.of_phone(ext)
        scenario = {"answer": "uas_answer.xml", "talk": "uas_talk.xml", "busy": "uas_busy.xml", "dnd": "uas_dnd.xml",
                    "ring": "uas_ring.xml", "transfer": "uas_transfer.xml", "hold": "uas_hold.xml"}[behaviour]
        name = self._name(f"phone{ext.replace('@', '-')}-{behaviour}")
        argv = [*self._common(name, scenario, port), "-d", str(ring_ms)]
        # The one who talks plays the customer's voice; the others echo what they hear.
        argv += ["-set", "hold_ms", str(hold_ms)] if behaviour == "talk" else ["-rtp_echo"]
        if transfer_to:
            argv += ["-key", "transfer_to", transfer_to]
        sipp = self._start(name, argv)
        # Not too often: the probe binds the very port SIPp is about to bind.
        until(lambda: udp_port_taken(port) or sipp.proc.poll() is not None, 5.0, f"SIPp {name} to listen", 0.05)
        if sipp.proc.poll() is not None:
            raise AssertionError(f"SIPp {name} did not start\n{sipp.logs()}")
        return sipp

    def customer(self, dialled: str, behaviour: str, *, hold_ms: int = 3000, caller: str = CUSTOMER) -> Sipp:
        """The customer calling `dialled`: "talk" (for hold_ms after the answer, then BYE),
        "refused" (expects a final error), or "cancel" (gives up hold_ms after the 183)."""
        scenario = {"talk": "uac_talk.xml", "refused": "uac_refused.xml", "cancel": "uac_cancel.xml"}[behaviour]
        name = self._name(f"customer-{behaviour}")
        argv = [*self._common(name, scenario, free_port(socket.SOCK_DGRAM)),
                f"{self.fs_host}:{self.ports.sip}", "-s", dialled, "-key", "caller", caller, "-d", str(hold_ms)]
        return self._start(name, argv)

    def extension_dials(self, dialled: str, caller: str) -> Sipp:
        """Extension `caller` dials `dialled` (a pickup code, a parking slot) and stays on the call until
        FreeSWITCH hangs it up."""
        name = self._name(f"ext{caller}-dials")
        argv = [*self._common(name, "uac_wait.xml", free_port(socket.SOCK_DGRAM)),
                f"{self.fs_host}:{self.ports.sip}", "-s", dialled, "-key", "caller", caller]
        return self._start(name, argv)

    def phone_dials(self, dialled: str, caller: str, domain: str, *, hold_ms: int = 3000) -> Sipp:
        """Extension `caller` of `domain` dials `dialled` from its phone (From and Request-URI in its
        domain, as a phone registered there sends them), talks for hold_ms once answered, and hangs up."""
        name = self._name(f"ext{caller}@{domain}-dials")
        argv = [*self._common(name, "uac_phone_talk.xml", free_port(socket.SOCK_DGRAM)),
                f"{self.fs_host}:{self.ports.sip}", "-s", dialled, "-key", "caller", caller, "-key", "domain", domain,
                "-d", str(hold_ms)]
        return self._start(name, argv)

    def stop_all(self) -> None:
        for sipp in self.running:
            sipp.stop()

    def logs(self) -> str:
        return "\n".join(s.logs() for s in self.running)


# -- the customer's voice -------------------------------------------------------------------------

def _alaw(sample: int) -> int:
    """G.711 A-law of a 16-bit sample (the reference algorithm, Sun's g711.c)."""
    value = sample >> 3
    if value >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        value = -value - 1
    for seg, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)):
        if value <= end:
            low = (value >> 1) & 0x0F if seg < 2 else (value >> seg) & 0x0F
            return ((seg << 4) | low) ^ mask
    return 0x7F ^ mask


def voice_packets(seconds: float, freq: float = 440.0) -> Iterator[bytes]:
    """20 ms RTP packets (PCMA, payload type 8) of a tone: something audible in the recording."""
    ssrc = 0x5EED1234
    samples_per_packet = 160
    count = int(seconds * 50)
    for n in range(count):
        payload = bytes(
            _alaw(int(12000 * math.sin(2 * math.pi * freq * (n * samples_per_packet + i) / 8000)))
            for i in range(samples_per_packet))
        header = struct.pack("!BBHII", 0x80, 8, n & 0xFFFF, (n * samples_per_packet) & 0xFFFFFFFF, ssrc)
        yield header + payload


def write_voice_pcap(path: Path, seconds: float = 30.0) -> None:
    """A pcap SIPp's play_pcap_audio replays (it rewrites addresses and ports, keeps the RTP)."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]  # Ethernet link type
    for n, rtp in enumerate(voice_packets(seconds)):
        udp = struct.pack("!HHHH", 6000, 6000, 8 + len(rtp), 0) + rtp
        total = 20 + len(udp)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, n & 0xFFFF, 0, 64, 17, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
        ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
        frame = b"\x00" * 12 + b"\x08\x00" + ip + udp
        usec = n * 20000
        out.append(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# -- recordings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WavInfo:
    channels: int
    rate: int
    seconds: float
    rms: tuple[float, ...]  # per channel, of 16-bit samples


def read_wav(data: bytes) -> WavInfo:
    """What a player would make of the file; raises if it would not play it."""
    import io

    with wave.open(io.BytesIO(data)) as w:
        channels, rate, width, frames = w.getnchannels(), w.getframerate(), w.getsampwidth(), w.getnframes()
        raw = w.readframes(frames)
    if width != 2:
        return WavInfo(channels, rate, frames / rate if rate else 0.0, ())
    samples = struct.unpack(f"<{len(raw) // 2}h", raw[: len(raw) // 2 * 2])
    rms = []
    for ch in range(channels):
        mine = samples[ch::channels]
        rms.append(math.sqrt(sum(s * s for s in mine) / len(mine)) if mine else 0.0)
    return WavInfo(channels, rate, frames / rate if rate else 0.0, tuple(rms))


# -- capturing the Event Socket traffic of a flow (tests/fixtures/esl/) ------------------------------

class EslRecorder:
    """A connection that sent `auth` and `event <fmt> ALL`, keeping every byte FreeSWITCH sent it
    and the commands beside (the format of tests/fixtures/esl/*.raw and *.raw.sent.txt)."""

    def __init__(self, host: str, port: int, password: str, fmt: str) -> None:
        import time

        import gevent

        self.fmt = fmt
        self.t0 = time.monotonic()
        self.sent: list[str] = []
        self.data = bytearray()
        self.sock = socket.create_connection((host, port), timeout=10)
        self._command(f"auth {password}")
        self._command(f"event {fmt} ALL")
        self._reader = gevent.spawn(self._read)

    def _command(self, text: str) -> None:
        import time

        self.sent.append(f"{time.monotonic() - self.t0:.3f} {text}")
        self.sock.sendall(f"{text}\n\n".encode())

    def _read(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            self.data += chunk

    def save(self, path: Path) -> None:
        self._reader.kill()
        with contextlib.suppress(OSError):
            self.sock.close()
        path.write_bytes(bytes(self.data))
        Path(f"{path}.sent.txt").write_text("\n".join(self.sent) + "\n")
