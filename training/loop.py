"""One training loop for every model: item tower and ranker end to end.

Per step, the item tower runs once over the distinct items of the batch (history
and candidates), the embeddings are gathered into the DESIGN section 3 tensors and
the ranker scores the candidates. Losses: CVR BCE for all models; + ITA + TIA for
CameNN (negatives swap in another item's text / image: half of them a random item's,
half a look-alike of another kind, :func:`look_alikes`); + ``cic_weight`` x CIC for
EM3 and CameNN. Early stopping keeps the weights of the best validation AUC (a moving
average of the weights by default, :class:`WeightAverage`); CameNN then runs
ITA/TIA-only steps on its tower's alignment path (:func:`align_phase`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm

from data.dataset import Batch, Catalog, Split, iter_batches
from models.camenn import CameNN
from models.em3 import EM3

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    epochs: int = 8
    cands_per_batch: int = 256
    lr: float = 1e-3  # paper: 4e-4; measured: 1e-3 learns faster here at batch 256
    betas: tuple[float, float] = (0.95, 0.999)
    weight_decay: float = 1e-4  # decoupled (AdamW): L2-in-Adam would erase rarely seen ids
    patience: int = 2  # epochs without a better validation AUC before stopping
    max_hist: int = 50
    short_hist: int = 10  # EM3 stage 1 (full training) history length
    lora_epochs: int = 2  # EM3 stage 2 (frozen attention + LoRA) epochs, long histories
    # CameNN: items per step in the ITA/TIA losses. Measured (2 epochs, default world):
    # 64 -> ITA / TIA 0.82 / 0.79, 128 -> 0.88 / 0.83 (test AUC 0.7833 / 0.7831; one
    # standard error on the 72 test items is ~0.04)
    align_items: int = 128
    align_holdout: float = 0.3  # share of items never used in ITA/TIA training (their test)
    # share of ITA/TIA negatives taken from look-alikes of another kind (:func:`look_alikes`)
    # instead of random items. Measured (tower alone on ITA/TIA, default world, 600
    # steps, planted-mismatch test): random only 0.58-0.69 / 0.60-0.67 (ITA / TIA),
    # half look-alikes 0.74-0.81 / 0.76-0.79, look-alikes only 0.65-0.69 / 0.58-0.72
    align_hard_share: float = 0.5
    # ITA/TIA see each training pair perturbed: Gaussian noise of ``align_noise`` x the
    # modality's per-dimension spread, and each text token after the first dropped with
    # probability ``align_drop``. Why: ~1,000 items with one text and one photo each are
    # memorised as pairs otherwise (measured, tower alone on ITA/TIA, default world:
    # training loss 0.26 and held-out accuracy falling to 0.69 / 0.71 after 1,000 steps;
    # with noise 1.0 and drop 0.4, 0.90 / 0.88 after 1,200)
    align_noise: float = 1.0
    align_drop: float = 0.4
    # where each CVR step's ITA/TIA items come from: "batch", the CVR batch's pool items
    # (popular items in nearly every step, tail items rarely), or "pool", uniformly
    # from the whole pool, as the held-out test items are drawn. Measured (world seed
    # 1, 4 epochs, 60 test items): batch 0.92 / 0.92, pool 0.88 / 0.90 (ITA / TIA),
    # within run-to-run noise (batch 0.85 / 0.85 in another run)
    align_sampling: str = "batch"
    # CameNN: ITA/TIA-only steps after CVR training (on the kept weights), on the
    # alignment path only (``CameNNItemTower.alignment_parameter_names``), items drawn
    # from the whole pool. Why: early stopping on validation AUC ends training while the
    # ITA/TIA losses still fall, and the item embedding barely reads that path (a trained
    # ``cls_gate`` ~0.03), so more alignment steps cost the ranking nothing. Measured
    # (world seed 1, two 4-epoch runs, 60 test items): ITA / TIA 0.88 / 0.90 -> 0.93 /
    # 0.93 after 500 steps (validation AUC 0.7667 -> 0.7671 after 1,000) and 0.92 / 0.92
    # -> 0.92 / 0.93 (0.7660 -> 0.7662)
    align_steps: int = 500
    cic_items: int = 256  # items per step in the CIC loss
    # weight averaging: validation, early stopping and the kept weights use an
    # exponential moving average of the trainable weights with this decay per step
    # (0 = off: the raw weights; :class:`WeightAverage`). Measured (test AUC, one run
    # each): world seed 0 EM3 0.8042 -> 0.8088 (0.8082 at 0.998), CameNN (4 epochs)
    # 0.7869 -> 0.7890; MovieLens EM3 0.7852 -> 0.7852 (validation 0.7846 -> 0.7898).
    # Baselines train with the run's settings, so they average too
    ema_decay: float = 0.995
    seed: int = 0
    threads: int = 2
    # 0 = no time cap; else stop before an epoch that would end past it, judged by the
    # last epoch's time (validation included), so training does not overrun the cap
    max_minutes: float = 0.0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def look_alikes(cat: Catalog, items: np.ndarray, k: int = 5) -> np.ndarray | None:
    """For each of ``items``, the ``k`` others among ``items`` whose mean image patch is
    most similar (cosine, centred) *and whose kind differs* (``cat.kind_field``);
    (len(items), k) item indices. None without a kind field or with too few items.

    Why: a random item's text or image differs from the item's own in style, colour and
    quality as well as in kind, and alignment heads trained on such negatives learn
    those cues; a mislisting (the planted mismatch, a dirty listing) keeps them and
    changes the kind. A look-alike of another kind differs the same way (measured on
    the default world: 95 % share the true style, against 16 % of random items)."""
    if cat.kind_field is None or len(items) <= k:
        return None
    kind = cat.sparse[items, [f.name for f in cat.fields].index(cat.kind_field)]
    if len(items) - np.bincount(np.unique(kind, return_inverse=True)[1]).max() < k:
        return None  # some kind has fewer than k items of other kinds to choose from
    x = cat.image[items].mean(1)  # (n, Di)
    x = x - x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    out = np.empty((len(items), k), dtype=np.int64)
    for lo in range(0, len(items), 1024):  # (1024, n) similarities at a time
        sim = x[lo : lo + 1024] @ x.T
        sim[kind[lo : lo + 1024, None] == kind[None, :]] = -np.inf
        out[lo : lo + 1024] = items[np.argpartition(-sim, k, axis=1)[:, :k]]
    return out


def mix_look_alikes(other: torch.Tensor, alikes: torch.Tensor | None, share: float,
                    gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """``other`` (n,) with each entry replaced, with probability ``share``, by one of the
    ``k`` candidates in its row of ``alikes`` (n, k) drawn at random; ``other`` as it is
    when there are no look-alikes or ``share`` is 0."""
    if alikes is None or share <= 0:
        return other
    n, k = alikes.shape
    pick = alikes[torch.arange(n), torch.randint(k, (n,), generator=gen)]
    return torch.where(torch.rand(n, generator=gen) < share, pick, other)


class CatalogTensors:
    """The catalog as torch tensors, plus which items may train ITA/TIA and their
    look-alikes of another kind."""

    def __init__(self, cat: Catalog, holdout: float, seed: int) -> None:
        self.text = torch.from_numpy(cat.text)
        self.text_len = torch.from_numpy(cat.text_len)
        self.image = torch.from_numpy(cat.image)
        self.has_image = torch.from_numpy(cat.has_image)
        self.sparse = torch.from_numpy(cat.sparse)
        both = cat.has_image & (cat.text_len > 0)
        held = np.random.default_rng(seed + 7919).random(len(cat.item_ids)) < holdout
        self.align_ok = torch.from_numpy(both & ~held)  # may train ITA/TIA
        self.align_test = both & held  # ITA/TIA evaluation items
        self.align_pool = torch.from_numpy(np.flatnonzero(both & ~held))
        self._catalog = cat

    @functools.cached_property
    def align_hard(self) -> torch.Tensor | None:
        """(P, k) look-alikes of another kind of each pool item (:func:`look_alikes`);
        computed on first use (evaluation never needs them)."""
        hard = look_alikes(self._catalog, self.align_pool.numpy())
        return None if hard is None else torch.from_numpy(hard)

    @functools.cached_property
    def pool_row(self) -> torch.Tensor:
        """(I,) each item's row in ``align_pool``; -1 outside it."""
        row = torch.full((len(self._catalog.item_ids),), -1, dtype=torch.long)
        row[self.align_pool] = torch.arange(len(self.align_pool))
        return row

    def align_negatives(self, own: torch.Tensor, hard_share: float, gen: torch.Generator
                        ) -> torch.Tensor:  # fmt: skip
        """An item per ``own`` pool item whose text or image is swapped in: with
        probability ``hard_share`` one of its look-alikes of another kind, otherwise a
        random pool item."""
        pool = self.align_pool
        other = pool[torch.randint(len(pool), (len(own),), generator=gen)]
        if hard_share <= 0 or self.align_hard is None:
            return other
        return mix_look_alikes(other, self.align_hard[self.pool_row[own]], hard_share, gen)

    @functools.cached_property
    def spread(self) -> tuple[float, float]:
        """Per-dimension standard deviation of real text tokens and of real patches."""
        real = torch.arange(self.text.shape[1])[None] < self.text_len[:, None]
        t = self.text[real]
        i = self.image[self.has_image]
        return (float(t.std()) if len(t) > 1 else 1.0), (float(i.std()) if len(i) > 1 else 1.0)

    def content(self, items: torch.Tensor, text_from: torch.Tensor | None = None,
                image_from: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Content of ``items``, text trimmed to the longest present; optionally with
        text or image taken from other items (alignment negatives)."""
        t_idx = items if text_from is None else text_from
        i_idx = items if image_from is None else image_from
        text_len = self.text_len[t_idx]
        lt = max(1, int(text_len.max()))
        return self.text[t_idx, :lt], text_len, self.image[i_idx], self.has_image[i_idx]


def perturb(content: tuple[torch.Tensor, ...], spread: tuple[float, float], noise: float,
            drop: float, gen: torch.Generator) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``content`` (text, text_len, image, has_image) with Gaussian noise of ``noise`` x
    ``spread`` added to every token and patch, and each text token after the first
    dropped with probability ``drop`` (the kept ones move up, in order, and
    ``text_len`` shrinks: a dropped token is masked, not zeroed). The first token (a
    title, where there is one) always stays."""
    text, text_len, image, has_image = content
    if drop > 0 and text.shape[1] > 1:
        pos = torch.arange(text.shape[1])[None]
        keep = ((torch.rand(text.shape[:2], generator=gen) >= drop) | (pos == 0)) & (
            pos < text_len[:, None]
        )  # (I, Lt)
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        text = torch.gather(text, 1, order[..., None].expand_as(text))
        text_len = keep.sum(1)
    if noise > 0:
        text = text + noise * spread[0] * torch.randn(text.shape, generator=gen)
        image = image + noise * spread[1] * torch.randn(image.shape, generator=gen)
    return text, text_len, image, has_image


def tower_forward(
    model: nn.Module, content: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(emb (I, Q, D), ita logit or None, tia logit or None). Baselines have no tower:
    they get a (I, 1, 1) zero embedding they never read."""
    if isinstance(model, CameNN):
        return model.tower(*content)
    if isinstance(model, EM3):
        return model.tower(*content), None, None
    return torch.zeros(len(content[0]), 1, 1), None, None


def bucketed_tower_forward(
    model: nn.Module, cat: CatalogTensors, items: torch.Tensor, buckets: int = 4
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`tower_forward` over ``items`` in text-length buckets (see
    :func:`tower_in_buckets`); results come back in ``items`` order."""
    return tower_in_buckets(model, cat.content(items), buckets)


def tower_in_buckets(
    model: nn.Module, content: tuple[torch.Tensor, ...], buckets: int = 4
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`tower_forward` over ``content`` (text, text_len, image, has_image) in
    text-length buckets, each trimmed to its own longest text: padding costs attention
    and MLP work but changes nothing, since it is masked, and items do not see each
    other. Results come back in input order."""
    text, text_len, image, has_image = content
    order = torch.argsort(text_len)
    parts = []
    for chunk in order.chunk(buckets):
        lt = max(1, int(text_len[chunk].max()))
        parts.append(tower_forward(model, (text[chunk, :lt], text_len[chunk], image[chunk],
                                           has_image[chunk])))  # fmt: skip
    inverse = torch.argsort(order)
    emb = torch.cat([p[0] for p in parts])[inverse]
    if parts[0][1] is None:
        return emb, None, None
    ita = torch.cat([p[1] for p in parts if p[1] is not None])[inverse]
    tia = torch.cat([p[2] for p in parts if p[2] is not None])[inverse]
    return emb, ita, tia


def ranker_inputs(emb: torch.Tensor, cat: CatalogTensors, items: torch.Tensor, b: Batch
                  ) -> dict[str, torch.Tensor]:  # fmt: skip
    """The seven DESIGN section 3 tensors of a batch, given the batch items' embeddings."""
    hist_pos = torch.from_numpy(b.hist_pos)
    hist_mask = torch.from_numpy(b.hist_mask)
    cand_pos = torch.from_numpy(b.cand_pos)
    sparse = cat.sparse[items]  # (I_b, Fi)
    return {
        "user_sparse": torch.from_numpy(b.user_sparse),
        "hist_emb": emb[hist_pos] * hist_mask[..., None, None],  # (U, N, Q, D)
        "hist_sparse": sparse[hist_pos] * hist_mask[..., None],  # (U, N, Fi), 0 = padding
        "hist_mask": hist_mask,
        "cand_emb": emb[cand_pos],  # (B, Q, D)
        "cand_sparse": sparse[cand_pos],
        "cand_user": torch.from_numpy(b.cand_user),
    }


def batch_loss(model: nn.Module, cat: CatalogTensors, b: Batch, s: TrainSettings,
               gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    items = torch.from_numpy(b.items)
    emb, _, _ = bucketed_tower_forward(model, cat, items)  # ITA/TIA: their own passes
    logits = model.get_submodule("ranker")(**ranker_inputs(emb, cat, items, b))
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(b.label))
    parts = {"cvr": loss.item()}
    if isinstance(model, CameNN):
        pair = alignment_losses(model, cat, items, s, gen)
        if pair is not None:
            loss = loss + pair[0] + pair[1]
            parts |= {"ita": pair[0].item(), "tia": pair[1].item()}
    if isinstance(model, EM3 | CameNN) and model.cfg.cic_weight > 0:
        pick = torch.randperm(len(items), generator=gen)[: s.cic_items]
        l_cic = model.cic_loss(emb[pick], cat.sparse[items[pick]])
        loss = loss + model.cfg.cic_weight * l_cic
        parts["cic"] = l_cic.item()
    return loss, parts


def align_items(cat: CatalogTensors, batch_items: torch.Tensor, s: TrainSettings,
                gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Up to ``s.align_items`` distinct pool items for one step's ITA/TIA losses, drawn
    per ``s.align_sampling`` (from the whole pool, or from ``batch_items``)."""
    if s.align_sampling == "pool":
        pool = cat.align_pool
    elif s.align_sampling == "batch":
        pool = batch_items[cat.align_ok[batch_items]]
    else:
        raise ValueError(f"align_sampling must be 'pool' or 'batch', not {s.align_sampling!r}")
    return pool[torch.randperm(len(pool), generator=gen)[: s.align_items]]


def alignment_losses(model: CameNN, cat: CatalogTensors, items: torch.Tensor, s: TrainSettings,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
    """ITA and TIA BCE over the pool items :func:`align_items` draws from ``items``
    (None when fewer than two): each with its own content is a positive; with another
    item's text (ITA) or image (TIA) swapped in (:meth:`CatalogTensors.align_negatives`),
    a negative; every pair perturbed alike (:func:`perturb`, ``s.align_noise`` /
    ``s.align_drop``)."""
    own = align_items(cat, items, s, gen)
    if len(own) < 2:
        return None
    other = cat.align_negatives(own, s.align_hard_share, gen)

    def view(content: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return perturb(content, cat.spread, s.align_noise, s.align_drop, gen)

    # the three views in one pass, in text-length buckets (perturbation shortens texts)
    views = [view(cat.content(own)), view(cat.content(own, text_from=other)),
             view(cat.content(own, image_from=other))]  # fmt: skip
    lt = max(v[0].shape[1] for v in views)
    text = torch.cat([F.pad(v[0], (0, 0, 0, lt - v[0].shape[1])) for v in views])
    joined = (text, *(torch.cat([v[j] for v in views]) for j in (1, 2, 3)))
    _, ita, tia = tower_in_buckets(model, joined)
    assert ita is not None and tia is not None, "CameNN's tower has ITA/TIA heads"
    n = len(own)
    target = torch.cat([torch.ones(n), torch.zeros(n)])
    return (
        F.binary_cross_entropy_with_logits(ita[: 2 * n], target),  # own, text swapped
        F.binary_cross_entropy_with_logits(torch.cat([tia[:n], tia[2 * n :]]), target),
    )


@torch.no_grad()
def predict(model: nn.Module, cat: CatalogTensors, split: Split, max_hist: int,
            cands_per_batch: int = 4096) -> np.ndarray:  # fmt: skip
    """CVR probabilities for every candidate of ``split``, in split order."""
    was_training = model.training
    model.eval()
    out = np.empty(len(split.label), dtype=np.float32)
    pos = 0
    for b in iter_batches(split, cands_per_batch, max_hist):
        items = torch.from_numpy(b.items)
        emb, _, _ = bucketed_tower_forward(model, cat, items)
        p = torch.sigmoid(
            model.get_submodule("ranker")(**ranker_inputs(emb, cat, items, b))
        ).numpy()
        out[pos : pos + len(p)] = p
        pos += len(p)
    model.train(was_training)
    return out


def auc(label: np.ndarray, score: np.ndarray) -> float:
    return float(roc_auc_score(label, score))


def fit(model: nn.Module, train: Split, valid: Split, cat: CatalogTensors, s: TrainSettings
        ) -> dict[str, Any]:  # fmt: skip
    """Train with early stopping on validation AUC; the model ends with the best
    weights seen (with ``s.ema_decay``, the best averaged weights: those are what was
    validated). EM3 runs two stages (full training on ``short_hist`` histories, then
    frozen attention + LoRA on ``max_hist`` ones), each with its own early stopping,
    stage 2 starting from stage 1's best. CameNN ends with :func:`align_phase` on the
    kept weights. Returns per-epoch losses and validation AUCs."""
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    state = _FitState(gen=torch.Generator().manual_seed(s.seed), rng=np.random.default_rng(s.seed))
    if isinstance(model, EM3):
        model.set_lora_stage(1)
        _run_stage(
            model, train, valid, cat, s, state, 1, max(1, s.epochs - s.lora_epochs), s.short_hist
        )
        model.load_state_dict(state.best_state)
        model.set_lora_stage(2)
        state.best = -math.inf  # stage 2 is judged on long histories
        _run_stage(model, train, valid, cat, s, state, 2, s.lora_epochs, s.max_hist)
    else:
        _run_stage(model, train, valid, cat, s, state, 1, s.epochs, s.max_hist)
    model.load_state_dict(state.best_state)
    if (
        isinstance(model, CameNN)
        and s.align_steps > 0
        and min(s.align_items, len(cat.align_pool)) > 1
    ):
        align_phase(model, valid, cat, s, state)
    model.eval()
    return {"history": state.history, "best_valid_auc": state.best,
            "train_seconds": time.perf_counter() - state.start}  # fmt: skip


def align_phase(model: CameNN, valid: Split, cat: CatalogTensors, s: TrainSettings,
                st: _FitState) -> None:  # fmt: skip
    """``s.align_steps`` ITA/TIA-only steps on the tower's alignment parameters (pool
    items, full rate), within the time cap; a history row with the mean losses and the
    validation AUC after them (the embedding moves only through ``cls_gate``). Both
    ``align_sampling`` modes draw from the whole pool here: it is the batch."""
    names = model.tower.alignment_parameter_names()
    params = [p for n, p in model.tower.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    sums, done = [0.0, 0.0], 0
    model.train()
    for _ in tqdm(range(s.align_steps), desc="ITA/TIA steps", disable=not s.progress,
                  leave=False):  # fmt: skip
        if s.max_minutes > 0 and time.perf_counter() - st.start > 60 * s.max_minutes:
            break
        pair = alignment_losses(model, cat, cat.align_pool, s, st.gen)
        if pair is None:  # fewer than two pool items (fit does not start the phase then)
            break
        l_ita, l_tia = pair
        opt.zero_grad(set_to_none=True)
        (l_ita + l_tia).backward()
        opt.step()
        sums[0] += l_ita.item()
        sums[1] += l_tia.item()
        done += 1
    v_auc = auc(valid.label, predict(model, cat, valid, s.max_hist))
    st.history.append({"stage": "align", "steps": done, "valid_auc": v_auc,
                       "seconds": time.perf_counter() - st.start,
                       "loss_ita": sums[0] / max(done, 1), "loss_tia": sums[1] / max(done, 1)})  # fmt: skip
    log.info("ITA/TIA phase: %d steps, valid AUC %.4f after (%.0f s)", done, v_auc,
             st.history[-1]["seconds"])  # fmt: skip


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimiser groups: the item tower's parameters named
    by its ``slow_parameter_names()`` (CameNN: see there; a tower without it: all of
    them) at ``lr`` x the config's ``tower_lr_mult`` (1 when the model has none),
    everything else at ``lr``.
    Measured (CameNN, 2 epochs, half look-alike negatives): heads at 0.1x, ITA/TIA
    0.68 / 0.68 on planted mismatches; at the full rate 0.75 / 0.71 (test AUC 0.7802
    and 0.7809)."""
    mult = float(getattr(getattr(model, "cfg", None), "tower_lr_mult", 1.0))
    tower = getattr(model, "tower", None)
    tower_ids: set[int] = set()
    if isinstance(tower, nn.Module):
        slow = getattr(tower, "slow_parameter_names", None)
        names = slow() if callable(slow) else {n for n, _ in tower.named_parameters()}
        tower_ids = {id(p) for n, p in tower.named_parameters() if n in names}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in tower_ids], "lr": lr * mult},
        {"params": [p for p in trainable if id(p) not in tower_ids], "lr": lr},
    ]
    return [g for g in groups if g["params"]]


