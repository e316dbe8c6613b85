"""Shapes, masks and batch independence of the item towers and rankers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch

from models import common
from models import em3 as em3_module
from models.baselines import Baseline, BaselineConfig
from models.camenn import CameNN, CameNNConfig
from models.common import MASKED_MAX_USERS, HistoryKernels
from models.em3 import EM3, EM3Config

USER_BUCKETS = [101, 7, 5]
ITEM_BUCKETS = [211, 13]


def camenn(attention: str, **overrides: Any) -> CameNN:
    torch.manual_seed(0)
    cfg = CameNNConfig(text_dim=12, image_dim=10, max_text_len=8, user_buckets=USER_BUCKETS,
                       item_buckets=ITEM_BUCKETS, attention=attention, **overrides)  # fmt: skip
    return CameNN(cfg).eval()


def em3() -> EM3:
    torch.manual_seed(0)
    cfg = EM3Config(text_dim=12, image_dim=10, max_text_len=8, user_buckets=USER_BUCKETS,
                    item_buckets=ITEM_BUCKETS)  # fmt: skip
    return EM3(cfg).eval()


MODELS: dict[str, Callable[[], CameNN | EM3]] = {
    "camenn-full": lambda: camenn("full"),
    "camenn-isolated": lambda: camenn("candidate-isolated"),
    "camenn-no-kernels": lambda: camenn("candidate-isolated", history_kernels=0),
    "em3": em3,
}


def content(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    text = torch.randn(n, 8, 12, generator=gen)
    text_len = torch.randint(0, 9, (n,), generator=gen)
    image = torch.randn(n, 9, 10, generator=gen)
    has_image = torch.rand(n, generator=gen) > 0.3
    return text, text_len, image, has_image


def ranker_inputs(
    model: CameNN | EM3, u: int, n: int, b: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, d = model.cfg.q, model.cfg.d
    hist_mask = torch.rand(u, n, generator=gen) > 0.3
    if n:
        hist_mask[0] = False  # one user with an empty (all padded) history
    return {
        "user_sparse": torch.randint(1, 5, (u, len(USER_BUCKETS)), generator=gen),
        "hist_emb": torch.randn(u, n, q, d, generator=gen) * hist_mask[..., None, None],
        "hist_sparse": torch.randint(1, 7, (u, n, len(ITEM_BUCKETS)), generator=gen)
        * hist_mask[..., None],
        "hist_mask": hist_mask,
        "cand_emb": torch.randn(b, q, d, generator=gen),
        "cand_sparse": torch.randint(1, 7, (b, len(ITEM_BUCKETS)), generator=gen),
        "cand_user": torch.randint(0, u, (b,), generator=gen),
    }


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_tower_shapes_and_missing_modalities(name: str) -> None:
    model = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    text, text_len, image, has_image = content(6, gen)
    text_len[0], has_image[1] = 0, False  # item 0 has no text, item 1 no image
    out = model.tower(text, text_len, image, has_image)
    emb = out[0] if isinstance(out, tuple) else out
    assert emb.shape == (6, model.cfg.q, model.cfg.d)
    assert torch.isfinite(emb).all()
    # masked content is never read: changing it changes nothing
    text2, image2 = text.clone(), image.clone()
    text2[0] += 100.0
    image2[1] += 100.0
    text2[2, int(text_len[2]) :] += 100.0  # padding beyond the text length
    out2 = model.tower(text2, text_len, image2, has_image)
    emb2 = out2[0] if isinstance(out2, tuple) else out2
    torch.testing.assert_close(emb, emb2, atol=1e-6, rtol=0)
    # ... while real content does matter
    text2[3, 0] += 1.0
    out3 = model.tower(text2, text_len, image2, has_image)
    emb3 = out3[0] if isinstance(out3, tuple) else out3
    assert (emb3[3] - emb[3]).abs().max() > 1e-4


@torch.no_grad()
def test_camenn_alignment_heads() -> None:
    model = camenn("full")
    _, ita, tia = model.tower(*content(5, torch.Generator().manual_seed(2)))
    assert ita.shape == tia.shape == (5,)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n", [0, 1, 7])
@torch.no_grad()
def test_ranker_shapes_and_empty_history(name: str, n: int) -> None:
    model = MODELS[name]()
    x = ranker_inputs(model, u=3, n=n, b=11)
    logits = model.ranker(**x)
    assert logits.shape == (11,)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_padded_history_is_ignored(name: str) -> None:
    model = MODELS[name]()
    x = ranker_inputs(model, u=4, n=6, b=9)
    base = model.ranker(**x)
    y = dict(x)
    y["hist_emb"] = x["hist_emb"] + 50.0 * (~x["hist_mask"])[..., None, None]
    torch.testing.assert_close(model.ranker(**y), base, atol=1e-5, rtol=0)
    # extra padding columns change nothing either
    pad = {"hist_emb": torch.zeros(4, 3, model.cfg.q, model.cfg.d), "hist_sparse": torch.zeros(4, 3, 2, dtype=torch.long),
           "hist_mask": torch.zeros(4, 3, dtype=torch.bool)}  # fmt: skip
    z = dict(x)
    for k, v in pad.items():
        z[k] = torch.cat([x[k], v], dim=1)
    torch.testing.assert_close(model.ranker(**z), base, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_batch_independence(name: str) -> None:
    """A candidate scored alone equals its score inside a mixed batch of several users."""
    model = MODELS[name]()
    x = ranker_inputs(model, u=5, n=7, b=40)
    mixed = model.ranker(**x)
    for i in range(0, 40, 7):
        u = int(x["cand_user"][i])
        alone = model.ranker(
            user_sparse=x["user_sparse"][u : u + 1],
            hist_emb=x["hist_emb"][u : u + 1],
            hist_sparse=x["hist_sparse"][u : u + 1],
            hist_mask=x["hist_mask"][u : u + 1],
            cand_emb=x["cand_emb"][i : i + 1],
            cand_sparse=x["cand_sparse"][i : i + 1],
            cand_user=torch.zeros(1, dtype=torch.long),
        )
        assert abs(float(alone[0]) - float(mixed[i])) <= 1e-5


@pytest.mark.parametrize("name", ["camenn-isolated", "em3"])
@pytest.mark.parametrize("u", [1, 3, 6])
@torch.no_grad()
def test_isolated_attention_layouts_agree(name: str, u: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The masked layout (exported graphs, few users) and the gathered one (training
    batches) are the same function, empty histories included: CameNN's
    ``attend_own_user``, EM3's target attention, and the history kernels of both."""
    model = MODELS[name]()
    x = ranker_inputs(model, u=u, n=6, b=25, seed=u)
    out = {}
    for limit in (0, 10):  # 0: every batch gathered; 10: these batches masked
        monkeypatch.setattr(common, "MASKED_MAX_USERS", limit)
        monkeypatch.setattr(em3_module, "MASKED_MAX_USERS", limit)
        out[limit] = model.ranker(**x)
    assert torch.allclose(out[0], out[10], atol=1e-6, rtol=0)


