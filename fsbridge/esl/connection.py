"""One authenticated Event Socket connection, on greenswitch's InboundESL.

greenswitch gives the API fsbridge builds on (connect / send / register_handle / stop);
this subclass replaces the parts freeswitch-notes.md lists as traps: the reader (our
framer, decoded per value, bodies kept, JSON events supported), `send` (a timeout on
every command; a lost reply closes the connection rather than shifting every later
reply by one), a bounded connect and auth, and no unbounded internal event queue:
events go straight to `on_event`, which must not block (the call model).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.socket
from greenswitch.esl import InboundESL, NotConnectedError

from fsbridge.esl.protocol import Event, Frame, FrameReader, ProtocolError, command_line, parse_event

# How long the reader handles events before it lets the other greenlets run.
_YIELD_AFTER = 0.0005

log = logging.getLogger("fsbridge.esl")


class EslError(Exception):
    """The event socket failed; the message says how, in one line."""


class EslDisconnected(EslError, NotConnectedError):
    pass


class EslTimeout(EslError):
    pass


class EslAuthError(EslError):
    pass


class EslCommandError(EslError):
    """FreeSWITCH answered a command with -ERR."""


class EslConnection(InboundESL):
    def __init__(self, host: str, port: int, password: str, *, connect_timeout: float = 5.0,
                 command_timeout: float = 10.0, idle_timeout: float = 65.0,
                 on_event: Callable[[Event], None] | None = None) -> None:
        super().__init__(host, port, password, timeout=connect_timeout)
        self.command_timeout = command_timeout
        self.idle_timeout = idle_timeout
        self.on_event = on_event or (lambda event: None)
        self.closed = gevent.event.Event()
        self.close_reason = ""
        self.bad_events = 0
        self._pending: collections.deque[gevent.event.AsyncResult] = collections.deque()
        self._jobs: dict[str, gevent.event.AsyncResult] = {}
        self._send_lock = gevent.lock.RLock()
        self._auth_request = gevent.event.AsyncResult()
        self._reader: gevent.Greenlet | None = None
        self._notice = ""
        # FreeSWITCH dropped us for reading too slowly: its disconnect notice says it lost events for us.
        self.lost_events = False
        self._stopping = False
        self.sock = None

    # -- lifecycle --

    def connect(self) -> None:
        try:
            self.sock = gevent.socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise EslDisconnected(f"cannot connect to FreeSWITCH at {self.host}:{self.port}: "
                                  f"{exc.strerror or exc}") from None
        # Reads time out when FreeSWITCH goes silent for longer than its heartbeat allows.
        self.sock.settimeout(self.idle_timeout)
        self.connected = True
        self._reader = gevent.spawn(self.receive_events)
        try:
            first = self._auth_request.get(timeout=self.timeout)
        except gevent.Timeout:
            self.close("no auth/request within the connect timeout")
            raise EslTimeout(f"FreeSWITCH at {self.host}:{self.port} sent no auth request within "
                             f"{self.timeout:g} s") from None
        if first is not None:
            self.close(first)
            raise EslDisconnected(first)
        self.authenticate()

    def authenticate(self) -> None:
        reply = self.send(f"auth {self.password}")
        text = reply.headers.get("Reply-Text", "")
        if not text.startswith("+OK"):
            self.close("authentication failed")
            raise EslAuthError(f"FreeSWITCH rejected the event socket password ({text or 'no reply'})")

    def close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.connected = False
        self._run = False
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        failure = EslDisconnected(f"event socket closed: {reason}")
        while self._pending:
            self._pending.popleft().set_exception(failure)
        for job in self._jobs.values():
            job.set_exception(failure)
        self._jobs.clear()
        if not self._auth_request.ready():
            self._auth_request.set(reason)
        self.closed.set()

    def stop(self) -> None:
        self._stopping = True
        if self.connected:
            with contextlib.suppress(EslError):
                self.send("exit", timeout=2.0)
        self.close("stopped")
        if self._reader is not None and self._reader is not gevent.getcurrent():
            self._reader.join(timeout=2.0)

    # -- reading --

    def receive_events(self) -> None:
        framer = FrameReader()
        reason = "FreeSWITCH closed the connection"
        try:
            while self._run:
                try:
                    data = self.sock.recv(262144)
                except TimeoutError:
                    reason = f"no data from FreeSWITCH for {self.idle_timeout:g} s (heartbeats stopped)"
                    break
                except OSError as exc:
                    reason = f"socket error: {exc.strerror or exc}"
                    break
                if not data:
                    if framer.buffered:
                        reason = f"connection cut in the middle of a frame ({framer.buffered} bytes unread)"
                    break
                yielded = time.monotonic()
                for frame in framer.feed(data):
                    self._dispatch(frame)
                    # One read can hold hundreds of events. Handling them all before anything else runs
                    # would hold back the cards of the first ones by the time the last ones take: let
                    # the card senders go out in between.
                    now = time.monotonic()
                    if now - yielded >= _YIELD_AFTER:
                        gevent.sleep(0)
                        if not self._run:
                            break  # stopped meanwhile: the rest is not taken, as if it came later
                        yielded = time.monotonic()
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except Exception as exc:  # the reader must never die silently with `connected` still True
            log.exception("event socket reader failed")
            reason = f"reader failed: {exc}"
        finally:
            reason = self._notice or reason
            if not self._stopping:
                log.warning("event socket: %s", reason)
            self.close(reason)

    def _dispatch(self, frame: Frame) -> None:
        kind = frame.content_type
        if kind in ("text/event-json", "text/event-plain"):
            try:
                event = parse_event(frame)
            except ProtocolError as exc:
                self.bad_events += 1
                log.warning("event socket: skipped a malformed event (%s)", exc)
                return
            try:
                if event.get("Event-Name") == "BACKGROUND_JOB":
                    job = self._jobs.pop(event.get("Job-UUID", ""), None)
                    if job is not None:
                        job.set(event.get("_body", ""))
                self.on_event(event)
            except ProtocolError as exc:
                # Headers are decoded lazily, so a broken value shows up here, not above.
                self.bad_events += 1
                log.warning("event socket: skipped a malformed event (%s)", exc)
            except Exception:
                log.exception("event handler failed on %s", event.get("Event-Name"))
        elif kind in ("command/reply", "api/response"):
            if not self._pending:
                raise ProtocolError(f"{kind} with no command waiting for it")
            self._pending.popleft().set(frame)
        elif kind == "auth/request":
            if not self._auth_request.ready():
                self._auth_request.set(None)
        elif kind == "text/rude-rejection":
            reason = (f"FreeSWITCH refused this client at {self.host}:{self.port} (rude rejection: check the "
                      f"event socket's apply-inbound-acl)")
            if not self._auth_request.ready():
                self._auth_request.set(reason)
            raise ProtocolError(reason)
        elif kind == "text/disconnect-notice":
            body = frame.body.decode("utf-8", "replace").strip().splitlines()
            self._run = False
            self._notice = "FreeSWITCH sent a disconnect notice" + (f": {body[0]}" if body else "")
            self.lost_events = any("lost events" in line.lower() for line in body)
        else:
            log.debug("event socket: ignored a %r frame", kind[:40])

    # -- commands --

    def send(self, data: str, timeout: float | None = None, headers: dict[str, str] | None = None) -> Frame:
        """Send one command and wait (bounded) for its reply frame."""
        line = command_line(data)
        extra = "".join(f"{command_line(k)}: {command_line(v)}\n" for k, v in (headers or {}).items())
        if not self.connected or self.closed.is_set():
            raise EslDisconnected(f"event socket not connected ({self.close_reason or 'never connected'})")
        result = gevent.event.AsyncResult()
        with self._send_lock:
            self._pending.append(result)
            try:
                self.sock.sendall(f"{line}\n{extra}\n".encode())
            except OSError as exc:
                self.close(f"send failed: {exc.strerror or exc}")
                raise EslDisconnected(f"event socket send failed: {exc.strerror or exc}") from None
        wait = self.command_timeout if timeout is None else timeout
        try:
            return result.get(timeout=wait)
        except gevent.Timeout:
            # Replies come back in order; one that never came would shift every later one.
            self.close(f"no reply to {line.split(' ', 1)[0]!r} within {wait:g} s")
            raise EslTimeout(f"FreeSWITCH did not answer {line.split(' ', 1)[0]!r} within {wait:g} s") from None

    def api(self, command: str, timeout: float | None = None) -> str:
        """`api <command>`; the response body. Keep to quick commands: api runs inline in FreeSWITCH."""
        frame = self.send(f"api {command}", timeout)
        return frame.body.decode("utf-8", "replace")

    def bgapi(self, command: str, timeout: float | None = None) -> gevent.event.AsyncResult:
        """`bgapi <command>`: returns an AsyncResult that gets the BACKGROUND_JOB body."""
        job_uuid = str(uuid.uuid4())
        job = gevent.event.AsyncResult()
        self._jobs[job_uuid] = job
        try:
            reply = self.send(f"bgapi {command}", timeout, headers={"Job-UUID": job_uuid})
        except EslError:
            self._jobs.pop(job_uuid, None)
            raise
        text = reply.headers.get("Reply-Text", "")
        if not text.startswith("+OK"):
            self._jobs.pop(job_uuid, None)
            raise EslCommandError(f"bgapi refused: {text}")
        return job

    def subscribe(self, names: list[str]) -> None:
        reply = self.send("event json " + " ".join(names))
        text = reply.headers.get("Reply-Text", "")
        if not text.startswith("+OK"):
            raise EslCommandError(f"FreeSWITCH refused the event subscription: {text}")
