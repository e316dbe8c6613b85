"""ONNX Runtime vs the PyTorch reference on the same weights, over the issue's grid:
U in 1..8, N in {0, 1, 7, 50, 64}, B in {1, 7, 500, 1000}, padded and unpadded
histories, CameNN in both attention modes and EM3; batch independence and padding
invariance inside the exported graph."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from export_fixtures import (
    FP16_MODEL,
    MAX_TEXT_LEN,
    MODELS,
    Exported,
    exported_models,
    ranker_feeds,
    tower_feeds,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    return exported_models(tmp_path_factory)


NS = (0, 1, 7, 50, 64)
BS = (1, 7, 500, 1000)
# every (N, B) pair once per model; U cycles through 1..8 so each model sees all of them
GRID = [(n, b, 1 + k % 8) for k, (n, b) in enumerate(itertools.product(NS, BS))]
F32_TOL = 1e-4


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize(("n", "b", "u"), GRID, ids=[f"N{n}-B{b}-U{u}" for n, b, u in GRID])
def test_ranker_matches_pytorch(
    exported: dict[str, Exported], key: str, n: int, b: int, u: int
) -> None:
    e = exported[key]
    for padded in (False, True) if n else (False,):
        feeds = ranker_feeds(e.manifest, u, n, b, padded=padded, seed=n * 7 + b + u)
        got, want = e.rank(feeds), e.ref.rank(feeds)
        assert got.shape == want.shape == (b,) and got.dtype == np.float32
        diff = float(np.abs(got - want).max())
        assert diff <= F32_TOL, f"{key} U={u} N={n} B={b} padded={padded}: {diff:.3g}"


@pytest.mark.parametrize("key", MODELS)
def test_parity_grid_is_not_vacuous(exported: dict[str, Exported], key: str) -> None:
    """The test weights spread CVR over (0, 1): 1e-4 is a real constraint."""
    p = exported[key].rank(ranker_feeds(exported[key].manifest, 8, 50, 1000, padded=True))
    assert p.std() > 0.05 and p.min() >= 0.0 and p.max() <= 1.0


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize(("i", "lt"), [(1, 1), (7, MAX_TEXT_LEN), (300, 3)])
def test_item_tower_matches_pytorch(
    exported: dict[str, Exported], key: str, i: int, lt: int
) -> None:
    e = exported[key]
    feeds = tower_feeds(e.manifest, i, lt, seed=i + lt)
    names = [o.name for o in e.tower.get_outputs()]
    got = dict(zip(names, e.tower.run(names, feeds), strict=True))
    want = e.ref.embed(feeds)
    assert set(got) == set(want) == ({"emb", "ita", "tia"} if key != "em3" else {"emb"})
    for name in want:
        assert got[name].shape == want[name].shape
        diff = float(np.abs(got[name] - want[name]).max())
        assert diff <= F32_TOL, f"{key} {name} I={i} L={lt}: {diff:.3g}"


@pytest.mark.parametrize(("n", "b", "u"), [(0, 1, 1), (7, 500, 3), (64, 1000, 8)])
def test_float16_ranker_within_its_tolerance(
    exported: dict[str, Exported], n: int, b: int, u: int
) -> None:
    e = exported[FP16_MODEL]
    graph = e.manifest.graphs["ranker_fp16"]
    assert graph.precision == "float16" and graph.tolerance > F32_TOL
    sess = e.repo.session("ranker_fp16")
    feeds = ranker_feeds(e.manifest, u, n, b, padded=True, seed=b)
    got = sess.run(["cvr"], feeds)[0]
    assert got.dtype == np.float32  # float16 inside, float32 at the boundary
    diff = float(np.abs(got - e.ref.rank(feeds)).max())
    assert diff <= graph.tolerance, diff


def test_float16_item_tower_within_its_tolerance(exported: dict[str, Exported]) -> None:
    e = exported[FP16_MODEL]
    graph = e.manifest.graphs["item_tower_fp16"]
    feeds = tower_feeds(e.manifest, 64, MAX_TEXT_LEN)
    sess = e.repo.session("item_tower_fp16")
    names = [o.name for o in sess.get_outputs()]
    want = e.ref.embed(feeds)
    for name, got in zip(names, sess.run(names, feeds), strict=True):
        assert float(np.abs(got - want[name]).max()) <= graph.tolerance, name


@pytest.mark.parametrize("key", MODELS)
def test_score_alone_equals_score_in_a_mixed_batch(exported: dict[str, Exported], key: str) -> None:
    """A candidate scored alone (its user row only, B = 1) gets the score it gets in
    a batch of 6 users' candidates, interleaved (<= 1e-5)."""
    e = exported[key]
    feeds = ranker_feeds(e.manifest, 6, 20, 300, padded=True, seed=11)
    batch = e.rank(feeds)
    for j in np.random.default_rng(0).choice(300, size=25, replace=False):
        r = int(feeds["cand_user"][j])
        alone = {
            **{
                k: feeds[k][r : r + 1]
                for k in ("user_sparse", "hist_emb", "hist_sparse", "hist_mask")
            },
            "cand_emb": feeds["cand_emb"][j : j + 1],
            "cand_sparse": feeds["cand_sparse"][j : j + 1],
            "cand_user": np.zeros(1, dtype=np.int64),
        }
        assert abs(float(e.rank(alone)[0]) - float(batch[j])) <= 1e-5, (key, j)
    # and the batch in reverse order scores every candidate the same
    rev = {**feeds, **{k: feeds[k][::-1].copy() for k in ("cand_emb", "cand_sparse", "cand_user")}}
    np.testing.assert_allclose(e.rank(rev)[::-1], batch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", MODELS)
def test_history_padding_bucket_does_not_change_scores(
    exported: dict[str, Exported], key: str
) -> None:
    """The service pads N to a few buckets: padding a batch's histories from 10 to 50
    positions (masked, zero-filled) leaves every score unchanged (<= 1e-5)."""
    e = exported[key]
    feeds = ranker_feeds(e.manifest, 4, 10, 50, padded=True, seed=5)
    pad = 40
    wide = dict(feeds)
    wide["hist_emb"] = np.pad(feeds["hist_emb"], ((0, 0), (0, pad), (0, 0), (0, 0)))
    wide["hist_sparse"] = np.pad(feeds["hist_sparse"], ((0, 0), (0, pad), (0, 0)))
    wide["hist_mask"] = np.pad(feeds["hist_mask"], ((0, 0), (0, pad)))
    np.testing.assert_allclose(e.rank(wide), e.rank(feeds), atol=1e-5, rtol=0)
