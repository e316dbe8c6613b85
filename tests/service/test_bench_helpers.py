"""The service benchmark's measuring parts (``mmrank bench-service``): its Poisson
schedule is reproducible, the model-alone replay of that schedule counts queueing
the way the service's latency does, and the merge measurement compares like with like.
Behaviour only; no speed is asserted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from svc_fixtures import World, shared_world

from service.bench import arrivals, make_requests, merge_costs, model_open_loop


@pytest.fixture(scope="session")
def w(tmp_path_factory: pytest.TempPathFactory, tiny_world: Path) -> World:
    return shared_world(tmp_path_factory.mktemp("svc"), tiny_world)


def test_arrivals_are_a_reproducible_poisson_schedule() -> None:
    a, b = arrivals(200.0, 10.0, seed=3), arrivals(200.0, 10.0, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, arrivals(200.0, 10.0, seed=4))
    assert np.all(np.diff(a) > 0) and a[0] > 0 and a[-1] < 10.0
    assert 1800 < len(a) < 2200  # Poisson(2000): 4.5 standard deviations either side
    gaps = np.diff(a)
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # exponential gaps: cv = 1


def test_model_replay_counts_queueing(w: World) -> None:
    reqs = make_requests(w.repo_a, w.store_file, 50, 20, 8)
    slow = model_open_loop(w.repo_a, reqs, 1, 5.0, 2.0, 256)
    flood = model_open_loop(w.repo_a, reqs, 1, 1e5, 0.002, 256)  # ~200 arrive at once
    assert slow["requests"] == len(arrivals(5.0, 2.0)) > 3 and flood["requests"] > 50
    # arriving together, the later requests wait for the earlier ones: the median request
    # waits for about half of the others, far longer than one request alone takes
    assert flood["p95_ms"] > 20 * slow["p50_ms"] > 0


def test_merge_costs_score_the_same_requests_both_ways(w: World) -> None:
    reqs = make_requests(w.repo_a, w.store_file, 12, 20, 9, zipf=1.0)  # varied histories
    rows = merge_costs(w.repo_a, reqs, 1, [2, 4, 16], rounds=1)
    assert [(r["k"], r["m"]) for r in rows] == [(12, 2), (12, 4)]  # 9 requests: no group of 16
    for r in rows:
        # one call of m users gives each candidate the score it gets alone
        assert r["max_score_diff"] <= 1e-5
        assert r["separate_ms"] > 0 and r["merged_ms"] > 0
        assert r["merged_over_separate"] == pytest.approx(r["merged_ms"] / r["separate_ms"])