class WeightAverage:
    """An exponential moving average of a model's trainable parameters (Polyak
    averaging): ``update`` after each optimiser step; inside ``applied()`` the model
    holds the averages and its own weights come back on exit, exceptions included.
    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so early steps are not
    averaged with the random initialisation for long."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.params: list[torch.Tensor] = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)
        self.steps += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        own = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, own)


@dataclass
class _FitState:
    gen: torch.Generator
    rng: np.random.Generator
    best: float = -math.inf
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)


def _run_stage(model: nn.Module, train: Split, valid: Split, cat: CatalogTensors,
               s: TrainSettings, st: _FitState, stage: int, epochs: int, hist_len: int
               ) -> None:  # fmt: skip
    opt = torch.optim.AdamW(param_groups(model, s.lr), betas=s.betas, weight_decay=s.weight_decay)
    n_batches = math.ceil(len(train.label) / s.cands_per_batch)
    bad = 0
    avg = WeightAverage(model, s.ema_decay) if s.ema_decay > 0 else None
    model.train()
    for epoch in range(epochs):
        bar = tqdm(iter_batches(train, s.cands_per_batch, hist_len, st.rng), total=n_batches,
                   desc=f"stage {stage} epoch {epoch + 1}/{epochs}", disable=not s.progress,
                   leave=False)  # fmt: skip
        sums: dict[str, float] = {}
        for b in bar:
            loss, parts = batch_loss(model, cat, b, s, st.gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if avg is not None:
                avg.update()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
        with avg.applied() if avg is not None else contextlib.nullcontext():
            v_auc = auc(valid.label, predict(model, cat, valid, hist_len))
            improved = v_auc > st.best or not st.best_state
            if improved:  # kept while the validated (averaged) weights are in the model
                st.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        row = {"stage": stage, "epoch": epoch + 1, "valid_auc": v_auc,
               "seconds": time.perf_counter() - st.start,
               **{f"loss_{k}": v / n_batches for k, v in sums.items()}}  # fmt: skip
        st.history.append(row)
        log.info(
            "stage %d epoch %d: valid AUC %.4f (%.0f s)", stage, epoch + 1, v_auc, row["seconds"]
        )
        if improved:
            st.best, bad = v_auc, 0
        else:
            bad += 1
        epoch_s = row["seconds"] - (st.history[-2]["seconds"] if len(st.history) > 1 else 0.0)
        out_of_time = s.max_minutes > 0 and row["seconds"] + epoch_s > 60 * s.max_minutes
        if bad >= s.patience or out_of_time:
            break
        model.train()
