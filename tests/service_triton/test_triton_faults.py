"""TritonBackend when its Triton fails: killed (in-flight and new calls fail fast as
BackendUnavailable, far inside the call deadline), restarted (the same backend object
scores again, no re-creation), frozen by SIGSTOP (the call deadline holds: no hang).
A server of this module's own, since these tests kill it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest
from triton_fixtures import SLOW_MODEL, exported_repo, ranker_feeds, triton_server

from model_export.repository import ModelRepository
from service.backends.base import BackendUnavailable
from service.backends.triton import TritonBackend
from service.triton_local import LocalTriton

DEADLINE_MS = 5000.0
SLOW_DELAY_MS = 400.0  # long enough that calls are still in flight when Triton dies


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    yield from triton_server(tmp_path_factory, SLOW_DELAY_MS, 16)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    return exported_repo(tmp_path_factory.mktemp("triton_export"))


async def timed_failure(call: asyncio.Future | asyncio.Task, t0: float) -> float:
    with pytest.raises(BackendUnavailable):
        await call
    return time.perf_counter() - t0


def test_kill_then_restart_same_backend(server: LocalTriton, repo: ModelRepository) -> None:
    feeds = ranker_feeds(repo.manifest, 3, 10, 40, seed=3)
    want = repo.session("ranker").run(["cvr"], feeds)[0]

    async def run() -> dict[str, float]:
        fast = TritonBackend(server.grpc_url, timeout_ms=DEADLINE_MS)
        slow = TritonBackend(server.grpc_url, SLOW_MODEL, timeout_ms=DEADLINE_MS)
        out: dict[str, float] = {}
        try:
            assert await fast.ready()
            np.testing.assert_allclose(await fast.infer(feeds), want, atol=1e-5, rtol=0)
            # calls in flight on the slow model when Triton is SIGKILLed
            in_flight = [asyncio.create_task(slow.infer(feeds)) for _ in range(3)]
            await asyncio.sleep(0.15)
            t0 = time.perf_counter()
            await asyncio.to_thread(server.kill)
            waits = await asyncio.gather(*(timed_failure(c, t0) for c in in_flight))
            out["in_flight_s"] = max(waits)
            # new calls while Triton is down: refused at once, retry included
            t0 = time.perf_counter()
            out["new_call_s"] = await timed_failure(asyncio.create_task(fast.infer(feeds)), t0)
            t0 = time.perf_counter()
            assert not await fast.ready()
            out["ready_false_s"] = time.perf_counter() - t0
            # Triton back on the same ports: the same objects score again
            t0 = time.perf_counter()
            await asyncio.to_thread(server.start)
            out["restart_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = await fast.infer(feeds)
            out["first_call_after_restart_s"] = time.perf_counter() - t0
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            assert await fast.ready()
            np.testing.assert_allclose(await slow.infer(feeds), want, atol=1e-5, rtol=0)
            out["reconnects"] = fast.reconnects + slow.reconnects
        finally:
            await fast.close()
            await slow.close()
        return out

    out = asyncio.run(run())
    print(f"\nkill/restart: {out}")
    limit = 1.0  # seconds; the call deadline is 5 s
    assert out["in_flight_s"] < limit and out["new_call_s"] < limit, out
    assert out["ready_false_s"] < limit, out


def test_twice_down_and_up_again(server: LocalTriton, repo: ModelRepository) -> None:
    """Several outages in a row with calls failing in between: the channel never gets
    stuck in gRPC's reconnect backoff (capped at 1 s) or on a dead connection."""
    feeds = ranker_feeds(repo.manifest, 2, 5, 9, seed=4)

    async def run() -> list[float]:
        backend = TritonBackend(server.grpc_url, timeout_ms=DEADLINE_MS)
        recovery: list[float] = []
        try:
            for _ in range(2):
                await asyncio.to_thread(server.kill)
                for _ in range(5):  # failures while down grow gRPC's backoff
                    with pytest.raises(BackendUnavailable):
                        await backend.infer(feeds)
                    await asyncio.sleep(0.1)
                await asyncio.to_thread(server.start)
                t0 = time.perf_counter()
                assert (await backend.infer(feeds)).shape == (9,)
                recovery.append(time.perf_counter() - t0)
        finally:
            await backend.close()
        return recovery

    recovery = asyncio.run(run())
    print(f"\nfirst call after each restart: {[f'{r * 1000:.0f} ms' for r in recovery]}")
    assert max(recovery) < 1.0, recovery


def test_frozen_triton_fails_within_the_deadline(
    server: LocalTriton, repo: ModelRepository
) -> None:
    """SIGSTOP: connections stay open, nothing answers. The call fails as
    BackendUnavailable at its deadline, not later; after SIGCONT it scores again."""
    feeds = ranker_feeds(repo.manifest, 2, 5, 9, seed=5)
    deadline_ms = 800.0

    async def run() -> tuple[float, float]:
        backend = TritonBackend(server.grpc_url, timeout_ms=deadline_ms, ready_timeout_ms=300)
        try:
            assert await backend.ready()
            server.pause()
            try:
                t0 = time.perf_counter()
                with pytest.raises(BackendUnavailable, match="DEADLINE"):
                    await backend.infer(feeds)
                frozen = time.perf_counter() - t0
                assert not await backend.ready()
            finally:
                server.resume()
            t0 = time.perf_counter()
            try:
                got = await backend.infer(feeds)
            except BackendUnavailable as exc:  # Triton's own account belongs in the failure
                pytest.fail(f"no score after SIGCONT: {exc}\ntriton log:\n{server.log_tail()}")
            assert got.shape == (9,)
            return frozen, time.perf_counter() - t0
        finally:
            await backend.close()

    frozen, after = asyncio.run(run())
    print(f"\nfrozen Triton: failed after {frozen * 1000:.0f} ms (deadline {deadline_ms:.0f} ms)")
    assert deadline_ms / 1000 * 0.9 <= frozen < deadline_ms / 1000 + 0.5
    assert after < 1.0
