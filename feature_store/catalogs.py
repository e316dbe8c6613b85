"""Resolve a ``--data`` reference for the offline commands (embed, load, audit).

``hm`` (the H&M sample), ``movielens`` (MovieLens-100K), ``world:PATH`` or a plain
``PATH`` (a synthetic world). Returns the catalog and, where the data has users, the
user table a store version holds: ids, hashed profile fields (context fields as in the
user's latest request) and history item ids, newest first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data.dataset import Catalog, RankingData

Users = tuple[list[str], np.ndarray, list[list[str]]]


def _users(data: RankingData, user_ids: np.ndarray) -> Users:
    """Each user's latest row (test, else valid, else train): fields + history."""
    latest: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for split in (data.train, data.valid, data.test):
        assert split.row_user is not None, "user tables need row_user"
        for r, u in enumerate(split.row_user.tolist()):
            latest[u] = (split.user_sparse[r], split.hist[r])
    ids = data.catalog.item_ids.astype(str)
    keys = sorted(latest)
    fields = np.stack([latest[u][0] for u in keys]).astype(np.int64)
    hists = [[str(ids[i]) for i in latest[u][1] if i >= 0] for u in keys]
    return [str(user_ids[u]) for u in keys], fields, hists


def resolve(ref: str, cache_dir: Path | None = None) -> tuple[str, Catalog, Users | None]:
    """(canonical data name, catalog, users or None); FileNotFoundError for a bad ref."""
    from training.datasets import DEFAULT_CACHE, DEFAULT_MOVIELENS

    cache = cache_dir or DEFAULT_CACHE
    if ref == "hm":
        from data.hm import load_hm_catalog

        return "hm", load_hm_catalog(cache_dir=cache), None
    if ref == "movielens":
        from data.movielens import load_movielens

        if not DEFAULT_MOVIELENS.is_dir():
            raise FileNotFoundError(f"MovieLens-100K not found at {DEFAULT_MOVIELENS}")
        data = load_movielens(DEFAULT_MOVIELENS, cache)
        uid = np.arange(int(max(s.row_user.max() for s in (data.train, data.valid, data.test)  # type: ignore[union-attr]
                                )) + 1).astype(str)  # fmt: skip
        return "movielens", data.catalog, _users(data, uid)
    path = Path(ref.removeprefix("world:"))
    if not (path / "interactions.parquet").is_file():
        raise FileNotFoundError(f"--data {ref!r}: not hm, movielens, or a world directory")
    from data.world import load_world

    data = load_world(path)
    uid = np.asarray(
        pq.read_table(path / "users.parquet", columns=["user_id"])["user_id"].to_pylist()
    )
    return f"world:{path}", data.catalog, _users(data, uid)
