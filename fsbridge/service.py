"""Wires the pieces together: ESL -> calls -> CRM, and the HTTP API."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.lock
import gevent.pool

from fsbridge import history
from fsbridge.calls.cdr_spool import CdrSpool
from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.config import Config, ConfigError
from fsbridge.crm.client import RetailCRM
from fsbridge.esl.connection import EslConnection, EslError
from fsbridge.esl.listener import EventListener
from fsbridge.esl.protocol import Event
from fsbridge.health import Health
from fsbridge.history.cdr import has_talk_recording, record_id_of
from fsbridge.http.account import DEFAULT_PATH as ACCOUNT_PATH
from fsbridge.http.account import MAX_BODY as ACCOUNT_MAX_BODY
from fsbridge.http.account import AccountPage
from fsbridge.http.app import Router
from fsbridge.http.logo import LogoHandler
from fsbridge.http.ops import OpsHandlers
from fsbridge.http.records import RecordsHandler
from fsbridge.http.server import HttpServer
from fsbridge.hub_watch import HubWatch
from fsbridge.metrics import Metrics
from fsbridge.record_links import UUID_RE, RecordLinks
from fsbridge.recordings import Recordings
from fsbridge.tenants.company import Company
from fsbridge.tenants.observe import AllCards, TenantMetrics, TenantsReachability, tenant_checks
from fsbridge.tenants.ops import TenantsOps
from fsbridge.tenants.registry import Companies, TenantRoutingHandler, register_callbacks

log = logging.getLogger("fsbridge")
# FreeSWITCH writes its own uuids in lower case, but an origination_uuid set by a dialplan or another ESL
# client keeps its case: channels are listed whatever the case, and only uuid-shaped ids reach a command.
CHANNEL_UUID_RE = re.compile(UUID_RE.pattern, re.IGNORECASE)
_ROW_UUID_RE = re.compile(rf'"uuid":\s*"({UUID_RE.pattern})"', re.IGNORECASE)
CDR_LEDGER_FILE = "cdr-ledger.sqlite3"


def live_channel_uuids(conn: EslConnection) -> set[str]:
    """Uuids of the channels FreeSWITCH has now (`show channels as json`).

    Only the uuids are pulled out: with thousands of calls a full json.loads of the listing stalled the
    event loop for hundreds of milliseconds (bench_load). The key is anchored as in esl/protocol.py."""
    body = conn.api("show channels as json")
    if not body.lstrip().startswith("{"):
        raise EslError(f"`show channels as json` did not answer JSON: {body[:80]!r}")
    return set(_ROW_UUID_RE.findall(body))


class _RecoveredCalls:
    """The spool's way into the history: calls rebuilt from FreeSWITCH's CDRs (no cards for them)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def known(self, call_ids: list[str]) -> set[str]:
        if self.bridge.companies.single:
            return self.bridge.history.known(call_ids)
        return self.bridge.outbox.known(call_ids)

    def record(self, calls: list[FinishedCall]) -> bool:
        # The outbox is shared: one transaction for all, then each company's uploader is woken for its own.
        if not self.bridge.history.record(calls):
            return False
        for company in {c.tenant for c in calls}:
            found = self.bridge.companies.get(company)
            if found is not None:
                found.history.wake()
        for call in calls:
            self.bridge._after_history(call)
        return True


