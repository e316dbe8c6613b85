"""Building blocks shared by the model files: hashed-field embeddings, a pre-LN
transformer block that runs either as plain self-attention or in the
candidate-isolated pattern, and LoRA.

Masks are boolean, True where a position is real. Every attention row has at least
one real key by construction (the callers guarantee it), so softmax never sees a
row of only ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FieldEmbedding(nn.Module):
    """One embedding table per hashed categorical field, stored as one table with
    offsets. Input (..., F) int64 in ``[0, buckets_f)``; output (..., F, dim)."""

    offsets: torch.Tensor

    def __init__(self, buckets: Sequence[int], dim: int) -> None:
        super().__init__()
        offsets = torch.tensor([0, *list(buckets)[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.table = nn.Embedding(int(sum(buckets)), dim)
        nn.init.normal_(self.table.weight, std=0.02)
        self.n_fields = len(buckets)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert ids.shape[-1] == self.n_fields, f"expected {self.n_fields} fields, got {ids.shape}"
        return self.table(ids + self.offsets)  # (..., F, dim)


def init_embeddings(module: nn.Module) -> None:
    """GPT-2 style: every embedding table N(0, 0.02). PyTorch's default N(0, 1) makes
    position/segment embeddings (norm ~8) swamp the content they are added to."""
    for m in module.modules():
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor
) -> torch.Tensor:
    """Scaled dot-product attention. q (B, h, Tq, hs), k/v (B, h, Tk, hs), key_mask
    (B, Tk) bool -> (B, h, Tq, hs). Written out (not SDPA) so the exported graph is
    plain MatMul/Softmax on every runtime."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, h, Tq, Tk)
    att = att.masked_fill(~key_mask[:, None, None, :], torch.finfo(att.dtype).min)
    return F.softmax(att, dim=-1) @ v  # (B, h, Tq, hs)


