"""`fsbridge check`, `register` and `info` end at crm.timeout when the CRM trickles its reply for ever."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import yaml

from fsbridge.config import Config
from fsbridge.registration import RegistrationError, info, register
from tests.conftest import settings
from tests.fakes.raw_http import Peer, RawHttpServer, Request

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _trickle_for_ever(peer: Peer, request: Request) -> None:
    # A byte of an endless head every 50 ms for 20 s: no single read ever waits its timeout out.
    peer.trickle(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: 1\r\n" * 35, every=0.05)


@pytest.fixture
def trickling_crm() -> Iterator[RawHttpServer]:
    with RawHttpServer(_trickle_for_ever) as raw:
        yield raw


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_check_ends_at_crm_timeout(tmp_path: pathlib.Path, trickling_crm: RawHttpServer) -> None:
    path = tmp_path / "fsbridge.yaml"
    path.write_text(yaml.safe_dump(settings(fs_port=_closed_port(), crm_url=trickling_crm.url,
                                            crm={"timeout": 1.0})))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fsbridge", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert "crm: FAILED: retailCRM did not answer" in proc.stdout, proc.stdout + proc.stderr
    assert elapsed < 10  # the trickle alone would last 20 s; Python's start-up is the rest


@pytest.mark.parametrize("command", [register, info], ids=["register", "info"])
def test_register_and_info_end_at_crm_timeout(make_config: Callable[..., Config], trickling_crm: RawHttpServer,
                                              command: Callable[[Config], str]) -> None:
    cfg = make_config(crm_url=trickling_crm.url, crm={"timeout": 1.0})
    start = time.monotonic()
    with pytest.raises(RegistrationError, match="did not answer"):
        command(cfg)
    assert time.monotonic() - start < 2.5
