# fsbridge is a gevent service: the tests run it in-process with the same monkey
# patching the `fsbridge` command applies, so requests, sockets and the fakes all
# cooperate on one hub.
from gevent import monkey

monkey.patch_all()

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES
