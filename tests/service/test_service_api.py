"""The ranking API end to end on real parts: exported models in ONNX Runtime, the
embedded store and a real redis-server; scores checked against the exported ranker run
directly on the same features."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from svc_app import running, settings
from svc_fixtures import World, direct_feeds, shared_world

from model_export.repository import open_repository


@pytest.fixture(scope="session")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> World:
    return shared_world(tmp_path_factory.mktemp("svc"), tiny_world)


def test_scores_equal_the_exported_model(w: World) -> None:
    sess = open_repository(w.repo_a).session("ranker")
    users = w.data.user_ids[:5]
    cands = w.data.item_ids[:300]

    async def go() -> None:
        async with running(settings(w.repo_a, w.store_file)) as (_, c):
            for u in users:
                r = await c.post("/v1/rank", json={"user_id": u, "candidates": cands})
                assert r.status_code == 200, r.text
                body = r.json()
                got = {i["item_id"]: i["score"] for i in body["items"]}
                want = sess.run(["cvr"], direct_feeds(w, u, cands))[0]
                diff = max(abs(got[i] - float(s)) for i, s in zip(cands, want, strict=True))
                assert diff <= 1e-5, diff
                scores = [i["score"] for i in body["items"]]
                assert scores == sorted(scores, reverse=True)
                assert sorted(got) == sorted(cands) and body["missing_items"] == []
                assert body["model"]["version"] == "test-a" and body["embedding_version"] == "va"

    asyncio.run(go())


def _cands(w: World, k: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = w.data.item_ids
    return [ids[i] for i in rng.choice(len(ids), size=k, replace=False)]


def test_concurrent_requests_score_as_alone(w: World) -> None:
    """200 concurrent requests (batched across requests, split over several batches)
    get the scores each gets alone, candidates complete and sorted."""
    reqs = [
        {"user_id": w.data.user_ids[i % 50], "candidates": _cands(w, 20 + (i * 7) % 280, i)}
        for i in range(200)
    ]
    # correctness, not speed: a deadline that a loaded 2-core machine cannot miss; requests
    # merge without the CPU cost bound (max_user_rows 0): batching is the subject here
    batching = {"max_batch_rows": 512, "max_delay_ms": 5, "queue_limit": 256, "max_user_rows": 0}
    s = settings(w.repo_a, w.store_file, api={"default_deadline_ms": 60_000}, batching=batching)

    async def go() -> None:
        async with running(s) as (_, c):
            alone = []
            for r in reqs:
                resp = await c.post("/v1/rank", json=r)
                assert resp.status_code == 200
                alone.append({i["item_id"]: i["score"] for i in resp.json()["items"]})
            got = await asyncio.gather(*(c.post("/v1/rank", json=r) for r in reqs))
            worst = 0.0
            for r, resp, a in zip(reqs, got, alone, strict=True):
                assert resp.status_code == 200
                items = resp.json()["items"]
                assert sorted(i["item_id"] for i in items) == sorted(r["candidates"])
                scores = [i["score"] for i in items]
                assert scores == sorted(scores, reverse=True)
                assert [i["rank"] for i in items] == list(range(1, len(items) + 1))
                worst = max(worst, max(abs(a[i["item_id"]] - i["score"]) for i in items))
            assert worst <= 1e-6, worst
            m = (await c.get("/metrics")).text
            # the concurrent wave really was batched: fewer inference calls than requests
            calls = float(m.split("mmrank_batch_requests_count ")[1].split()[0])
            assert calls < 400 - 50

    asyncio.run(go())


def test_missing_items_duplicates_topk_context(w: World) -> None:
    u = w.data.user_ids[3]
    cands = _cands(w, 30, 1)
    body = {"user_id": u, "candidates": ["nope-1", *cands, cands[0], "nope-2"], "top_k": 40,
            "context": {"slot": "home", "device": 2}, "request_id": "r-1"}  # fmt: skip

    async def go() -> None:
        async with running(settings(w.repo_a, w.store_file)) as (_, c):
            r = (await c.post("/v1/rank", json=body)).json()
            assert r["missing_items"] == ["nope-1", "nope-2"] and r["duplicates_removed"] == 1
            items = r["items"]
            assert [i["item_id"] for i in items[-2:]] == ["nope-1", "nope-2"]
            assert all(i["score"] is None for i in items[-2:]) and len(items) == 32
            assert r["request_id"] == "r-1" and r["user_known"] and not r["degraded"]
            assert set(r["timings_ms"]) == {"parse", "features", "queue", "inference", "sort",
                                            "total"}  # fmt: skip
            top = (await c.post("/v1/rank", json={**body, "top_k": 5})).json()["items"]
            assert top == items[:5]
            plain = (await c.post("/v1/rank", json={**body, "context": {}})).json()["items"]
            assert {i["item_id"]: i["score"] for i in plain} != {
                i["item_id"]: i["score"] for i in items
            }  # context fields reach the model
            unknown = await c.post("/v1/rank", json={"user_id": "nobody", "candidates": cands})
            assert unknown.status_code == 200 and unknown.json()["user_known"] is False

    asyncio.run(go())


def test_bad_input_is_4xx_with_one_schema(w: World) -> None:
    s = settings(w.repo_a, w.store_file, api={"max_body_bytes": 4096, "api_keys": ["k1"]})
    ok = {"user_id": "u1", "candidates": ["a"]}
    key = {"x-api-key": "k1"}
    bad = [
        {"user_id": "u1", "candidates": []},
        {"user_id": "u1", "candidates": ["has space"]},
        {"user_id": "u1", "candidates": ["x" * 200]},
        {"user_id": "u1", "candidates": ["a"], "top_k": 0},
        {"user_id": "u1", "candidates": ["a"], "context": {"nope": "x"}},
        {"user_id": "u1", "candidates": ["a"], "surprise": 1},
        {"candidates": ["a"]},
    ]

    async def go() -> None:
        async with running(s) as (_, c):
            assert (await c.post("/v1/rank", json=ok)).status_code == 401
            assert (
                await c.post("/v1/rank", json=ok, headers={"x-api-key": "k2"})
            ).status_code == 403
            auth = {"authorization": "Bearer k1"}
            assert (await c.post("/v1/rank", json=ok, headers=auth)).status_code == 200
            for b in bad:
                r = await c.post("/v1/rank", json=b, headers=key)
                assert r.status_code == 422, (b, r.text)
                assert set(r.json()["error"]) >= {"code", "message"}
                assert "Traceback" not in r.text
            r = await c.post("/v1/rank", content=b"{not json", headers={**key,
                             "content-type": "application/json"})  # fmt: skip
            assert r.status_code == 422
            many = {"user_id": "u", "candidates": [f"i{k}" for k in range(1001)]}
            big = await c.post("/v1/rank", json=many, headers=key)
            assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
            hdr = {**key, "x-mmrank-deadline-ms": "-3"}
            assert (await c.post("/v1/rank", json=ok, headers=hdr)).status_code == 422
            assert (await c.post("/v1/admin/models", json={"repo": "x"})).status_code == 403

    asyncio.run(go())
    s2 = settings(w.repo_a, w.store_file)
    many = {"user_id": "u", "candidates": [f"i{k}" for k in range(1001)]}

    async def limit() -> None:
        async with running(s2) as (_, c):
            r = await c.post("/v1/rank", json=many)
            assert r.status_code == 422 and "at most 1000" in r.json()["error"]["message"]

    asyncio.run(limit())


def test_full_queue_429_and_passed_deadline_504(w: World) -> None:
    """A batch that waits 400 ms for rows holds the first request; the queue (limit 1)
    refuses the second at once; a deadline shorter than the wait is answered 504
    without being scored."""
    s = settings(w.repo_a, w.store_file, batching={"queue_limit": 1, "max_delay_ms": 400,
                                                   "max_batch_rows": 100_000})  # fmt: skip
    body = {"user_id": w.data.user_ids[0], "candidates": _cands(w, 10, 0)}

    async def go() -> None:
        async with running(s) as (_, c):
            first = asyncio.create_task(c.post("/v1/rank", json=body))
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            r = await c.post("/v1/rank", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert time.monotonic() - t0 < 0.3
            assert (await first).status_code == 200
            before = (await c.get("/metrics")).text.split("mmrank_batch_rows_count ")[1].split()[0]
            t0 = time.monotonic()
            r = await c.post("/v1/rank", json=body, headers={"x-mmrank-deadline-ms": "150"})
            assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
            assert time.monotonic() - t0 < 0.4
            await asyncio.sleep(0.5)
            after = (await c.get("/metrics")).text.split("mmrank_batch_rows_count ")[1].split()[0]
            assert before == after  # not scored

    asyncio.run(go())
