"""Ranker tensors as pure functions (numpy only): history padding to length buckets
and the assembly of one batch from pieces of several requests (DESIGN section 3).

A *piece* is a contiguous slice of one request's candidates; a batch holds at most one
piece per request, so each piece gets its own user row and ``cand_user`` points its
candidates at it. Padding never changes a score: padded history positions carry zero
embeddings, field id 0 and ``hist_mask`` false (the export tests check the invariance).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``n`` (``buckets`` sorted ascending, the last one the
    longest history a request may carry)."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"history of {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


def pad_history(inputs: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """``inputs`` with the history axis padded (or cut) to ``n`` positions."""
    out = dict(inputs)
    u, cur = inputs["hist_mask"].shape  # (U, N)
    if cur == n:
        return out
    keep = min(cur, n)
    for name in ("hist_emb", "hist_sparse", "hist_mask"):
        a = inputs[name]
        padded = np.zeros((u, n, *a.shape[2:]), dtype=a.dtype)
        padded[:, :keep] = a[:, :keep]
        out[name] = padded
    return out


@dataclass
class UserSide:
    """One request's user row: hashed user/context fields and its real history."""

    user_sparse: np.ndarray  # (Fu,) int64
    hist_emb: np.ndarray  # (n, Q, D) float32, n real items
    hist_sparse: np.ndarray  # (n, Fi) int64


@dataclass
class Piece:
    """Candidates ``start:stop`` of one request."""

    user: UserSide
    cand_emb: np.ndarray  # (K, Q, D) float32, the whole request
    cand_sparse: np.ndarray  # (K, Fi) int64
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def assemble(pieces: Sequence[Piece], buckets: Sequence[int]) -> dict[str, np.ndarray]:
    """The seven ranker inputs of a batch: U = len(pieces) user rows, histories
    padded to the bucket of the longest one, B = total rows."""
    assert pieces, "a batch has at least one piece"
    u = len(pieces)
    first = pieces[0]
    q, d = first.cand_emb.shape[1:]
    fi = first.cand_sparse.shape[1]
    n = bucket_for(max(len(p.user.hist_emb) for p in pieces), buckets)
    user_sparse = np.stack([p.user.user_sparse for p in pieces]).astype(np.int64)  # (U, Fu)
    hist_emb = np.zeros((u, n, q, d), np.float32)  # (U, N, Q, D)
    hist_sparse = np.zeros((u, n, fi), np.int64)  # (U, N, Fi)
    hist_mask = np.zeros((u, n), bool)  # (U, N)
    for r, p in enumerate(pieces):
        h = len(p.user.hist_emb)
        hist_emb[r, :h] = p.user.hist_emb
        hist_sparse[r, :h] = p.user.hist_sparse
        hist_mask[r, :h] = True
    rows = [p.rows for p in pieces]
    cand_emb = np.concatenate([p.cand_emb[p.start : p.stop] for p in pieces])  # (B, Q, D)
    cand_sparse = np.concatenate([p.cand_sparse[p.start : p.stop] for p in pieces])  # (B, Fi)
    cand_user = np.repeat(np.arange(u, dtype=np.int64), rows)  # (B,)
    return {
        "user_sparse": user_sparse,
        "hist_emb": hist_emb,
        "hist_sparse": hist_sparse,
        "hist_mask": hist_mask,
        "cand_emb": np.ascontiguousarray(cand_emb, dtype=np.float32),
        "cand_sparse": np.ascontiguousarray(cand_sparse, dtype=np.int64),
        "cand_user": cand_user,
    }
