"""``mmrank bench`` with tiny settings, end to end for real (a small exported CameNN,
redis-server, ``mmrank serve``, the naive FastAPI + torch service, Triton where it can
start): the output files and their structure, and that every server scored the same
request alike. Not speed: the numbers of a shared CI machine say nothing."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.side_by_side import SYSTEMS
from mmrank.cli import main


def test_bench_writes_json_markdown_and_png(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "--out", str(out), "--work", str(tmp_path / "work"), "--items", "150",
               "--users", "80", "--k", "8,16", "--requests", "6", "--seconds", "0.3",
               "--fractions", "0.5", "--concurrency", "2"])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "bench.json").read_text())
    assert set(doc) >= {"machine", "setup", "results", "ratios", "parity_max_abs_diff",
                        "skipped", "targets"}  # fmt: skip
    assert doc["setup"]["k"] == [8, 16] and doc["machine"]["cores"] >= 1
    measured = [s for s in SYSTEMS if s not in doc["skipped"]]
    assert {"ceiling", "mmrank", "naive"} <= set(measured)
    assert set(measured) | set(doc["skipped"]) == set(SYSTEMS)  # Triton: measured or why not
    for s in measured:
        for k in ("8", "16"):
            r = doc["results"][s][k]
            assert r["saturation"]["throughput_rps"] > 0 and r["saturation"]["requests"] > 0
            if s != "ceiling":
                assert r["saturation"]["errors"] == 0
                [load] = r["loads"]
                assert load["fraction"] == 0.5 and load["errors"] == 0
                assert 0 < load["p50_ms"] <= load["p95_ms"] <= load["p99_ms"]
    for k in ("8", "16"):
        r = doc["ratios"][k]
        assert {"mmrank/ceiling", "mmrank/naive"} <= set(r)
        # the model alone before and after the servers; the ratio to their mean lies between
        assert doc["results"]["ceiling"][k]["after"]["throughput_rps"] > 0
        assert r["mmrank/ceiling_low"] <= r["mmrank/ceiling"] <= r["mmrank/ceiling_high"]
    # the systems compute the same scores (the comparison is of engineering, not models)
    assert set(doc["parity_max_abs_diff"]) == set(measured) - {"ceiling"}
    assert max(doc["parity_max_abs_diff"].values()) <= 1e-5
    md = (out / "bench.md").read_text()
    assert "| K |" in md and "mmrank / naive" in md and "p99" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
