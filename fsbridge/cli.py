"""The `fsbridge` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

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
    try:
        conn = EventListener(cfg.freeswitch, lambda ev: None).connect_once()
        version = conn.api("version").strip()
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
    return 0 if ok else 1


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
