"""ITA/TIA training: look-alike negatives of another kind (on small hand-built
catalogs) and the learning rates of the alignment heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.dataset import Catalog, FieldSpec
from models.camenn import CameNN, CameNNConfig
from training.loop import (
    CatalogTensors,
    TrainSettings,
    align_items,
    alignment_losses,
    look_alikes,
    param_groups,
    perturb,
    tower_in_buckets,
)

FIELDS = (FieldSpec("item_id", 101), FieldSpec("kind", 7))


def catalog(image_means: np.ndarray, kinds: list[int], kind_field: str | None = "kind") -> Catalog:
    n = len(kinds)
    image = np.repeat(image_means[:, None, :], 9, axis=1).astype(np.float32)  # (n, 9, 4)
    return Catalog(
        item_ids=np.array([f"i{k}" for k in range(n)]),
        text=np.ones((n, 3, 4), np.float32),
        text_len=np.full(n, 3),
        image=image,
        has_image=np.ones(n, bool),
        sparse=np.stack([np.arange(1, n + 1), np.array(kinds)], 1),
        fields=FIELDS,
        kind_field=kind_field,
    )


def test_look_alikes_are_the_most_similar_items_of_another_kind() -> None:
    # items 0-2 kind 1, 3-5 kind 2; 0 looks like 1 (same kind) and then like 3
    means = np.array([[1, 0, 0, 0], [1, 0.1, 0, 0], [0, 0, 1, 0],
                      [0.9, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # fmt: skip
    cat = catalog(means, [1, 1, 1, 2, 2, 2])
    got = look_alikes(cat, np.arange(6), k=1)
    assert got is not None
    assert got[0, 0] == 3 and got[1, 0] == 3  # never item 1 / 0: same kind
    kinds = cat.sparse[:, 1]
    full = look_alikes(cat, np.arange(6), k=3)
    assert full is not None and (kinds[full] != kinds[:, None]).all()


def test_no_look_alikes_without_a_kind_field_or_enough_other_kinds() -> None:
    means = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    assert look_alikes(catalog(means, [1, 1, 1, 2, 2, 2], kind_field=None), np.arange(6)) is None
    assert look_alikes(catalog(means, [1, 1, 1, 1, 1, 2]), np.arange(6), k=2) is None


def test_align_negatives_mix_look_alikes_and_random_pool_items() -> None:
    rng = np.random.default_rng(0)
    kinds = [1] * 20 + [2] * 20
    cat = catalog(rng.normal(size=(40, 4)), kinds)
    ct = CatalogTensors(cat, holdout=0.0, seed=0)
    own = ct.align_pool[:30]
    gen = torch.Generator().manual_seed(0)
    hard = ct.align_negatives(own, 1.0, gen)
    assert ct.align_hard is not None
    rows = ct.align_hard[ct.pool_row[own]]  # (30, k) each item's look-alikes
    assert all(int(h) in r.tolist() for r, h in zip(rows, hard, strict=True))
    k = torch.as_tensor(kinds)
    assert (k[hard] != k[own]).all()
    random = ct.align_negatives(own, 0.0, gen)
    assert set(random.tolist()) <= set(ct.align_pool.tolist())
    assert (k[random] == k[own]).any()  # random draws do not avoid the item's own kind


def test_align_items_come_from_the_pool_or_the_batch_distinct_and_never_held_out() -> None:
    cat = catalog(np.random.default_rng(0).normal(size=(200, 4)), [1] * 100 + [2] * 100)
    ct = CatalogTensors(cat, holdout=0.3, seed=0)
    pool = set(ct.align_pool.tolist())
    held = set(np.flatnonzero(ct.align_test).tolist())
    batch = torch.arange(0, 40)  # a batch that sees the first 40 items only
    gen = torch.Generator().manual_seed(0)
    seen: set[int] = set()
    pool_mode = TrainSettings(align_items=16, align_sampling="pool")
    for _ in range(20):
        got = align_items(ct, batch, pool_mode, gen).tolist()
        assert len(got) == len(set(got)) == 16 and set(got) <= pool
        seen |= set(got)
    assert max(seen) >= 40 and not seen & held  # the whole pool, beyond the batch
    s = TrainSettings(align_items=1000, align_sampling="batch")
    got = align_items(ct, batch, s, gen).tolist()
    assert sorted(got) == sorted(set(range(40)) & pool)  # every pool item of the batch, once
    with pytest.raises(ValueError, match="align_sampling"):
        align_items(ct, batch, TrainSettings(align_sampling="everything"), gen)


def test_alignment_path_learns_at_the_full_rate_and_the_content_path_slower() -> None:
    model = CameNN(CameNNConfig(user_buckets=[7], item_buckets=[11], tower_lr_mult=0.1))
    groups = param_groups(model, lr=1e-3)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    t = model.tower
    for fast in (t.ita, t.tia, t.text_in, t.image_in, t.blocks, t.ln_a):
        assert all(lr_of[id(p)] == 1e-3 for p in fast.parameters())
    assert lr_of[id(t.cls)] == lr_of[id(t.cls_gate)] == 1e-3
    for slow in (t.pool_text, t.pool_image, t.ln_f):
        assert all(lr_of[id(p)] == 1e-3 * 0.1 for p in slow.parameters())
    assert all(lr_of[id(p)] == 1e-3 for p in model.ranker.parameters())
    assert len(lr_of) == sum(1 for _ in model.parameters())  # every parameter in one group


def test_one_path_tower_learns_slower_except_its_heads() -> None:
    cfg = CameNNConfig(user_buckets=[7], item_buckets=[11], tower_lr_mult=0.1, align_path=False)
    model = CameNN(cfg)
    lr_of = {id(p): g["lr"] for g in param_groups(model, lr=1e-3) for p in g["params"]}
    assert all(lr_of[id(p)] == 1e-3 for p in model.tower.ita.parameters())
    assert lr_of[id(model.tower.cls)] == 1e-3 * 0.1
    assert all(lr_of[id(p)] == 1e-3 * 0.1 for p in model.tower.blocks.parameters())


def test_cvr_gradient_into_the_cls_output_is_scaled_and_its_value_kept() -> None:
    """The content path sees the [CLS] output unchanged but passes back only
    ``tower_lr_mult`` of the gradient; the ITA/TIA heads' gradient is not scaled."""
    torch.manual_seed(0)
    cfg = CameNNConfig(user_buckets=[7], item_buckets=[11], tower_lr_mult=0.1, dropout=0.0)
    text, text_len = torch.randn(3, 5, 32), torch.tensor([5, 2, 0])
    image, has_image = torch.randn(3, 9, 32), torch.tensor([True, False, True])
    # a weighted sum: the plain sum of a LayerNorm's output has a zero gradient
    w = torch.randn(3, 1, cfg.d_model, generator=torch.Generator().manual_seed(2))
    grads = []
    for scale in (1.0, 0.1):
        torch.manual_seed(1)  # the same weights both times
        model = CameNN(cfg)
        model.tower.cvr_grad_scale = scale
        with torch.no_grad():
            model.tower.cls_gate.fill_(1.0)
        emb, _, _ = model.tower(text, text_len, image, has_image)
        (emb * w).sum().backward()
        assert model.tower.cls.grad is not None
        grads.append((emb.detach(), model.tower.cls.grad.clone()))
    # the same embedding up to float32 rounding: cls * s + cls * (1 - s) is cls within
    # an ulp or two, which after the LayerNorm (values up to ~4) is ~5e-7 on some CPUs
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=2e-6)
    assert grads[0][1].abs().max() > 1e-3  # a real gradient, not rounding noise
    # atol for entries that cancel to near 0, where float32 rounding is relatively large
    assert torch.allclose(grads[1][1], grads[0][1] * 0.1, rtol=1e-4, atol=1e-5)


