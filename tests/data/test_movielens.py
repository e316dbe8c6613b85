"""MovieLens-100K loader, checked against the raw parquet files."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data import movielens
from data.dataset import RankingData
from mmrank.features import hash_column

_CANDIDATES = [
    Path(__file__).resolve().parents[3] / "shared" / "data" / "movielens100k",  # beside the repo
    Path("/work/shared/data/movielens100k"),
]
DATA_DIR = next((p for p in _CANDIDATES if p.exists()), _CANDIDATES[0])
pytestmark = pytest.mark.skipif(not DATA_DIR.exists(), reason="MovieLens-100K not available")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ml_cache")


@pytest.fixture(scope="module")
def ml(cache_dir: Path) -> RankingData:
    return movielens.load_movielens(DATA_DIR, cache_dir)


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    t = pq.read_table(DATA_DIR / "MovieLens100k_data.parquet.brotli").to_pydict()
    return {k: np.asarray(v, dtype=np.int64) for k, v in t.items()}


def _events(ml: RankingData, raw: dict[str, np.ndarray]) -> dict[str, list[tuple[int, int]]]:
    """(user_id, timestamp) of every row that the hashed user id + movie identify uniquely."""
    uids = np.unique(raw["user_id"])
    by_hash: dict[int, list[int]] = defaultdict(list)
    for u, h in zip(
        uids, hash_column("user_id", uids, movielens.USER_FIELDS[0].buckets), strict=True
    ):
        by_hash[int(h)].append(int(u))
    ts = {
        (int(u), int(m)): int(t)
        for u, m, t in zip(raw["user_id"], raw["movie_id"], raw["timestamp"], strict=True)
    }
    out: dict[str, list[tuple[int, int]]] = {}
    for name in ("train", "valid", "test"):
        split = getattr(ml, name)
        movies = ml.catalog.item_ids[split.cand_item].astype(np.int64)
        rows = []
        for h, m in zip(split.user_sparse[:, 0], movies, strict=True):
            hits = [(u, ts[u, int(m)]) for u in by_hash[int(h)] if (u, int(m)) in ts]
            rows.append(hits[0] if len(hits) == 1 else (-1, -1))
        out[name] = rows
    return out


def test_shapes_and_dtypes(ml: RankingData) -> None:
    cat = ml.catalog
    n_items = 1682
    assert ml.name == "movielens" and not ml.has_oracle
    assert cat.text.dtype == np.float32 and cat.text.shape[0] == n_items and cat.text_dim == 384
    assert cat.text.shape[1] == cat.text_len.max() <= movielens.MAX_TITLE_TOKENS
    assert cat.text_len.dtype == np.int64 and (cat.text_len == 0).sum() == 1  # movie 267 "unknown"
    pad = np.arange(cat.text.shape[1])[None, :] >= cat.text_len[:, None]
    assert not cat.text[pad].any() and np.abs(cat.text[~pad]).sum(axis=1).min() > 0
    assert cat.image.shape == (n_items, 9, 1) and not cat.image.any() and not cat.has_image.any()
    assert sum(s.n_rows for s in (ml.train, ml.valid, ml.test)) == 100_000
    for s in (ml.train, ml.valid, ml.test):
        assert s.p_true is None and s.label.dtype == np.float32
        assert set(np.unique(s.label)) <= {0.0, 1.0}
        np.testing.assert_array_equal(s.offsets, np.arange(s.n_rows + 1))
        assert s.hist.dtype == np.int64 and s.hist.shape == (s.n_rows, 50)
        real = s.hist >= 0
        assert (real[:, :-1] >= real[:, 1:]).all(), "padding only at the end"
        assert s.hist.max() < n_items and s.cand_item.max() < n_items


def test_histories_causal_and_complete(ml: RankingData, raw: dict[str, np.ndarray]) -> None:
    events = _events(ml, raw)
    likes: dict[int, list[tuple[int, int]]] = defaultdict(list)  # user -> [(ts, movie)]
    rating = {}
    for u, m, r, t in zip(
        raw["user_id"], raw["movie_id"], raw["rating"], raw["timestamp"], strict=True
    ):
        rating[int(u), int(m)] = (int(r), int(t))
        if r >= 4:
            likes[int(u)].append((int(t), int(m)))
    rng = np.random.default_rng(0)
    checked = 0
    for name in ("train", "valid", "test"):
        split = getattr(ml, name)
        for row in rng.choice(split.n_rows, 400, replace=False):
            user, t = events[name][row]
            if user < 0:
                continue
            hist = ml.catalog.item_ids[split.hist[row][split.hist[row] >= 0]].astype(np.int64)
            for m in hist:
                r, tm = rating[user, int(m)]
                assert r >= 4 and tm < t
            expect = sorted((x for x in likes[user] if x[0] < t), reverse=True)[:50]
            assert [m for _, m in expect] == hist.tolist()
            checked += 1
    assert checked > 1000


def test_split_is_chronological_per_user(ml: RankingData, raw: dict[str, np.ndarray]) -> None:
    events = _events(ml, raw)
    times: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for name, rows in events.items():
        for u, t in rows:
            if u >= 0:
                times[u][name].append(t)
    for per in times.values():
        assert max(per["train"], default=0) <= min(per["valid"] + per["test"], default=2**62)
        assert max(per["valid"], default=0) <= min(per["test"], default=2**62)
    n_per_user = Counter(raw["user_id"].tolist())
    n_eval = sum(math.ceil(0.1 * n) for n in n_per_user.values())
    assert ml.valid.n_rows == ml.test.n_rows == n_eval


def test_fields_in_range_and_small_fields_collision_free(ml: RankingData) -> None:
    for sparse, fields in (
        (ml.train.user_sparse, ml.user_fields),
        (ml.test.user_sparse, ml.user_fields),
        (ml.catalog.sparse, ml.catalog.fields),
    ):
        assert sparse.dtype == np.int64
        for col, f in zip(sparse.T, fields, strict=True):
            assert col.min() >= 1 and col.max() < f.buckets, f.name
    users = pq.read_table(DATA_DIR / "MovieLens100k_users.parquet.brotli").to_pydict()
    ufields = np.concatenate([ml.train.user_sparse, ml.valid.user_sparse, ml.test.user_sparse])
    assert len(np.unique(ufields[:, 2])) == len(set(users["gender"]))
    assert len(np.unique(ufields[:, 3])) == len(set(users["occupation"]))
    assert len(np.unique(ml.catalog.sparse[:, 3])) == 9  # 1920s..1990s + unknown


def test_cache_hit_is_identical_and_skips_encoder(
    ml: RankingData, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(list(cache_dir.glob("*.npz"))) == 1

    def boom(*args: object) -> list[np.ndarray]:
        raise AssertionError("encoder called on a cache hit")

    monkeypatch.setattr(movielens, "_encode_titles", boom)
    again = movielens.load_movielens(DATA_DIR, cache_dir)
    np.testing.assert_array_equal(again.catalog.text, ml.catalog.text)
    np.testing.assert_array_equal(again.catalog.text_len, ml.catalog.text_len)
    np.testing.assert_array_equal(again.catalog.sparse, ml.catalog.sparse)
    for name in ("train", "valid", "test"):
        a, b = getattr(again, name), getattr(ml, name)
        for k in ("user_sparse", "hist", "cand_item", "label"):
            np.testing.assert_array_equal(getattr(a, k), getattr(b, k))


def test_changed_titles_reencode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def fake(titles: list[str], path: Path) -> list[np.ndarray]:
        calls.append(titles)
        return [np.ones((len(t.split()), 384), dtype=np.float32) for t in titles]

    monkeypatch.setattr(movielens, "_encode_titles", fake)
    text, text_len = movielens.title_tokens(["a b c", "", "d"], tmp_path)
    assert calls == [["a b c", "d"]] and text.shape == (3, 3, 384)
    assert text_len.tolist() == [3, 0, 1] and text[1].sum() == 0
    movielens.title_tokens(["a b c", "", "d"], tmp_path)
    assert len(calls) == 1
