"""``mmrank train``: train a model on a dataset and write its run directory."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets import load_data
from training.loop import CatalogTensors, TrainSettings, auc, fit, predict
from training.runs import build_model, model_config, save_run

log = logging.getLogger(__name__)


def train_run(model_name: str, data_ref: str, out: Path, settings: TrainSettings,
              overrides: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Train ``model_name`` on ``data_ref``; writes ``out/config.json``,
    ``out/model.safetensors`` and ``out/metrics.json``; returns the metrics."""
    data = load_data(data_ref, max_hist=settings.max_hist)
    cfg = model_config(model_name, data, **(overrides or {}))
    import torch

    torch.manual_seed(settings.seed)
    model = build_model(model_name, cfg)
    cat = CatalogTensors(data.catalog, settings.align_holdout, settings.seed)
    log.info("training %s on %s: %d train / %d valid candidates", model_name, data.name,
             len(data.train.label), len(data.valid.label))  # fmt: skip
    result = fit(model, data.train, data.valid, cat, settings)
    test_p = predict(model, cat, data.test, settings.max_hist)
    metrics: dict[str, Any] = {
        "model": model_name,
        "attention": getattr(cfg, "attention", None),
        "dataset": data.name,
        "valid_auc": result["best_valid_auc"],
        "test_auc": auc(data.test.label, test_p),
        "train_seconds": result["train_seconds"],
        "history": result["history"],
    }
    if data.has_oracle:
        assert data.test.p_true is not None
        metrics["oracle_auc"] = auc(data.test.label, data.test.p_true)
    data_ref_saved = data_ref if data_ref == "movielens" else str(Path(data_ref).resolve())
    save_run(out, model_name, model, cfg, {"data": data_ref_saved, "train": asdict(settings)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.save(out / "test_predictions.npy", test_p)
    return metrics
