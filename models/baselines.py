"""Content-blind baselines trained on the same splits: logistic regression over the
categorical fields, a DIN-style model and a BST-style model over ID/field embeddings.

They take the DESIGN section 3 tensors like the real rankers and ignore the content
embeddings (``hist_emb``, ``cand_emb``), so the comparison measures what content adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.common import Block, FieldEmbedding, init_embeddings, mlp

BASELINES = ("lr", "din", "bst")


@dataclass
class BaselineConfig:
    kind: str = "lr"  # lr | din | bst
    user_buckets: list[int] = field(default_factory=list)
    item_buckets: list[int] = field(default_factory=list)
    field_dim: int = 16
    d_model: int = 64  # BST transformer width
    n_head: int = 8  # BST: 8 heads as in the paper
    max_hist: int = 64
    hidden: list[int] = field(default_factory=lambda: [200, 80])  # DIN/BST MLP
    dropout: float = 0.1


class LogisticRegression(nn.Module):
    """logit = bias + sum of one weight per (field, bucket) over user and item fields."""

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        self.user_w = FieldEmbedding(cfg.user_buckets, 1)
        self.item_w = FieldEmbedding(cfg.item_buckets, 1)
        nn.init.zeros_(self.user_w.table.weight)
        nn.init.zeros_(self.item_w.table.weight)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(
        self,
        user_sparse: Tensor,
        hist_emb: Tensor,
        hist_sparse: Tensor,
        hist_mask: Tensor,
        cand_emb: Tensor,
        cand_sparse: Tensor,
        cand_user: Tensor,
    ) -> Tensor:
        return (
            self.bias
            + self.user_w(user_sparse).sum((1, 2))[cand_user]
            + self.item_w(cand_sparse).sum((1, 2))
        )


class DIN(nn.Module):
    """Deep Interest Network: an activation unit weighs each history item's ID
    embedding by its relevance to the candidate; MLP over user, candidate, interest."""

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        e = len(cfg.item_buckets) * cfg.field_dim
        self.user_fields = FieldEmbedding(cfg.user_buckets, cfg.field_dim)
        self.item_fields = FieldEmbedding(cfg.item_buckets, cfg.field_dim)
        self.unit = nn.Sequential(nn.Linear(4 * e, 36), nn.Sigmoid(), nn.Linear(36, 1))
        self.mlp = mlp(len(cfg.user_buckets) * cfg.field_dim + 2 * e, cfg.hidden, cfg.dropout)

    def forward(
        self,
        user_sparse: Tensor,
        hist_emb: Tensor,
        hist_sparse: Tensor,
        hist_mask: Tensor,
        cand_emb: Tensor,
        cand_sparse: Tensor,
        cand_user: Tensor,
    ) -> Tensor:
        c = self.item_fields(cand_sparse).flatten(-2)  # (B, e)
        h = self.item_fields(hist_sparse).flatten(-2)[cand_user]  # (B, N, e)
        q = c[:, None, :].expand_as(h)
        w = self.unit(torch.cat([q, h, q - h, q * h], -1))[..., 0]  # (B, N)
        w = w * hist_mask[cand_user]  # DIN: no softmax, padded positions weigh 0
        interest = (w[..., None] * h).sum(1)  # (B, e)
        user = self.user_fields(user_sparse).flatten(-2)[cand_user]
        return self.mlp(torch.cat([user, c, interest], -1))[:, 0]


class BST(nn.Module):
    """Behaviour Sequence Transformer: one transformer block over the history items
    and the target item (ID embeddings + position), then an MLP with the other fields."""

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        e = len(cfg.item_buckets) * cfg.field_dim
        self.user_fields = FieldEmbedding(cfg.user_buckets, cfg.field_dim)
        self.item_fields = FieldEmbedding(cfg.item_buckets, cfg.field_dim)
        self.item_in = nn.Linear(e, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_hist + 1, cfg.d_model)
        self.block = Block(cfg.d_model, cfg.n_head, cfg.dropout)
        d_in = len(cfg.user_buckets) * cfg.field_dim + 2 * cfg.d_model
        self.mlp = mlp(d_in, cfg.hidden, cfg.dropout)

    def forward(
        self,
        user_sparse: Tensor,
        hist_emb: Tensor,
        hist_sparse: Tensor,
        hist_mask: Tensor,
        cand_emb: Tensor,
        cand_sparse: Tensor,
        cand_user: Tensor,
    ) -> Tensor:
        n = hist_mask.shape[1]
        h = self.item_in(self.item_fields(hist_sparse).flatten(-2))  # (U, N, d)
        c = self.item_in(self.item_fields(cand_sparse).flatten(-2))  # (B, d)
        x = torch.cat([h[cand_user], c[:, None]], 1) + self.pos.weight[: n + 1]  # (B, N+1, d)
        m = torch.cat([hist_mask[cand_user], hist_mask.new_ones((len(cand_user), 1))], 1)
        y = self.block(x, m)
        pooled = (y * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # (B, d)
        user = self.user_fields(user_sparse).flatten(-2)[cand_user]
        return self.mlp(torch.cat([user, pooled, F.layer_norm(c, c.shape[-1:])], -1))[:, 0]


class Baseline(nn.Module):
    """A baseline as a model: no item tower, ``ranker`` takes the DESIGN tensors."""

    tower = None

    def __init__(self, cfg: BaselineConfig) -> None:
        super().__init__()
        kinds = {"lr": LogisticRegression, "din": DIN, "bst": BST}
        if cfg.kind not in kinds:
            raise ValueError(f"unknown baseline {cfg.kind!r}; expected one of {BASELINES}")
        self.cfg = cfg
        self.ranker = kinds[cfg.kind](cfg)
        if cfg.kind != "lr":  # LR's weights start at zero
            init_embeddings(self)
