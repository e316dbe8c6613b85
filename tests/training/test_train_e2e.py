"""Tiny end-to-end training runs: real data, real models, real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data.world import load_world
from models.camenn import CameNN
from models.em3 import EM3
from training.evaluate import evaluate_run, render_report
from training.loop import (
    CatalogTensors,
    TrainSettings,
    WeightAverage,
    _FitState,
    align_phase,
    auc,
    fit,
    predict,
)
from training.runs import build_model, load_run, model_config, save_run
from training.train import train_run


def tiny_settings(**kw: object) -> TrainSettings:
    base = {
        "epochs": 3,
        "cands_per_batch": 512,
        "progress": False,
        "lora_epochs": 1,
        "patience": 3,
        "align_steps": 20,
    }
    return TrainSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "overrides"),
    [
        ("camenn", {"attention": "candidate-isolated"}),
        ("camenn", {"attention": "full"}),
        ("em3", {}),
    ],
)
def test_tiny_training_beats_random(
    tiny_world: Path, tmp_path: Path, model: str, overrides: dict
) -> None:
    run = tmp_path / "run"
    m = train_run(model, str(tiny_world), run, tiny_settings(), overrides)
    # a model that learned nothing sits at 0.5 +- 0.015 on this test set (~2k candidates)
    assert m["test_auc"] > 0.58, m
    assert m["oracle_auc"] > m["test_auc"] - 0.02
    assert (
        (run / "model.safetensors").exists()
        and not list(run.glob("*.pt"))
        and not list(run.glob("*.pkl"))
    )
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == model and cfg["train"]["seed"] == 0


def test_checkpoint_round_trip_gives_identical_scores(tiny_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(
        "camenn", str(tiny_world), run, tiny_settings(epochs=1), {"attention": "candidate-isolated"}
    )
    name, model, meta = load_run(run)
    data = load_world(tiny_world)
    cat = CatalogTensors(data.catalog, 0.3, 0)
    p = predict(model, cat, data.test, 50)
    np.testing.assert_allclose(p, np.load(run / "test_predictions.npy"), atol=1e-6)
    assert name == "camenn" and meta["config"]["attention"] == "candidate-isolated"


def test_seeds_make_training_repeatable(tiny_world: Path, tmp_path: Path) -> None:
    a = train_run("lr", str(tiny_world), tmp_path / "a", tiny_settings(epochs=1))
    b = train_run("lr", str(tiny_world), tmp_path / "b", tiny_settings(epochs=1))
    assert a["test_auc"] == b["test_auc"]
    torch.testing.assert_close(
        torch.from_numpy(np.load(tmp_path / "a" / "test_predictions.npy")),
        torch.from_numpy(np.load(tmp_path / "b" / "test_predictions.npy")),
    )


def test_evaluate_with_baselines_writes_metrics_and_report(
    tiny_world: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train_run(
        "camenn", str(tiny_world), run, tiny_settings(epochs=2), {"attention": "candidate-isolated"}
    )
    m = evaluate_run(run, baselines=True, progress=False)
    on_disk = json.loads((run / "metrics.json").read_text())
    for key in ("model", "attention", "dataset", "test_auc", "oracle_auc", "baselines", "ita_accuracy",
                "tia_accuracy", "train_seconds"):  # fmt: skip
        assert key in on_disk, key
    assert set(m["baselines"]) == {"lr", "din", "bst"}
    assert all(0.4 < v < 1.0 for v in m["baselines"].values())
    assert 0.0 <= m["ita_accuracy"] <= 1.0 and m["alignment_test_items"] > 0
    report = (run / "report.md").read_text()
    assert report == render_report(on_disk) and "| baseline LR |" in report and "oracle" in report


@pytest.mark.parametrize("align_path", [True, False])
def test_align_phase_changes_the_alignment_path_only(tiny_world: Path, align_path: bool) -> None:
    """The ITA/TIA-only steps after CVR training leave the ranker and every parameter
    the item embedding reads (but the gated [CLS]) as they were."""
    data = load_world(tiny_world)
    torch.manual_seed(0)
    model = CameNN(model_config("camenn", data, align_path=align_path))  # type: ignore[arg-type]
    cat = CatalogTensors(data.catalog, 0.3, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = _FitState(gen=torch.Generator().manual_seed(0), rng=np.random.default_rng(0))
    align_phase(model, data.valid, cat, tiny_settings(align_steps=5), st)
    allowed = {f"tower.{n}" for n in model.tower.alignment_parameter_names()}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= allowed
    assert any(k.startswith("tower.ita.") for k in changed)
    assert align_path == any(k.startswith("tower.blocks.") for k in changed)
    row = st.history[-1]
    assert row["stage"] == "align" and row["steps"] == 5 and 0 <= row["valid_auc"] <= 1


@pytest.mark.parametrize(("name", "old"), [
    ("em3", {"recency": False, "kernel_views": 1}),
    ("camenn", {"history_kernels": 11, "kernel_views": 1}),
])  # fmt: skip
def test_run_saved_before_a_config_field_loads_with_its_old_value(
    tiny_world: Path, tmp_path: Path, name: str, old: dict[str, Any]
) -> None:
    """A run whose config.json predates ``EM3Config.recency`` / ``kernel_views`` or
    ``CameNNConfig.kernel_views`` (no such keys) was trained without them and must load
    so, with identical scores. (A CameNN run from before history kernels has
    ``history_kernels: 0`` saved, so only its view count is missing.)"""
    data = load_world(tiny_world)
    cfg = model_config(name, data, **old)
    torch.manual_seed(0)
    model = build_model(name, cfg).eval()
    run = tmp_path / "old"
    save_run(run, name, model, cfg, {"data": str(tiny_world)})
    meta = json.loads((run / "config.json").read_text())
    for key in ("recency", "kernel_views"):
        meta["config"].pop(key, None)
    (run / "config.json").write_text(json.dumps(meta))
    _, loaded, _ = load_run(run)
    assert isinstance(loaded, {"em3": EM3, "camenn": CameNN}[name])
    assert all(getattr(loaded.cfg, k) == v for k, v in old.items())
    cat = CatalogTensors(data.catalog, 0.3, 0)
    np.testing.assert_array_equal(predict(loaded, cat, data.test, 50),
                                  predict(model, cat, data.test, 50))  # fmt: skip


def test_weight_average_follows_the_ramped_decay_and_restores_the_weights() -> None:
    lin = torch.nn.Linear(2, 1, bias=False)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    lin.register_parameter("frozen", frozen)
    avg = WeightAverage(lin, decay=0.9)
    assert len(avg.params) == 1  # frozen parameters are not averaged
    expect = lin.weight.detach().clone()
    for t, value in enumerate((1.0, 2.0, 3.0)):
        with torch.no_grad():
            lin.weight.fill_(value)
        avg.update()
        d = min(0.9, (1 + t) / (10 + t))
        expect = d * expect + (1 - d) * value
    torch.testing.assert_close(avg.shadow[0], expect)
    with pytest.raises(RuntimeError, match="inside"), avg.applied():
        torch.testing.assert_close(lin.weight.detach(), expect)
        raise RuntimeError("inside")
    assert torch.equal(lin.weight.detach(), torch.full((1, 2), 3.0))


def test_averaged_training_keeps_the_weights_it_validated(tiny_world: Path) -> None:
    """With ``ema_decay`` the kept weights are the averages that scored the best
    validation AUC, not the raw weights of that epoch."""
    data = load_world(tiny_world)
    torch.manual_seed(0)
    model = build_model("em3", model_config("em3", data))
    cat = CatalogTensors(data.catalog, 0.3, 0)
    s = tiny_settings(ema_decay=0.99)
    res = fit(model, data.train, data.valid, cat, s)
    assert res["best_valid_auc"] == max(r["valid_auc"] for r in res["history"] if r["stage"] == 2)
    assert auc(data.valid.label, predict(model, cat, data.valid, s.max_hist)) == pytest.approx(
        res["best_valid_auc"], abs=1e-9
    )
