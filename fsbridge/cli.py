"""The `fsbridge` command."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsbridge import __version__, logs
from fsbridge.config import Config, ConfigError, load
from fsbridge.tenants.cli import add_tenant_arguments, cmd_reload, cmd_tenants, per_tenant
from fsbridge.tenants.cli import secrets as tenant_secrets

log = logging.getLogger("fsbridge")


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    import gc
    import signal

    import gevent
    import gevent.event

    from fsbridge.service import Bridge

    # gevent runs ready greenlets for up to the switch interval before it looks for I/O again. At the
    # default 5 ms, greenlets taking turns (the ESL reader working through a burst, history batches) kept
    # card replies and new events unread for up to 5 ms; 1 ms bounds that wait. (It is also the GIL's
    # interval, which matters only while a worker thread runs: the outbox checkpoint, DNS lookups, the
    # manager-status file.)
    sys.setswitchinterval(0.001)
    try:
        bridge = Bridge(cfg)
        # What exists now (modules, config, the service) lives as long as the process: frozen, it is left
        # out of the collector's full passes, which it made ~7 ms longer each.
        gc.collect()
        gc.freeze()
        bridge.start()
    except (ConfigError, OSError) as exc:
        # A state directory it may not write, a port already taken: one line, not a traceback.
        print(f"fsbridge: cannot start: {exc}", file=sys.stderr)
        return 1
    log.info("fsbridge %s running (FreeSWITCH %s:%s, CRM %s)", __version__, cfg.freeswitch.host,
             cfg.freeswitch.port, cfg.crm.url or f"{len(bridge.companies)} tenant(s)")
    stopping = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stopping.set)
    gevent.signal_handler(signal.SIGINT, stopping.set)
    # Tenant files added, changed or removed: applied without a restart (as `fsbridge reload` does).
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(bridge.reload))
    stopping.wait()
    log.info("stopping")
    bridge.stop()
    return 0


def cmd_check(cfg: Config, args: argparse.Namespace) -> int:
    from fsbridge.crm.client import RetailCRM
    from fsbridge.crm.errors import CRMError
    from fsbridge.esl.connection import EslError
    from fsbridge.esl.listener import EventListener

    ok = True
    print(f"config: ok ({len(cfg.managers)} manager(s), {len(cfg.external_phones)} external number(s))")
    if args.config_only:
        return 0
    cdr_report: list[str] = []
    try:
        conn = EventListener(cfg.freeswitch, lambda ev: None).connect_once()
        version = conn.api("version").strip()
        if cfg.freeswitch.cdr_dir:
            cdr_report = _freeswitch_cdr_problems(conn, Path(cfg.freeswitch.cdr_dir))
        conn.stop()
        print(f"freeswitch: ok ({cfg.freeswitch.host}:{cfg.freeswitch.port}, {version or 'version unknown'})")
    except EslError as exc:
        ok = False
        print(f"freeswitch: FAILED: {exc}")
    try:
        # One deadline for the whole check, retries included: a CRM that trickles its reply must not
        # hold the command (each read's timeout alone never ends it).
        with RetailCRM(cfg.crm.url, cfg.crm.api_key, timeout=cfg.crm.timeout) as crm:
            crm.credentials(deadline=time.monotonic() + cfg.crm.timeout)
        print(f"crm: ok ({cfg.crm.url} accepted the API key)")
    except CRMError as exc:
        ok = False
        print(f"crm: FAILED: {exc}")
    cdr_ok, line = _check_cdr(cfg, cdr_report)
    print(line)
    return 0 if ok and cdr_ok else 1


def _freeswitch_cdr_problems(conn: Any, cdr_dir: Path) -> list[str]:
    """What FreeSWITCH says about its CDR record: mod_json_cdr loaded, and its settings as fsbridge needs them."""
    if conn.api("module_exists mod_json_cdr").strip() != "true":
        return ["mod_json_cdr is not loaded (add it to modules.conf.xml, copy "
                "conf/freeswitch/autoload_configs/json_cdr.conf.xml, `load mod_json_cdr`)"]
    problems = []
    xml = conn.api("xml_locate configuration configuration name json_cdr.conf")
    params = {m[1].lower(): m[2] for m in re.finditer(r'<param\s+name="([^"]*)"\s+value="([^"]*)"', xml)}
    if not params:
        return problems    # not readable this way: the documents' presence below says the rest
    if params.get("url") and params.get("log-http-and-disk", "false").lower() not in ("true", "yes", "on", "1"):
        problems.append("json_cdr.conf posts to a URL: documents reach its log-dir only when the post fails "
                        "(remove the url, or set log-http-and-disk)")
    if params.get("log-b-leg", "true").lower() in ("false", "no", "off", "0"):
        problems.append("json_cdr.conf has log-b-leg false: managers' legs leave no document")
    if params.get("rotate", "false").lower() in ("true", "yes", "on", "1"):
        problems.append("json_cdr.conf rotates log-dir into dated subdirectories, which fsbridge does not read")
    log_dir = params.get("log-dir", "")
    if log_dir.startswith("/") and Path(log_dir) != cdr_dir:
        problems.append(f"json_cdr.conf writes to {log_dir}, freeswitch.cdr_dir is {cdr_dir}")
    return problems


def _check_cdr(cfg: Config, freeswitch_problems: list[str]) -> tuple[bool, str]:
    if not cfg.freeswitch.cdr_dir:
        return True, ("cdr: off (freeswitch.cdr_dir not set): calls that end while fsbridge is stopped or cut off "
                      "from FreeSWITCH cannot be recovered")
    path = Path(cfg.freeswitch.cdr_dir)
    if freeswitch_problems:
        return False, "cdr: FAILED: " + "; ".join(freeswitch_problems)
    if not path.is_dir():
        return False, f"cdr: FAILED: {path} does not exist (mod_json_cdr's log-dir, freeswitch.cdr_dir)"
    if not os.access(path, os.R_OK | os.X_OK):
        return False, f"cdr: FAILED: fsbridge cannot read {path} (add its user to FreeSWITCH's group)"
    docs = [e for e in os.scandir(path) if e.name.endswith(".cdr.json")]
    if not docs:
        return False, f"cdr: FAILED: no CDR document in {path} yet (place a test call, then check again)"
    newest = max(e.stat().st_mtime for e in docs)
    cleans = ("fsbridge deletes accounted documents after "
              f"{cfg.freeswitch.cdr_keep_days} day(s)" if cfg.freeswitch.cdr_keep_days else "clean it yourself")
    if cfg.freeswitch.cdr_keep_days and not os.access(path, os.W_OK):
        cleans = "fsbridge cannot delete there: clean it yourself or give it write access"
    age = time.time() - newest
    return True, f"cdr: ok ({path}: {len(docs)} document(s), the newest {age / 60:.0f} min old; {cleans})"


def _registration(action: str) -> Callable[[Config, argparse.Namespace], int]:
    def command(cfg: Config, args: argparse.Namespace) -> int:
        from fsbridge import registration

        try:
            print(getattr(registration, action)(cfg))
        except registration.RegistrationError as exc:
            print(exc)
            return 1
        return 0
    return command


cmd_register = per_tenant(_registration("register"))
cmd_info = per_tenant(_registration("info"))
cmd_check = per_tenant(cmd_check)


def cmd_outbox(cfg: Config, args: argparse.Namespace) -> int:
    from fsbridge.history.outbox_cli import cmd_outbox as run

    return run(cfg, args)


COMMANDS: dict[str, tuple[str, Callable[[Config, argparse.Namespace], int]]] = {
    "run": ("connect to FreeSWITCH and retailCRM and serve until stopped", cmd_run),
    "register": ("create or update the integration module in retailCRM from the config", cmd_register),
    "info": ("show the integration module as retailCRM has it, and where it differs from the config", cmd_info),
    "outbox": ("show the call-history outbox and re-queue calls the CRM refused", cmd_outbox),
    "check": ("validate the config, log in to FreeSWITCH's event socket and check the CRM key", cmd_check),
    "tenants": ("list the companies (tenants_dir) with their state: CRM, cards and history pending, last call",
                cmd_tenants),
    "reload": ("make the running fsbridge apply added, changed and removed tenant files (as SIGHUP)", cmd_reload),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsbridge", description="FreeSWITCH <-> retailCRM telephony bridge")
    parser.add_argument("--version", action="version", version=f"fsbridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", default="/etc/fsbridge/fsbridge.yaml", help="YAML config file")
        p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="overrides log.level of the config")
        if name == "check":
            p.add_argument("--config-only", action="store_true", help="only validate the file (no network)")
        if name in ("register", "info", "check"):
            add_tenant_arguments(p)
        if name == "outbox":
            from fsbridge.history.outbox_cli import add_arguments

            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Everything fsbridge does is cooperative (ESL, requests, the HTTP server); patch before
    # anything imports ssl or socket.
    from gevent import monkey

    monkey.patch_all()
    args = build_parser().parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"fsbridge: config error: {exc}", file=sys.stderr)
        return 2
    logs.setup(args.log_level or cfg.log.level, cfg.log.format, cfg.secrets + tenant_secrets(cfg))
    return COMMANDS[args.command][1](cfg, args)


if __name__ == "__main__":
    sys.exit(main())
