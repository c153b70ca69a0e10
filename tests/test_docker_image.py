"""The Docker image a user builds from docker/Dockerfile: it builds, its `fsbridge check` reads a mounted
config, and a container running `fsbridge run` answers /healthz/live and passes the image's HEALTHCHECK.

Needs a Docker engine (`docker info` succeeds) and the Dockerfile's base image already present or
pullable; where `docker info` fails the whole module is skipped with one line (CI has no engine).
The image is tagged fsbridge:test; the builds after the first one reuse Docker's layer cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.waiting import until

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "conf" / "fsbridge.example.yaml"
IMAGE = "fsbridge:test"
BASE_IMAGE = "python:3.11-slim-bookworm"  # docker/Dockerfile's FROM


def _docker_ok() -> str:
    """Why the module cannot run here, or "" when it can."""
    if not shutil.which("docker"):
        return "no docker command: the Docker image tests need a Docker engine"
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode != 0:
            return "no Docker engine (`docker info` failed): the Docker image tests need one"
    except (OSError, subprocess.TimeoutExpired):
        return "no Docker engine (`docker info` did not answer): the Docker image tests need one"
    return ""


_WHY_NOT = _docker_ok()
if _WHY_NOT:
    pytest.skip(_WHY_NOT, allow_module_level=True)

pytestmark = pytest.mark.slow


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    if docker("image", "inspect", BASE_IMAGE).returncode != 0:
        # Without it the build would pull: fine for a user with Docker Hub, not for a machine without.
        proc = docker("pull", BASE_IMAGE, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"base image {BASE_IMAGE} neither present nor pullable: {proc.stderr.strip()[-200:]}")
    # --network host: the RUN steps reach PyPI through the host's network, as compose's builds do.
    proc = docker("build", "--network", "host", "-f", "docker/Dockerfile", "-t", IMAGE, str(ROOT), timeout=1200)
    assert proc.returncode == 0, f"docker build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return IMAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_check_reads_the_mounted_config(image: str, tmp_path: Path) -> None:
    ok = docker("run", "--rm", "--network", "host", "-v", f"{EXAMPLE}:/etc/fsbridge/fsbridge.yaml:ro",
                image, "check", "--config", "/etc/fsbridge/fsbridge.yaml", "--config-only")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("config: ok (2 manager(s), 1 external number(s))"), ok.stdout

    # The same command on a broken copy: the container reads the file it is given, and says what is wrong.
    raw = yaml.safe_load(EXAMPLE.read_text("utf-8"))
    raw["http"]["listen"] = "nowhere"
    bad = tmp_path / "fsbridge.yaml"
    bad.write_text(yaml.safe_dump(raw))
    bad.chmod(0o644)
    proc = docker("run", "--rm", "--network", "host", "-v", f"{bad}:/etc/fsbridge/fsbridge.yaml:ro",
                  image, "check", "--config", "/etc/fsbridge/fsbridge.yaml", "--config-only")
    assert proc.returncode != 0
    assert "http.listen" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def _health_listener(raw: dict) -> int:
    """The port /healthz is served on: http.internal_listen where fsbridge has one, else http.listen."""
    from fsbridge import config

    port = free_port()
    names = {f.name for f in dataclasses.fields(config.HttpSettings)}
    key = "internal_listen" if "internal_listen" in names else "listen"
    raw["http"][key] = f"127.0.0.1:{port}"
    if key == "internal_listen":
        raw["http"]["listen"] = f"127.0.0.1:{free_port()}"
    return port


@pytest.fixture
def running(image: str, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A container running `fsbridge run` on the example config; FreeSWITCH and the CRM are unreachable."""
    raw = yaml.safe_load(EXAMPLE.read_text("utf-8"))
    port = _health_listener(raw)
    raw["freeswitch"]["port"] = free_port()  # nothing listens there
    raw["crm"]["url"] = f"http://127.0.0.1:{free_port()}"
    raw["records"]["dir"] = "/tmp"
    cfg = tmp_path / "fsbridge.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    cfg.chmod(0o644)
    name = f"fsbridge-test-{uuid.uuid4().hex[:8]}"
    # The image's own HEALTHCHECK command, pointed at liveness (readiness needs FreeSWITCH) and run every second.
    proc = docker("run", "-d", "--name", name, "--network", "host",
                  "-v", f"{cfg}:/etc/fsbridge/fsbridge.yaml:ro",
                  "-e", f"FSBRIDGE_HEALTH_URL=http://127.0.0.1:{port}/healthz/live",
                  "--health-interval", "1s", "--health-start-period", "0s", "--health-retries", "3", image)
    assert proc.returncode == 0, proc.stderr
    try:
        yield name, port
    finally:
        logs = docker("logs", name)
        print(f"===== {name} =====\n{logs.stdout}{logs.stderr}")
        docker("rm", "-f", "-v", name)


def _get(url: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_run_answers_liveness_and_passes_the_healthcheck(running: tuple[str, int]) -> None:
    name, port = running

    def live() -> tuple[int, dict] | None:
        try:
            return _get(f"http://127.0.0.1:{port}/healthz/live")
        except OSError:
            state = docker("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"the container stopped ({state}):\n{docker('logs', name).stderr}"
            return None

    status, body = until(live, 60, "/healthz/live to answer", every=0.2)
    assert (status, body["status"]) == (200, "ok"), body

    # Readiness says what is missing: FreeSWITCH is not there.
    status, body = _get(f"http://127.0.0.1:{port}/healthz")
    assert status == 503 and body["checks"]["freeswitch"]["ok"] is False, body

    until(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip() == "healthy",
          30, "Docker to report the container healthy (the image's HEALTHCHECK command)", every=0.5)
