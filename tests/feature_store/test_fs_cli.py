"""The offline path end to end on a tiny real world: a small CameNN exported by the real
exporter -> ``mmrank embed`` -> ``mmrank load`` (embedded file and real Redis) ->
``mmrank audit``; the embedded store's interface, flip and refusal; ``mmrank bench-store``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fs_fixtures import *  # noqa: F403  (the shared Redis fixtures)

from data.world import ITEM_FIELDS, USER_FIELDS
from feature_store.embed import load_embeddings
from feature_store.embedded import EmbeddedStore
from feature_store.errors import LoadError
from feature_store.local_redis import LocalRedis
from feature_store.reader import RedisSettings, RedisStore
from mmrank.cli import main
from model_export.export import export_run
from models.camenn import CameNN, CameNNConfig
from training.runs import save_run


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained CameNN with the world's content sizes, really exported."""
    torch.manual_seed(0)
    cfg = CameNNConfig(user_buckets=[f.buckets for f in USER_FIELDS],
                       item_buckets=[f.buckets for f in ITEM_FIELDS], d_model=16, n_head=2,
                       field_dim=4, head_hidden=[16])  # fmt: skip
    model = CameNN(cfg).eval()
    run = tmp_path_factory.mktemp("run")
    save_run(run, "camenn", model, cfg, {"data": "tiny-world"})
    out = tmp_path_factory.mktemp("repo") / "repo"
    export_run(run, out)
    return out


@pytest.fixture(scope="module")
def emb(repo: Path, tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("emb")
    assert (
        main(
            [
                "embed",
                "--repo",
                str(repo),
                "--data",
                f"world:{tiny_world}",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    return out


def test_embed_matches_the_item_tower(emb: Path, repo: Path) -> None:
    e = load_embeddings(emb)
    meta = json.loads((repo / "manifest.json").read_text())
    assert e.meta["model_version"] == meta["version"] and e.emb.shape == (300, 1, 16)
    assert np.isfinite(e.emb).all() and ((e.ita > 0) & (e.ita < 1)).all()


def test_load_embedded_and_read(emb: Path, repo: Path, tiny_world: Path, tmp_path: Path) -> None:
    path = tmp_path / "store.npz"
    args = ["load", "--repo", str(repo), "--embeddings", str(emb), "--data", str(tiny_world)]
    assert main([*args, "--embedded", str(path), "--version", "e1"]) == 0
    e = load_embeddings(emb)

    async def read(s: EmbeddedStore) -> None:
        b = await s.read_items([str(e.item_ids[3]), "nope"])
        assert b.version == "e1" and b.present.tolist() == [True, False]
        np.testing.assert_array_equal(b.emb[0], e.emb[3].astype(np.float16))
        r = await s.read_request("u0", [str(e.item_ids[0])])
        assert r.user_found and len(r.history.ids) > 0 and r.history.present.all()

    s = EmbeddedStore(path, pointer_ttl_s=0.0)
    asyncio.run(read(s))
    # a new file is a new version (the rename is the flip)
    assert main([*args, "--embedded", str(path), "--version", "e2"]) == 0
    assert asyncio.run(s.read_items([str(e.item_ids[3])])).version == "e2"


def test_embedded_write_fails_closed(tmp_path: Path) -> None:
    """A failure no real disk produces on demand here (write refused) is made real by a
    directory in the target's place: the write fails, nothing is half-written."""
    from feature_store.bench import synthetic_embeddings
    from feature_store.embed import build_version
    from feature_store.embedded import write_embedded

    (tmp_path / "store.npz").mkdir()
    with pytest.raises(LoadError):
        write_embedded(tmp_path / "store.npz", build_version(synthetic_embeddings(5), version="x"))
    assert [p.name for p in tmp_path.iterdir()] == ["store.npz"]


def test_load_redis_refuses_foreign_embeddings(emb: Path, repo: Path, tmp_path: Path,
                                               target: tuple[str, bool], ns: str) -> None:  # fmt: skip
    url, cluster = target
    flag = ["--cluster"] if cluster else []
    args = ["load", "--repo", str(repo), "--embeddings", str(emb), "--redis", url, *flag,
            "--namespace", ns, "--quiet"]  # fmt: skip
    assert main(args) == 0
    meta = json.loads((emb / "embeddings.json").read_text())
    (tmp_path / "e").mkdir()
    for f in ("embeddings.npz",):
        (tmp_path / "e" / f).write_bytes((emb / f).read_bytes())
    (tmp_path / "e" / "embeddings.json").write_text(json.dumps({**meta, "model_version": "other"}))
    assert main([*args[:4], str(tmp_path / "e"), *args[5:]]) == 2  # clean refusal

    async def check() -> None:
        s = RedisStore(RedisSettings(url=url, cluster=cluster, namespace=ns))
        try:
            m = await s.manifest()
            assert m.model_version == meta["model_version"] and m.n_items == 300
        finally:
            await s.close()

    asyncio.run(check())


def test_audit_csv(emb: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.csv"
    assert main(["audit", "--embeddings", str(emb), "--threshold", "0.5", "--out", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    e = load_embeddings(emb)
    judged = e.has_text & e.has_image
    want = int((judged & ((e.ita < 0.5) | (e.tia < 0.5))).sum())
    assert len(rows) == want
    mins = [min(float(r["ita"]), float(r["tia"])) for r in rows]
    assert mins == sorted(mins)


def test_bench_store_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with LocalRedis() as r:
        assert main(["bench-store", "--redis", r.url, "--no-cluster", "--items", "2000",
                     "--reads", "20", "--quiet"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "items cold" in out and "items warm" in out and "single node" in out
    # Redis's own MGET time is counted, and is part of (not more than) the read's time
    cold = next(line for line in out.splitlines() if "items cold" in line)
    cells = [c.strip() for c in cold.strip("|").split("|")]
    mean_ms, server_ms = float(cells[5]), float(cells[6])
    assert 0 < server_ms < mean_ms
