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

    def on_event(self, event: Event) -> None:
        self.tracker.handle(event)

    def reconcile(self, conn: EslConnection) -> int:
        snapshot = self.tracker.seen
        live = live_channel_uuids(conn)
        return self.tracker.reconcile(live, snapshot)

    def start(self) -> None:
        self.cards.start()
        self.listener.start()
        self._periodic = gevent.spawn(self._reconcile_periodically)

    def stop(self, timeout: float = 5.0) -> None:
        if self._periodic is not None:
            self._periodic.kill()
        self.listener.stop()
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
