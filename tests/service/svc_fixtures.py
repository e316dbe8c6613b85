"""Real parts for the service tests: small CameNN models with the synthetic world's
content sizes, exported by the real exporter; the world's catalog embedded by the real
item tower (ONNX Runtime); store versions written to the embedded store and to a real
``redis-server``. Built once per test session.

Model ``b`` is model ``a`` with its ranker retrained (perturbed) over the same item
tower: its repository reuses ``a``'s item-tower file byte for byte, so both models
score the same embeddings (what a hot swap of a ranker looks like). Model ``other``
has its own item tower: ``a``'s embeddings do not belong to it.

Not a conftest (one ``conftest`` per tree keeps mypy's module names unique).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.world import ITEM_FIELDS, USER_FIELDS
from feature_store.catalogs import resolve
from feature_store.embed import Embeddings, build_version, embed_catalog
from feature_store.embedded import write_embedded
from feature_store.loader import VersionData
from model_export.export import export_run
from model_export.manifest import ITEM_TOWER
from model_export.repository import open_repository, sha256_file
from models.camenn import CameNN, CameNNConfig
from training.runs import save_run


def _model(seed: int) -> CameNN:
    torch.manual_seed(seed)
    cfg = CameNNConfig(user_buckets=[f.buckets for f in USER_FIELDS],
                       item_buckets=[f.buckets for f in ITEM_FIELDS], d_model=16, n_head=2,
                       field_dim=4, head_hidden=[16], attention="candidate-isolated")  # fmt: skip
    model = CameNN(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)  # wide weights: scores spread over (0, 1)
    return model


def _export(model: CameNN, root: Path, name: str) -> Path:
    run = root / f"run-{name}"
    save_run(run, "camenn", model, model.cfg, {"data": "tiny-world"})
    out = root / f"repo-{name}"
    export_run(run, out, version=f"test-{name}")
    return out


def reuse_tower(src: Path, dst: Path) -> None:
    """Put ``src``'s item-tower files into repository ``dst`` (same weights, other
    bytes) and fix ``dst``'s manifest checksums."""
    man = json.loads((dst / "manifest.json").read_text())
    g = man["graphs"][ITEM_TOWER]
    for rel in (g["file"], g["golden"]):
        shutil.copyfile(src / rel, dst / rel)
        man["files"][rel] = sha256_file(dst / rel)
    (dst / "manifest.json").write_text(json.dumps(man, indent=2) + "\n")


@dataclass
class World:
    root: Path
    world: Path
    repo_a: Path
    repo_b: Path
    repo_other: Path
    embeddings: Embeddings
    data: VersionData  # version "va" built by a's item tower, with users
    store_file: Path  # the embedded store holding ``data``


def build_world(root: Path, world: Path) -> World:
    a = _model(0)
    repo_a = _export(a, root, "a")
    with torch.no_grad():
        for p in a.ranker.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # the retrained ranker
    repo_b = _export(a, root, "b")
    reuse_tower(repo_a, repo_b)
    repo_other = _export(_model(1), root, "other")
    _name, cat, users = resolve(f"world:{world}")
    e = embed_catalog(open_repository(repo_a), cat, threads=1)
    data = build_version(e, users, "va")
    store_file = root / "store.npz"
    write_embedded(store_file, data)
    return World(root, world, repo_a, repo_b, repo_other, e, data, store_file)


_WORLD: list[World] = []


def shared_world(root: Path, world: Path) -> World:
    """:func:`build_world` once per test session (every module shares it)."""
    if not _WORLD:
        _WORLD.append(build_world(root, world))
    return _WORLD[0]


def history_of(w: World, user: str) -> list[str]:
    from feature_store.codec import decode_user

    k = w.data.user_ids.index(user)
    return decode_user(w.data.user_values[k], len(w.data.manifest.user_fields))[1]


def item_index(w: World) -> dict[str, int]:
    return {i: k for k, i in enumerate(w.data.item_ids)}


def direct_feeds(w: World, user: str, cands: list[str], context: dict[str, np.ndarray] | None = None,
                 max_hist: int = 50) -> dict[str, np.ndarray]:  # fmt: skip
    """The ranker's inputs for one request, built straight from the version data
    (U = 1, the real history length, no padding, no batching)."""
    from feature_store.codec import decode_user

    idx = item_index(w)
    k = w.data.user_ids.index(user)
    fields, hist = decode_user(w.data.user_values[k], len(w.data.manifest.user_fields))
    hist = hist[:max_hist]
    rec = w.data.records
    h = [idx[i] for i in hist]
    c = [idx[i] for i in cands]
    return {
        "user_sparse": fields[None, :].astype(np.int64),
        "hist_emb": rec["emb"][h].astype(np.float32)[None],
        "hist_sparse": rec["sparse"][h][None].astype(np.int64),
        "hist_mask": np.ones((1, len(h)), bool),
        "cand_emb": rec["emb"][c].astype(np.float32),
        "cand_sparse": rec["sparse"][c].astype(np.int64),
        "cand_user": np.zeros(len(c), np.int64),
    }
