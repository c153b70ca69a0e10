"""`fsbridge tenants`, `fsbridge reload`, and `--tenant NAME` / `--all` for register, info and check."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from fsbridge.config import Config
from fsbridge.tenants.settings import load_all

Command = Callable[[Config, argparse.Namespace], int]


def add_tenant_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tenant", metavar="NAME", help="the company of this tenant file (with tenants_dir)")
    group.add_argument("--all", action="store_true", help="every tenant, one after the other")


def per_tenant(command: Command) -> Command:
    """`command` run with the settings of the tenant(s) named on the command line."""
    def run(cfg: Config, args: argparse.Namespace) -> int:
        if not (args.tenant or args.all):
            if cfg.tenants_dir is not None:
                print("fsbridge: the config has tenants_dir: name the company with --tenant NAME, or --all")
                return 2
            return command(cfg, args)
        loaded = load_all(cfg)
        names = list(loaded.tenants) if args.all else [args.tenant]
        status = 0
        for name in names:
            tenant = loaded.tenants.get(name)
            if tenant is None:
                print(f"tenant {name}: {loaded.errors.get(name) or 'no such tenant file'}")
                status = 1
                continue
            if args.all:
                print(f"== tenant {tenant.label}")
            status = max(status, command(tenant.cfg, args))
        if args.all:
            for problem in loaded.errors.values():
                print(f"refused: {problem}")
                status = max(status, 1)
        return status
    return run


def secrets(cfg: Config) -> list[str]:
    """Every tenant's secrets, for the log filter (the files are read again by the command itself)."""
    if cfg.tenants_dir is None:
        return []
    try:
        tenants = load_all(cfg).tenants.values()
    except Exception:
        return []
    return [s for t in tenants for s in (t.cfg.crm.api_key, t.cfg.integration.client_id) if s]


def _internal(cfg: Config, path: str, method: str = "GET") -> Any:
    """The running service's answer on its internal listener; None when it does not answer."""
    import requests

    host, _, port = cfg.http.internal_listen.rpartition(":")
    host = "127.0.0.1" if host in ("", "0.0.0.0", "localhost") else "[::1]" if host in ("::", "[::]") else host
    try:
        reply = requests.request(method, f"http://{host}:{port}{path}", timeout=10)
    except requests.RequestException:
        return None
    if reply.status_code != 200:
        return None
    try:
        return reply.json()
    except ValueError:
        return None


def cmd_reload(cfg: Config, args: argparse.Namespace) -> int:
    answer = _internal(cfg, "/reload", "POST")
    if answer is None:
        print(f"fsbridge: no running fsbridge answered on {cfg.http.internal_listen} (send it SIGHUP instead)")
        return 1
    print(f"reloaded: {len(answer['tenants'])} tenant(s) running")
    for name, problem in sorted(answer["refused"].items()):
        print(f"refused {name}: {problem}")
    return 1 if answer["refused"] else 0


def cmd_tenants(cfg: Config, args: argparse.Namespace) -> int:
    answer = _internal(cfg, "/tenants")
    if answer is None:
        print(f"(no running fsbridge answered on {cfg.http.internal_listen}: what the files say)")
        answer = _offline(cfg)
    rows = answer["tenants"]
    print(f"{'TENANT':<20} {'CRM':<28} {'CARDS':>6} {'HISTORY':>8}  {'LAST CALL':<19}  DOMAINS")
    for row in rows:
        last = row.get("last_call")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last)) if last else "-"
        crm = row.get("crm", "-")
        if row.get("activity", "active") != "active":  # switched off in retailCRM (activity.py)
            crm += f"; {row['activity']}"
        print(f"{row['tenant']:<20} {crm:<28} {row.get('cards_pending', '-')!s:>6} "
              f"{row.get('history_pending', 0)!s:>8}  {when:<19}  {', '.join(row.get('domains', []))}")
    for name, problem in sorted(answer.get("refused", {}).items()):
        print(f"refused {name}: {problem}")
    if getattr(args, "json", False):
        print(json.dumps(answer, sort_keys=True))
    return 1 if answer.get("refused") else 0


def _offline(cfg: Config) -> dict[str, Any]:
    from fsbridge.history import outbox_path
    from fsbridge.history.outbox import Outbox, OutboxError

    loaded = load_all(cfg)
    try:
        with Outbox(outbox_path(cfg), create=False) as outbox:
            pending = outbox.pending_by_tenant()
    except OutboxError:
        pending = {}
    rows: list[dict[str, Any]] = [
        {"tenant": t.label, "crm": "not running", "domains": list(t.domains), "history_pending": pending.get(n, 0)}
        for n, t in loaded.tenants.items()]
    rows += [{"tenant": n or "default", "crm": "removed", "domains": [], "history_pending": c}
             for n, c in sorted(pending.items()) if n not in loaded.tenants]
    return {"tenants": rows, "refused": loaded.errors}
