"""SIGTERM during load on a real service process: readiness turns false first (while
requests are still accepted and answered), every request accepted before the signal is
answered 200, and the process exits within the grace period."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import pytest
from rel_fixtures import loader, shared_inputs, source, version_data

from reliability.load import closed_loop
from reliability.rig import Rig

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
GRACE_S = 45.0  # docker-compose.yml's stop_grace_period


def test_sigterm_drains(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    inputs = shared_inputs(tmp_path_factory)
    src = source(inputs, k=200)
    env = {"MMRANK_SHUTDOWN__UNREADY_S": "1.5", "MMRANK_SHUTDOWN__DRAIN_S": "10"}
    with Rig(inputs.repo, loader(version_data(inputs)), env, workdir=tmp_path) as rig:
        svc = rig.service
        assert svc is not None and svc.proc is not None
        host, port = rig.host_port

        async def go() -> tuple[list, float, float, list[tuple[float, int]]]:
            load = asyncio.create_task(closed_loop(host, port, src, 8, 6.0, 5000.0))
            await asyncio.sleep(1.0)
            t_term = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            probes: list[tuple[float, int]] = []
            while svc.alive() and time.monotonic() - t_term < GRACE_S:
                probes.append(
                    (time.monotonic() - t_term, await asyncio.to_thread(svc.ready_status, 1.0))
                )
                await asyncio.sleep(0.1)
            exited = time.monotonic() - t_term
            return await load, t_term, exited, probes

        outs, t_term, exited_s, probes = asyncio.run(go())
        code = svc.proc.wait(GRACE_S)
    print(f"\nprobes {probes[:3]}...{probes[-3:]}; exit {code} after {exited_s:.2f}s")
    # readiness false first: 503 while the listener still answers
    first = probes[0]
    assert first[1] == 503, probes
    statuses = [s for _, s in probes]
    assert 0 in statuses, "the listener never closed within 5 s"
    assert all(s == 503 for s in statuses[: statuses.index(0)]), probes
    # requests accepted (sent) before the signal: all answered 200
    before = [o for o in outs if o.sent < t_term]
    assert before and all(o.status == 200 for o in before), {o.status for o in before}
    # served during the unready phase too
    assert any(o.status == 200 and o.sent > t_term + 0.5 for o in outs)
    assert code in (0, -signal.SIGTERM) and exited_s < GRACE_S, (code, exited_s)
    assert "Traceback" not in svc.log()
