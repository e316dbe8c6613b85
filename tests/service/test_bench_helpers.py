"""The service benchmark's measuring parts (``mmrank bench-service``): its Poisson
schedule is reproducible, the model-alone replay of that schedule counts queueing
the way the service's latency does, the merge measurement compares like with like, and
the whole benchmark runs its rounds against a real ``mmrank serve``. Behaviour only; no
speed is asserted."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from svc_fixtures import World, shared_world

from service.bench import (
    RATIOS,
    arrivals,
    make_requests,
    merge_costs,
    model_open_loop,
    render,
    run_bench,
)


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


def test_bench_service_reports_each_round_and_the_medians(w: World) -> None:
    """Two short rounds against a real ``mmrank serve``: every request answered 200, each
    round's comparisons computed from its own measurements, the reported figures the
    medians of the rounds'."""
    args = argparse.Namespace(repo=str(w.repo_a), store=str(w.store_file), work=None, k=20,
                              n=10, threads=1, max_batch_rows=None, concurrency=2,
                              seconds=1.0, rounds=2, server_cpus=None, client_cpus=None)  # fmt: skip
    res = run_bench(args)
    assert len(res["rounds"]) == 2
    for r in res["rounds"]:
        sat, half, m = r["saturation"], r["half_load"], r["model_only"]
        assert sat["errors"] == 0 and half["errors"] == 0 and sat["requests"] > 0
        assert r["throughput_ratio"] == pytest.approx(sat["throughput_rps"] / m["throughput_rps"])
        assert r["p50_delta_same_arrivals_ms"] == pytest.approx(
            half["p50_ms"] - r["model_half_load"]["p50_ms"]
        )
        assert r["model_half_load"]["rate_rps"] == half["rate_rps"] == sat["throughput_rps"] / 2
    for k in RATIOS:
        lo, hi = sorted(r[k] for r in res["rounds"])
        assert res[k] == pytest.approx((lo + hi) / 2) and res["spread"][k] == [lo, hi]
    assert "median over rounds" in render(res)
    with pytest.raises(ValueError, match="--store"):
        run_bench(argparse.Namespace(**{**vars(args), "store": None}))
