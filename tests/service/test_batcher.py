"""The batcher on a real ONNX Runtime backend (exported model a): splitting and
merging, a failing batch reaching all its requests, skipped cancelled requests, a full
queue refused at once. Failures are real: a malformed user row makes ONNX Runtime
itself reject the batch."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import Histogram
from svc_fixtures import World, direct_feeds, shared_world

from model_export.repository import open_repository
from service.backends.base import BackendError
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.batcher import Batcher, Job
from service.errors import Overloaded
from service.metrics import Metrics
from service.models import FEW_BUCKETS, max_history
from service.settings import BatchingSettings, Settings, StoreSettings
from service.tensors import Piece, UserSide, assemble


@pytest.fixture(scope="session")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> World:
    return shared_world(tmp_path_factory.mktemp("svc"), tiny_world)


def _job(w: World, user: str, cands: list[str], bad: bool = False) -> Job:
    f = direct_feeds(w, user, cands)
    us = f["user_sparse"][0]
    if bad:
        us = us + 10**9  # hashed ids far outside every embedding table: the graph refuses them
    side = UserSide(us, f["hist_emb"][0], f["hist_sparse"][0])
    loop = asyncio.get_running_loop()
    return Job(side, f["cand_emb"], f["cand_sparse"], time.monotonic() + 10, loop.create_future())


def _batcher(w: World, metrics: Metrics, **kw: float) -> Batcher:
    repo = open_repository(w.repo_a, golden=False)
    opts: dict = {"max_batch_rows": 256, "max_delay_s": 0.05, "queue_limit": 8, "in_flight": 1}
    opts.update(kw)
    return Batcher(OnnxRuntimeBackend(repo, device="cpu"), hist_buckets=[8, 16, 32, 50],
                   timeout_s=10, retry_after_s=1, metrics=metrics, **opts)  # fmt: skip


def _sum_count(h: Histogram) -> tuple[float, float]:
    samples = next(iter(h.collect())).samples
    total = next(s.value for s in samples if s.name.endswith("_sum"))
    return total, next(s.value for s in samples if s.name.endswith("_count"))


async def _scored_as_alone(w: World, b: Batcher, sizes: tuple[int, ...]) -> None:
    """Requests of ``sizes`` candidates (one user each) queued together get the scores
    the ranker gives each alone."""
    sess = open_repository(w.repo_a, golden=False).session("ranker")
    users, cands = w.data.user_ids[: len(sizes)], w.data.item_ids
    jobs = [_job(w, u, cands[:k]) for u, k in zip(users, sizes, strict=True)]
    got = await asyncio.gather(*(b.submit(j) for j in jobs))
    for u, g, k in zip(users, got, sizes, strict=True):
        want = sess.run(["cvr"], direct_feeds(w, u, cands[:k]))[0]
        np.testing.assert_allclose(g, want, atol=1e-6)


def test_split_merge_and_padding(w: World) -> None:
    async def go() -> None:
        m = Metrics()
        b = _batcher(w, m)
        b.start()
        await _scored_as_alone(w, b, (100, 200, 300))
        assert _sum_count(m.batch_rows) == (600, 3)  # 256 + 256 + 88: full batches, split
        await b.close()

    asyncio.run(go())


@pytest.mark.parametrize("in_flight", [1, 2])
def test_prefetched_batch_waits_at_the_backend(w: World, in_flight: int) -> None:
    """With one worker thread and ``in_flight`` = 2 (``batching.prefetch`` = 1) the next
    batch is handed to the backend while the first is scored (it waits in the thread
    pool's queue); with 1 never. Scores are the same either way. The real backend's
    ``infer`` is wrapped only to count the calls in progress."""

    async def go() -> None:
        b = _batcher(w, Metrics(), max_batch_rows=64, max_delay_s=0.0, in_flight=in_flight)
        inner = b.backend.infer
        pending, most = [0], [0]

        async def counted(inputs: Mapping[str, np.ndarray]) -> np.ndarray:
            pending[0] += 1
            most[0] = max(most[0], pending[0])
            try:
                return await inner(inputs)
            finally:
                pending[0] -= 1

        b.backend.infer = counted  # type: ignore[method-assign]
        b.start()
        await _scored_as_alone(w, b, (64, 64, 64, 64, 64, 64))
        assert most[0] == in_flight
        await b.close()

    asyncio.run(go())


def test_without_fill_only_oversized_requests_are_split(w: World) -> None:
    async def go() -> None:
        m = Metrics()
        b = _batcher(w, m, fill=False, max_delay_s=0.2)  # the four requests queue together
        b.start()
        await _scored_as_alone(w, b, (100, 200, 300, 50))
        # 100 | 200 | 256 of 300 | its last 44 + 50: a request goes whole into a batch
        # unless it alone is larger than one
        assert _sum_count(m.batch_rows) == (650, 4)
        await b.close()

    asyncio.run(go())


def test_requests_x_rows_per_batch_are_capped(w: World) -> None:
    async def go() -> None:
        m = Metrics()
        b = _batcher(w, m, max_user_rows=60, max_delay_s=0.2)  # the five queue together
        b.start()
        await _scored_as_alone(w, b, (10, 10, 10, 20, 20))
        # requests x rows <= 60: 10+10 (2 x 20), then 10+20 (2 x 30), then 20 alone;
        # 70 rows would fit one batch of 256
        assert _sum_count(m.batch_requests) == (5, 3)
        await b.close()

    asyncio.run(go())


def test_default_cap_merges_only_tiny_requests(w: World) -> None:
    """On CPU a merged call of the masked graph costs more than separate calls except for
    tiny requests (``BatchingSettings.max_user_rows``' measurements): with the default,
    two 8-candidate requests share a batch, two 100-candidate requests do not."""

    async def go() -> None:
        m = Metrics()
        cap = BatchingSettings().max_user_rows
        b = _batcher(w, m, max_user_rows=cap, max_delay_s=0.2)  # the four queue together
        b.start()
        await _scored_as_alone(w, b, (8, 8, 100, 100))
        assert _sum_count(m.batch_requests) == (4, 3)  # 8+8 | 100 | 100
        await b.close()

    asyncio.run(go())


def test_failure_reaches_every_request_and_cancelled_are_skipped(w: World) -> None:
    cands = w.data.item_ids[:20]

    async def go() -> None:
        m = Metrics()
        b = _batcher(w, m, max_delay_s=0.2)
        b.start()
        gone = _job(w, w.data.user_ids[0], cands)
        b.submit(gone)
        gone.future.cancel()  # the client left before its batch closed
        good, bad = _job(w, w.data.user_ids[1], cands), _job(w, w.data.user_ids[2], cands, True)
        futs = [b.submit(good), b.submit(bad)]
        res = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(r, BackendError) for r in res), res
        assert _sum_count(m.batch_rows)[0] == 40  # not 60
        # the batcher still works after a failed batch
        ok = await b.submit(_job(w, w.data.user_ids[1], cands))
        assert ok.shape == (20,)
        await b.close()

    asyncio.run(go())


def test_full_queue_refuses_at_once(w: World) -> None:
    async def go() -> None:
        b = _batcher(w, Metrics(), queue_limit=2, max_delay_s=0.3, max_batch_rows=10_000)
        b.start()
        cands = w.data.item_ids[:5]
        held = [b.submit(_job(w, w.data.user_ids[k], cands)) for k in range(2)]
        with pytest.raises(Overloaded) as e:
            b.submit(_job(w, w.data.user_ids[3], cands))
        assert e.value.retry_after == 1
        await asyncio.gather(*held)
        assert await b.drain(1.0)
        await b.close()

    asyncio.run(go())


def test_default_buckets_pad_a_batch_only_to_its_longest_history(w: World) -> None:
    """Every length is a bucket by default (a few where shapes are compiled); a given
    list is completed up to the history limit; a batch is padded to its bucket."""
    m = open_repository(w.repo_a, golden=False).manifest
    limit = min(50, m.max_hist or 50)
    default = Settings(repo=w.repo_a, store=StoreSettings(kind="redis"))
    assert max_history(default, m) == (limit, list(range(1, limit + 1)))
    few = sorted({b for b in FEW_BUCKETS if b < limit} | {limit})
    assert max_history(default, m, compiles_shapes=True)[1] == few
    given = default.model_copy(update={"batching": BatchingSettings(hist_buckets=[32, 8])})
    assert given.batching.hist_buckets == [8, 32, 50]
    assert max_history(given, m)[1] == sorted({b for b in (8, 32) if b < limit} | {limit})
    assert BatchingSettings().hist_buckets == []
    q, d, fi = 1, 4, 3

    def piece(n: int) -> Piece:
        user = UserSide(np.zeros(2, np.int64), np.ones((n, q, d), np.float32),
                        np.ones((n, fi), np.int64))  # fmt: skip
        return Piece(user, np.zeros((5, q, d), np.float32), np.zeros((5, fi), np.int64), 0, 5)

    batch = assemble([piece(37), piece(12)], list(range(1, 51)))
    assert batch["hist_mask"].shape == (2, 37)
    assert batch["hist_mask"].sum(axis=1).tolist() == [37, 12]
    assert assemble([piece(37)], [8, 32, 50])["hist_mask"].shape == (1, 50)