@torch.no_grad()
def test_attention_modes_share_weights_but_differ() -> None:
    full, iso = camenn("full"), camenn("candidate-isolated")
    iso.load_state_dict(full.state_dict())
    x = ranker_inputs(full, u=2, n=5, b=6)
    a, b = full.ranker(**x), iso.ranker(**x)
    assert a.shape == b.shape and (a - b).abs().max() > 1e-6


def test_em3_lora_stages() -> None:
    model = em3()
    lora = model.ranker.lora_modules()
    before = [m.merged_weight().detach().clone() for m in lora]
    for m, w in zip(lora, before, strict=True):
        torch.testing.assert_close(w, m.base.weight)  # B = 0: LoRA starts as a no-op
    model.set_lora_stage(1)
    assert all(m.base.weight.requires_grad and not m.lora_b.requires_grad for m in lora)
    model.set_lora_stage(2)
    assert all(not m.base.weight.requires_grad and m.lora_b.requires_grad for m in lora)
    assert model.ranker.dnn[0].weight.requires_grad  # the rest keeps training


@pytest.mark.parametrize("name", ["em3", "camenn"])
def test_cic_loss_is_infonce_over_the_batch(name: str) -> None:
    """Matched ID/content pairs score lower loss than the same batch with pairs shuffled
    once the projections are aligned; here: identical projections of one signal."""
    model = em3() if name == "em3" else camenn("candidate-isolated")
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(16, model.cfg.q, 64, generator=gen, requires_grad=True)
    sparse = torch.stack(
        [torch.randint(1, 211, (16,), generator=gen), torch.randint(1, 13, (16,), generator=gen)], 1
    )
    loss = model.cic_loss(emb, sparse)
    assert loss.ndim == 0 and 0 < loss.item() < 2 * torch.log(torch.tensor(16.0)) + 1
    loss.backward()
    assert (
        model.cic_id.weight.grad is not None and emb.grad is not None and emb.grad.abs().sum() > 0
    )
    # a few steps on this batch drive the matched pairs together: loss falls well below log(16)
    opt = torch.optim.Adam([*model.cic_id.parameters(), *model.cic_content.parameters(),
                            *model.ranker.item_fields.parameters()], lr=1e-2)  # fmt: skip
    for _ in range(100):
        opt.zero_grad()
        model.cic_loss(emb.detach(), sparse).backward()
        opt.step()
    assert model.cic_loss(emb.detach(), sparse).item() < 0.5 * float(torch.log(torch.tensor(16.0)))


