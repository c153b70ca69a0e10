"""`fsbridge outbox`: what is waiting, what the CRM refused and why, and re-queueing it.

Safe while fsbridge runs: SQLite's WAL lets this process read beside the service, and a re-queue is
one short write the service picks up within its poll interval.
"""

from __future__ import annotations

import argparse
import datetime
import sqlite3
import zoneinfo
from collections.abc import Sequence
from typing import Any, Literal

from fsbridge.history import outbox_path
from fsbridge.history.cdr import crm_date
from fsbridge.history.outbox import Outbox, OutboxError

MAX_LISTED = 200


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _zone(cfg: Any) -> datetime.tzinfo:
    try:
        return zoneinfo.ZoneInfo(cfg.crm.timezone)
    except (AttributeError, TypeError, zoneinfo.ZoneInfoNotFoundError, ValueError):
        return datetime.UTC


def _open(cfg: Any) -> Outbox:
    return Outbox(outbox_path(cfg), create=False)


def show(cfg: Any) -> str:
    """Counts, the oldest pending call's age, and every quarantined call with the CRM's reason."""
    path = outbox_path(cfg)
    try:
        outbox = _open(cfg)
    except OutboxError:
        return f"outbox: {path}\nno outbox yet: no call has finished since fsbridge was installed"
    with outbox:
        stats = outbox.stats()
        quarantined = outbox.quarantined(limit=MAX_LISTED)
        by_tenant = outbox.pending_by_tenant()
    zone = _zone(cfg)
    age = stats.oldest_pending_age()
    lines = [
        f"outbox: {path}",
        f"pending:     {stats.pending}" + (f" (oldest written {_age(age)} ago)" if age is not None else ""),
        *(["pending by tenant: " + ", ".join(f"{t or 'default'} {n}" for t, n in sorted(by_tenant.items()))]
          if set(by_tenant) - {""} else []),
        f"sent:        {stats.sent}",
        f"quarantined: {stats.quarantined}",
    ]
    if quarantined:
        lines.append("")
        lines.append("quarantined calls (call date in the CRM's zone; re-queue with --requeue ID or --requeue-all):")
        for q in quarantined:
            when = crm_date(int(q.since * 1e6), zone)
            if q.call is None:
                lines.append(f"  {q.external_id}  (stored call unreadable)  since {when}: {q.reason}")
                continue
            c = q.call
            who = f"code {c.manager_code}" if c.manager_code else "no manager"
            # With tenant files: whose call it is (and so whose CRM refused it).
            company = f"tenant {c.tenant}  " if c.tenant else ""
            lines.append(f"  {q.external_id}  {company}{crm_date(c.start_us, zone)}  {c.direction} {c.phone}  {who}  "
                         f"{c.result}  since {when}: {q.reason}")
        if stats.quarantined > len(quarantined):
            lines.append(f"  ... and {stats.quarantined - len(quarantined)} more")
    return "\n".join(lines)


def requeue(cfg: Any, ids: Sequence[str] | Literal["all"]) -> int:
    """Quarantined calls back to pending (by externalId, or "all"); how many were re-queued."""
    with _open(cfg) as outbox:
        return outbox.requeue(None if ids == "all" else list(ids))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--requeue", nargs="+", metavar="ID", default=[],
                       help="send these quarantined calls (externalId) again")
    group.add_argument("--requeue-all", action="store_true", help="send every quarantined call again")


def cmd_outbox(cfg: Any, args: argparse.Namespace) -> int:
    """`fsbridge outbox [--requeue ID ... | --requeue-all]`; exit 1 if some named id was not quarantined."""
    status = 0
    try:
        if args.requeue_all or args.requeue:
            wanted: Sequence[str] | Literal["all"] = "all" if args.requeue_all else args.requeue
            count = requeue(cfg, wanted)
            print(f"re-queued {count} call(s); the running fsbridge sends them with its next upload")
            if wanted != "all" and count < len(set(wanted)):
                print(f"{len(set(wanted)) - count} of the given id(s) were not quarantined")
                status = 1
            print()
        print(show(cfg))
    except (OutboxError, sqlite3.Error) as exc:
        print(f"fsbridge: outbox {outbox_path(cfg)}: {exc}")
        return 2
    return status