class Bridge:
    """The running service. Tests build it in-process; `fsbridge run` builds it from a config file."""

    def __init__(self, cfg: Config, *, crm: RetailCRM | None = None,
                 on_finished: Callable[[FinishedCall], None] | None = None) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.hub_watch = HubWatch(self.metrics.registry)
        try:
            cfg.storage.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"storage.dir: cannot create {cfg.storage.dir}: {exc.strerror}") from None
        self.links = RecordLinks(cfg.integration.public_url, cfg.records.link_secret,
                                 previous_secrets=tuple(cfg.records.previous_link_secrets))
        self.outbox = history.open_outbox(cfg)
        # What is per company (CRM client, cards, history, routing, statuses, click-to-call) is in
        # fsbridge/tenants/; the single-company config is one implicit tenant.
        self.companies = Companies(cfg, outbox=self.outbox, links=self.links, observe_crm=self._observe_crm)
        self.crm_health = TenantsReachability(self.companies)
        self.observer = on_finished
        self.tracker = CallTracker(self.companies.directory, on_event=self.companies.card,
                                   on_finished=self._finished)
        self.listener = EventListener(cfg.freeswitch, self.on_event, on_connect=self._after_connect)
        self.companies.build(self.listener, self.tracker, crm=crm)
        # The live view is whole once, connected, fsbridge has taken stock of FreeSWITCH's channels.
        self._view_of: EslConnection | None = None
        self._stopped = False
        self.spool = self._cdr_spool()
        self.last_event_at: float | None = None
        self._periodic: gevent.Greenlet | None = None
        self.recordings = Recordings(cfg.records.dir, prefer_mp3=cfg.records.prefer_mp3,
                                     encoder=cfg.records.mp3_encoder, bitrate_kbps=cfg.records.mp3_bitrate_kbps)
        # MP3 encoding runs in child processes, two at a time, never on the ESL reading path: the reader only
        # spawns (a Pool would make it wait for a free slot), the greenlet waits for its turn.
        self._encoders = gevent.pool.Group()
        self._located: dict[str, str | None] = {}
        self._encoder_slots = gevent.lock.BoundedSemaphore(2)
        self.health = Health(
            esl_connected=lambda: self.listener.connected,
            last_event_age=self._last_sign_of_life_age,
            heartbeat_timeout=cfg.freeswitch.heartbeat_timeout, workers_alive=self._dead_workers,
            outbox_oldest_age=self._outbox_oldest_age, outbox_max_age=self._outbox_max_age(),
            crm=self.crm_health, extra=lambda: tenant_checks(self.companies))
        self._watch_levels()
        # Two listeners, each with its own routes (a route exists on one only): the public one, behind the
        # TLS proxy, for retailCRM and the managers' browsers; the internal one (loopback by default) for
        # FreeSWITCH's routing lookup, Prometheus and health checks.
        self.router, self.internal_router = self._routes(), self._internal_routes()
        self.http = self._server(cfg.http.listen, self.router)
        self.internal_http = self._server(cfg.http.internal_listen, self.internal_router)

    def _server(self, listen: str, router: Router) -> HttpServer:
        h = self.cfg.http
        server = HttpServer(listen, router, zero_copy=h.zero_copy, timeout=h.timeout, max_connections=h.max_connections)
        server.observer = self.metrics.on_http
        return server

    def _last_sign_of_life_age(self) -> float | None:
        """Seconds since FreeSWITCH last showed it is there: an event, or the connect and subscription."""
        times = [t for t in (self.last_event_at, self.listener.subscribed_at) if t is not None]
        return time.monotonic() - max(times) if times else None

    def _outbox_max_age(self) -> float:
        """A call waiting longer than this means the history is stuck, not just between uploads."""
        h = self.cfg.history
        return 600.0 + (2 * h.period * 60 if h.strategy == "periodic" else 0.0)

    # The single company's objects, under the names they always had (tests, tools); with tenant files, the
    # first tenant's.
    def _only(self) -> Company:
        return next(iter(self.companies))

    crm = property(lambda self: self._only().crm)
    cards = property(lambda self: self._only().cards)
    history = property(lambda self: self._only().history)
    statuses = property(lambda self: self._only().statuses)
    manager_lookup = property(lambda self: self._only().lookup)
    originator = property(lambda self: self._only().originator)
    click_to_call_off = property(lambda self: self._only().click_to_call_off)

    def _outbox_oldest_age(self) -> float | None:
        oldest = self.outbox.oldest_pending()
        return None if oldest is None else max(0.0, time.time() - oldest)

    def _routes(self) -> Router:
        """The public listener's routes: what retailCRM and the managers' browsers reach."""
        cfg = self.cfg
        router = Router()
        register_callbacks(router, self.companies)
        self.account = AccountPage(self.companies, lambda: self.listener.connected)
        router.add({"GET", "POST"}, ACCOUNT_PATH, self.account, max_body=ACCOUNT_MAX_BODY)
        LogoHandler().register(router)
        RecordsHandler(self.links, self.recordings, accel_redirect_prefix=cfg.records.accel_redirect_prefix or None,
                       locate=self._locate_recording).register(router)
        return router

    def _internal_routes(self) -> Router:
        """The internal listener's routes; routing.allow_from still fences the lookup."""
        router = Router()
        TenantRoutingHandler(self.companies, allow_from=self.cfg.routing.allow_from).register(router)
        OpsHandlers(self.metrics, self.health).register(router)
        TenantsOps(self.companies, allow_from=self.cfg.routing.allow_from, reload=self.reload).register(router)
        return router

    def reload(self) -> dict[str, str]:
        """Apply the tenant files as they are now (`fsbridge reload`, SIGHUP); the refusals by tenant."""
        refused = self.companies.reload()
        if self.spool is not None:
            self.spool.calls = self.companies.directory   # CDRs are attributed as live calls are
        self._located.clear()   # where record links resolve depends on the companies' domains
        return refused

    # -- the reading path: no I/O but the outbox's single INSERT (see history/outbox.py) --

    def on_event(self, event: Event) -> None:
        self.last_event_at = time.monotonic()
        self.metrics.on_event(event.get("Event-Name") or "", event.get("Event-Date-Timestamp"))
        self.tracker.handle(event)
        self.companies.watch.on_event(event)

    def _cdr_spool(self) -> CdrSpool | None:
        fs = self.cfg.freeswitch
        if not fs.cdr_dir:
            return None
        return CdrSpool(Path(fs.cdr_dir), self.cfg.storage.dir / CDR_LEDGER_FILE, self.tracker.directory,
                        _RecoveredCalls(self), records_dir=self.cfg.records.dir,
                        live=self.tracker.legs.__contains__, view_ready=self._view_ready,
                        keep_days=fs.cdr_keep_days)

    def _view_ready(self) -> bool:
        conn = self.listener.connection
        return conn is not None and conn is self._view_of and self.listener.connected

    def _finished(self, call: FinishedCall) -> None:
        if call.gap and self.spool is not None:
            # Part of it happened while events were not arriving: FreeSWITCH's CDRs complete it.
            self.spool.defer(call)
            return
        self.companies.finished(call)
        if self.spool is not None:
            self.spool.note_live(call)
        self._after_history(call)

    def _after_history(self, call: FinishedCall) -> None:
        if self.cfg.records.prefer_mp3 and has_talk_recording(call):
            ref = record_id_of(call.recording_path or "")
            subdir = self.companies.recording_subdir(call.recording_path, call.tenant, self.recordings)
            if ref is not None and ref[1] == "wav" and subdir is not None:
                # Rebuilt from the allow-listed id and directory: the header's own path never reaches the encoder.
                self._encoders.spawn(self._to_mp3, self.recordings.wav_path(ref[0], subdir))
        if self.observer is not None:
            self.observer(call)

    def _locate_recording(self, record_id: str) -> str | None:
        """The directory of a record link's file: its call's RECORD_STOP path, checked (registry.py)."""
        known = self._located.get(record_id, False)
        if known is not False:
            return known  # type: ignore[return-value]
        # The call's row, or what the purge kept of it (outbox.purge_sent): record links never expire.
        recording = self.outbox.recording_of(record_id)
        if recording is None:
            return ""   # no call of that id (yet): the flat <records.dir>/<uuid>.<ext>
        if len(self._located) >= 4096:
            self._located.clear()
        subdir = self._located[record_id] = self.companies.recording_subdir(*recording, self.recordings)
        return subdir

    def _to_mp3(self, wav: Path) -> None:
        with self._encoder_slots:
            self.recordings.to_mp3(wav)

    def reconcile(self, conn: EslConnection, ended_by: float | None = None, snapshot: int | None = None,
                  live: set[str] | None = None) -> int:
        snapshot = self.tracker.seen if snapshot is None else snapshot
        live = live_channel_uuids(conn) if live is None else live

        def gone(uuid: str) -> bool:
            return conn.api(f"uuid_exists {uuid}").strip() == "false" if CHANNEL_UUID_RE.fullmatch(uuid) else True

        return self.tracker.reconcile(live, snapshot, ended_by=ended_by, confirm_gone=gone)

    def _after_connect(self, conn: EslConnection) -> None:
        # Calls that vanished while we were away were last known alive when the connection dropped. Legs
        # heard from after the listing was asked for are not candidates (see CallTracker.reconcile).
        snapshot = self.tracker.seen
        live = live_channel_uuids(conn)
        self.reconcile(conn, ended_by=self.listener.disconnected_at, snapshot=snapshot, live=live)
        self.adopt(conn, live=live)
        self._view_of = conn
        if self.spool is not None:
            self.spool.wake()

    def adopt(self, conn: EslConnection, limit: int = 5000, live: set[str] | None = None) -> int:
        """Follow the calls that were already up when we connected (fsbridge restarted mid-call), and bring
        the ones we know up to date (answered or bridged while the socket was down)."""
        live = live_channel_uuids(conn) if live is None else live
        # Unknown channels first: with more than `limit`, taking calls over matters more than refreshing.
        ordered = sorted(live, key=lambda u: u in self.tracker.legs)[:limit]
        dumps = []
        for uuid in ordered:
            if not CHANNEL_UUID_RE.fullmatch(uuid):
                continue   # it goes into an api command: only a uuid may
            body = conn.api(f"uuid_dump {uuid} json")
            try:
                dump = json.loads(body)
            except ValueError:
                continue   # the channel ended meanwhile (-ERR No such channel!)
            if isinstance(dump, dict):
                dumps.append({k: v if isinstance(v, str) else str(v) for k, v in dump.items()})
        return self.tracker.adopt(dumps)

    # -- lifecycle --

    def start(self) -> None:
        self.internal_http.start()
        try:
            self.http.start()
        except BaseException:
            self.internal_http.stop(0)  # the public port is taken: leave nothing bound behind
            raise
        self.companies.start()
        self.listener.start()
        self._periodic = gevent.spawn(self._reconcile_periodically)
        if self.spool is not None:
            self.spool.start()
        else:
            log.warning("freeswitch.cdr_dir is not set: calls that end while fsbridge is stopped or cut off from "
                        "FreeSWITCH cannot be recovered (see docs/deploy.md, \"CDR record\")")
        self.hub_watch.start()  # last: nothing to undo if an earlier start fails (the port is taken)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking events, then flush what can be flushed within `timeout`; the outbox keeps the rest.
        Once: a second call does nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._stop(timeout)
        finally:
            self.hub_watch.stop()

    def _history_to_send(self) -> bool:
        """Whether a company that can deliver (running, not switched off) still has calls of its own waiting:
        a switched-off company's or a removed tenant's calls must not hold up a shutdown."""
        pending = self.outbox.pending_by_tenant()
        return any(pending.get(c.name) and c.history.alive and c.activity.delivering for c in self.companies)

    def _stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if self._periodic is not None:
            self._periodic.kill()
        self.listener.stop()
        if self.spool is not None:
            self.spool.stop()
        # Give the history a last chance to go out now rather than at the next start.
        for company in self.companies:
            company.history.wake()
        # (A company retailCRM has switched off keeps its calls waiting: nothing to wait for there.)
        while time.monotonic() < deadline - 1.0 and self._history_to_send():
            gevent.sleep(0.05)
        self.companies.stop(max(1.0, deadline - time.monotonic()))
        pending = self.outbox.levels()[0]
        self.outbox.close()
        self.http.stop(1.0)
        self.internal_http.stop(1.0)
        if not self._encoders.join(timeout=5.0):
            self._encoders.kill(timeout=5.0)  # to_mp3 kills its encoder and removes the half-written MP3
        self.recordings.close()
        log.info("stopped%s", f"; {pending} call(s) wait in the outbox for the next start" if pending else "")

    def _reconcile_periodically(self) -> None:
        # While connected, an api reply overtakes events still queued for us in FreeSWITCH: a channel
        # that just ended may be gone from the listing before its HANGUP_COMPLETE reaches us. So only
        # legs silent since the previous pass (a whole interval ago) are candidates.
        previous: int | None = None
        while True:
            gevent.sleep(self.cfg.freeswitch.reconcile_interval)
            conn = self.listener.connection
            if conn is None or not self.listener.connected:
                previous = None
                continue
            current = self.tracker.seen
            try:
                if previous is not None:
                    self.reconcile(conn, snapshot=previous)
            except EslError as exc:
                log.warning("periodic reconciliation skipped: %s", exc)
            previous = current

    # -- operations --

    def _observe_crm(self, company: Company, method: str, path: str, status: int | None, seconds: float) -> None:
        self.metrics.on_crm_request(method, path, status, seconds)
        self.tenant_metrics.on_crm_request(company, status)

    def _dead_workers(self) -> list[str]:
        dead = []
        if not self.listener.running:
            dead.append("event listener")
        for company in self.companies:
            dead += company.dead_workers()
        return dead

    def _watch_levels(self) -> None:
        m, cards, tracker = self.metrics, AllCards(self.companies), self.tracker
        self.tenant_metrics = TenantMetrics(m, self.companies)
        m.watch("fsbridge_calls_tracked", "Channels fsbridge follows now",
                lambda: [({}, len(tracker.legs))])
        m.watch("fsbridge_call_events_queued", "Call events waiting for delivery", lambda: [({}, cards.pending)])
        m.watch("fsbridge_call_events_done_total", "Call events by outcome", lambda: [
            ({"outcome": "sent"}, cards.sent), ({"outcome": "stale"}, cards.dropped_stale),
            ({"outcome": "queue_full"}, cards.dropped_full), ({"outcome": "rejected"}, cards.rejected),
            # Still queued when a reload retired their company (a tenant removed or moved to another account).
            ({"outcome": "retired"}, self.companies.cards_dropped_retired)],
            counter=True)
        m.watch("fsbridge_calls_finished_total", "Customer calls finished", lambda: [({}, tracker.calls_finished)],
                counter=True)
        m.watch("fsbridge_esl_reconnects_total", "Event socket connections re-established",
                lambda: [({}, self.listener.reconnects)], counter=True)
        m.watch("fsbridge_esl_events_lost_total", "Channels closed by reconciliation because their events were lost",
                lambda: [({"how": "reconciled"}, tracker.closed_by_reconcile),
                         ({"how": "listener_killed"}, self.listener.lost_listener)], counter=True)
        m.watch("fsbridge_esl_events_malformed_total", "Events skipped because they could not be parsed",
                lambda: [({}, self.listener.malformed_events)], counter=True)
        m.watch("fsbridge_esl_connected", "1 while the event socket is connected",
                lambda: [({}, 1.0 if self.listener.connected else 0.0)])

        def outbox() -> list[tuple[dict[str, str], float]]:
            pending, quarantined = self.outbox.levels()
            return [({"state": "pending"}, float(pending)), ({"state": "quarantined"}, float(quarantined))]
        m.watch("fsbridge_outbox_calls", "Calls in the history outbox by state", outbox)
        m.watch("fsbridge_outbox_oldest_pending_seconds", "Age of the oldest call waiting for upload",
                lambda: [({}, self._outbox_oldest_age() or 0.0)])
        if self.spool is not None:
            st = self.spool.stats
            m.watch("fsbridge_cdr_calls_total", "Calls written to the history from FreeSWITCH's CDR documents",
                    lambda: [({"how": "recovered"}, st.recovered), ({"how": "completed"}, st.completed),
                             ({"how": "guessed"}, st.guessed)], counter=True)
            m.watch("fsbridge_cdr_documents_total", "CDR documents read, accounted for, deleted, unusable",
                    lambda: [({"what": "read"}, st.reads), ({"what": "accounted"}, st.accounted),
                             ({"what": "deleted"}, st.deleted), ({"what": "unreadable"}, st.unreadable)],
                    counter=True)

        def originated() -> list[tuple[dict[str, str], float]]:
            started = sum(c.originator.started for c in self.companies if c.originator is not None)
            failed = sum(c.originator.failed for c in self.companies if c.originator is not None)
            return [({"result": "ringing"}, started - failed), ({"result": "failed"}, failed)]
        m.watch("fsbridge_originate_total", "Click-to-call attempts by result", originated, counter=True)
