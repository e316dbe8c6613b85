"""The world's ceilings: computed from its hidden truth, on the real generator's output."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.ceilings import ceilings
from training.evaluate import balanced_alignment_items


def test_ceilings_of_a_tiny_world(tiny_world: Path) -> None:
    m = ceilings(tiny_world)
    # a model with the true attributes ranks well, but not above the oracle
    assert 0.7 < m["latent_auc"] <= m["oracle_auc"] + 0.02
    # supervised category agreement finds planted mismatches far above chance (0.5)
    assert m["alignment_ceiling"] >= 0.7
    assert m["alignment_test_items"] >= 10


def test_balanced_alignment_items_take_every_held_out_mismatch() -> None:
    mismatch = np.array([1, 0, 0, 1, 0, 0, 1, 0], dtype=bool)
    held = np.array([1, 1, 1, 1, 1, 0, 0, 1], dtype=bool)
    got = balanced_alignment_items(mismatch, held, seed=0)
    assert got is not None
    items, aligned = got
    assert sorted(items[~aligned].tolist()) == [0, 3]  # item 6 is not held out
    assert len(items[aligned]) == 2 and set(items[aligned].tolist()) <= {1, 2, 4, 7}
    assert balanced_alignment_items(mismatch, held & ~mismatch, seed=0) is None
