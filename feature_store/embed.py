"""``mmrank embed`` / ``mmrank load`` data side: run the exported item tower (ONNX
Runtime, no torch) over a catalog, save the result, and turn it into a store version.

An embeddings directory holds ``embeddings.npz`` (``item_ids``, ``emb`` (I, Q, D)
float32, ``sparse`` (I, Fi) int64, ``ita``/``tia`` (I,) float32 probabilities or NaN
where the model has no alignment heads, ``has_text``, ``has_image``) and
``embeddings.json`` (the model repository's name, version and item tower sha256, q, d,
item fields, data reference, timing). Guarantees: the catalog is checked against the
item tower's signature before anything runs (ValueError naming the mismatch); the
outputs are checked finite; the directory is written whole or not at all.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from data.dataset import Catalog
from feature_store.codec import VersionManifest, encode_items, encode_user, record_dtype
from feature_store.keys import DEFAULT_KEY_BUCKETS, check_name
from feature_store.loader import VersionData
from model_export.manifest import ITEM_TOWER, Manifest, item_record_json
from model_export.repository import ModelRepository

log = logging.getLogger(__name__)
EMB_NPZ = "embeddings.npz"
EMB_JSON = "embeddings.json"


@dataclass
class Embeddings:
    item_ids: np.ndarray  # (I,) str
    emb: np.ndarray  # (I, Q, D) float32
    sparse: np.ndarray  # (I, Fi) int64
    ita: np.ndarray  # (I,) float32, NaN = no alignment heads
    tia: np.ndarray
    has_text: np.ndarray  # (I,) bool
    has_image: np.ndarray
    meta: dict[str, Any]


def check_catalog(m: Manifest, cat: Catalog) -> None:
    c = m.item_content
    problems = []
    if cat.text_dim != c["text_dim"]:
        problems.append(f"text_dim {cat.text_dim} != model {c['text_dim']}")
    if cat.image_dim != c["image_dim"]:
        problems.append(f"image_dim {cat.image_dim} != model {c['image_dim']}")
    if cat.image.shape[1] != c["n_patches"]:
        problems.append(f"{cat.image.shape[1]} image patches != model {c['n_patches']}")
    if int(cat.text_len.max(initial=0)) > c["max_text_len"]:
        problems.append(f"texts up to {int(cat.text_len.max())} tokens > model {c['max_text_len']}")
    if [f.buckets for f in cat.fields] != [f.buckets for f in m.item_fields]:
        problems.append("item field buckets differ from the model's")
    if problems:
        raise ValueError(f"catalog does not fit model {m.name} {m.version}: " + "; ".join(problems))


def embed_catalog(repo: ModelRepository, cat: Catalog, *, batch: int = 256, threads: int = 2,
                  progress: Callable[[int], None] | None = None) -> Embeddings:  # fmt: skip
    """Run ``repo``'s item tower over every item of ``cat`` (batches of similar text
    length, each trimmed to its longest text)."""
    m = repo.manifest
    check_catalog(m, cat)
    sess = repo.session(ITEM_TOWER, threads=threads)
    n = len(cat.item_ids)
    emb = np.zeros((n, m.q, m.d), dtype=np.float32)
    ita = np.full(n, np.nan, dtype=np.float32)
    tia = np.full(n, np.nan, dtype=np.float32)
    order = np.argsort(cat.text_len, kind="stable")
    outs = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    for s in range(0, n, batch):
        idx = order[s : s + batch]
        lt = max(1, int(cat.text_len[idx].max()))
        feed = {
            "text": np.ascontiguousarray(cat.text[idx, :lt], dtype=np.float32),
            "text_len": cat.text_len[idx].astype(np.int64),
            "image": np.ascontiguousarray(cat.image[idx], dtype=np.float32),
            "has_image": cat.has_image[idx].astype(bool),
        }
        got = dict(zip(outs, sess.run(outs, feed), strict=True))
        emb[idx] = got["emb"]
        if "ita" in got:
            ita[idx], tia[idx] = got["ita"], got["tia"]
        if progress:
            progress(len(idx))
    secs = time.perf_counter() - t0
    if not np.isfinite(emb).all():
        raise ValueError("the item tower produced NaN/inf embeddings")
    tower_file = m.graphs[ITEM_TOWER].file
    meta = {
        "model_name": m.name,
        "model_version": m.version,
        "item_tower_sha256": m.files[tower_file],
        "q": m.q,
        "d": m.d,
        "alignment": m.alignment,
        "item_fields": [[f.name, f.buckets] for f in m.item_fields],
        "user_fields": [[f.name, f.buckets] for f in m.user_fields],
        "items": n,
        "seconds": secs,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    log.info("embedded %d items in %.2fs (%.0f items/s)", n, secs, n / max(secs, 1e-9))
    return Embeddings(cat.item_ids.astype(str), emb, cat.sparse.astype(np.int64), ita, tia,
                      cat.text_len > 0, cat.has_image.astype(bool), meta)  # fmt: skip


def save_embeddings(out: Path, e: Embeddings) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, item_ids=e.item_ids, emb=e.emb, sparse=e.sparse, ita=e.ita, tia=e.tia,
             has_text=e.has_text, has_image=e.has_image)  # fmt: skip
    tmp = out / f".{EMB_NPZ}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out / EMB_NPZ)
    (out / EMB_JSON).write_text(json.dumps(e.meta, indent=2) + "\n")


def load_embeddings(path: Path) -> Embeddings:
    path = Path(path)
    if not (path / EMB_NPZ).is_file() or not (path / EMB_JSON).is_file():
        raise FileNotFoundError(f"{path} is not an embeddings directory (run `mmrank embed`)")
    meta = json.loads((path / EMB_JSON).read_text())
    with np.load(path / EMB_NPZ, allow_pickle=False) as z:
        return Embeddings(z["item_ids"], z["emb"], z["sparse"], z["ita"], z["tia"],
                          z["has_text"], z["has_image"], meta)  # fmt: skip


def version_name(e: Embeddings) -> str:
    """``{model version}-{UTC time}``, a valid version name."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return check_name("version", f"{e.meta['model_version']}-{stamp}"[:64])


