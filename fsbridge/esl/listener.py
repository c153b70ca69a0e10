"""Keeps one event subscription alive for months: connect, subscribe, reconcile,
notice silence or a cut, back off, and do it all again."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import gevent
import gevent.event

from fsbridge.config import FreeSwitchSettings
from fsbridge.esl.connection import EslAuthError, EslConnection, EslError
from fsbridge.esl.protocol import Event

log = logging.getLogger("fsbridge.esl")

# What the call model needs, and nothing more: every extra name is load on
# FreeSWITCH's per-listener queue (freeswitch-notes.md, "slow readers lose events").
CALL_EVENTS = (
    "CHANNEL_CREATE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER",
    "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY",
    "RECORD_STOP", "BACKGROUND_JOB", "HEARTBEAT",
)


class EventListener:
    """Supervises EslConnection: the rest of fsbridge only sees events and `connection`."""

    def __init__(self, settings: FreeSwitchSettings, on_event: Callable[[Event], None], *,
                 events: tuple[str, ...] = CALL_EVENTS,
                 on_connect: Callable[[EslConnection], None] | None = None,
                 min_delay: float = 0.5) -> None:
        self.settings = settings
        self.on_event = on_event
        self.events = events
        self.on_connect = on_connect
        self.min_delay = min_delay
        self.connection: EslConnection | None = None
        self.reconnects = 0
        self.malformed_before = 0     # malformed events skipped on earlier connections
        self.lost_listener = 0        # times FreeSWITCH killed us for reading too slowly (events lost)
        self.disconnected_at: float | None = None   # wall clock of the last connection loss
        # Monotonic time of the last successful connect and subscription: a sign of life as good as an
        # event, since FreeSWITCH's first HEARTBEAT may be 20 s away.
        self.subscribed_at: float | None = None
        self.last_error = ""
        self._running = False
        self._greenlet: gevent.Greenlet | None = None

    @property
    def malformed_events(self) -> int:
        """Events skipped because they could not be parsed, over every connection so far."""
        conn = self.connection
        # Counted until the next connection replaces this one: a scrape between the close and the
        # listener's bookkeeping must not see the counter go down.
        return self.malformed_before + (conn.bad_events if conn is not None else 0)

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    @property
    def connected(self) -> bool:
        conn = self.connection
        return conn is not None and conn.connected and not conn.closed.is_set()

    def start(self) -> None:
        self._running = True
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self._running = False
        if self.connection is not None:
            self.connection.stop()
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)

    def connect_once(self) -> EslConnection:
        s = self.settings
        conn = EslConnection(s.host, s.port, s.password, connect_timeout=s.connect_timeout,
                             command_timeout=s.command_timeout, idle_timeout=s.heartbeat_timeout,
                             on_event=self.on_event)
        conn.connect()
        try:
            conn.subscribe(list(self.events))
        except EslError:
            conn.close("subscription failed")
            raise
        return conn

    def _run(self) -> None:
        delay = self.min_delay
        first = True
        while self._running:
            try:
                conn = self.connect_once()
            except EslError as exc:
                self._note_failure(str(exc), auth=isinstance(exc, EslAuthError))
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.reconnect_max_delay)
                continue
            if not first:
                self.reconnects += 1
            first = False
            if self.connection is not None:
                self.malformed_before += self.connection.bad_events
            self.connection = conn
            self.subscribed_at = time.monotonic()
            self.last_error = ""
            delay = self.min_delay
            log.info("connected to FreeSWITCH at %s:%s, subscribed to %d event names",
                     self.settings.host, self.settings.port, len(self.events))
            if self.on_connect is not None:
                try:
                    self.on_connect(conn)
                except EslError as exc:
                    log.warning("after connecting: %s", exc)
                except Exception:
                    log.exception("after connecting: reconciliation failed")
            conn.closed.wait()
            self.disconnected_at = time.time()
            if conn.lost_events:
                self.lost_listener += 1
            if self._running:
                log.warning("lost FreeSWITCH (%s); reconnecting", conn.close_reason)

    def _note_failure(self, message: str, *, auth: bool) -> None:
        # One line per distinct problem, not one per retry: the log must stay readable
        # through a FreeSWITCH outage of hours.
        if message != self.last_error:
            (log.error if auth else log.warning)("%s; retrying with backoff", message)
        self.last_error = message
