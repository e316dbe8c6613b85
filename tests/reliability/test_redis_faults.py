"""Redis faults injected for real under steady open-loop load on a real service
process (uvicorn) that reaches a real redis-server through the delay proxy: SIGSTOP,
SIGKILL (+ restart and reload, Redis has no persistence), CLIENT PAUSE and a TCP delay
past the store's timeout. Every request is answered within its deadline as a 200 or a
503 with Retry-After (with ``degraded=input_order``: a flagged degraded 200), full
rankings are back to >= 99 % within 5 s after Redis returns, and the service process
is never restarted. Each fault lasts 2 s (the long version: ``mmrank reliability faults``)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import pytest
from rel_fixtures import loader, shared_inputs, source, version_data

from reliability.rig import Rig
from reliability.scenarios import redis_faults, run_fault

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
FAULT_S = 2.0


def _rig(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[Rig]:
    inputs = shared_inputs(tmp_path_factory)
    with Rig(inputs.repo, loader(version_data(inputs)), env,
             workdir=tmp_path_factory.mktemp("rig")) as rig:  # fmt: skip
        yield rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from _rig(tmp_path_factory, {})


@pytest.mark.parametrize("name", ["sigstop", "kill", "pause", "slow"])
def test_redis_fault_under_load(
    rig: Rig, name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    src = source(shared_inputs(tmp_path_factory))
    fault = redis_faults(FAULT_S)[name]
    rep = asyncio.run(
        run_fault(rig, src, fault, rate=20, before_s=1.0, fault_s=FAULT_S, after_s=6.0)
    )
    print("\n" + rep.line())
    assert rep.passed, rep.line()
    # the fault was felt: some requests failed fast with 503 (not all served from cache)
    assert rep.statuses.get(503, 0) > 0, rep.line()
    assert rep.statuses.get(200, 0) > 0, rep.line()


def test_degraded_policy_flags_instead_of_503(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With ``api.degraded = input_order`` a stopped Redis gives flagged degraded 200s."""
    src = source(shared_inputs(tmp_path_factory), seed=1)
    for rig in _rig(tmp_path_factory, {"MMRANK_API__DEGRADED": "input_order"}):
        rep = asyncio.run(run_fault(rig, src, redis_faults(FAULT_S)["sigstop"], rate=20,
                                    before_s=1.0, fault_s=FAULT_S, after_s=6.0))  # fmt: skip
        print("\n" + rep.line())
        assert rep.passed, rep.line()
        assert rep.degraded > 0 and rep.statuses.get(503, 0) == 0, rep.line()
