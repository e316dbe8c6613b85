"""Overload on a real service process: saturation measured with closed-loop clients,
then 5x of it offered open-loop. Behaviour, not speed (the machine is shared): the
service stays up, every answer is a 200 or a 429 with Retry-After (a 503/504 only as
the documented answers to a dependency or the deadline), the overload is felt (429s),
full rankings keep coming, memory stays bounded, and it serves normally afterwards.
The speed targets are measured by ``mmrank reliability overload``."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from rel_fixtures import loader, shared_inputs, source, version_data

from reliability.load import HttpClient, open_loop, rss_bytes, send_one
from reliability.rig import Rig
from reliability.scenarios import saturation, summarize_step

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def test_five_times_saturation(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    inputs = shared_inputs(tmp_path_factory)
    src = source(inputs, n=64, k=200)
    env = {"MMRANK_API__MAX_IN_FLIGHT": "4"}
    with Rig(inputs.repo, loader(version_data(inputs)), env, workdir=tmp_path) as rig:
        assert rig.service is not None
        host, port = rig.host_port
        rss0 = rss_bytes(rig.service.pid)

        async def go() -> tuple[float, list, list]:
            sat, _ = await saturation(host, port, src, 3.0, concurrency=3)
            outs = await open_loop(host, port, src, 5 * sat, 4.0, 1000.0, max_in_flight=4096)
            await asyncio.sleep(1.0)
            c = HttpClient(host, port)
            after = [await send_one(c, src, k, 2000.0) for k in range(5)]
            c.close()
            return sat, outs, after

        sat, outs, after = asyncio.run(go())
        rss1 = rss_bytes(rig.service.pid)
        alive = rig.service.alive()
        log = rig.service.log()
    step = summarize_step(5, 5 * sat, 4.0, outs, 1000.0, rss1)
    print(f"\nsaturation {sat:.1f}/s; 5x: {step}; RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MB")
    assert alive and "Traceback" not in log
    sent = [o for o in outs if o.status != -1]
    assert step.client_drops == 0, "the load generator could not offer the load"
    assert {o.status for o in sent} <= {200, 429, 503, 504}, step.statuses
    assert step.statuses.get(429, 0) > 0 and step.rejected_with_retry_after == 1.0, step
    assert {o.error_code for o in sent if o.status == 429} == {"overloaded"}  # the error schema
    assert step.statuses.get(200, 0) > 0, step
    assert all(o.status == 200 for o in after), [o.status for o in after]
    assert rss1 < 1.5 * rss0 + 100 * 2**20, (rss0, rss1)  # bounded: no per-request growth
