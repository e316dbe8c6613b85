"""The functions that are exported, as PyTorch modules (exporting side: imports torch).

The ONNX graphs and the PyTorch reference backend both run these wrappers, so they
compute the same function on the same weights:

- :class:`RankerGraph`: the DESIGN section 3 tensors -> ``cvr`` probabilities (B,);
- :class:`ItemTowerGraph`: item content -> ``emb`` (I, Q, D) and, for CameNN, the
  ``ita`` / ``tia`` alignment probabilities (I,).

With ``half=True`` the wrapped model runs in float16 while inputs and outputs stay
float32 (one signature for every precision; the casts are inside the graph).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.export import Dim

from models.camenn import CameNN, CameNNItemTower
from models.em3 import EM3


def item_tower_outputs(model: nn.Module) -> tuple[str, ...]:
    return ("emb", "ita", "tia") if isinstance(model, CameNN) else ("emb",)


def _dtype(half: bool) -> torch.dtype:
    return torch.float16 if half else torch.float32


class RankerGraph(nn.Module):
    """CVR probabilities (B,) float32 from the seven DESIGN section 3 tensors."""

    def __init__(self, model: CameNN | EM3, half: bool = False) -> None:
        super().__init__()
        ranker = model.ranker
        self.ranker = copy.deepcopy(ranker).half() if half else ranker
        self.use_half = half
        self.eval()

    def forward(
        self,
        user_sparse: torch.Tensor,  # (U, Fu) int64
        hist_emb: torch.Tensor,  # (U, N, Q, D) float32
        hist_sparse: torch.Tensor,  # (U, N, Fi) int64
        hist_mask: torch.Tensor,  # (U, N) bool
        cand_emb: torch.Tensor,  # (B, Q, D) float32
        cand_sparse: torch.Tensor,  # (B, Fi) int64
        cand_user: torch.Tensor,  # (B,) int64
    ) -> torch.Tensor:
        dt = _dtype(self.use_half)
        logit = self.ranker(
            user_sparse,
            hist_emb.to(dt),
            hist_sparse,
            hist_mask,
            cand_emb.to(dt),
            cand_sparse,
            cand_user,
        )
        return torch.sigmoid(logit.float())  # (B,)


class ItemTowerGraph(nn.Module):
    """(emb (I, Q, D), [ita (I,), tia (I,)]) float32 from item content."""

    def __init__(self, model: CameNN | EM3, half: bool = False) -> None:
        super().__init__()
        tower = model.tower
        self.tower = copy.deepcopy(tower).half() if half else tower
        self.use_half = half
        self.alignment = isinstance(tower, CameNNItemTower)
        self.eval()

    def forward(
        self,
        text: torch.Tensor,  # (I, L, Dt) float32
        text_len: torch.Tensor,  # (I,) int64
        image: torch.Tensor,  # (I, P, Di) float32
        has_image: torch.Tensor,  # (I,) bool
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt = _dtype(self.use_half)
        out = self.tower(text.to(dt), text_len, image.to(dt), has_image)
        if self.alignment:
            emb, ita, tia = out
            return emb.float(), torch.sigmoid(ita.float()), torch.sigmoid(tia.float())
        return out.float()  # (I, Q, D)


def ranker_example(
    model: CameNN | EM3, u: int = 3, n: int = 5, b: int = 7, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the ranker's signature (sizes distinct, so that no two
    dynamic axes are mistaken for one while tracing)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)

    def ids(buckets: list[int], *lead: int) -> torch.Tensor:
        cols = [torch.randint(1, bk, (*lead, 1), generator=g) for bk in buckets]
        return torch.cat(cols, dim=-1)

    mask = torch.rand(u, n, generator=g) < 0.7
    mask[:, 0] = True
    return (
        ids(cfg.user_buckets, u),
        torch.randn(u, n, cfg.q, cfg.d, generator=g),
        ids(cfg.item_buckets, u, n),
        mask,
        torch.randn(b, cfg.q, cfg.d, generator=g),
        ids(cfg.item_buckets, b),
        torch.randint(0, u, (b,), generator=g),
    )


def item_tower_example(
    model: CameNN | EM3, i: int = 6, lt: int = 4, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    lt = min(lt, cfg.max_text_len)
    return (
        torch.randn(i, lt, cfg.text_dim, generator=g),
        torch.randint(0, lt + 1, (i,), generator=g),
        torch.randn(i, cfg.n_patches, cfg.image_dim, generator=g),
        torch.rand(i, generator=g) < 0.7,
    )


def ranker_dynamic_shapes(max_hist: int | None) -> tuple[dict[int, Dim], ...]:
    u, b = Dim("U", min=1), Dim("B", min=1)
    n = Dim("N", min=0, max=max_hist) if max_hist else Dim("N", min=0)
    return ({0: u}, {0: u, 1: n}, {0: u, 1: n}, {0: u, 1: n}, {0: b}, {0: b}, {0: b})


def item_tower_dynamic_shapes(max_text_len: int) -> tuple[dict[int, Dim], ...]:
    i = Dim("I", min=1)
    lt = Dim("L", min=1, max=max_text_len)
    return ({0: i, 1: lt}, {0: i}, {0: i}, {0: i})
