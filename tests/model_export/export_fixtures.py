"""Small real runs (saved with the real run writer) exported once per test session by
the real exporter; every test reads real ONNX Runtime sessions on those files.

Test modules wrap :func:`exported_models` in a fixture of their own (this is not a
conftest: one module named ``conftest`` per tree keeps mypy's module names unique);
the exports are cached here, so every test module shares one export per model.

The models are small (d = 16) so that the parity grid runs in seconds, and their
weights are drawn wide (N(0, 0.3)) so that CVR spreads over (0, 1) and a parity
tolerance of 1e-4 actually constrains something (untrained models score ~0.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from data.world import ITEM_FIELDS, USER_FIELDS
from model_export.export import export_run
from model_export.manifest import Manifest
from model_export.repository import ModelRepository, open_repository
from model_export.torch_reference import TorchReference
from models.camenn import CameNN, CameNNConfig
from models.em3 import EM3, EM3Config
from training.runs import save_run

MODELS = ("camenn-full", "camenn-candidate-isolated", "em3")
FP16_MODEL = "camenn-full"  # the one exported with --fp16 as well
MAX_TEXT_LEN = 8


def small_model(key: str, seed: int = 0) -> tuple[str, CameNN | EM3]:
    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "user_buckets": [f.buckets for f in USER_FIELDS],
        "item_buckets": [f.buckets for f in ITEM_FIELDS],
        "text_dim": 8,
        "image_dim": 6,
        "max_text_len": MAX_TEXT_LEN,
        "n_patches": 4,
        "d_model": 16,
        "field_dim": 4,
    }
    model: CameNN | EM3
    if key == "em3":
        cfg = EM3Config(
            **common, n_head=2, att_dim=16, att_heads=4, lora_rank=2, cic_dim=8, dnn_hidden=[32, 16]
        )
        model, name = EM3(cfg), "em3"
    else:
        attention = key.removeprefix("camenn-")
        cfg2 = CameNNConfig(**common, n_head=4, attention=attention, head_hidden=[32, 16])
        model, name = CameNN(cfg2), "camenn"
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # LoRA B included: the merged-weight path is exercised
    return name, model.eval()


def save_small_run(run: Path, key: str, seed: int = 0) -> None:
    name, model = small_model(key, seed)
    save_run(run, name, model, model.cfg, {"data": "tiny-world", "train": {"seed": seed}})
    (run / "metrics.json").write_text(json.dumps({"model": name, "test_auc": 0.5}))


@dataclass
class Exported:
    """One exported small model: repository, manifest, ONNX sessions, PyTorch reference."""

    key: str
    repo: ModelRepository
    ranker: ort.InferenceSession
    tower: ort.InferenceSession
    ref: TorchReference

    @property
    def manifest(self) -> Manifest:
        return self.repo.manifest

    def rank(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.ranker.run(["cvr"], feeds)[0]


_EXPORTED: dict[str, Exported] = {}


def exported_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """The three small models, exported (``camenn-full`` with float16 graphs too)."""
    if _EXPORTED:
        return _EXPORTED
    root = tmp_path_factory.mktemp("model_export")
    out = _EXPORTED
    for key in MODELS:
        run = root / f"run-{key}"
        save_small_run(run, key)
        export_run(run, root / f"repo-{key}", fp16=key == FP16_MODEL)
        repo = open_repository(root / f"repo-{key}")
        out[key] = Exported(
            key,
            repo,
            repo.session("ranker"),
            repo.session("item_tower"),
            TorchReference.from_repository(repo.root, threads=1),
        )
    return out


def ranker_feeds(
    m: Manifest, u: int, n: int, b: int, *, padded: bool, seed: int = 0
) -> dict[str, np.ndarray]:
    """A batch as the service builds it: U user rows, histories of N positions (with
    ``padded``, each user has 0..N real items, the rest zero / id 0 / masked),
    B candidates spread over the users (every user gets at least one if B >= U)."""
    rng = np.random.default_rng(seed)

    def ids(fields: tuple, *lead: int) -> np.ndarray:
        cols = [rng.integers(1, f.buckets, size=(*lead, 1)) for f in fields]
        return np.concatenate(cols, axis=-1).astype(np.int64)

    if padded and n > 0:
        lengths = rng.integers(0, n + 1, size=u)
        lengths[rng.integers(u)] = 0 if u > 1 else max(1, n // 2)  # an empty history
        lengths[-1] = n if u > 1 else lengths[-1]  # and a full one
    else:
        lengths = np.full(u, n)
    mask = np.arange(n)[None, :] < lengths[:, None]  # (U, N)
    cand_user = np.concatenate([np.arange(min(u, b)), rng.integers(0, u, size=b - min(u, b))])
    rng.shuffle(cand_user)
    return {
        "user_sparse": ids(m.user_fields, u),
        "hist_emb": (rng.standard_normal((u, n, m.q, m.d)) * mask[..., None, None]).astype(
            np.float32
        ),
        "hist_sparse": ids(m.item_fields, u, n) * mask[..., None],
        "hist_mask": mask,
        "cand_emb": rng.standard_normal((b, m.q, m.d)).astype(np.float32),
        "cand_sparse": ids(m.item_fields, b),
        "cand_user": cand_user.astype(np.int64),
    }


def tower_feeds(m: Manifest, i: int, lt: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Items with every modality combination, text padded to ``lt`` tokens."""
    rng = np.random.default_rng(seed)
    c = m.item_content
    text_len = rng.integers(0, lt + 1, size=i)
    text_len[0] = lt
    text = rng.standard_normal((i, lt, c["text_dim"])).astype(np.float32)
    text *= (np.arange(lt)[None, :] < text_len[:, None])[..., None]
    has_image = rng.random(i) < 0.7
    if i > 1:
        has_image[1] = False
        text_len[1] = max(1, text_len[1])  # text only
    return {
        "text": text,
        "text_len": text_len.astype(np.int64),
        "image": rng.standard_normal((i, c["n_patches"], c["image_dim"])).astype(np.float32),
        "has_image": has_image,
    }