@pytest.mark.parametrize("kind", ["lr", "din", "bst"])
@torch.no_grad()
def test_baselines_take_the_same_tensors(kind: str) -> None:
    model = Baseline(
        BaselineConfig(kind=kind, user_buckets=USER_BUCKETS, item_buckets=ITEM_BUCKETS)
    ).eval()
    x = ranker_inputs(camenn("full"), u=3, n=4, b=8)
    assert model.ranker(**x).shape == (8,)


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_item_embedding_does_not_depend_on_text_padding(name: str) -> None:
    """The same item gets the same embedding however far its batch pads the text."""
    model = MODELS[name]()
    text, text_len, image, has_image = content(4, torch.Generator().manual_seed(5))
    text_len = torch.tensor([2, 3, 1, 0])
    short = model.tower(text[:, :3], text_len, image, has_image)
    long = model.tower(text, text_len, image, has_image)  # padded to 8
    a = short[0] if isinstance(short, tuple) else short
    b = long[0] if isinstance(long, tuple) else long
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if isinstance(short, tuple) and isinstance(long, tuple):
        torch.testing.assert_close(short[1], long[1], atol=1e-5, rtol=0)  # ITA


def test_history_kernels_are_shares_of_the_history() -> None:
    torch.manual_seed(0)
    k = HistoryKernels(6, d_proj=4, n_kernels=5)  # centres -1, -0.5, 0, 0.5, 1
    c = torch.randn(2, 6)
    hist = torch.stack([c[0].expand(4, 6), torch.randn(4, 6)])  # (U=2, N=4, 6)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out = k(hist, mask, c, torch.tensor([0, 1]))  # (B=2, K=5)
    # user 0's real history is two copies of candidate 0: cosine 1, all in the last kernel
    assert torch.allclose(out[0], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]), atol=1e-4)
    assert torch.equal(out[1], torch.zeros(5))  # no real history: no counts
    hist[0, 2:] = 100.0  # padding never counts
    assert torch.equal(k(hist, mask, c, torch.tensor([0, 1])), out)


