"""A run directory: ``config.json`` (model config, data reference, training
settings), ``model.safetensors`` (weights, no pickle), ``metrics.json``.

:func:`build_model` is the one place that maps a model name to its classes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from data.dataset import RankingData
from models.baselines import Baseline, BaselineConfig
from models.camenn import CameNN, CameNNConfig
from models.em3 import EM3, EM3Config

MODELS = ("camenn", "em3", "lr", "din", "bst")

# config fields added after runs were saved without them: such a run was trained with
# the behaviour the old value names, so it loads with that value, not the new default
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "camenn": {
        "align_path": False,
        "history_kernels": 0,
        "kernel_views": 1,
        "cic_weight": 0.0,
        "positional_pool": False,
        "content_ffn": False,
    },
    "em3": {"recency": False, "kernel_views": 1},
}


def model_config(
    name: str, data: RankingData, **overrides: Any
) -> CameNNConfig | EM3Config | BaselineConfig:
    """The default config of ``name`` sized for ``data``'s features."""
    cat = data.catalog
    common: dict[str, Any] = {
        "user_buckets": [f.buckets for f in data.user_fields],
        "item_buckets": [f.buckets for f in cat.fields],
    }
    content: dict[str, Any] = {
        "text_dim": cat.text_dim,
        "image_dim": cat.image_dim,
        "max_text_len": max(1, int(cat.text.shape[1])),
        "n_patches": int(cat.image.shape[1]),
    }
    if name == "camenn":
        return CameNNConfig(**common, **content, **overrides)
    if name == "em3":
        return EM3Config(**common, **content, **overrides)
    if name in ("lr", "din", "bst"):
        return BaselineConfig(kind=name, **common, **overrides)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def build_model(name: str, cfg: Any) -> nn.Module:
    if name == "camenn":
        return CameNN(cfg)
    if name == "em3":
        return EM3(cfg)
    return Baseline(cfg)


def save_run(run: Path, name: str, model: nn.Module, cfg: Any, extra: dict[str, Any]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(run / "model.safetensors"))
    (run / "config.json").write_text(
        json.dumps({"model": name, "config": asdict(cfg), **extra}, indent=2)
    )


def model_from_config(name: str, config: dict[str, Any]) -> nn.Module:
    """The untrained model of a saved ``config.json``'s ``config``; a field of
    :data:`LEGACY_DEFAULTS` it lacks takes its old value."""
    cfg_cls = {"camenn": CameNNConfig, "em3": EM3Config}.get(name, BaselineConfig)
    return build_model(name, cfg_cls(**{**LEGACY_DEFAULTS.get(name, {}), **config}))


def load_run(run: Path) -> tuple[str, nn.Module, dict[str, Any]]:
    """(model name, model in eval mode with its trained weights, config.json)."""
    meta = json.loads((run / "config.json").read_text())
    name = meta["model"]
    model = model_from_config(name, meta["config"])
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    return name, model.eval(), meta