class Block(nn.Module):
    """Pre-LN transformer encoder block (attention + 4x GELU MLP).

    ``forward``: every token attends to every real token of its sequence.
    ``forward_isolated``: user-side tokens ``xu`` (U, S, d) attend only to each other;
    each candidate token ``xc`` (B, d) attends to its user's tokens and to itself. The
    user side is computed once per user row whatever the number of candidates, and a
    candidate's output depends on nothing but its own user row and itself.
    """

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (B, T, d)
        shape = (b, t, self.n_head, d // self.n_head)
        return (
            q.view(shape).transpose(1, 2),
            k.view(shape).transpose(1, 2),
            v.view(shape).transpose(1, 2),
        )

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, t, -1)))  # (B, T, d)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.mlp(self.ln2(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.ln1(x))  # (B, h, T, hs)
        x = x + self._merge(attend(q, k, v, mask))  # (B, T, d)
        return self._mlp(x)

    def forward_isolated(
        self, xu: torch.Tensor, mask_u: torch.Tensor, xc: torch.Tensor, cand_user: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qu, ku, vu = self._heads(self.ln1(xu))  # (U, h, S, hs)
        qc, kc, vc = self._heads(self.ln1(xc[:, None, :]))  # (B, h, 1, hs)
        yu = xu + self._merge(attend(qu, ku, vu, mask_u))  # (U, S, d)
        y = attend_own_user(qc, kc, vc, ku, vu, mask_u, cand_user)  # (B, h, 1, hs)
        yc = xc[:, None, :] + self._merge(y)  # (B, 1, d)
        return self._mlp(yu), self._mlp(yc)[:, 0]  # (U, S, d), (B, d)


# up to this many user rows, eager PyTorch uses the masked layout of attend_own_user
MASKED_MAX_USERS = 4


def own_keys(mask_u: torch.Tensor, cand_user: torch.Tensor) -> torch.Tensor:
    """(B, U*S) bool: which of all user rows' keys, laid end to end, each candidate may
    attend to: its own row's real ones. mask_u (U, S), cand_user (B,)."""
    u, s = mask_u.shape
    row = torch.arange(u, device=mask_u.device)[:, None].expand(u, s).reshape(1, u * s)
    return (row == cand_user[:, None]) & mask_u.reshape(1, u * s)


def attend_own_user(
    qc: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    ku: torch.Tensor,
    vu: torch.Tensor,
    mask_u: torch.Tensor,
    cand_user: torch.Tensor,
) -> torch.Tensor:
    """Each candidate's attention over its own user row's keys and its own key.

    qc/kc/vc (B, h, 1, hs) candidates, ku/vu (U, h, S, hs) user rows, mask_u (U, S),
    cand_user (B,) -> (B, h, 1, hs). Two layouts of the same function:

    - gathered: every candidate gets a copy of its user's keys and values, (B, h, S+1, hs):
      memory traffic ~ B·S·d, then B·h tiny matrix products;
    - masked: every candidate's query meets the keys of all U user rows in one matrix
      product per head, (h, B, U·S), and the other users' keys are masked out (their
      softmax weight is exactly 0): no copies, work ~ B·U·S·d.

    Measured (ONNX Runtime CPU, 1 thread, demo-sized CameNN, S = 53): masked is 2.1x
    faster for one user row (250 candidates: 2.6 against 5.5 ms), 1.2x for 4, slower
    from ~6. Exported graphs (the serving path) use the masked layout, and the service's
    batcher bounds requests x rows per batch (``batching.max_user_rows``); eager PyTorch
    picks by U, so training batches of many users keep the gathered one.
    """
    u, h, s, hs = ku.shape
    b = qc.shape[0]
    if not (torch.compiler.is_exporting() or u <= MASKED_MAX_USERS):
        k = torch.cat([ku[cand_user], kc], dim=2)  # (B, h, S + 1, hs)
        v = torch.cat([vu[cand_user], vc], dim=2)  # (B, h, S + 1, hs)
        m = torch.cat([mask_u[cand_user], mask_u.new_ones((b, 1))], dim=1)  # (B, S + 1)
        return attend(qc, k, v, m)
    q = qc[:, :, 0] * (1.0 / math.sqrt(hs))  # (B, h, hs)
    kf = ku.transpose(0, 1).reshape(h, u * s, hs)  # (h, U*S, hs)
    vf = vu.transpose(0, 1).reshape(h, u * s, hs)  # (h, U*S, hs)
    att_u = q.transpose(0, 1) @ kf.transpose(1, 2)  # (h, B, U*S)
    own = own_keys(mask_u, cand_user)  # (B, U*S)
    att_u = att_u.masked_fill(~own[None], torch.finfo(att_u.dtype).min)
    att_c = (q * kc[:, :, 0]).sum(-1).transpose(0, 1)[..., None]  # (h, B, 1)
    att = F.softmax(torch.cat([att_u, att_c], dim=-1), dim=-1)  # (h, B, U*S + 1)
    y = att[..., :-1] @ vf + att[..., -1:] * vc[:, :, 0].transpose(0, 1)  # (h, B, hs)
    return y.transpose(0, 1)[:, :, None, :]  # (B, h, 1, hs)


class LoRALinear(nn.Module):
    """A linear layer W x + b with a low-rank update (alpha / r) * B A x.

    ``B`` starts at zero, so enabling LoRA does not change the function until it is
    trained. :meth:`merged_weight` folds the update in for export."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) / math.sqrt(d_in))
        self.lora_b = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.lora_b @ self.lora_a  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.merged_weight(), self.base.bias)


def content_id_contrast(z_id: torch.Tensor, z_c: torch.Tensor, temperature: float) -> torch.Tensor:
    """The content-ID contrastive (CIC) loss of EM3: InfoNCE both ways between the ID
    view ``z_id`` and the content view ``z_c`` (I, c) of I distinct items; row i of
    each is item i, the other rows are its negatives."""
    z_id, z_c = F.normalize(z_id, dim=-1), F.normalize(z_c, dim=-1)
    logits = z_id @ z_c.T / temperature  # (I, I)
    target = torch.arange(len(z_id), device=z_id.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class ContentIdContrast(nn.Module):
    """Mixin for a model trained with CIC: the two projections and the loss; the model
    passes its own item-field embeddings. The attribute names ``cic_id``/``cic_content``
    are saved state-dict keys (EM3 runs), so they stay."""

    cic_id: nn.Linear
    cic_content: nn.Linear

    def add_cic(self, id_width: int, content_width: int, dim: int) -> None:
        """Create the projections of the ID view (``id_width``) and the content view
        (``content_width`` = Q * D) into the shared ``dim``-wide space."""
        self.cic_id = nn.Linear(id_width, dim)
        self.cic_content = nn.Linear(content_width, dim)

    def cic_of(self, fields: torch.Tensor, emb: torch.Tensor, temperature: float) -> torch.Tensor:
        """CIC between the item-field embeddings ``fields`` (I, Fi, f) and the item
        embeddings ``emb`` (I, Q, D) of I distinct items."""
        z_id = self.cic_id(fields.flatten(-2))  # (I, c)
        z_c = self.cic_content(emb.flatten(-2))  # (I, c)
        return content_id_contrast(z_id, z_c, temperature)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Mean of ``x`` over axis ``dim`` at the positions where ``mask`` (R, T) is True;
    0 where none is (also for T = 0). ``x`` is (R, ..., T at ``dim``, ...): (R, T, d)
    -> (R, d) by default."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = mask.shape
    w = mask.to(x.dtype).reshape(shape)  # (R, 1.., T, 1..)
    return (x * w).sum(dim) / w.sum(dim).clamp(min=1.0)


class HistoryKernels(nn.Module):
    """Soft counts of history items like the candidate (K-NRM's kernel pooling): the
    cosine between a learned projection of each real history item and of the candidate,
    under ``n_kernels`` Gaussian kernels centred evenly on [-1, 1], averaged over the
    history -> (B, views * n_kernels), each the share of the history at that similarity
    in one of ``views`` projections; 0 for N = 0. A candidate's features depend only on
    its own user row. ``views=1`` has the parameters and outputs of the single-view
    module runs were saved with.

    Why: the world's conversions follow the user's shares of purchases in the
    candidate's category and style; target attention is a softmax (a weighted mean, not a
    share) and a mean profile's dot product mixes every pair. One cosine also mixes
    attributes (a same-category item of another style and an other-category item of the
    same style can look equally similar); separate views can each measure one. Measured
    in README: logistic regression on the true attributes and shares reaches 0.82 test
    AUC."""

    mu: torch.Tensor  # (K,) kernel centres

    def __init__(self, d_in: int, d_proj: int = 32, n_kernels: int = 11, sigma: float = 0.1,
                 views: int = 1) -> None:  # fmt: skip
        super().__init__()
        self.proj = nn.Linear(d_in, views * d_proj, bias=False)
        self.register_buffer("mu", torch.linspace(-1.0, 1.0, n_kernels), persistent=False)
        self.sigma, self.views = sigma, views
        self.out_features = views * n_kernels  # width of the output, read by the heads

    def forward(self, hist: torch.Tensor, hist_mask: torch.Tensor, cand: torch.Tensor,
                cand_user: torch.Tensor) -> torch.Tensor:  # fmt: skip
        u, n, v = hist.shape[0], hist.shape[1], self.views
        b, p = cand.shape[0], self.proj.out_features // v
        # eps that float16 can hold (the default 1e-12 rounds to 0 there, and a padded
        # history row's zero projection would divide 0 by 0)
        h = F.normalize(self.proj(hist).view(u, n, v, p), dim=-1, eps=1e-4)  # (U, N, V, p)
        c = F.normalize(self.proj(cand).view(b, v, p), dim=-1, eps=1e-4)  # (B, V, p)
        if torch.compiler.is_exporting() or u <= MASKED_MAX_USERS:
            # every candidate against every user row's history in one product per view,
            # then its own row picked out: no per-candidate copy of the history (as in
            # attend_own_user). Measured, 1 thread, B = 500, N = 50, 3 views: this step
            # 2.6 -> 0.06 ms in eager PyTorch; K=500 requests in ONNX Runtime, CameNN
            # 16.1 -> 12.7 ms, EM3 12.3 -> 10.4 ms (with the shares summed in place)
            hv = h.permute(2, 3, 0, 1).reshape(v, p, u * n)  # (V, p, U*N)
            all_sim = (c.transpose(0, 1) @ hv).view(v, b, u, n)  # (V, B, U, N)
            own = cand_user.view(1, b, 1, 1).expand(v, b, 1, n)
            sim = torch.gather(all_sim, 2, own)[:, :, 0].transpose(0, 1)  # (B, V, N)
        else:
            sim = (h[cand_user].transpose(1, 2) @ c[..., None])[..., 0]  # (B, V, N)
        k = torch.exp(-((sim[..., None] - self.mu) ** 2) / (2 * self.sigma**2))  # (B, V, N, K)
        shares = masked_mean(k, hist_mask[cand_user], dim=2)  # (B, V, K)
        return shares.flatten(1)  # (B, V*K), view-major as the runs were saved


def mlp(d_in: int, hidden: Sequence[int], dropout: float, d_out: int = 1) -> nn.Sequential:
    """ReLU MLP d_in -> hidden... -> d_out."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.ReLU(), nn.Dropout(dropout)]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def content_tokens(
    text: torch.Tensor, text_len: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of an item's text tokens (I, Lt) and image patches (I, P): True where real."""
    lt, p = text.shape[1], image.shape[1]
    text_mask = torch.arange(lt, device=text.device)[None, :] < text_len[:, None]  # (I, Lt)
    image_mask = has_image[:, None].expand(-1, p)  # (I, P)
    return text_mask, image_mask