@torch.no_grad()
def test_history_kernels_layouts_agree() -> None:
    """Up to MASKED_MAX_USERS user rows the kernels compare every candidate with every
    row's history and pick its own (no copies); past it each candidate gets a copy of its
    row's history. Six rows (copies) give each candidate what its row alone (masked)
    gives, empty and partly padded histories included."""
    torch.manual_seed(0)
    k = HistoryKernels(8, d_proj=4, n_kernels=5, views=2)
    u, n, b = MASKED_MAX_USERS + 2, 7, 20
    hist, cand = torch.randn(u, n, 8), torch.randn(b, 8)
    mask = torch.rand(u, n) < 0.6
    mask[0] = False  # an empty history
    cand_user = torch.randint(0, u, (b,))
    together = k(hist, mask, cand, cand_user)
    for r in range(u):
        mine = cand_user == r
        alone = k(
            hist[r : r + 1],
            mask[r : r + 1],
            cand[mine],
            torch.zeros(int(mine.sum()), dtype=torch.long),
        )
        torch.testing.assert_close(together[mine], alone, atol=1e-6, rtol=0)
    assert torch.equal(together[cand_user == 0], torch.zeros(int((cand_user == 0).sum()), 10))


@torch.no_grad()
def test_history_kernel_views_measure_similarity_each_in_its_own_projection() -> None:
    """View 0 reads the first two input dimensions, view 1 the last two: a history item
    equal to the candidate in the first half only is a full match in view 0 and an
    opposite in view 1, so each view's shares say which attribute matched."""
    k = HistoryKernels(4, d_proj=2, n_kernels=5, views=2)
    k.proj.weight.copy_(torch.eye(4))  # rows 0-1: view 0, rows 2-3: view 1
    cand = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    hist = torch.tensor([[[1.0, 0.0, -1.0, 0.0], [1.0, 0.0, -1.0, 0.0]]])  # (U=1, N=2, 4)
    out = k(hist, torch.ones(1, 2, dtype=torch.bool), cand, torch.tensor([0]))
    assert out.shape == (1, k.out_features) == (1, 10)
    torch.testing.assert_close(
        out[0, :5], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        out[0, 5:], torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), atol=1e-4, rtol=0
    )
    one = HistoryKernels(4, d_proj=2, n_kernels=5)
    one.proj.weight.copy_(torch.eye(4)[:2])
    torch.testing.assert_close(one(hist, torch.ones(1, 2, dtype=torch.bool), cand, torch.tensor([0])),
                               out[:, :5])  # fmt: skip


@pytest.mark.parametrize("recency", [True, False])
@torch.no_grad()
def test_em3_recency_reads_the_history_order(recency: bool) -> None:
    """Histories come newest first: with ``recency`` the same items in another order
    score differently; without it target attention is order-blind."""
    torch.manual_seed(0)
    cfg = EM3Config(text_dim=12, image_dim=10, max_text_len=8, user_buckets=USER_BUCKETS,
                    item_buckets=ITEM_BUCKETS, recency=recency)  # fmt: skip
    model = EM3(cfg).eval()
    x = ranker_inputs(model, u=2, n=6, b=8)
    x["hist_mask"] = torch.ones(2, 6, dtype=torch.bool)  # every position real
    y = dict(x)
    for k in ("hist_emb", "hist_sparse"):
        y[k] = x[k].flip(1)
    a, b = model.ranker(**x), model.ranker(**y)
    if recency:
        assert (a - b).abs().max() > 1e-4
    else:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("field", "old", "keys"),
    [
        ("cic_weight", 0.0, "cic_"),
        ("positional_pool", False, "tower.pool_placed."),
        ("content_ffn", False, "tower.pool_ffn."),
    ],
)
def test_camenn_runs_saved_before_a_field_load_without_it(field: str, old: object,
                                                          keys: str) -> None:  # fmt: skip
    """A CameNN ``config.json`` written before ``field`` existed was trained without what
    it turns on: it loads with the old value and without those weights (its state dict
    has none), while the default has them."""
    from training.runs import model_from_config

    cfg = dataclasses.asdict(camenn("candidate-isolated").cfg)
    del cfg[field]
    legacy = cast(CameNN, model_from_config("camenn", cfg))
    assert getattr(legacy.cfg, field) == old
    assert not any(k.startswith(keys) for k in legacy.state_dict())
    assert any(k.startswith(keys) for k in camenn("candidate-isolated").state_dict())
