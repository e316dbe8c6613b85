"""What a synthetic world lets a model reach, measured with its hidden truth
(``mmrank ceilings``). The models never see these attributes; the numbers say how much
of a gap to the oracle is the world's and how much is the model's.

- ``oracle_auc``: AUC of ``p_true`` on the test split (the bound; no model reaches it).
- ``latent_auc``: gradient-boosted trees trained on the train split over features built
  from the *true* latent attributes: the share of the user's history in the
  candidate's true category and style, the candidate's true quality, category, coarse
  group and the context slot, the history length and how concentrated it is. This is
  a model with perfect content understanding; it still has to infer each user's taste
  from a finite history and the effects from finite labels. A model reading noisy
  text/image features is not expected to beat it.
- ``alignment_ceiling``: planted-mismatch detection by two classifiers trained *with
  the true categories* (which ITA/TIA never get): a per-token evidence sum over the
  text tokens plus a vote of the first (title) token, and a logistic regression over
  the image patches, trained on clean items of the ITA/TIA training pool; an item is
  "aligned" when ``sum_c p_text(c) p_image(c)`` clears a threshold picked on a
  validation part of that pool. Balanced accuracy on the same held-out set as ITA/TIA
  (:func:`training.evaluate.balanced_alignment_items`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from data.world import load_world
from training.evaluate import balanced_alignment_items
from training.loop import CatalogTensors, TrainSettings

log = logging.getLogger(__name__)


def _latent_features(world: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(features (n, 10), label (n,), p_true (n,), split (n,)) per interaction row."""
    items = pq.read_table(world / "items.parquet").to_pydict()
    users = pq.read_table(world / "users.parquet").to_pydict()
    inter = pq.read_table(world / "interactions.parquet").to_pydict()
    item_row = {k: n for n, k in enumerate(items["item_id"])}
    user_row = {k: n for n, k in enumerate(users["user_id"])}
    cat = np.asarray(items["true_category"])
    style = np.asarray(items["true_style"])
    quality = np.asarray(items["true_quality"])
    coarse = np.asarray(items["coarse_category"])
    n_cat, n_style = int(cat.max()) + 1, int(style.max()) + 1
    hist = [np.array([item_row[x] for x in h], dtype=np.int64) for h in users["history"]]
    hist_len = np.array([len(h) for h in hist])
    n_hist = np.maximum(hist_len, 1)[:, None]
    cat_share = np.stack([np.bincount(cat[h], minlength=n_cat) for h in hist]) / n_hist  # (U, C)
    style_share = np.stack([np.bincount(style[h], minlength=n_style) for h in hist]) / n_hist
    u = np.array([user_row[x] for x in inter["user_id"]])
    i = np.array([item_row[x] for x in inter["item_id"]])
    x = np.c_[
        cat_share[u, cat[i]], style_share[u, style[i]], quality[i], hist_len[u],
        np.asarray(inter["slot"]), coarse[i], cat[i],
        cat_share[u].max(1), np.sort(cat_share[u], 1)[:, -3], style_share[u].max(1),
    ]  # fmt: skip
    return x, np.asarray(inter["label"]), np.asarray(inter["p_true"]), np.asarray(inter["split"])


def latent_auc(world: Path, seed: int = 0) -> dict[str, float]:
    """Test AUC of boosted trees on the true latent attributes, and the oracle's."""
    x, y, p_true, split = _latent_features(world)
    train, test = split == "train", split == "test"
    gbdt = HistGradientBoostingClassifier(
        max_iter=400, learning_rate=0.05, categorical_features=[4, 5, 6],
        early_stopping=True, random_state=seed,
    )  # fmt: skip
    gbdt.fit(x[train], y[train])
    return {
        "latent_auc": float(roc_auc_score(y[test], gbdt.predict_proba(x[test])[:, 1])),
        "oracle_auc": float(roc_auc_score(y[test], p_true[test])),
    }


