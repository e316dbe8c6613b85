"""The ranking pipeline of ``POST /v1/rank``: validate -> features -> compatibility ->
tensors -> batcher -> sort -> JSON.

Guarantees:

- every dependency call is bounded by the request's deadline: the feature read by
  ``min(store.timeout_ms, time left)``, the wait for scores by the time left; a request
  whose deadline passes gets 504 and is not scored;
- a feature store that fails or is slow gives 503 + Retry-After, or with
  ``api.degraded = input_order`` a 200 with the candidates in the order sent, no
  scores, ``degraded: true`` and the reason;
- the embedding version read must belong to the model (see :mod:`service.models`);
  otherwise 503 with the reason;
- one model scores and labels a request; one embedding version serves it (the store
  reads the pointer once);
- candidates come back complete: scored ones by score (descending; ties keep the order
  sent), then the missing ones in the order sent with ``score`` null (schemas module).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from feature_store.errors import StoreUnavailable, VersionError
from feature_store.store import FeatureStore
from mmrank.features import hash_value
from service.batcher import Job
from service.errors import DeadlineExceeded, InvalidInput, Unavailable
from service.metrics import Metrics
from service.models import ModelHolder, ModelSlot
from service.schemas import RankRequest
from service.settings import Settings
from service.tensors import UserSide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deadline:
    """A point in ``time.monotonic()`` by which the answer must be sent."""

    at: float

    @classmethod
    def after_ms(cls, ms: float) -> Deadline:
        return cls(time.monotonic() + ms / 1e3)

    def left(self) -> float:
        return self.at - time.monotonic()


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


class RankingService:
    def __init__(self, settings: Settings, store: FeatureStore, models: ModelHolder,
                 metrics: Metrics) -> None:  # fmt: skip
        self.settings = settings
        self.store = store
        self.models = models
        self.metrics = metrics
        self._embedding: tuple[str, bool] | None = None

    # -- steps ---------------------------------------------------------------------
    def _check_limits(self, req: RankRequest) -> None:
        a = self.settings.api
        if len(req.candidates) > a.max_candidates:
            raise InvalidInput(
                f"candidates: {len(req.candidates)} ids, at most {a.max_candidates} allowed"
            )
        longest = max(len(req.user_id), *map(len, req.candidates))
        if longest > a.max_id_length:
            raise InvalidInput(f"ids may be at most {a.max_id_length} characters")

    def _user_side(self, slot: ModelSlot, req: RankRequest, fields: np.ndarray,
                   found: bool) -> np.ndarray:  # fmt: skip
        """The user row: stored fields, the user id hashed for an unknown user (its
        other profile fields stay 0 = absent), then the request's context fields."""
        ufields = slot.manifest.user_fields
        out = fields.astype(np.int64, copy=True)
        names = {f.name: k for k, f in enumerate(ufields)}
        if not found and "user_id" in names:
            k = names["user_id"]
            out[k] = hash_value("user_id", req.user_id, ufields[k].buckets)
        for name, value in req.context.items():
            k2 = names.get(name)
            if k2 is None or name == "user_id":
                allowed = sorted(n for n in names if n != "user_id")
                raise InvalidInput(f"context.{name}: not a context field of this model "
                                   f"(fields: {', '.join(allowed)})")  # fmt: skip
            out[k2] = hash_value(name, value, ufields[k2].buckets)
        return out

    def _embedding_seen(self, version: str, ok: bool) -> None:
        if self._embedding != (version, ok):
            self._embedding = (version, ok)
            self.metrics.set_embedding(version, ok)

    # -- the pipeline ----------------------------------------------------------------
    async def rank(self, req: RankRequest, deadline: Deadline, started: float) -> bytes:
        """The JSON body of the answer; raises a ServiceError (or a lower-layer error
        that :mod:`service.errors` maps) otherwise."""
        t_parse = time.monotonic()
        self._check_limits(req)
        slot = self.models.current
        if slot is None:
            raise Unavailable("no model is loaded", retry_after=self.settings.api.retry_after_s)
        ids = list(dict.fromkeys(req.candidates))  # first occurrence wins
        dups = len(req.candidates) - len(ids)
        self.metrics.candidates.observe(len(ids))
        self.metrics.stage("parse", t_parse - started)

        budget = min(self.settings.store.timeout_ms / 1e3, deadline.left())
        if budget <= 0:
            raise DeadlineExceeded("the deadline passed before the features were read")
        try:
            async with asyncio.timeout(budget):  # no task per request, as wait_for makes
                feats = await self.store.read_request(req.user_id, ids, slot.max_hist)
        except (StoreUnavailable, VersionError, TimeoutError) as exc:
            if deadline.left() <= 0:
                raise DeadlineExceeded("the deadline passed while reading features") from exc
            reason = ("feature_store_timeout" if isinstance(exc, TimeoutError)
                      else "feature_store_unavailable")  # fmt: skip
            log.warning("feature read failed (%s): %s", reason, exc or type(exc).__name__)
            if self.settings.api.degraded == "input_order" and not isinstance(exc, VersionError):
                self.metrics.degraded.labels(reason).inc()
                return self._degraded(req, slot, ids, dups, reason, started, t_parse)
            self.metrics.rejected(reason)
            raise
        t_feat = time.monotonic()
        self.metrics.stage("features", t_feat - t_parse)

        vm = await self.store.manifest(feats.version)
        problems = slot.problems(vm)
        self._embedding_seen(vm.version, not problems)
        if problems:
            self.metrics.rejected("incompatible_embeddings")
            raise Unavailable(
                f"model {slot.manifest.version} cannot score embedding version {vm.version}: "
                + "; ".join(problems),
                retry_after=self.settings.api.retry_after_s,
            )

        cand = feats.candidates
        scored = np.flatnonzero(cand.present)  # positions in ids
        missing = [ids[k] for k in np.flatnonzero(~cand.present)]
        self.metrics.missing.inc(len(missing))
        hist = feats.history
        hkeep = np.flatnonzero(hist.present)
        user = UserSide(
            self._user_side(slot, req, feats.user_fields, feats.user_found),
            hist.emb[hkeep].astype(np.float32),  # (n, Q, D)
            hist.sparse[hkeep],  # (n, Fi)
        )
        queue_s = infer_s = 0.0
        scores = np.zeros(0, np.float32)
        if len(scored):
            left = deadline.left()
            if left <= 0:
                raise DeadlineExceeded("the deadline passed before inference")
            loop = asyncio.get_running_loop()
            if len(scored) == len(ids):  # every candidate known: no gather
                c_emb, c_sparse = cand.emb.astype(np.float32), cand.sparse
            else:
                c_emb, c_sparse = cand.emb[scored].astype(np.float32), cand.sparse[scored]
            job = Job(user, c_emb, c_sparse, deadline.at, loop.create_future())
            fut = slot.batcher.submit(job)
            try:
                async with asyncio.timeout(left):  # cancelling this task cancels fut: skipped
                    scores = await fut
            except TimeoutError:
                self.metrics.rejected("deadline")
                raise DeadlineExceeded("the deadline passed before the scores came") from None
            if job.dispatched is not None and job.done_at is not None:
                queue_s, infer_s = job.dispatched - job.enqueued, job.done_at - job.dispatched
                self.metrics.stage("queue", queue_s)

        t_sort = time.monotonic()
        order = np.argsort(-scores, kind="stable")  # ties keep the order sent
        ranked_ids = list(map(ids.__getitem__, scored[order].tolist()))
        ranked_scores = scores[order].astype(np.float64).tolist()  # exact float32 values
        items: list[dict[str, Any]] = [
            {"item_id": i, "score": sc, "rank": r}
            for i, sc, r in zip(ranked_ids, ranked_scores, range(1, len(order) + 1), strict=True)
        ]
        items += [
            {"item_id": i, "score": None, "rank": r} for r, i in enumerate(missing, len(items) + 1)
        ]
        if req.top_k is not None:
            items = items[: req.top_k]
        m = slot.manifest
        timings: dict[str, float] = {"parse": _ms(t_parse - started), "features": _ms(t_feat - t_parse),
                   "queue": _ms(queue_s), "inference": _ms(infer_s)}  # fmt: skip
        body: dict[str, Any] = {
            "request_id": req.request_id,
            "items": items,
            "model": {"name": m.name, "version": m.version},
            "embedding_version": feats.version,
            "missing_items": missing,
            "duplicates_removed": dups,
            "user_known": feats.user_found,
            "degraded": False,
            "degraded_reason": None,
        }
        done = time.monotonic()
        self.metrics.stage("sort", done - t_sort)
        body["timings_ms"] = {**timings, "sort": _ms(done - t_sort), "total": _ms(done - started)}
        return orjson.dumps(body)

    def _degraded(self, req: RankRequest, slot: ModelSlot, ids: list[str], dups: int,
                  reason: str, started: float, t_parse: float) -> bytes:  # fmt: skip
        items = [{"item_id": i, "score": None, "rank": r} for r, i in enumerate(ids, 1)]
        if req.top_k is not None:
            items = items[: req.top_k]
        now = time.monotonic()
        body: dict[str, Any] = {
            "request_id": req.request_id,
            "items": items,
            "model": {"name": slot.manifest.name, "version": slot.manifest.version},
            "embedding_version": None,
            "missing_items": [],
            "duplicates_removed": dups,
            "user_known": False,
            "degraded": True,
            "degraded_reason": reason,
            "timings_ms": {
                "parse": _ms(t_parse - started),
                "features": _ms(now - t_parse),
                "queue": 0.0,
                "inference": 0.0,
                "sort": 0.0,
                "total": _ms(now - started),
            },
        }
        return orjson.dumps(body)
