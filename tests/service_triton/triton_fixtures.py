"""A small exported ranker and real ``tritonserver`` processes for the Triton tests.

Not a conftest (one module named ``conftest`` per tree keeps mypy's module names
unique). The Triton venv (``.venv-triton``) is built on first use by
:func:`service.triton_local.ensure_triton` (about 30 s, once per checkout); when it
cannot be built here the tests are skipped with the reason. The exported model is a
small CameNN (candidate-isolated, d = 16) with weights drawn wide (N(0, 0.3)) so that
scores spread over (0, 1) and a 1e-5 parity bound constrains something.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from data.world import ITEM_FIELDS, USER_FIELDS
from model_export.export import export_run
from model_export.manifest import Manifest
from model_export.repository import ModelRepository, open_repository
from models.camenn import CameNN, CameNNConfig
from service.triton_local import LocalTriton, TritonInstall, TritonSetupError, ensure_triton
from service.triton_repo import build_triton_repository
from training.runs import save_run

SLOW_MODEL = "ranker_slow"  # the same graph behind a slow instance and a tiny queue
SLOW_DELAY_MS = 150.0
SLOW_QUEUE = 2

_cache: dict[str, object] = {}


def exported_repo(root: Path) -> ModelRepository:
    """A small CameNN (candidate-isolated) exported to ``root / "repo"`` (once per session)."""
    if "repo" not in _cache:
        torch.manual_seed(0)
        cfg = CameNNConfig(
            user_buckets=[f.buckets for f in USER_FIELDS],
            item_buckets=[f.buckets for f in ITEM_FIELDS],
            text_dim=8,
            image_dim=6,
            max_text_len=8,
            n_patches=4,
            d_model=16,
            field_dim=4,
            n_head=4,
            attention="candidate-isolated",
            head_hidden=[32, 16],
        )
        model = CameNN(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        run = root / "run"
        save_run(run, "camenn", model, cfg, {"data": "tiny-world", "train": {"seed": 0}})
        (run / "metrics.json").write_text(json.dumps({"model": "camenn", "test_auc": 0.5}))
        export_run(run, root / "repo")
        _cache["repo"] = open_repository(root / "repo")
    repo = _cache["repo"]
    assert isinstance(repo, ModelRepository)
    return repo


def triton_install() -> TritonInstall:
    """The built Triton venv, or a visible skip saying why it cannot be built here."""
    if "install" not in _cache:
        try:
            _cache["install"] = ensure_triton()
        except TritonSetupError as exc:
            _cache["install"] = exc
    got = _cache["install"]
    if isinstance(got, TritonSetupError):
        pytest.skip(f"Triton venv cannot be built on this machine: {got}")
    assert isinstance(got, TritonInstall)
    return got


def build_models(repo: ModelRepository, out: Path, slow_delay_ms: float, slow_queue: int) -> Path:
    """A Triton repository serving the ranker twice: ``ranker`` (the defaults: 2
    instances, queue 64) and :data:`SLOW_MODEL` (one instance, ``slow_delay_ms`` per
    request, ``slow_queue`` queue places)."""
    build_triton_repository(repo.root, out)
    build_triton_repository(
        repo.root,
        out,
        model_name=SLOW_MODEL,
        instances=1,
        delay_ms=slow_delay_ms,
        max_queue_size=slow_queue,
    )
    return out


def triton_server(
    tmp_path_factory: pytest.TempPathFactory, slow_delay_ms: float, slow_queue: int
) -> Iterator[LocalTriton]:
    """A fresh server on free ports, stopped (by its process group) at teardown."""
    install = triton_install()
    repo = exported_repo(tmp_path_factory.mktemp("triton_export"))
    models = build_models(repo, tmp_path_factory.mktemp("triton_models"), slow_delay_ms, slow_queue)
    server = LocalTriton(models, install=install, exit_timeout_s=1)
    try:
        yield server
    finally:
        server.stop()


def ranker_feeds(m: Manifest, u: int, n: int, b: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A ranker batch as the service builds it: U users with 0..N real history items
    (the rest zero / id 0 / masked), B candidates spread over the users."""
    rng = np.random.default_rng(seed)

    def ids(fields: tuple, *lead: int) -> np.ndarray:
        cols = [rng.integers(1, f.buckets, size=(*lead, 1)) for f in fields]
        return np.concatenate(cols, axis=-1).astype(np.int64)

    lengths = rng.integers(0, n + 1, size=u)
    if u > 1:
        lengths[-1] = n  # one full history, and (with U > 2) likely an empty one
    mask = np.arange(n)[None, :] < lengths[:, None]  # (U, N)
    cand_user = np.concatenate([np.arange(min(u, b)), rng.integers(0, u, size=b - min(u, b))])
    rng.shuffle(cand_user)
    return {
        "user_sparse": ids(m.user_fields, u),  # (U, Fu)
        "hist_emb": (rng.standard_normal((u, n, m.q, m.d)) * mask[..., None, None]).astype(
            np.float32
        ),  # (U, N, Q, D)
        "hist_sparse": ids(m.item_fields, u, n) * mask[..., None],  # (U, N, Fi)
        "hist_mask": mask,
        "cand_emb": rng.standard_normal((b, m.q, m.d)).astype(np.float32),  # (B, Q, D)
        "cand_sparse": ids(m.item_fields, b),  # (B, Fi)
        "cand_user": cand_user.astype(np.int64),  # (B,)
    }