def test_perturb_masks_dropped_tokens_keeps_the_title_and_the_order() -> None:
    text = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 6, 1).expand(2, 6, 3).clone()
    text_len = torch.tensor([6, 0])
    image, has_image = torch.zeros(2, 9, 3), torch.tensor([True, False])
    gen = torch.Generator().manual_seed(0)
    t, tl, im, hi = perturb((text, text_len, image, has_image), (1.0, 1.0), 0.0, 0.5, gen)
    assert tl[1] == 0 and 1 <= tl[0] <= 6  # an empty text stays empty
    kept = t[0, : int(tl[0]), 0]
    assert kept[0] == 0  # the first token (a title) always stays
    assert (kept[1:] > kept[:-1]).all()  # kept tokens move up, in order
    assert set(kept.tolist()) <= set(range(6))
    assert im is image and hi is has_image  # no noise asked: the image is untouched
    same = perturb((text, text_len, image, has_image), (1.0, 1.0), 0.0, 0.0, gen)
    assert same[0] is text and same[1] is text_len  # nothing asked, nothing changed
    noisy = perturb((text, text_len, image, has_image), (2.0, 0.5), 1.0, 0.0, gen)
    assert 1.5 < float((noisy[0] - text).std()) < 2.5
    assert 0.3 < float((noisy[2] - image).std()) < 0.7


