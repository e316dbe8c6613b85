"""The in-memory form every dataset is turned into before training.

A dataset is a catalog of items (content tokens + hashed categorical fields) and
three splits. A split is a list of *rows* (one request: a user in a context, with a
history) and the candidate items shown in each row, with labels. This is exactly the
shape of DESIGN section 3 (U user rows, B candidate rows pointing at their row), so a
training batch is a slice of rows and needs no reshaping.

Conventions:
- histories are stored most recent first, padded with -1 (``hist[r, :n]`` is real);
- categorical fields are already hashed (:mod:`mmrank.features`), 0 = absent;
- a missing modality is a mask (``text_len == 0``, ``has_image == False``), and its
  feature rows are zero but never read as data by the models.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FieldSpec:
    """One hashed categorical field: its name and its number of buckets."""

    name: str
    buckets: int


@dataclass
class Catalog:
    """All items of a dataset; row i of every array is item i."""

    item_ids: np.ndarray  # (I,) str
    text: np.ndarray  # (I, Lt, Dt) float32 text-token content embeddings
    text_len: np.ndarray  # (I,) int64, 0 = no text
    image: np.ndarray  # (I, P, Di) float32 image-patch content embeddings
    has_image: np.ndarray  # (I,) bool
    sparse: np.ndarray  # (I, Fi) int64 hashed item fields
    fields: tuple[FieldSpec, ...]
    mismatch: np.ndarray | None = None  # (I,) bool, planted text/image mismatch (synthetic)
    # a field whose values name the kind of product (world: coarse category; H&M: product
    # type); hard ITA/TIA negatives swap in content from items of another kind
    kind_field: str | None = None

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("text", "text_len", "image", "has_image", "sparse"):
            arr = getattr(self, name)
            assert len(arr) == n, f"catalog.{name} has {len(arr)} rows, expected {n}"
        assert self.sparse.shape[1] == len(self.fields), "one sparse column per item field"
        assert self.kind_field is None or self.kind_field in [f.name for f in self.fields]

    @property
    def text_dim(self) -> int:
        return int(self.text.shape[2])

    @property
    def image_dim(self) -> int:
        return int(self.image.shape[2])


@dataclass
class Split:
    """Rows (requests) and their candidates; candidates of row r are
    ``cand_item[offsets[r]:offsets[r + 1]]``."""

    user_sparse: np.ndarray  # (R, Fu) int64 hashed user + context fields
    hist: np.ndarray  # (R, Nmax) int64 item index, most recent first, -1 = padding
    offsets: np.ndarray  # (R + 1,) int64
    cand_item: np.ndarray  # (B,) int64 item index
    label: np.ndarray  # (B,) float32 in {0, 1}
    p_true: np.ndarray | None = None  # (B,) float32 true conversion probability
    # (R,) int64 user of each row, so that batches can keep a user's rows together
    row_user: np.ndarray | None = None

    def __post_init__(self) -> None:
        r = len(self.user_sparse)
        assert self.hist.shape[0] == r, "one history per row"
        assert self.offsets.shape == (r + 1,) and self.offsets[0] == 0, "offsets must be (R+1,)"
        assert self.offsets[-1] == len(self.cand_item) == len(self.label), "offsets cover labels"

    @property
    def n_rows(self) -> int:
        return len(self.user_sparse)

    @property
    def cand_row(self) -> np.ndarray:
        """(B,) row index of every candidate."""
        return np.repeat(np.arange(self.n_rows), np.diff(self.offsets))


@dataclass
class RankingData:
    name: str
    catalog: Catalog
    user_fields: tuple[FieldSpec, ...]
    train: Split
    valid: Split
    test: Split
    has_oracle: bool = False


@dataclass
class Batch:
    """A slice of rows in DESIGN section 3 form, as numpy, plus the unique items it
    touches (so an item tower runs once per item per step).

    ``hist_pos`` / ``cand_pos`` index into ``items``; padded history positions point
    at 0 and are masked by ``hist_mask``.
    """

    items: np.ndarray  # (I_b,) int64 catalog index of each unique item
    user_sparse: np.ndarray  # (U, Fu)
    hist_pos: np.ndarray  # (U, N) int64 into items
    hist_mask: np.ndarray  # (U, N) bool
    cand_pos: np.ndarray  # (B,) int64 into items
    cand_user: np.ndarray  # (B,) int64 into rows of this batch
    label: np.ndarray  # (B,) float32
    p_true: np.ndarray | None


def make_batch(split: Split, rows: np.ndarray, max_hist: int) -> Batch:
    """Gather ``rows`` of ``split``; histories truncated to the ``max_hist`` most recent
    items and trimmed to the longest history in the batch (at least 1 column)."""
    rows = np.asarray(rows, dtype=np.int64)
    hist = split.hist[rows, :max_hist]  # (U, N)
    n = max(1, int((hist >= 0).sum(axis=1).max(initial=0)))
    hist = hist[:, :n]
    starts, ends = split.offsets[rows], split.offsets[rows + 1]
    counts = ends - starts
    cand_idx = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    cand_item = split.cand_item[cand_idx]
    mask = hist >= 0
    items, inverse = np.unique(np.concatenate([hist[mask], cand_item]), return_inverse=True)
    hist_pos = np.zeros(hist.shape, dtype=np.int64)
    hist_pos[mask] = inverse[: int(mask.sum())]
    return Batch(
        items=items,
        user_sparse=split.user_sparse[rows],
        hist_pos=hist_pos,
        hist_mask=mask,
        cand_pos=inverse[int(mask.sum()) :],
        cand_user=np.repeat(np.arange(len(rows)), counts),
        label=split.label[cand_idx],
        p_true=None if split.p_true is None else split.p_true[cand_idx],
    )


def iter_batches(
    split: Split,
    cands_per_batch: int,
    max_hist: int,
    rng: np.random.Generator | None = None,
) -> Iterator[Batch]:
    """Yield batches of whole rows holding about ``cands_per_batch`` candidates each.

    Every row appears exactly once; with ``rng`` the row order is shuffled, without
    it the order is the split's (deterministic evaluation). When the split knows each
    row's user, a user's rows stay adjacent (users are shuffled, then their rows), so a
    batch shares history items and the item tower encodes fewer distinct items."""
    if rng is None:
        order = np.arange(split.n_rows)
    elif split.row_user is None:
        order = rng.permutation(split.n_rows)
    else:
        user_rank = rng.permutation(int(split.row_user.max()) + 1)[split.row_user]
        order = np.lexsort((rng.random(split.n_rows), user_rank))
    counts = np.diff(split.offsets)[order]
    cum = np.cumsum(counts)
    # cut wherever the running candidate count crosses a multiple of cands_per_batch
    cut = np.flatnonzero(np.diff(cum // cands_per_batch, prepend=0)) + 1
    for chunk in np.split(order, cut[cut < len(order)]):
        if len(chunk):
            yield make_batch(split, chunk, max_hist)
