"""EM3 (Deng et al. 2024): a Fusion-Q-Former item tower trained end to end with the
ranking model, split at the item boundary for serving (DESIGN section 2).

Item tower (FQ-Former): ``[Q learnable queries, image patches, text tokens]`` with
self-attention over the whole sequence; the first Q outputs are the item's
fixed-length multimodal embedding (I, Q, D). Missing modalities are masked.

Ranker: multi-head target attention from the candidate to the history items, each
read as its content embedding and its ID embeddings, the q/k/v projections adapted
with LoRA (train them fully on short histories, then freeze them and train only the
low-rank matrices on long ones: :meth:`EM3.set_lora_stage`); a DNN over ID,
context and interest features. A learned "null" history slot is always attended, so
an empty history (N = 0) is well defined.

Content-ID contrastive (CIC) loss: item ID embeddings and content embeddings are
projected to one space; the same item is the positive pair, the other items of the
batch the negatives (InfoNCE both ways, temperature ``cic_temperature``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.common import (
    MASKED_MAX_USERS,
    Block,
    ContentIdContrast,
    FieldEmbedding,
    HistoryKernels,
    LoRALinear,
    attend,
    content_tokens,
    init_embeddings,
    masked_mean,
    mlp,
    own_keys,
)


@dataclass
class EM3Config:
    text_dim: int = 32  # input text-token width
    image_dim: int = 32  # input image-patch width
    max_text_len: int = 50
    n_patches: int = 9
    n_query: int = 2  # paper: Q = 2 learnable queries
    d_model: int = 64  # FQ-Former width; item embedding D
    n_head: int = 4  # paper: 4 heads
    tower_layers: int = 1  # paper: 1 layer
    user_buckets: list[int] = field(default_factory=list)
    item_buckets: list[int] = field(default_factory=list)
    field_dim: int = 16  # per-field ID embedding width
    att_dim: int = 64  # target-attention width
    att_heads: int = 4
    lora_rank: int = 4  # low rank of the long-sequence adaptation
    lora_alpha: float = 8.0
    cic_dim: int = 32  # shared ID/content space of the CIC loss
    cic_weight: float = 0.1  # paper: 0.1
    cic_temperature: float = 0.1  # paper: 0.1
    dnn_hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.1
    # the item embedding adds the masked means of the projected image patches and text
    # tokens to each query output before the final LayerNorm (as CameNN's tower does;
    # see camenn.py)
    pooled_residual: bool = True
    # soft counts of history items similar to the candidate (models.common.HistoryKernels)
    # fed to the DNN; 0 = none. Measured (1 + 2 LoRA epochs): test AUC 0.7877 without,
    # 0.7953 with 11 kernels
    history_kernels: int = 11
    # projections the kernels measure similarity in, each with its own K shares
    # (HistoryKernels ``views``: one can follow category, another style); 1 = one cosine
    # (runs trained before it). Measured (world seed 0, 8 epochs, weight averaging 0.995;
    # test AUC): 1 view 0.8088, 3 views 0.8109, 6 views 0.8097 (run-to-run spread ~0.005)
    kernel_views: int = 3
    # target attention reads each item as [content embedding, ID embeddings] (queries,
    # keys and values), so the history can match the candidate by what co-occurs in
    # interactions as well as by content; False = content only. Measured (test AUC):
    # world (8 epochs) 0.8003 -> 0.8054; MovieLens (14 epochs) 0.7841 -> 0.7842
    attend_ids: bool = True
    # a learned recency embedding (0 = the most recent history item; histories come newest
    # first) added to the target attention's keys and values, as BST's position embedding
    # and CameNN's ``hist_pos``: without it the attention cannot tell a last purchase from
    # one long ago. False = none (runs trained before it). Measured (test AUC, seed 0):
    # MovieLens (20 epochs) 0.7820 -> 0.7852, within its run-to-run noise (~0.01); the
    # world (8 epochs; random history order) 0.8021 -> 0.8042
    recency: bool = True
    max_hist: int = 64  # history positions with a recency embedding

    @property
    def history_limit(self) -> int | None:
        """The longest history the ranker accepts (a position embedding's length);
        None: any."""
        return self.max_hist if self.recency else None

    @property
    def q(self) -> int:
        return self.n_query

    @property
    def d(self) -> int:
        return self.d_model


class FQFormer(nn.Module):
    """Item content -> item embedding (I, Q, D)."""

    def __init__(self, cfg: EM3Config) -> None:
        super().__init__()
        d = cfg.d_model
        self.queries = nn.Parameter(torch.randn(cfg.n_query, d) * 0.02)
        self.text_in = nn.Linear(cfg.text_dim, d)
        self.image_in = nn.Linear(cfg.image_dim, d)
        self.pos = nn.Embedding(cfg.n_query + cfg.n_patches + cfg.max_text_len, d)
        self.kind = nn.Embedding(3, d)  # 0 query, 1 image, 2 text
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.tower_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.n_query = cfg.n_query
        self.pooled_residual = cfg.pooled_residual

    def forward(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        image: torch.Tensor,
        has_image: torch.Tensor,
    ) -> torch.Tensor:
        n, lt, _ = text.shape  # (I, Lt, Dt)
        p, q = image.shape[1], self.n_query
        text_mask, image_mask = content_tokens(text, text_len, image, has_image)
        i_in, t_in = self.image_in(image), self.text_in(text)  # (I, P, d), (I, Lt, d)
        x = torch.cat(
            [
                self.queries.expand(n, -1, -1) + self.kind.weight[0],  # (I, Q, d)
                i_in + self.kind.weight[1],
                t_in + self.kind.weight[2],
            ],
            dim=1,
        )
        x = x + self.pos(torch.arange(q + p + lt, device=x.device))  # (I, T, d)
        mask = torch.cat([text_mask.new_ones((n, q)), image_mask, text_mask], 1)
        for block in self.blocks:
            x = block(x, mask)
        out = x[:, :q]  # (I, Q, d)
        if self.pooled_residual:  # each modality's mean, whatever its token count
            pooled = masked_mean(i_in, image_mask) + masked_mean(t_in, text_mask)  # (I, d)
            out = out + pooled[:, None, :]
        return self.ln_f(out)  # (I, Q, D)


class EM3Ranker(nn.Module):
    """DESIGN section 3 tensors -> CVR logit (B,); a candidate's output depends only on
    its own user row and its own features."""

    def __init__(self, cfg: EM3Config) -> None:
        super().__init__()
        self.cfg = cfg
        qd, a, fi = cfg.q * cfg.d, cfg.att_dim, len(cfg.item_buckets)
        self.user_fields = FieldEmbedding(cfg.user_buckets, cfg.field_dim)
        self.item_fields = FieldEmbedding(cfg.item_buckets, cfg.field_dim)
        att_in = qd + (fi * cfg.field_dim if cfg.attend_ids else 0)
        self.att_q = LoRALinear(att_in, a, cfg.lora_rank, cfg.lora_alpha)
        self.att_k = LoRALinear(att_in, a, cfg.lora_rank, cfg.lora_alpha)
        self.att_v = LoRALinear(att_in, a, cfg.lora_rank, cfg.lora_alpha)
        self.null_k = nn.Parameter(torch.zeros(a))  # the always-present empty-history slot
        self.null_v = nn.Parameter(torch.zeros(a))
        self.null_id = nn.Parameter(torch.zeros(fi * cfg.field_dim))
        self.recency_k = nn.Embedding(cfg.max_hist, a) if cfg.recency else None
        self.recency_v = nn.Embedding(cfg.max_hist, a) if cfg.recency else None
        d_in = len(cfg.user_buckets) * cfg.field_dim + 2 * fi * cfg.field_dim + qd + 2 * a
        self.kernels = (HistoryKernels(qd, n_kernels=cfg.history_kernels, views=cfg.kernel_views)
                        if cfg.history_kernels else None)  # fmt: skip
        d_in += self.kernels.out_features if self.kernels else 0
        self.dnn = mlp(d_in, cfg.dnn_hidden, cfg.dropout)

    def lora_modules(self) -> list[LoRALinear]:
        return [self.att_q, self.att_k, self.att_v]

    def forward(
        self,
        user_sparse: torch.Tensor,  # (U, Fu)
        hist_emb: torch.Tensor,  # (U, N, Q, D)
        hist_sparse: torch.Tensor,  # (U, N, Fi)
        hist_mask: torch.Tensor,  # (U, N) bool
        cand_emb: torch.Tensor,  # (B, Q, D)
        cand_sparse: torch.Tensor,  # (B, Fi)
        cand_user: torch.Tensor,  # (B,)
    ) -> torch.Tensor:
        b, h = cand_user.shape[0], self.cfg.att_heads
        u = hist_mask.shape[0]
        a = self.cfg.att_dim
        hist_ids = self.item_fields(hist_sparse).flatten(-2)  # (U, N, Fi*f)
        cand_ids = self.item_fields(cand_sparse).flatten(-2)  # (B, Fi*f)
        cand_flat = cand_emb.flatten(-2)  # (B, Q*D)
        hist_in, cand_in = hist_emb.flatten(-2), cand_flat  # (U, N, Q*D), (B, Q*D)
        if self.cfg.attend_ids:
            hist_in = torch.cat([hist_in, hist_ids], -1)  # (U, N, Q*D + Fi*f)
            cand_in = torch.cat([cand_in, cand_ids], -1)  # (B, Q*D + Fi*f)
        hk, hv = self.att_k(hist_in), self.att_v(hist_in)  # (U, N, a)
        if self.recency_k is not None and self.recency_v is not None:
            n = hist_mask.shape[1]
            assert n <= self.cfg.max_hist, f"history length {n} > max_hist {self.cfg.max_hist}"
            hk = hk + self.recency_k.weight[:n]  # position j = the j-th most recent item
            hv = hv + self.recency_v.weight[:n]
        k = torch.cat([self.null_k.expand(u, 1, a), hk], 1)  # (U, N+1, a)
        v = torch.cat([self.null_v.expand(u, 1, a), hv], 1)
        ids = torch.cat([self.null_id.expand(u, 1, -1), hist_ids], 1)  # (U, N+1, Fi*f)
        mask = torch.cat([hist_mask.new_ones((u, 1)), hist_mask], 1)  # (U, N+1)
        cand_q = self.att_q(cand_in)  # (B, a)
        if torch.compiler.is_exporting() or u <= MASKED_MAX_USERS:
            interest, id_interest = self._attend_masked(cand_q, k, v, ids, mask, cand_user)
        else:  # every candidate gets a copy of its user row's keys, values and ids
            q = cand_q.view(b, h, 1, a // h)  # (B, h, 1, a/h)
            kb = k[cand_user].view(b, -1, h, a // h).transpose(1, 2)  # (B, h, N+1, a/h)
            vb = v[cand_user].view(b, -1, h, a // h).transpose(1, 2)
            interest = attend(q, kb, vb, mask[cand_user]).reshape(b, a)  # (B, a)
            # the same attention, head-averaged, pools the history's ID embeddings
            scores = (q @ kb.transpose(-2, -1)).mean(1)[:, 0] / (a // h) ** 0.5  # (B, N+1)
            scores = scores.masked_fill(~mask[cand_user], torch.finfo(scores.dtype).min)
            id_interest = (F.softmax(scores, -1)[:, :, None] * ids[cand_user]).sum(1)
        parts = [
            self.user_fields(user_sparse).flatten(-2)[cand_user],  # (B, Fu*f) user + context
            cand_ids,  # (B, Fi*f) candidate ids
            cand_flat,
            interest,
            id_interest,
            interest * cand_q,  # (B, a) match feature
        ]
        if self.kernels is not None:  # (B, K) shares of the history like the candidate
            parts.append(self.kernels(hist_emb.flatten(-2), hist_mask, cand_flat, cand_user))
        x = torch.cat(parts, dim=-1)
        return self.dnn(x)[:, 0]  # (B,)

    def _attend_masked(self, cand_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       ids: torch.Tensor, mask: torch.Tensor, cand_user: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The target attention and its ID pooling without per-candidate copies: every
        candidate's query meets the keys of every user row in one product per head and
        the other rows are masked out (softmax weight exactly 0), as
        :func:`models.common.attend_own_user` does for CameNN. cand_q (B, a), k/v
        (U, S, a), ids (U, S, F), mask (U, S) -> interest (B, a), id interest (B, F)."""
        b, (u, s, a), h = cand_q.shape[0], k.shape, self.cfg.att_heads
        hs = a // h
        q = cand_q.view(b, h, hs).transpose(0, 1)  # (h, B, hs)
        kf = k.view(u, s, h, hs).permute(2, 0, 1, 3).reshape(h, u * s, hs)  # (h, U*S, hs)
        vf = v.view(u, s, h, hs).permute(2, 0, 1, 3).reshape(h, u * s, hs)
        raw = q @ kf.transpose(1, 2)  # (h, B, U*S)
        own = own_keys(mask, cand_user)  # (B, U*S)
        low = torch.finfo(raw.dtype).min
        att = (raw * (1.0 / math.sqrt(hs))).masked_fill(~own[None], low)
        interest = (F.softmax(att, dim=-1) @ vf).transpose(0, 1).reshape(b, a)  # (B, a)
        scores = (raw.mean(0) / hs**0.5).masked_fill(~own, low)  # (B, U*S) head-averaged
        id_interest = F.softmax(scores, -1) @ ids.reshape(u * s, -1)  # (B, F)
        return interest, id_interest


class EM3(ContentIdContrast):
    """FQ-Former + ranker, trained end to end (CVR + CIC)."""

    cfg: EM3Config

    def __init__(self, cfg: EM3Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = FQFormer(cfg)
        self.ranker = EM3Ranker(cfg)
        self.add_cic(len(cfg.item_buckets) * cfg.field_dim, cfg.q * cfg.d, cfg.cic_dim)
        init_embeddings(self)

    def cic_loss(self, emb: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """InfoNCE between ID and content views of the same items; emb (I, Q, D),
        sparse (I, Fi) of distinct items."""
        return self.cic_of(self.ranker.item_fields(sparse), emb, self.cfg.cic_temperature)

    def set_lora_stage(self, stage: int) -> None:
        """Stage 1: attention projections train fully, LoRA frozen (B = 0, no effect).
        Stage 2: the projections are frozen and only their LoRA matrices train."""
        assert stage in (1, 2), "stage must be 1 or 2"
        for m in self.ranker.lora_modules():
            for p in m.base.parameters():
                p.requires_grad_(stage == 1)
            m.lora_a.requires_grad_(stage == 2)
            m.lora_b.requires_grad_(stage == 2)
