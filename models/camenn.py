"""CameNN (Li et al. 2020): cross-modal alignment item tower + mixture-of-transformer-
experts CVR ranker, split at the item boundary for serving (DESIGN section 2).

Item tower: ``[CLS] text tokens [SEP] image patches``; each token is content +
position + segment ('T' for CLS/text/SEP, 'I' for patches). A missing modality is
masked out of attention, never fed as zeros. ITA and TIA heads read the ``[CLS]``
output (with each modality's mean token); the item embedding (Q = 1) is the ``[CLS]``
output, gated, plus each modality's mean content (``CameNNConfig.align_path``).

Ranker: tokens ``[other-feature tokens, history item tokens, target item]`` ->
shared-bottom transformer -> M transformer experts mixed per token by the CVR task's
softmax gate -> transformer tower -> CVR. Attention mode ``full`` re-encodes the user
side for every candidate (the paper); ``candidate-isolated`` computes it once per user
row and lets each candidate attend to it and to itself. Both run on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from models.common import (
    Block,
    ContentIdContrast,
    FieldEmbedding,
    HistoryKernels,
    content_tokens,
    init_embeddings,
    masked_mean,
    mlp,
)

ATTENTION_MODES = ("full", "candidate-isolated")


@dataclass
class CameNNConfig:
    text_dim: int = 32  # input text-token width (BERT/MiniLM token embedding size)
    image_dim: int = 32  # input image-patch width (CNN feature size)
    max_text_len: int = 50  # the paper's text cap
    n_patches: int = 9  # 3 x 3 patches
    d_model: int = 64  # token width in both transformers; item embedding D
    n_head: int = 8  # paper: 8 heads
    tower_layers: int = 1  # paper: 1 block per transformer
    n_experts: int = 2  # M; 2 keeps the demo model within its 5-minute budget
    field_dim: int = 16  # per-field embedding width inside an item token
    user_buckets: list[int] = field(default_factory=list)  # hashed user/context fields
    item_buckets: list[int] = field(default_factory=list)  # hashed item fields
    max_hist: int = 64  # history positions with a position embedding
    attention: str = "candidate-isolated"  # or "full"
    dropout: float = 0.1
    head_hidden: list[int] = field(default_factory=lambda: [128, 64])
    # the item tower's content path (with align_path; else the whole tower but the
    # ITA/TIA heads) learns at this fraction of the optimiser's rate (its own parameter
    # group in training.loop), and with align_path the CVR gradient into the [CLS] output
    # is scaled by it. Measured before align_path and pooled_residual: at the full rate
    # the CVR loss collapsed the [CLS] embedding within an epoch (mean cosine between
    # items 0.58 -> 0.86), 0.1 kept its content (validation AUC after one epoch 0.62 ->
    # 0.70). With both, the content path is linear projections of the modality means,
    # which do not collapse: world seed 0, valid AUC per epoch, one run at 0.1 and two
    # at 1.0 (session 19): 0.7821, 0.7917, 0.7954, 0.7966, 0.7968 (best; test 0.7961)
    # against 0.7857 / 0.7862, 0.7945 / 0.7956, 0.7986 / 0.7989, 0.8001 / 0.7999 (test
    # 0.7981 after 4 epochs). Runs saved before keep their own value (config.json)
    tower_lr_mult: float = 1.0
    # the item embedding is LN([CLS] output + the masked mean of the projected text
    # tokens + that of the image patches). Measured: a ranker on fixed mean-pooled content
    # beats the trained [CLS] (0.79 vs 0.75 test AUC); the pooled path keeps that content
    # from the first step. One mean per modality, not one over all tokens: 2 epochs,
    # test AUC 0.7687 (one mean; text outweighs the 9 patches 2:1 on average and
    # varies with the description's length) -> 0.7814.
    pooled_residual: bool = True
    # two paths through the tower. Alignment: the transformer and its input projections,
    # at the full rate; the ITA/TIA heads read LN([CLS] output + its projected modality
    # means). Content: the embedding is LN(g * [CLS] output + the means of separate
    # projections), the projections at tower_lr_mult, g a learned scalar from 0, and the
    # CVR gradient into the [CLS] output scaled by tower_lr_mult. Measured (4 epochs,
    # default world, perturbed pairs, 128 alignment items; ITA / TIA on planted
    # mismatches, test AUC): one path (tower at 0.1x, heads at the full rate) 0.85 /
    # 0.86, 0.7879; two paths 0.94 / 0.93, 0.7869. Without g (the fast [CLS] added as it
    # is) the ranker loses the content (2 epochs: 0.7327 against 0.7831).
    align_path: bool = True
    # soft counts of history items similar to the candidate (models.common.HistoryKernels)
    # read by the head, in ``kernel_views`` learned projections (as EM3's); 0 = none (the
    # default before session 14; older runs load as trained). Measured (world seed 0, 4
    # epochs, weight averaging; valid / test AUC): none 0.7901 / 0.7890, 11 kernels x 3
    # views 0.7961 / 0.7948. Session 4, one view, no averaging: 0.7791 with, 0.7814 without
    history_kernels: int = 11
    kernel_views: int = 3
    # EM3's content-ID contrastive loss (models.common.content_id_contrast) on CameNN's
    # item-field embeddings and item embeddings, added to ITA + TIA + CVR; 0 = off (runs
    # saved before it). Not in the CameNN paper: borrowed from EM3, as the history
    # kernels are. Why: the ranker's head was saturated (session 20, world seed 0, 4
    # epochs, valid AUC at epochs 1-4; test): baseline 0.7857, 0.7945, 0.7986, 0.8001;
    # 0.7981 (session 19); the candidate's raw item-field embeddings in the head 0.7848,
    # 0.7944, 0.7982, 0.7995; 0.7989; an explicit target attention read by the head
    # 0.7850, 0.7945, 0.7988, 0.7998; 0.7982; CIC 0.1: 0.7836, 0.7934, 0.7994, 0.8026;
    # 0.8026 (ITA / TIA 0.90 / 0.90); CIC 0.3: 0.8014; 0.8008. Training seed 1, test AUC
    # without / with CIC 0.1: 0.7974 / 0.8030
    cic_weight: float = 0.1
    # with align_path, the content path also reads the title (the first text token) and
    # the image patches in their places (PlacedContent), not only each modality's mean,
    # and ``content_ffn`` adds a residual feed-forward layer (d -> 2d -> d) on the pooled
    # content before the final LayerNorm, so the embedding is no longer linear in the
    # content. Why: the [CLS] output, which reads positions, reaches the
    # embedding only through ``cls_gate`` (~0.03 trained). Measured (session 21, world
    # seed 0, 6 epochs, valid AUC at epochs 1 / 4 / best; test): neither 0.7834 / 0.8028
    # / 0.8050; 0.8041; positional_pool 0.7913 / 0.8069 / 0.8084; 0.8076; both 0.7923 /
    # 0.8087 / 0.8103; 0.8086 (ITA / TIA 0.93 / 0.93). Runs saved before: False, False
    positional_pool: bool = True
    content_ffn: bool = True
    cic_dim: int = 32  # shared ID/content space of the CIC loss (as EM3's)
    cic_temperature: float = 0.1  # EM3 paper: 0.1

    @property
    def history_limit(self) -> int | None:
        """The longest history the ranker accepts (a position embedding's length);
        None: any."""
        return self.max_hist

    @property
    def q(self) -> int:
        return 1  # CameNN's item embedding is the [CLS] output

    @property
    def d(self) -> int:
        return self.d_model


class PlacedContent(nn.Module):
    """An item's content read in place, beside the modality means: a projection of the
    first text token (the synthetic world's title; on MovieLens MiniLM's first output
    token, a summary of the title) and one of the concatenated image patches; (I, d), 0
    for a missing modality. Why: a text mean mixes the title with filler words, and a
    patch mean loses each patch's part of the shape."""

    def __init__(self, text_dim: int, image_dim: int, n_patches: int, d: int) -> None:
        super().__init__()
        self.title = nn.Linear(text_dim, d)
        self.patches = nn.Linear(n_patches * image_dim, d)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor,
                image_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        # text (I, Lt, Dt) with Lt >= 0 (an empty slice sums to 0), image (I, P, Di)
        title = (self.title(text[:, :1]) * text_mask[:, :1, None]).sum(1)  # (I, d)
        return title + self.patches(image.flatten(1)) * image_mask[:, :1]


class CameNNItemTower(nn.Module):
    """Item content -> (item embedding (I, 1, D), ITA logit (I,), TIA logit (I,))."""

    def __init__(self, cfg: CameNNConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.text_in = nn.Linear(cfg.text_dim, d)
        self.image_in = nn.Linear(cfg.image_dim, d)
        self.cls = nn.Parameter(torch.randn(d) * 0.02)
        self.sep = nn.Parameter(torch.randn(d) * 0.02)
        self.pos = nn.Embedding(cfg.max_text_len + cfg.n_patches + 2, d)
        self.seg = nn.Embedding(2, d)  # 0 = 'T', 1 = 'I'
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.tower_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.ita = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.tia = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.max_text_len = cfg.max_text_len
        self.pooled_residual = cfg.pooled_residual
        self.align_path = cfg.align_path
        self.cvr_grad_scale = cfg.tower_lr_mult
        if cfg.align_path:
            self.ln_a = nn.LayerNorm(d)  # the heads' view of the [CLS] output
            self.pool_text = nn.Linear(cfg.text_dim, d)
            self.pool_image = nn.Linear(cfg.image_dim, d)
            self.cls_gate = nn.Parameter(torch.zeros(()))  # how much [CLS] the embedding gets
        self.pool_placed = (PlacedContent(cfg.text_dim, cfg.image_dim, cfg.n_patches, d)
                            if cfg.align_path and cfg.positional_pool else None)  # fmt: skip
        self.pool_ffn = (nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(),
                                       nn.Linear(2 * d, d))
                         if cfg.align_path and cfg.content_ffn else None)  # fmt: skip

    def slow_parameter_names(self) -> set[str]:
        """The parameters that shape the item embedding's content (trained at the
        config's ``tower_lr_mult``); the rest (alignment transformer, heads) at the full
        rate. Without ``align_path``, everything but the heads."""
        names = {n for n, _ in self.named_parameters()}
        if self.align_path:
            return {n for n in names if n.startswith(("pool_", "ln_f."))}
        return {n for n in names if not n.startswith(("ita.", "tia."))}

    def alignment_parameter_names(self) -> set[str]:
        """What an ITA/TIA-only phase after CVR training may change: with ``align_path``
        the alignment transformer, its input projections and the heads (the embedding
        reads the [CLS] output only through ``cls_gate``, which stays); without it the
        heads alone, since the rest of the tower is the embedding."""
        names = {n for n, _ in self.named_parameters()}
        if self.align_path:
            return names - self.slow_parameter_names() - {"cls_gate"}
        return {n for n in names if n.startswith(("ita.", "tia."))}

    def forward(
        self,
        text: torch.Tensor,
        text_len: torch.Tensor,
        image: torch.Tensor,
        has_image: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, lt, _ = text.shape  # (I, Lt, Dt); Lt <= max_text_len
        p = image.shape[1]  # (I, P, Di)
        text_mask, image_mask = content_tokens(text, text_len, image, has_image)
        special = text_mask.new_ones((n, 1))  # (I, 1) CLS / SEP always real
        t_in, i_in = self.text_in(text), self.image_in(image)  # (I, Lt, d), (I, P, d)
        x = torch.cat([self.cls.expand(n, 1, -1), t_in, self.sep.expand(n, 1, -1), i_in], dim=1)
        # (I, T = Lt + P + 2, d)
        # positions do not depend on how far the text is padded: CLS 0, text 1..Lt,
        # SEP max_text_len + 1, patches after it; otherwise the same item would get a
        # different embedding in every batch, and the heads could read the padding
        big = self.max_text_len
        ids = torch.arange(big + 2 + p, device=x.device)
        ids = torch.cat([ids[: lt + 1], ids[big + 1 :]])  # (T,)
        seg = (ids > big + 1).long()  # 0 = 'T' (CLS, text, SEP), 1 = 'I'
        x = x + self.pos(ids) + self.seg(seg)
        mask = torch.cat([special, text_mask, special, image_mask], dim=1)  # (I, T)
        for block in self.blocks:
            x = block(x, mask)
        cls = x[:, 0]  # (I, d)
        if not self.align_path:
            if self.pooled_residual:  # each modality's mean, whatever its token count
                cls = cls + masked_mean(t_in, text_mask) + masked_mean(i_in, image_mask)
            emb = self.ln_f(cls)  # (I, d)
            return emb[:, None, :], self.ita(emb)[:, 0], self.tia(emb)[:, 0]
        a = self.ln_a(cls + masked_mean(t_in, text_mask) + masked_mean(i_in, image_mask))
        if self.training and self.cvr_grad_scale != 1.0:  # same value, smaller gradient
            s = self.cvr_grad_scale
            cls = cls * s + cls.detach() * (1.0 - s)
        emb = self.cls_gate * cls  # (I, d)
        if self.pooled_residual:
            emb = emb + masked_mean(self.pool_text(text), text_mask)
            emb = emb + masked_mean(self.pool_image(image), image_mask)
        if self.pool_placed is not None:
            emb = emb + self.pool_placed(text, text_mask, image, image_mask)
        if self.pool_ffn is not None:
            emb = emb + self.pool_ffn(emb)
        emb = self.ln_f(emb)
        return emb[:, None, :], self.ita(a)[:, 0], self.tia(a)[:, 0]


class CameNNRanker(nn.Module):
    """DESIGN section 3 tensors -> CVR logit (B,). A candidate's output depends only on
    its own user row and its own features, in both attention modes."""

    def __init__(self, cfg: CameNNConfig) -> None:
        super().__init__()
        assert cfg.attention in ATTENTION_MODES, f"attention must be one of {ATTENTION_MODES}"
        self.cfg = cfg
        d = cfg.d_model
        # each user/context field is one token: a field_dim embedding projected to d (a
        # d-wide table per field memorises user ids long before content is learned)
        self.user_fields = FieldEmbedding(cfg.user_buckets, cfg.field_dim)
        self.user_in = nn.Linear(cfg.field_dim, d)
        self.item_fields = FieldEmbedding(cfg.item_buckets, cfg.field_dim)
        self.item_in = nn.Linear(cfg.q * cfg.d + len(cfg.item_buckets) * cfg.field_dim, d)
        self.kind = nn.Embedding(3, d)  # 0 other-feature, 1 history item, 2 target item
        self.field_pos = nn.Embedding(len(cfg.user_buckets), d)
        self.hist_pos = nn.Embedding(cfg.max_hist, d)  # recency: 0 = most recent
        self.bottom = Block(d, cfg.n_head, cfg.dropout)
        self.experts = nn.ModuleList(
            Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.n_experts)
        )
        self.gate = nn.Linear(d, cfg.n_experts)  # the CVR task's gate (ITA/TIA live on the tower)
        self.tower = Block(d, cfg.n_head, cfg.dropout)
        self.ln_f = nn.LayerNorm(d)
        # as in BST, the head also reads the other-feature embeddings directly: user and
        # context effects need not be found by attention first
        n_user = len(cfg.user_buckets) * cfg.field_dim
        # ... and a profile-match readout of the history tokens (see forward)
        self.kernels = (HistoryKernels(cfg.q * cfg.d, n_kernels=cfg.history_kernels,
                                       views=cfg.kernel_views)
                        if cfg.history_kernels else None)  # fmt: skip
        n_kernel = self.kernels.out_features if self.kernels else 0
        self.head = mlp(4 * d + n_user + n_kernel, cfg.head_hidden, cfg.dropout)

    def item_tokens(self, emb: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """(..., Q, D) embeddings + (..., Fi) fields -> (..., d) item tokens."""
        flat = emb.flatten(-2)  # (..., Q*D)
        ids = self.item_fields(sparse).flatten(-2)  # (..., Fi*field_dim)
        return self.item_in(torch.cat([flat, ids], dim=-1))

    def _mix(self, h: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        g = F.softmax(self.gate(h), dim=-1)  # (..., M) per-token gate
        return (torch.stack(experts, dim=-1) * g[..., None, :]).sum(-1)  # (..., d)

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
        _u, n = hist_mask.shape
        d = self.cfg.d_model
        assert n <= self.cfg.max_hist, f"history length {n} > max_hist {self.cfg.max_hist}"
        fu = user_sparse.shape[1]
        fields = self.user_fields(user_sparse)  # (U, Fu, field_dim)
        other = self.user_in(fields) + self.field_pos.weight[:fu]
        other = other + self.kind.weight[0]  # (U, Fu, d)
        hist_items = self.item_tokens(hist_emb, hist_sparse)  # (U, N, d)
        hist = hist_items + self.hist_pos.weight[:n] + self.kind.weight[1]  # (U, N, d)
        xu = torch.cat([other, hist], dim=1)  # (U, S = Fu + N, d)
        mu = torch.cat([torch.ones_like(user_sparse, dtype=torch.bool), hist_mask], dim=1)
        xc = self.item_tokens(cand_emb, cand_sparse) + self.kind.weight[2]  # (B, d)

        if self.cfg.attention == "full":
            x = torch.cat([xu[cand_user], xc[:, None, :]], dim=1)  # (B, S + 1, d)
            m = torch.cat([mu[cand_user], mu.new_ones((len(cand_user), 1))], dim=1)
            h = self.bottom(x, m)
            x = self._mix(h, [e(h, m) for e in self.experts])
            t = self.tower(x, m)[:, -1]  # (B, d) the target token
        else:
            hu, hc = self.bottom.forward_isolated(xu, mu, xc, cand_user)
            outs = [cast(Block, e).forward_isolated(hu, mu, hc, cand_user) for e in self.experts]
            mu_x = self._mix(hu, [o[0] for o in outs])  # (U, S, d)
            mc_x = self._mix(hc, [o[1] for o in outs])  # (B, d)
            t = self.tower.forward_isolated(mu_x, mu, mc_x, cand_user)[1]  # (B, d)
        wide = fields.flatten(1)[cand_user]  # (B, Fu * field_dim)
        # profile match: the mean history token (the user's content profile) and its
        # elementwise product with the candidate token. Measured: the candidate's
        # attention over the history stays uniform after an epoch (no target match
        # learned) and an MLP over the concatenation [t, xc] does not find the product;
        # this bilinear feature exposes the history/candidate content match directly.
        # It reads the input tokens, so it is the same function in both attention modes.
        prof = masked_mean(hist_items, hist_mask)  # (U, d); 0 for N = 0
        prof = F.layer_norm(prof, (d,))[cand_user]  # (B, d)
        match = prof * F.layer_norm(xc, (d,))  # (B, d)
        parts = [self.ln_f(t), xc, prof, match, wide]
        if self.kernels is not None:
            parts.append(self.kernels(hist_emb.flatten(-2), hist_mask, cand_emb.flatten(-2),
                                      cand_user))  # fmt: skip
        x = torch.cat(parts, dim=-1)
        return self.head(x)[:, 0]  # (B,)


class CameNN(ContentIdContrast):
    """Item tower + ranker, trained end to end (ITA + TIA + CVR, + CIC with
    ``cic_weight``)."""

    cfg: CameNNConfig

    def __init__(self, cfg: CameNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = CameNNItemTower(cfg)
        self.ranker = CameNNRanker(cfg)
        if cfg.cic_weight > 0:
            self.add_cic(len(cfg.item_buckets) * cfg.field_dim, cfg.q * cfg.d, cfg.cic_dim)
        init_embeddings(self)

    def cic_loss(self, emb: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        """CIC between the item-field and content views of distinct items; emb (I, Q, D),
        sparse (I, Fi). Needs ``cic_weight`` > 0 (the projections exist only then)."""
        return self.cic_of(self.ranker.item_fields(sparse), emb, self.cfg.cic_temperature)
