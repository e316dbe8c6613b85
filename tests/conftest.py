"""Shared fixtures: small real worlds written to disk by the real generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from data.world import WorldConfig, write_world


def tiny_world_config(seed: int = 0) -> WorldConfig:
    """A world small enough to train on in seconds, same generator as the default."""
    return WorldConfig(
        seed=seed, n_users=400, n_items=300, requests_per_user=4.0, cands_per_request=10
    )


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(tiny_world_config(), out)
    return out