def random_content(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """n items of 32-wide text (lengths 0-12) and 9 patches, some without an image."""
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(0, 13, (n,), generator=g)
    text = torch.randn(n, 12, 32, generator=g)
    image, has_image = torch.randn(n, 9, 32, generator=g), torch.rand(n, generator=g) > 0.2
    return text, text_len, image, has_image


@pytest.mark.parametrize("model_name", ["camenn", "em3"])
def test_towers_in_text_length_buckets_give_one_pass_outputs_in_input_order(
    model_name: str,
) -> None:
    from models.em3 import EM3, EM3Config
    from training.loop import tower_forward

    torch.manual_seed(0)
    model = (CameNN(CameNNConfig(user_buckets=[7], item_buckets=[11])) if model_name == "camenn"
             else EM3(EM3Config(user_buckets=[7], item_buckets=[11]))).eval()  # fmt: skip
    content = random_content(23, seed=1)
    whole = tower_forward(model, content)
    parts = tower_in_buckets(model, content, buckets=4)
    for got, want in zip(parts, whole, strict=True):
        if want is None:
            assert got is None
        else:
            assert got is not None
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_alignment_losses_in_one_pass_equal_three_separate_passes() -> None:
    """ITA on (own, text swapped), TIA on (own, image swapped): the joined, bucketed pass
    gives the losses of one tower pass per view (no dropout, no perturbation, so the
    views are exact)."""
    torch.manual_seed(0)
    n = 40
    text, text_len, image, has_image = random_content(n, seed=2)
    cat = CatalogTensors(Catalog(
        item_ids=np.array([f"i{k}" for k in range(n)]), text=text.numpy(),
        text_len=text_len.numpy(), image=image.numpy(), has_image=has_image.numpy(),
        sparse=np.stack([np.arange(1, n + 1), np.arange(n) % 4 + 1], 1), fields=FIELDS,
        kind_field="kind"), holdout=0.0, seed=0)  # fmt: skip
    model = CameNN(CameNNConfig(user_buckets=[7], item_buckets=[101, 7])).eval()
    s = TrainSettings(align_items=16, align_noise=0.0, align_drop=0.0)
    items = torch.arange(n)
    got = alignment_losses(model, cat, items, s, torch.Generator().manual_seed(3))
    assert got is not None
    gen = torch.Generator().manual_seed(3)  # the same draws, by hand
    own = align_items(cat, items, s, gen)
    other = cat.align_negatives(own, s.align_hard_share, gen)
    _, ita_pos, tia_pos = model.tower(*cat.content(own))
    _, ita_neg, _ = model.tower(*cat.content(own, text_from=other))
    _, _, tia_neg = model.tower(*cat.content(own, image_from=other))
    target = torch.cat([torch.ones(len(own)), torch.zeros(len(own))])
    want = (F.binary_cross_entropy_with_logits(torch.cat([ita_pos, ita_neg]), target),
            F.binary_cross_entropy_with_logits(torch.cat([tia_pos, tia_neg]), target))  # fmt: skip
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert abs(got[0].item() - got[1].item()) > 1e-6  # two different losses, not one twice
