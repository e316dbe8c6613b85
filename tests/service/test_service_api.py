"""The ranking API end to end on real parts: exported models in ONNX Runtime, the
embedded store and a real redis-server; scores checked against the exported ranker run
directly on the same features."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from svc_app import running, settings
from svc_fixtures import World, build_world, direct_feeds

from model_export.repository import open_repository


@pytest.fixture(scope="session")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> World:
    return build_world(tmp_path_factory.mktemp("svc"), tiny_world)


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
