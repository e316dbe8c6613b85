"""The naive ranking service of DESIGN section 10: what a user writes first.

FastAPI with pydantic request and response models, a plain ``def`` endpoint (FastAPI
runs it in its thread pool), a synchronous Redis client with one ``GET`` per key (the
user record, each history item, each candidate), one ``np.frombuffer`` per record, the
model in PyTorch eager (the repository's reference weights through
:class:`~model_export.torch_reference.TorchReference`), one forward pass per request (no
batching across requests), sorting in Python. It reads the same Redis keys and records
that ``mmrank load`` writes, so it scores exactly what mmrank scores (the benchmark's
smoke test checks the scores agree); only the engineering differs.

It is a baseline for ``mmrank bench``, not part of the service (it imports torch).
``python -m benchmarks.naive_service --repo REPO --redis URL --port P`` serves it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import redis
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from feature_store.codec import decode_user, parse_manifest
from feature_store.keys import item_key, manifest_key, pointer_key, user_key
from model_export.torch_reference import TorchReference


class RankRequest(BaseModel):
    user_id: str
    candidates: list[str]


class RankedItem(BaseModel):
    item_id: str
    score: float | None
    rank: int


class RankResponse(BaseModel):
    items: list[RankedItem]
    missing_items: list[str]


def create_app(repo: Path, redis_url: str, namespace: str = "mmrank", threads: int = 1,
               max_hist: int = 50) -> FastAPI:  # fmt: skip
    """The naive app: model and Redis client built once, everything else per request."""
    torch.set_num_threads(threads)
    model = TorchReference.from_repository(repo)
    r = redis.Redis.from_url(redis_url)
    version = r.get(pointer_key(namespace)).decode()  # type: ignore[union-attr]
    manifest = parse_manifest(r.get(manifest_key(namespace, version)), version)  # type: ignore[arg-type]
    dtype = manifest.dtype()
    buckets = manifest.key_buckets
    app = FastAPI()

    def record(item_id: str) -> np.ndarray | None:
        raw = r.get(item_key(namespace, version, item_id, buckets))
        return None if raw is None else np.frombuffer(raw, dtype)[0]  # type: ignore[arg-type]

    @app.get("/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/rank", response_model=RankResponse)
    def rank(req: RankRequest) -> RankResponse:
        raw_user = r.get(user_key(namespace, version, req.user_id, buckets))
        fields = np.zeros(len(manifest.user_fields), np.int64)
        history: list[str] = []
        if raw_user is not None:
            fields, history = decode_user(raw_user, len(manifest.user_fields))  # type: ignore[arg-type]
        hist = [rec for rec in (record(i) for i in history[:max_hist]) if rec is not None]
        found, missing, cands = [], [], []
        for item_id in req.candidates:
            rec = record(item_id)
            if rec is None:
                missing.append(item_id)
            else:
                found.append(item_id)
                cands.append(rec)
        items = []
        if cands:
            feeds: dict[str, np.ndarray] = {
                "user_sparse": fields[None].astype(np.int64),
                "hist_emb": np.array([h["emb"] for h in hist], np.float32).reshape(
                    1, len(hist), manifest.q, manifest.d
                ),
                "hist_sparse": np.array([h["sparse"] for h in hist], np.int64).reshape(
                    1, len(hist), len(manifest.item_fields)
                ),
                "hist_mask": np.ones((1, len(hist)), bool),
                "cand_emb": np.array([c["emb"] for c in cands], np.float32),
                "cand_sparse": np.array([c["sparse"] for c in cands], np.int64),
                "cand_user": np.zeros(len(cands), np.int64),
            }
            scores = model.rank(feeds).tolist()
            ranked = sorted(zip(found, scores, strict=True), key=lambda x: -x[1])
            items = [RankedItem(item_id=i, score=s, rank=k + 1) for k, (i, s) in enumerate(ranked)]
        items += [RankedItem(item_id=i, score=None, rank=len(items) + k + 1)
                  for k, i in enumerate(missing)]  # fmt: skip
        return RankResponse(items=items, missing_items=missing)

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.naive_service", description=__doc__)
    ap.add_argument("--repo", required=True, type=Path, help="exported model repository")
    ap.add_argument("--redis", required=True, help="redis://host:port/db holding a loaded version")
    ap.add_argument("--namespace", default="mmrank")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--port", type=int, default=8100)
    args = ap.parse_args(argv)
    app = create_app(args.repo, args.redis, args.namespace, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
