"""fsbridge installed the way a user installs it, not the way the test suite does.

The suite itself runs on an editable install, which puts the source tree on the path: a module that the
packaging leaves out (a folder without __init__.py, say) would never show. Here the checkout is built into an
sdist and a wheel (the wheel through the sdist, as `python -m build` does, and directly, as `pip install .`
and docker/Dockerfile do), every module of the source tree must be in both, and the direct wheel is installed
into a fresh virtualenv outside the source tree, where the installed `fsbridge` command must answer `--help`,
pass `check --config-only` on the example config and start `run` far enough to answer `/healthz/live`.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(*args: str | os.PathLike[str], cwd: pathlib.Path, timeout: float = 240, env: dict | None = None,
         ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _source_files() -> list[pathlib.Path]:
    """The files a fresh clone has: tracked ones (and new ones not ignored) when this is a git checkout."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]
    skip = {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache", ".ruff_cache"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def _package_files() -> set[str]:
    """What must ship: every module and data file under fsbridge/ in the source tree."""
    return {p.relative_to(ROOT).as_posix() for p in _source_files()
            if p.relative_to(ROOT).parts[0] == "fsbridge" and "__pycache__" not in p.parts}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """A copy of the checkout as a fresh clone would have it, built into an sdist and two wheels."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    for path in _source_files():
        target = src / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    # The sdist, then a wheel built from it: what PyPI users and `python -m build` get.
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", work / "dist", src, cwd=work)
    # A wheel straight from the tree: what `pip install .` and the Dockerfile install.
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
         work / "direct", src, cwd=work)
    return {
        "sdist": next((work / "dist").glob("fsbridge-*.tar.gz")),
        "wheel_from_sdist": next((work / "dist").glob("fsbridge-*.whl")),
        "wheel": next((work / "direct").glob("fsbridge-*.whl")),
        "work": work,
    }


def test_every_module_of_the_source_tree_ships_in_the_sdist_and_the_wheels(built) -> None:
    wanted = _package_files()
    assert "fsbridge/calls/tracker.py" in wanted and "fsbridge/py.typed" in wanted
    for kind in ("wheel", "wheel_from_sdist"):
        with zipfile.ZipFile(built[kind]) as whl:
            shipped = {name for name in whl.namelist() if name.startswith("fsbridge/")}
        assert wanted - shipped == set(), f"missing from the {kind}"
        assert shipped - wanted == set(), f"the {kind} has files the source tree does not"
    with tarfile.open(built["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        in_sdist = {name.removeprefix(top + "/") for name in sdist.getnames()}
    assert wanted - in_sdist == set(), "missing from the sdist"


def test_the_installed_command_runs_outside_the_source_tree(built) -> None:
    work = built["work"]
    venv = work / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=work)
    _run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", built["wheel"],
         cwd=work)
    fsbridge = venv / "bin" / "fsbridge"
    home = work / "home"   # not the checkout: nothing of the source tree can be imported from here
    home.mkdir()
    where = _run(venv / "bin" / "python", "-c", "import fsbridge.calls.tracker, fsbridge.esl.listener; "
                 "print(fsbridge.__file__)", cwd=home)
    assert pathlib.Path(where.stdout.strip()).is_relative_to(venv)

    assert "check" in _run(fsbridge, "--help", cwd=home).stdout
    example = yaml.safe_load((ROOT / "conf" / "fsbridge.example.yaml").read_text())
    (home / "example.yaml").write_text(yaml.safe_dump(example))
    assert "config: ok" in _run(fsbridge, "check", "--config-only", "--config", "example.yaml", cwd=home).stdout

    # `run` on the example config, moved to places this test owns; FreeSWITCH and the CRM are absent: it
    # must start anyway and stay live while it keeps trying.
    (home / "run.yaml").write_text(yaml.safe_dump(_runnable(example, home)))
    _run_until_live([str(fsbridge), "run", "--config", "run.yaml"], cwd=home, config=home / "run.yaml")


def test_the_readmes_install_and_run_command_starts_fsbridge(built) -> None:
    """The README's first command, as written, in a fresh copy of the clone (its config made runnable here
    beforehand: the command's `cp -n` keeps an existing conf/fsbridge.yaml)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install and run"):]
    start = section.index("```sh\n") + len("```sh\n")
    command = section[start:section.index("\n```", start)].strip()
    assert command.count("\n") == 0 and "fsbridge run --config conf/fsbridge.yaml" in command
    clone = built["work"] / "clone"
    shutil.copytree(built["work"] / "src", clone)
    example = yaml.safe_load((clone / "conf" / "fsbridge.example.yaml").read_text())
    (clone / "conf" / "fsbridge.yaml").write_text(yaml.safe_dump(_runnable(example, built["work"] / "readme")))
    _run_until_live(["bash", "-c", command], cwd=clone, config=clone / "conf" / "fsbridge.yaml", timeout=240)


def _runnable(example: dict, where: pathlib.Path) -> dict:
    """The example config with its state, recordings and ports moved to places this test owns."""
    raw = yaml.safe_load(yaml.safe_dump(example))
    raw["storage"]["dir"] = str(where / "state")
    raw["records"]["dir"] = str(where / "recordings")
    raw["freeswitch"]["port"] = _free_port()   # nothing listens there: fsbridge keeps retrying
    raw["http"]["listen"] = f"127.0.0.1:{_free_port()}"
    if "internal_listen" in raw["http"]:
        raw["http"]["internal_listen"] = f"127.0.0.1:{_free_port()}"
    return raw


def _run_until_live(argv: list[str], *, cwd: pathlib.Path, config: pathlib.Path, timeout: float = 30) -> None:
    http = yaml.safe_load(config.read_text())["http"]
    live = http.get("internal_listen", http["listen"])
    log = cwd / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status = None
        deadline = time.monotonic() + timeout
        while status != 200 and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://{live}/healthz/live", timeout=2).status
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        assert status == 200, f"no /healthz/live 200 (exit {proc.poll()}):\n{log.read_text()}"
        assert " running " in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
    assert "stopped" in log.read_text()
