"""Real ``redis-server`` processes for the feature-store tests: one single node and one
3-master cluster per test session, on free ports, started on first use and stopped by
pid when the session ends.

Not a conftest: one module named ``conftest`` per tree keeps mypy's module names
unique (as ``tests/model_export/export_fixtures.py``). Test modules import the fixtures
below; the servers themselves are module-level singletons, so every module shares them.
"""

from __future__ import annotations

import atexit
import uuid

import pytest

from feature_store.local_redis import LocalCluster, LocalRedis

_servers: dict[str, LocalRedis | LocalCluster] = {}


def _stop_all() -> None:
    for s in _servers.values():
        s.stop()
    _servers.clear()


atexit.register(_stop_all)


def shared_node() -> LocalRedis:
    if "node" not in _servers:
        _servers["node"] = LocalRedis()
    s = _servers["node"]
    assert isinstance(s, LocalRedis)
    return s


def shared_cluster() -> LocalCluster:
    if "cluster" not in _servers:
        _servers["cluster"] = LocalCluster()
    s = _servers["cluster"]
    assert isinstance(s, LocalCluster)
    return s


@pytest.fixture(scope="session")
def redis_node() -> LocalRedis:
    return shared_node()


@pytest.fixture(scope="session")
def redis_cluster() -> LocalCluster:
    return shared_cluster()


@pytest.fixture(params=["single", "cluster"])
def target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(url, is_cluster) of each real Redis deployment."""
    if request.param == "single":
        return shared_node().url, False
    return shared_cluster().url, True


@pytest.fixture
def ns() -> str:
    """A namespace of its own for each test (the servers are shared)."""
    return f"t{uuid.uuid4().hex[:10]}"
