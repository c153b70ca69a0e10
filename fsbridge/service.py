"""Wires the pieces together: ESL -> calls -> CRM, and the HTTP API."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import gevent

from fsbridge.calls.legs import Directory
from fsbridge.calls.model import FinishedCall
from fsbridge.calls.tracker import CallTracker
from fsbridge.config import Config
from fsbridge.crm.card_sender import CardSender
from fsbridge.crm.client import RetailCRM
from fsbridge.esl.connection import EslConnection, EslError
from fsbridge.esl.listener import EventListener
from fsbridge.esl.protocol import Event
from fsbridge.http.app import Router
from fsbridge.http.logo import LogoHandler
from fsbridge.http.lookup import RoutingHandler
from fsbridge.http.make_call import MakeCallHandler
from fsbridge.http.records import RecordsHandler
from fsbridge.http.server import HttpServer
from fsbridge.http.status import StatusHandler
from fsbridge.manager_status import ManagerStatus
from fsbridge.originate import DialPlan, Originator
from fsbridge.record_links import RecordLinks
from fsbridge.recordings import Recordings
from fsbridge.routing import ManagerLookup

log = logging.getLogger("fsbridge")


def live_channel_uuids(conn: EslConnection) -> set[str]:
    """Uuids of the channels FreeSWITCH has now (`show channels as json`)."""
    body = conn.api("show channels as json")
    try:
        data = json.loads(body)
    except ValueError:
        raise EslError(f"`show channels as json` did not answer JSON: {body[:80]!r}") from None
    rows = data.get("rows") or [] if isinstance(data, dict) else []
    return {row["uuid"] for row in rows if isinstance(row, dict) and isinstance(row.get("uuid"), str)}


class Bridge:
    """The running service. Tests build it in-process; `fsbridge run` builds it from a config file."""

    def __init__(self, cfg: Config, *, crm: RetailCRM | None = None,
                 on_finished: Callable[[FinishedCall], None] | None = None) -> None:
        self.cfg = cfg
        self.crm = crm or RetailCRM(cfg.crm.url, cfg.crm.api_key, timeout=cfg.crm.timeout,
                                    telephony_rate=cfg.crm.telephony_rate)
        self.cards = CardSender(self.crm, max_age=cfg.crm.card_max_age, workers=cfg.crm.card_workers,
                                queue_size=cfg.crm.card_queue_size)
        self.finished_sink = on_finished or self._log_finished
        self.tracker = CallTracker(Directory.from_config(cfg), on_event=self.cards.submit,
                                   on_finished=self.finished_sink)
        self.listener = EventListener(cfg.freeswitch, self.on_event, on_connect=self.reconcile)
        self._periodic: gevent.Greenlet | None = None
        cfg.storage.dir.mkdir(parents=True, exist_ok=True)
        self.statuses = ManagerStatus(cfg.storage.dir / "manager_status.json")
        self.links = RecordLinks(cfg.integration.public_url, cfg.records.link_secret,
                                 previous_secrets=tuple(cfg.records.previous_link_secrets))
        self.recordings = Recordings(cfg.records.dir, prefer_mp3=cfg.records.prefer_mp3,
                                     encoder=cfg.records.mp3_encoder, bitrate_kbps=cfg.records.mp3_bitrate_kbps)
        r = cfg.routing
        self.manager_lookup = ManagerLookup(self.crm, cfg.manager_codes, self.statuses, timeout=r.timeout,
                                            cache_ttl=r.cache_ttl, negative_ttl=r.negative_ttl,
                                            cache_size=r.cache_size, ignore_status=r.ignore_status)
        self.originator = self._originator()
        self.router = self._routes()
        self.http = HttpServer(cfg.http.listen, self.router, zero_copy=cfg.http.zero_copy,
                               timeout=cfg.http.timeout, max_connections=cfg.http.max_connections)

    def _originator(self) -> Originator | None:
        o = self.cfg.originate
        try:
            plan = DialPlan(manager_dial=o.manager_dial, customer_dial=o.customer_dial, gateway=o.gateway,
                            ring_timeout=o.ring_timeout, ringing_wait=o.ringing_wait,
                            dedupe_window=o.dedupe_window, record_dir=str(self.cfg.records.dir))
        except ValueError as exc:
            log.warning("click-to-call is off: originate.%s", exc)
            return None
        return Originator(self.listener, self.tracker, plan)

    def _routes(self) -> Router:
        cfg = self.cfg
        router = Router()
        StatusHandler(cfg.integration.client_id, cfg.manager_codes, self.statuses).register(router)
        RoutingHandler(self.manager_lookup, allow_from=cfg.routing.allow_from).register(router)
        LogoHandler().register(router)
        RecordsHandler(self.links, self.recordings,
                       accel_redirect_prefix=cfg.records.accel_redirect_prefix or None).register(router)
        if self.originator is not None:
            MakeCallHandler(cfg.integration.client_id, cfg.managers, cfg.external_phones,
                            self.originator).register(router)
        return router

    def on_event(self, event: Event) -> None:
        self.tracker.handle(event)
        if self.originator is not None:
            self.originator.on_event(event)

    def reconcile(self, conn: EslConnection) -> int:
        snapshot = self.tracker.seen
        live = live_channel_uuids(conn)
        return self.tracker.reconcile(live, snapshot)

    def start(self) -> None:
        self.http.start()
        self.cards.start()
        self.listener.start()
        self._periodic = gevent.spawn(self._reconcile_periodically)

    def stop(self, timeout: float = 5.0) -> None:
        if self._periodic is not None:
            self._periodic.kill()
        self.listener.stop()
        self.http.stop()
        self.cards.stop(timeout)

    def _reconcile_periodically(self) -> None:
        while True:
            gevent.sleep(self.cfg.freeswitch.reconcile_interval)
            conn = self.listener.connection
            if conn is None or not self.listener.connected:
                continue
            try:
                self.reconcile(conn)
            except EslError as exc:
                log.warning("periodic reconciliation skipped: %s", exc)

    @staticmethod
    def _log_finished(call: FinishedCall) -> None:
        log.info("call %s %s %s finished: %s", call.call_id, call.direction, call.phone, call.result)
