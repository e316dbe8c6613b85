"""``mmrank export`` on a really trained run and ``mmrank bench-model`` on exported
repositories, through the console script's own entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import MODELS, Exported, exported_models

from data.world import WorldConfig, write_world
from mmrank.cli import main
from model_export.repository import open_repository
from model_export.torch_reference import TorchReference
from training.loop import TrainSettings
from training.train import train_run


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    return exported_models(tmp_path_factory)


def test_export_a_trained_run(tmp_path: Path) -> None:
    run, repo, world = tmp_path / "run", tmp_path / "repo", tmp_path / "world"
    # a world smaller than tiny_world: the export path is under test, not the model
    write_world(WorldConfig(seed=0, n_users=120, n_items=150, requests_per_user=2.0), world)
    # a real (short) training run of a small EM3: the export path, not the model, is tested
    settings = TrainSettings(
        epochs=1, lora_epochs=1, max_hist=20, cands_per_batch=1024, progress=False
    )
    small = {
        "d_model": 16,
        "n_head": 2,
        "att_dim": 16,
        "cic_dim": 8,
        "dnn_hidden": [32],
        "field_dim": 4,
    }
    metrics = train_run("em3", str(world), run, settings, small)
    assert main(["export", str(run), "--out", str(repo)]) == 0
    r = open_repository(repo)
    m = r.manifest
    assert m.model == "em3" and m.training["test_auc"] == pytest.approx(metrics["test_auc"])
    assert [f.name for f in m.item_fields] == ["item_id", "coarse_category", "brand"]
    assert "fields" not in m.notes  # names resolved from the world the run trained on
    # the trained weights, scored by ONNX Runtime and by the PyTorch reference
    ins, want = r.golden("ranker")
    got = r.session("ranker").run(["cvr"], ins)[0]
    ref = TorchReference.from_repository(repo).rank(ins)
    assert np.abs(got - ref).max() <= 1e-4 and np.abs(ref - want["cvr"]).max() <= 1e-6
    # an existing repository is replaced only on request
    assert main(["export", str(run), "--out", str(repo)]) == 2
    assert main(["export", str(run), "--out", str(repo), "--force", "--version", "v2"]) == 0
    assert open_repository(repo).manifest.version == "v2"


def test_bench_model_prints_latency_and_mode_ratio(
    exported: dict[str, Exported], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repos = [str(exported[k].repo.root) for k in MODELS]
    out = tmp_path / "bench.json"
    args = [
        "bench-model",
        *repos,
        "--k",
        "10",
        "40",
        "--n",
        "7",
        "--min-runs",
        "2",
        "--min-seconds",
        "0",
        "--levels",
        "--levels-k",
        "10",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "| camenn-full | 40 | 7 |" in text and "| em3 | 10 | 7 |" in text
    assert "full / isolated" in text and "| camenn-candidate-isolated | 10 | disable |" in text
    res = json.loads(out.read_text())
    assert len(res["latency"]) == 3 * 2 and len(res["optimization_levels"]) == 3 * 4
    assert {r["k"] for r in res["mode_ratios"]} == {10, 40}
    assert all(r["p50_ms"] > 0 and r["runs"] >= 2 for r in res["latency"])


def test_bench_model_refuses_a_broken_repository(tmp_path: Path) -> None:
    assert main(["bench-model", str(tmp_path)]) == 2  # no manifest: a clean error, exit 2
