import pytest

from tests.support import app_server, make_pki


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


@pytest.fixture
def app():
    with app_server() as server:
        yield server
