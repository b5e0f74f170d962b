import pytest

from tests.k8s_standin import StandIn


@pytest.fixture
def standin(tmp_path):
    s = StandIn(tmp_path).start()
    try:
        yield s
    finally:
        s.stop()
