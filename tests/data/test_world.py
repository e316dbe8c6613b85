"""The synthetic world: ground truth is consistent and its oracle is the AUC of p_true."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from data.dataset import iter_batches
from data.world import WorldConfig, generate, load_world


def test_world_files_and_columns(tiny_world: Path) -> None:
    inter = pq.read_table(tiny_world / "interactions.parquet")
    for col in ("user_id", "item_id", "label", "p_true", "split", "request_id"):
        assert col in inter.column_names
    assert set(inter["split"].to_pylist()) == {"train", "valid", "test"}
    assert isinstance(inter["item_id"][0].as_py(), str)
    items = pq.read_table(tiny_world / "items.parquet")
    assert {"item_id", "text", "image", "true_mismatch"} <= set(items.column_names)


def test_labels_are_drawn_from_p_true(tiny_world: Path) -> None:
    t = pq.read_table(tiny_world / "interactions.parquet").to_pydict()
    label, p = np.asarray(t["label"]), np.asarray(t["p_true"])
    assert ((p > 0) & (p < 1)).all()
    # Bernoulli: observed rate within 4 standard errors of the expected rate, per p decile
    for lo, hi in zip(
        np.quantile(p, np.linspace(0, 0.9, 10)),
        np.quantile(p, np.linspace(0.1, 1, 10)),
        strict=True,
    ):
        sel = (p >= lo) & (p <= hi)
        se = np.sqrt((p[sel] * (1 - p[sel])).sum()) / sel.sum()
        assert abs(label[sel].mean() - p[sel].mean()) < 4 * se + 1e-3


def test_oracle_auc_is_auc_of_p_true(tiny_world: Path) -> None:
    data = load_world(tiny_world)
    t = pq.read_table(tiny_world / "interactions.parquet").to_pydict()
    split = np.asarray(t["split"])
    expected = roc_auc_score(
        np.asarray(t["label"])[split == "test"], np.asarray(t["p_true"])[split == "test"]
    )
    assert data.test.p_true is not None
    assert abs(roc_auc_score(data.test.label, data.test.p_true) - expected) < 1e-12


def test_default_world_is_realistic_not_easy() -> None:
    """Default settings: oracle AUC in [0.75, 0.85], a CVR-like positive rate, and the
    planted mismatch share as configured."""
    cfg = WorldConfig(seed=3)
    tables = generate(cfg)
    t = tables["interactions"].to_pydict()
    oracle = roc_auc_score(t["label"], t["p_true"])
    assert 0.75 <= oracle <= 0.85, oracle
    assert 0.05 < np.mean(t["label"]) < 0.3
    mismatch = np.asarray(tables["items"]["true_mismatch"].to_pylist())
    assert abs((mismatch != "none").mean() - cfg.mismatch_rate) < 0.03


def test_planted_mismatch_is_really_another_category(tiny_world: Path) -> None:
    """A clean item's text points at its own category far above chance (1/16); a
    text-mismatched item's text does not."""
    data = load_world(tiny_world)
    items = pq.read_table(tiny_world / "items.parquet").to_pydict()
    cat = np.asarray(items["true_category"])
    kind = np.asarray(items["true_mismatch"])
    cata = data.catalog
    mean_tok = cata.text.sum(1) / np.maximum(cata.text_len, 1)[:, None]
    present = [c for c in range(16) if ((cat == c) & (kind == "none")).any()]
    centroids = np.stack([mean_tok[(cat == c) & (kind == "none")].mean(0) for c in present])
    nearest = np.asarray(present)[
        np.argmin(((mean_tok[:, None] - centroids[None]) ** 2).sum(-1), 1)
    ]
    clean, bad = kind == "none", kind == "text"
    clean_hit, bad_hit = (nearest[clean] == cat[clean]).mean(), (nearest[bad] == cat[bad]).mean()
    assert clean_hit > 0.4, clean_hit
    assert bad_hit < clean_hit / 3, (bad_hit, clean_hit)


def test_batches_cover_every_candidate_once(tiny_world: Path) -> None:
    data = load_world(tiny_world, max_hist=50)
    seen = []
    for b in iter_batches(data.train, 256, 50, np.random.default_rng(0)):
        items = b.items
        assert (np.diff(items) > 0).all(), "unique, sorted"
        seen.append(np.sort(items[b.cand_pos]))
        assert b.hist_mask.shape == b.hist_pos.shape
        assert b.cand_user.max() < len(b.user_sparse)
    assert sum(len(s) for s in seen) == len(data.train.label)


def test_histories_are_most_recent_first_and_padded(tiny_world: Path) -> None:
    data = load_world(tiny_world, max_hist=50)
    users = pq.read_table(tiny_world / "users.parquet").to_pydict()
    index = {iid: k for k, iid in enumerate(data.catalog.item_ids)}
    hist = data.train.hist
    real = (hist >= 0).sum(1)
    assert (hist[real[:, None] <= np.arange(hist.shape[1])] == -1).all(), "padding after real"
    assert data.train.row_user is not None
    u = int(data.train.row_user[0])  # the user of train row 0, and all of that user's rows
    want = [index[x] for x in users["history"][u]][::-1]  # stored oldest first
    for r in np.flatnonzero(data.train.row_user == u):
        assert real[r] == len(want) and (hist[r, : len(want)] == want).all()


def test_titles_change_only_the_text() -> None:
    """``title_rate`` draws from its own stream: the same seed gives the same users,
    interactions (labels, ``p_true``, splits) and images with or without titles; with
    them, a description's first token names the item's category (nearest centre of the
    clean items' first tokens) far more often than without."""
    small = WorldConfig(n_users=300, n_items=400, requests_per_user=2.0, cands_per_request=8)
    plain = generate(dataclasses.replace(small, title_rate=0.0))
    titled = generate(small)
    for name in ("users", "interactions"):
        assert plain[name].equals(titled[name])
    assert plain["items"].drop(["text"]).equals(titled["items"].drop(["text"]))

    def first_token_hits(tables: dict[str, pa.Table]) -> float:
        items = tables["items"].to_pydict()
        has = np.asarray(items["text_len"]) > 0
        first = np.stack([np.asarray(t[:32], dtype=np.float32) for t in items["text"]])[has]
        cat = np.asarray(items["true_category"])[has]
        clean = (np.asarray(items["true_mismatch"]) == "none")[has]
        present = [c for c in range(16) if (clean & (cat == c)).any()]
        centres = np.stack([first[clean & (cat == c)].mean(0) for c in present])
        nearest = np.asarray(present)[np.argmin(((first[:, None] - centres[None]) ** 2).sum(-1), 1)]
        return float((nearest[clean] == cat[clean]).mean())

    with_titles, without = first_token_hits(titled), first_token_hits(plain)
    assert with_titles > 0.9 and without < with_titles - 0.3, (with_titles, without)
