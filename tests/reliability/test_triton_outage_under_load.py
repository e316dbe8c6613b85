"""Triton as the backend of a real service process, killed and restarted, and frozen
(SIGSTOP), under steady load: the rules of the Redis faults (every answer within its
deadline as 200 or 503 + Retry-After, full rankings back to >= 99 % within 5 s after
Triton is back, no service restart). The backend call timeout is set below the request
deadline (``MMRANK_BACKEND__TIMEOUT_MS``), so a frozen Triton fails the call as 503
before the request's deadline would make it a 504, and the circuit breaker
(``service.backends.breaker``) fails the batches queued behind a frozen call at once
(without it they wait out their deadlines: 504s). Skipped, visibly, where the Triton
venv cannot be built."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import pytest
from rel_fixtures import loader, shared_inputs, source, version_data

from reliability.rig import Rig
from reliability.scenarios import run_fault, triton_faults
from service.triton_local import TritonSetupError, ensure_triton

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
ENV = {"MMRANK_BACKEND__TIMEOUT_MS": "400"}  # one worker: batches queue behind a frozen call


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    try:
        ensure_triton()
    except TritonSetupError as exc:
        pytest.skip(f"Triton venv cannot be built on this machine: {exc}")
    inputs = shared_inputs(tmp_path_factory)
    with Rig(inputs.repo, loader(version_data(inputs)), ENV, triton=True,
             workdir=tmp_path_factory.mktemp("triton-rig")) as rig:  # fmt: skip
        yield rig


@pytest.mark.parametrize("name", ["triton-kill", "triton-stop"])
def test_triton_fault_under_load(
    rig: Rig, name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    src = source(shared_inputs(tmp_path_factory), seed=2)
    # 30 req/s for 3 s: enough batches queue behind a frozen call that, without the
    # breaker, some wait out their deadlines (504)
    rep = asyncio.run(run_fault(rig, src, triton_faults()[name], rate=30, before_s=1.0,
                                fault_s=3.0, after_s=6.0))  # fmt: skip
    print("\n" + rep.line())
    if not rep.passed:  # shown by pytest with the failure
        print("service log:\n" + rig.service_log_tail() + "\ntriton log:\n" + rig.triton.log_tail())
    assert rep.passed, rep.line()
    assert rep.statuses.get(503, 0) > 0 and rep.statuses.get(200, 0) > 0, rep.line()
