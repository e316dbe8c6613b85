"""``mmrank evaluate``: test-set metrics of a run, optional baselines on the same
split, written to ``RUN/metrics.json`` and ``RUN/report.md``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.dataset import RankingData
from models.camenn import CameNN
from training.datasets import load_data
from training.loop import CatalogTensors, TrainSettings, auc, fit, predict
from training.runs import build_model, load_run, model_config

log = logging.getLogger(__name__)


def balanced_alignment_items(mismatch: np.ndarray, held: np.ndarray, seed: int
                             ) -> tuple[np.ndarray, np.ndarray] | None:  # fmt: skip
    """The ITA/TIA test set: every planted-mismatch item among the ``held`` ones
    (never used in ITA/TIA training) and as many clean ones drawn with ``seed``;
    (items, aligned). None when there are no such items or too few clean ones."""
    bad = np.flatnonzero(held & mismatch)
    clean = np.flatnonzero(held & ~mismatch)
    if len(bad) == 0 or len(clean) < len(bad):
        return None
    clean = np.random.default_rng(seed).choice(clean, size=len(bad), replace=False)
    aligned = np.r_[np.zeros(len(bad)), np.ones(len(clean))].astype(bool)
    return np.concatenate([bad, clean]), aligned


@torch.no_grad()
def alignment_accuracy(model: CameNN, data: RankingData, cat: CatalogTensors, seed: int
                       ) -> dict[str, Any] | None:  # fmt: skip
    """ITA/TIA accuracy on :func:`balanced_alignment_items`. An item is predicted
    "aligned" when the head's probability is >= 0.5. None when the dataset has no
    planted truth or no held-out items with both modalities."""
    if data.catalog.mismatch is None:
        return None
    test = balanced_alignment_items(data.catalog.mismatch, cat.align_test, seed)
    if test is None:
        return None
    items, aligned = test
    _, ita, tia = model.tower(*cat.content(torch.from_numpy(items)))
    return {
        "ita_accuracy": float(((ita.numpy() >= 0) == aligned).mean()),
        "tia_accuracy": float(((tia.numpy() >= 0) == aligned).mean()),
        "alignment_test_items": len(items),
    }


def evaluate_run(run: Path, baselines: bool = False, progress: bool = True) -> dict[str, Any]:
    name, model, meta = load_run(run)
    settings = TrainSettings(**{**meta["train"], "progress": progress})
    settings.betas = tuple(settings.betas)  # type: ignore[assignment]
    data = load_data(meta["data"], max_hist=settings.max_hist)
    cat = CatalogTensors(data.catalog, settings.align_holdout, settings.seed)
    metrics_path = run / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    test_p = predict(model, cat, data.test, settings.max_hist)
    metrics |= {
        "model": name,
        "attention": meta["config"].get("attention"),
        "dataset": data.name,
        "test_auc": auc(data.test.label, test_p),
        "test_candidates": len(data.test.label),
        "ita_accuracy": None,
        "tia_accuracy": None,
    }
    if data.has_oracle:
        assert data.test.p_true is not None
        metrics["oracle_auc"] = auc(data.test.label, data.test.p_true)
    if isinstance(model, CameNN):
        metrics |= alignment_accuracy(model, data, cat, settings.seed) or {}
    if baselines:
        metrics["baselines"] = {}
        for kind in ("lr", "din", "bst"):
            log.info("baseline %s", kind)
            torch.manual_seed(settings.seed)
            bmodel = build_model(kind, model_config(kind, data))
            s = TrainSettings(**{**settings.__dict__, "lr": 1e-3})
            res = fit(bmodel, data.train, data.valid, cat, s)
            metrics["baselines"][kind] = auc(data.test.label, predict(bmodel, cat, data.test,
                                                                      s.max_hist))  # fmt: skip
            metrics.setdefault("baseline_train_seconds", {})[kind] = res["train_seconds"]
    metrics_path.write_text(json.dumps(metrics, indent=2))
    (run / "report.md").write_text(render_report(metrics))
    return metrics


def render_report(m: dict[str, Any]) -> str:
    """A markdown table of the run's metrics."""

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)

    title = f"{m['model']}" + (f" ({m['attention']})" if m.get("attention") else "")
    lines = [f"# {title} on {m['dataset']}", "", "| model | test AUC |", "|---|---|",
             f"| {title} | {f(m['test_auc'])} |"]  # fmt: skip
    for k, v in (m.get("baselines") or {}).items():
        lines.append(f"| baseline {k.upper()} | {f(v)} |")
    if "oracle_auc" in m:
        lines.append(f"| oracle (p_true) | {f(m['oracle_auc'])} |")
    lines += ["", "| metric | value |", "|---|---|"]
    for k in ("ita_accuracy", "tia_accuracy", "alignment_test_items", "test_candidates",
              "valid_auc", "train_seconds"):  # fmt: skip
        if k in m:
            lines.append(f"| {k} | {f(m[k])} |")
    return "\n".join(lines) + "\n"
