# fsbridge is a gevent service: the tests run it in-process with the same monkey
# patching the `fsbridge` command applies, so requests, sockets and the fakes all
# cooperate on one hub.
from gevent import monkey

monkey.patch_all()

import pathlib  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from fsbridge import config  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
API_KEY = "test-api-key-0123456789"
CLIENT_ID = "test-client-id-0123456789abcdef"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


RECORD_SECRET = "test-record-secret-0123456789"


def settings(fs_port: int = 8021, crm_url: str = "http://127.0.0.1:9", state_dir: str | None = None,
             **sections: dict[str, Any]) -> dict:
    """A valid raw config for the captured lab PBX (fixtures/README.md), with overrides per section."""
    raw: dict[str, Any] = {
        "freeswitch": {"host": "127.0.0.1", "port": fs_port, "password": "ClueCon", "connect_timeout": 2.0,
                       "command_timeout": 3.0},
        "crm": {"url": crm_url, "api_key": API_KEY, "timezone": "Europe/Moscow", "card_max_age": 5.0},
        "integration": {"client_id": CLIENT_ID, "public_url": "https://pbx.example.com"},
        "http": {"listen": "127.0.0.1:0", "internal_listen": "127.0.0.1:0"},
        "storage": {"dir": state_dir or _tmp_state_dir()},
        "records": {"dir": str(FIXTURES / "recordings"), "link_secret": RECORD_SECRET},
        "managers": {"100": 1, "200": 2},
        "external_phones": {"74999999999": "shop1", "74999999998": "shop1"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
    return raw


_STATE_DIRS: list[str] = []


def _tmp_state_dir() -> str:
    import tempfile

    made = tempfile.mkdtemp(prefix="fsbridge-state-")
    _STATE_DIRS.append(made)
    return made


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The state directories settings() made (a few thousand per run) go with the run."""
    import shutil

    for made in _STATE_DIRS:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def make_config() -> Callable[..., config.Config]:
    def make(**kwargs: Any) -> config.Config:
        return config.from_mapping(settings(**kwargs), env={})
    return make


@pytest.fixture
def fake_crm() -> Iterator[Any]:
    from tests.fakes.retailcrm import FakeRetailCRM

    crm = FakeRetailCRM(api_key=API_KEY, known_codes={"100", "200"}, known_user_ids={1, 2},
                        known_sites={"shop1"})
    crm.start()
    yield crm
    crm.stop()


@pytest.fixture
def simulator() -> Iterator[Any]:
    from tests.fakes.freeswitch import FreeSwitchSimulator

    sim = FreeSwitchSimulator(password="ClueCon")
    sim.start()
    yield sim
    sim.stop()


@pytest.fixture
def start_bridge(simulator, fake_crm, make_config) -> Iterator[Callable[..., Any]]:
    """Start fsbridge in-process against the simulator and the fake CRM, connected and subscribed;
    stopped after the test. Keyword arguments override config sections."""
    from fsbridge.service import Bridge

    started: list[Bridge] = []

    def start(**overrides: Any) -> Bridge:
        cfg = config.from_mapping(settings(fs_port=simulator.port, crm_url=fake_crm.url, **overrides), env={})
        return run_bridge(cfg, simulator, started)

    yield start
    for bridge in started:
        bridge.stop()


def run_bridge(cfg: config.Config, simulator: Any, started: list[Any]) -> Any:
    """fsbridge of `cfg` started in-process, connected and subscribed to `simulator`; added to `started`."""
    from fsbridge.service import Bridge
    from tests.waiting import until

    bridge = Bridge(cfg)
    bridge.start()
    started.append(bridge)
    until(lambda: bridge.listener.connected, what="fsbridge to connect")
    simulator.wait_for_subscriber()
    return bridge


def base_url(bridge: Any) -> str:
    """The public listener's URL (retailCRM's callbacks, records, the logo)."""
    host, port = bridge.http.address
    return f"http://{host}:{port}"


def internal_url(bridge: Any) -> str:
    """The internal listener's URL (/routing/manager, /metrics, /healthz)."""
    host, port = bridge.internal_http.address
    return f"http://{host}:{port}"
