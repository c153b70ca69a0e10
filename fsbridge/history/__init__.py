"""Call history: every finished customer call in retailCRM's call history, once.

    tracker --FinishedCall--> Uploader.on_finished --> Outbox (SQLite WAL) --> Uploader loop --> CRM
                                                                        \\--> `fsbridge outbox`
"""

from __future__ import annotations

import zoneinfo
from pathlib import Path
from typing import Any

from fsbridge.config import Config
from fsbridge.crm.client import RetailCRM
from fsbridge.history.cdr import CdrBuilder, crm_date
from fsbridge.history.outbox import Outbox, OutboxError, Stats
from fsbridge.history.scheduler import FairScheduler
from fsbridge.history.uploader import IMMEDIATE, PERIODIC, STRATEGIES, Uploader, UploaderStats
from fsbridge.record_links import RecordLinks

__all__ = [
    "IMMEDIATE",
    "PERIODIC",
    "STRATEGIES",
    "CdrBuilder",
    "FairScheduler",
    "Outbox",
    "OutboxError",
    "Stats",
    "Uploader",
    "UploaderStats",
    "builder_from_config",
    "crm_date",
    "from_config",
    "outbox_path",
]

OUTBOX_FILE = "calls-outbox.sqlite3"


def outbox_path(cfg: Config) -> Path:
    return cfg.history.outbox_path or Path(cfg.storage.dir) / OUTBOX_FILE


def builder_from_config(cfg: Config, links: RecordLinks | None = None) -> CdrBuilder:
    """`links`: the service's RecordLinks (the record proxy verifies with the same secrets)."""
    if links is None:
        links = RecordLinks(cfg.integration.public_url, cfg.records.link_secret,
                            previous_secrets=tuple(cfg.records.previous_link_secrets))
    return CdrBuilder(
        zoneinfo.ZoneInfo(cfg.crm.timezone), dict(cfg.managers), links,
        # Recordings converted after the call: the link names the MP3 (the proxy serves the WAV until
        # the MP3 exists), since the CRM keeps the first link for ever.
        record_ext="mp3" if getattr(cfg.records, "prefer_mp3", False) else None,
        unassigned_code=cfg.history.unassigned_code or None,
    )


def from_config(cfg: Config, crm: RetailCRM, links: RecordLinks | None = None) -> Uploader:
    """The service's uploader and its outbox (opened, with checkpoints off the hub), not started."""
    return uploader(cfg, crm, open_outbox(cfg), links)


def open_outbox(cfg: Config) -> Outbox:
    return Outbox(outbox_path(cfg), fsync=cfg.history.fsync, checkpoint_interval=1.0)


def uploader(cfg: Config, crm: RetailCRM, outbox: Any, links: RecordLinks | None = None) -> Uploader:
    """An uploader of `cfg`'s company over `outbox` (a tenant's view of the shared one), not started."""
    h = cfg.history
    keep_days = h.keep_sent_days
    return Uploader(
        outbox, crm, builder_from_config(cfg, links),
        strategy=h.strategy,
        period=h.period * 60.0,
        concurrency=h.concurrency,
        retry_max=h.retry_max_delay,
        keep_sent=keep_days * 86400.0 if keep_days else None,
    )