def build_version(
    e: Embeddings,
    users: tuple[list[str], np.ndarray, list[list[str]]] | None = None,
    version: str | None = None,
    key_buckets: int = DEFAULT_KEY_BUCKETS,
    source: dict[str, Any] | None = None,
) -> VersionData:
    """A store version from embeddings and (optionally) users: ``(user ids, fields
    (U, Fu) int64, histories of item ids, newest first)``. History ids absent from the
    embeddings are dropped (a user record never points at an item the version lacks)."""
    meta = e.meta
    align = bool(meta["alignment"])
    dt = record_dtype(meta["q"], meta["d"], len(meta["item_fields"]), align)
    recs = encode_items(dt, e.emb, e.sparse, e.ita if align else None, e.tia if align else None)
    known = set(e.item_ids.tolist())
    uids: list[str] = []
    uvals: list[bytes] = []
    if users is not None:
        ids, fields, hists = users
        if fields.shape != (len(ids), len(meta["user_fields"])):
            raise ValueError(
                f"user fields {fields.shape} do not match the model's {len(meta['user_fields'])}"
            )
        uids = list(ids)
        uvals = [
            encode_user(f, [h for h in hist if h in known])
            for f, hist in zip(fields, hists, strict=True)
        ]
    manifest = VersionManifest(
        version=version or version_name(e),
        record=item_record_json(meta["q"], meta["d"], len(meta["item_fields"]), align),
        record_size=dt.itemsize,
        q=meta["q"],
        d=meta["d"],
        alignment=align,
        item_fields=meta["item_fields"],
        user_fields=meta["user_fields"],
        model_name=meta["model_name"],
        model_version=meta["model_version"],
        item_tower_sha256=meta["item_tower_sha256"],
        n_items=len(e.item_ids),
        n_users=len(uids),
        key_buckets=key_buckets,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source or {},
    )
    return VersionData(manifest, e.item_ids.tolist(), recs, uids, uvals)
