"""`fsbridge check` tells an admin what is wrong before they go live."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import yaml

from tests.conftest import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def check(tmp_path: pathlib.Path, raw: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "fsbridge.yaml"
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "fsbridge", "check", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_check_passes_against_a_working_pbx_and_crm(tmp_path, simulator, fake_crm) -> None:
    proc = check(tmp_path, settings(fs_port=simulator.port, crm_url=fake_crm.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("config: ok (2 manager(s), 2 external number(s))")
    assert lines[1].startswith(f"freeswitch: ok (127.0.0.1:{simulator.port}")
    assert lines[2].startswith("crm: ok")


def test_check_names_each_failure(tmp_path, simulator, fake_crm) -> None:
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, freeswitch={"password": "wrong"},
                   crm={"api_key": "not-the-right-key"})
    proc = check(tmp_path, raw)
    assert proc.returncode == 1
    assert "freeswitch: FAILED: FreeSWITCH rejected the event socket password" in proc.stdout
    assert 'crm: FAILED: ' in proc.stdout and 'Wrong "apiKey" value' in proc.stdout
    assert "not-the-right-key" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_with_a_state_directory_it_cannot_create_says_so_in_one_line(tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    path = tmp_path / "fsbridge.yaml"
    path.write_text(yaml.safe_dump(settings(state_dir=str(blocker / "state"))))
    proc = subprocess.run([sys.executable, "-m", "fsbridge", "run", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"fsbridge: cannot start: storage.dir: cannot create {blocker / 'state'}: Not a directory"]


def test_check_tells_whether_freeswitchs_cdr_record_is_set_up_as_fsbridge_needs(tmp_path, simulator, fake_crm) -> None:
    from tests.fakes.freeswitch import write_cdr_pairs

    cdr_dir = tmp_path / "log" / "json_cdr"
    cdr_dir.mkdir(parents=True)
    shipped = (ROOT / "conf" / "freeswitch" / "autoload_configs" / "json_cdr.conf.xml").read_text()
    # What `xml_locate` answers: the section as FreeSWITCH loaded it, its $${log_dir} expanded.
    simulator.api_responses["xml_locate"] = shipped[shipped.index("<configuration"):].replace(
        "$${log_dir}", str(tmp_path / "log"))
    raw = settings(fs_port=simulator.port, crm_url=fake_crm.url, freeswitch={"cdr_dir": str(cdr_dir)})

    proc = check(tmp_path, raw)
    assert proc.returncode == 1 and "cdr: FAILED: no CDR document in" in proc.stdout, proc.stdout
    write_cdr_pairs(cdr_dir, [1_700_000_000_000_000])
    proc = check(tmp_path, raw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[3].startswith(f"cdr: ok ({cdr_dir}: 2 document(s)")

    simulator.api_responses["xml_locate"] = simulator.api_responses["xml_locate"].replace(
        '"log-b-leg" value="true"', '"log-b-leg" value="false"')
    proc = check(tmp_path, raw)
    assert proc.returncode == 1 and "log-b-leg false" in proc.stdout
    simulator.modules.discard("mod_json_cdr")
    proc = check(tmp_path, raw)
    assert proc.returncode == 1 and "cdr: FAILED: mod_json_cdr is not loaded" in proc.stdout

    del raw["freeswitch"]["cdr_dir"]
    proc = check(tmp_path, raw)
    assert proc.returncode == 0 and "cdr: off" in proc.stdout