class _TokenEvidence(nn.Module):
    """Category logits of a description: the sum over its tokens of a per-token MLP
    (a word votes for its category; fillers learn to vote for nothing), plus a separate
    vote of the first token (the title's product-type word, ``WorldConfig.title_rate``)."""

    def __init__(self, dim: int, n_classes: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, n_classes))
        self.title = nn.Linear(dim, n_classes)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        words = self.f(text).masked_fill(~mask[..., None], 0.0).sum(1)  # (I, C)
        return words + self.title(text[:, 0]) * mask[:, :1]  # (I, C)


def _text_classifier(text: np.ndarray, text_len: np.ndarray, labels: np.ndarray,
                     train: np.ndarray, n_classes: int, seed: int, steps: int = 1500
                     ) -> np.ndarray:  # fmt: skip
    """Category probabilities (I, C) of every item, trained on ``train`` items."""
    torch.manual_seed(seed)
    x = torch.from_numpy(text)
    mask = torch.arange(x.shape[1])[None] < torch.from_numpy(text_len)[:, None]
    y = torch.from_numpy(labels)
    model = _TokenEvidence(x.shape[2], n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    tr = torch.from_numpy(train)
    for _ in range(steps):
        b = tr[torch.randint(len(tr), (256,), generator=gen)]
        loss = F.cross_entropy(model(x[b], mask[b]), y[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.softmax(model(x, mask), dim=1).numpy()


def _balanced(agree: np.ndarray, aligned: np.ndarray, threshold: float) -> float:
    pred = agree >= threshold
    return float(((pred[aligned]).mean() + (~pred[~aligned]).mean()) / 2)


def alignment_ceiling(world: Path, seed: int = 0) -> dict[str, float]:
    """Balanced accuracy of supervised category agreement on the ITA/TIA test set."""
    data = load_world(world)
    c = data.catalog
    assert c.mismatch is not None
    true_cat = np.asarray(pq.read_table(world / "items.parquet")["true_category"].to_pylist())
    n_classes = int(true_cat.max()) + 1
    s = TrainSettings()
    ct = CatalogTensors(c, s.align_holdout, s.seed)
    pool = ct.align_pool.numpy()
    rng = np.random.default_rng(seed)
    pool = rng.permutation(pool)
    valid, fit_pool = pool[: len(pool) // 6], pool[len(pool) // 6 :]
    fit_items = fit_pool[~c.mismatch[fit_pool]]  # clean items: their true category is right
    p_text = _text_classifier(c.text, c.text_len, true_cat, fit_items, n_classes, seed)
    image = c.image.reshape(len(c.image), -1)
    lr = LogisticRegression(max_iter=3000).fit(image[fit_items], true_cat[fit_items])
    p_image = np.zeros_like(p_text)
    p_image[:, lr.classes_] = lr.predict_proba(image)
    agree = (p_text * p_image).sum(1)
    v_aligned = ~c.mismatch[valid]
    grid = np.quantile(agree[valid], np.linspace(0.01, 0.99, 99))
    threshold = float(max(grid, key=lambda t: _balanced(agree[valid], v_aligned, t)))
    test = balanced_alignment_items(c.mismatch, ct.align_test, s.seed)
    if test is None:
        raise ValueError("the world has no held-out planted-mismatch items")
    items, aligned = test
    return {
        "alignment_ceiling": _balanced(agree[items], aligned, threshold),
        "alignment_threshold": threshold,
        "alignment_test_items": float(len(items)),
        "text_category_accuracy": float(
            (p_text[items].argmax(1) == true_cat[items])[aligned].mean()
        ),
        "image_category_accuracy": float(
            (p_image[items].argmax(1) == true_cat[items])[aligned].mean()
        ),
    }


def ceilings(world: Path, seed: int = 0) -> dict[str, Any]:
    """Both ceilings of a world directory written by ``mmrank world``."""
    out: dict[str, Any] = {"world": str(world)}
    out |= latent_auc(world, seed)
    out |= alignment_ceiling(world, seed)
    log.info("ceilings of %s: %s", world, out)
    return out
