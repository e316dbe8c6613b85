"""The served model: load, verify, warm, check against the embeddings, hot swap.

A :class:`ModelSlot` is one verified model repository with its backend and its own
batcher. :class:`ModelHolder` keeps the current slot; a request takes the current slot
once, so it is scored and labelled by exactly one model. A swap (:meth:`ModelHolder.swap`)
opens the new repository (manifest, sha256 of every file, I/O signature, golden batch:
:func:`model_export.repository.open_repository`), builds its backend, runs the ranker's
golden batch through that backend, warms every history bucket, checks it against the
store's active embedding version, and only then replaces the current slot (one
assignment); the old slot finishes the requests it accepted and is closed. Any failure
before the assignment leaves the old model serving.

Model and embeddings must belong together (:func:`compatibility`): the embedding
version must have been written by this model's item tower, byte for byte (its sha256),
with the same Q, D, record layout and fields. A model version that reuses an item
tower file (a ranker retrained over a frozen tower) reuses its embeddings; any other
pairing is refused: the service is not ready, ``/v1/models`` and the logs say why, and
ranking requests get 503.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feature_store.codec import VersionManifest
from model_export.bench import request_feeds
from model_export.manifest import ITEM_TOWER, RANKER, Manifest
from model_export.repository import ModelRepository, max_abs_diff, open_repository
from service.backends.base import Backend, BackendError
from service.batcher import Batcher
from service.errors import Conflict
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


def compatibility(m: Manifest, vm: VersionManifest) -> list[str]:
    """Why embedding version ``vm`` cannot be scored by model ``m`` (empty: it can)."""
    problems = []
    tower = m.files.get(m.graphs[ITEM_TOWER].file, "")
    if vm.item_tower_sha256 != tower:
        problems.append(
            f"embeddings {vm.version} were built by the item tower of {vm.model_name} "
            f"{vm.model_version} (sha256 {vm.item_tower_sha256[:12]}), not by this model's "
            f"({m.name} {m.version}, sha256 {tower[:12]})"
        )
    if (vm.q, vm.d) != (m.q, m.d):
        problems.append(f"embeddings are Q x D = {vm.q} x {vm.d}, the model wants {m.q} x {m.d}")
    if [[*list(map(str, r[:2])), list(r[2])] for r in vm.record] != [
        [*list(map(str, r[:2])), list(r[2])] for r in m.item_record
    ]:
        problems.append(f"record layout {vm.record} differs from the model's {m.item_record}")
    for kind, got, want in (
        ("item", vm.item_fields, m.item_fields),
        ("user", vm.user_fields, m.user_fields),
    ):
        if [[str(n), int(b)] for n, b in got] != [[f.name, f.buckets] for f in want]:
            problems.append(f"{kind} fields {got} differ from the model's")
    return problems


def repository_dir(path: str) -> Path | None:
    """``path`` as a directory, or None when it is not one, also when the path itself
    is invalid (a component too long, a NUL byte): an admin's bad input, not a 500."""
    try:
        root = Path(path)
        return root if root.is_dir() else None
    except (OSError, ValueError):
        return None


FEW_BUCKETS = (8, 16, 24, 32, 40, 48)  # measured: 6 % less work than 8/16/32/50


def max_history(settings: Settings, m: Manifest, compiles_shapes: bool = False
                ) -> tuple[int, list[int]]:  # fmt: skip
    """(history items read per user, the padding buckets) for model ``m``: the
    configured buckets, else every length up to that limit, or a few
    (:data:`FEW_BUCKETS`) where each shape is compiled; the limit is always one."""
    b = settings.batching
    n = b.max_hist if m.max_hist is None else min(b.max_hist, m.max_hist)
    given = b.hist_buckets or (FEW_BUCKETS if compiles_shapes else range(1, n + 1))
    buckets = sorted({x for x in given if x < n} | {max(n, 1)})
    return n, buckets


def build_backend(settings: Settings, repo: ModelRepository) -> Backend:
    """The backend named by ``settings.backend.kind`` (imported only when chosen),
    behind a circuit breaker (:mod:`service.backends.breaker`) unless it is disabled."""
    from service.backends.breaker import BreakerBackend

    inner = _build_backend(settings, repo)
    b = settings.backend
    if b.breaker_open_ms <= 0:
        return inner
    return BreakerBackend(inner, 0.95 * b.timeout_ms / 1e3, b.breaker_open_ms / 1e3)


def _build_backend(settings: Settings, repo: ModelRepository) -> Backend:
    b = settings.backend
    if b.kind == "onnxruntime":
        from service.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(repo, device=b.device, workers=b.workers, threads=b.threads,
                                  optimization=b.optimization)  # fmt: skip
    if b.kind == "torch":
        from service.backends.torch_reference import TorchReferenceBackend

        return TorchReferenceBackend(repo.root, threads=b.threads)
    triton = importlib.import_module("service.backends.triton")  # tritonclient: optional extra
    factory: Any = getattr(triton, "from_settings", None)
    if factory is None:
        raise ValueError("service.backends.triton has no from_settings(settings, repo)")
    backend: Backend = factory(settings, repo)
    return backend


@dataclass(eq=False)
class ModelSlot:
    repo: ModelRepository
    backend: Backend
    batcher: Batcher
    max_hist: int
    buckets: list[int]
    loaded_at: float
    golden_diff: float
    warm_seconds: float
    compat: dict[str, list[str]] = field(default_factory=dict)  # embedding version -> problems

    @property
    def manifest(self) -> Manifest:
        return self.repo.manifest

    def problems(self, vm: VersionManifest) -> list[str]:
        """Cached :func:`compatibility` with embedding version ``vm`` (logged once)."""
        got = self.compat.get(vm.version)
        if got is None:
            got = self.compat[vm.version] = compatibility(self.manifest, vm)
            m = self.manifest
            if got:
                log.error("model %s %s cannot score embedding version %s: %s", m.name,
                          m.version, vm.version, "; ".join(got))  # fmt: skip
            else:
                log.info("model %s %s matches embedding version %s", m.name, m.version,
                         vm.version)  # fmt: skip
            while len(self.compat) > 16:
                self.compat.pop(next(iter(self.compat)))
        return got

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        g = m.graphs[RANKER]
        return {
            "name": m.name,
            "version": m.version,
            "model": m.model,
            "attention": m.attention,
            "backend": self.backend.name,
            "repository": str(self.repo.root),
            "q": m.q,
            "d": m.d,
            "max_hist": self.max_hist,
            "hist_buckets": self.buckets,
            "item_tower_sha256": m.files.get(m.graphs[ITEM_TOWER].file),
            "signature": {
                "inputs": [t.to_json() for t in g.inputs],
                "outputs": [t.to_json() for t in g.outputs],
            },
            "golden_max_abs_diff": self.golden_diff,
            "warm_seconds": round(self.warm_seconds, 3),
            "loaded_at": self.loaded_at,
        }

    async def close(self, drain_s: float = 30.0) -> None:
        if not await self.batcher.drain(drain_s):
            log.warning("model %s: requests still queued after %.0fs; closing", self.manifest.version,
                        drain_s)  # fmt: skip
        await self.batcher.close()
        await self.backend.close()


async def load_slot(settings: Settings, root: Path, metrics: Metrics | None) -> ModelSlot:
    """Open + verify ``root``, build its backend, run its golden batch through the
    backend, warm every bucket, start its batcher. Raises on any failure (nothing is
    left running)."""
    repo = await asyncio.to_thread(open_repository, root, golden=settings.golden_check)
    backend = await asyncio.to_thread(build_backend, settings, repo)
    try:
        g = repo.manifest.graphs[RANKER]
        ins, want = await asyncio.to_thread(repo.golden, RANKER)
        got = await backend.infer(ins)
        diff = max_abs_diff({"cvr": got}, {"cvr": want["cvr"]})
        if not diff <= g.tolerance:
            raise Conflict(f"{root}: the backend's golden batch differs by {diff:.3g} > "
                           f"tolerance {g.tolerance:g}")  # fmt: skip
        n, buckets = max_history(settings, repo.manifest, backend.compiles_shapes)
        t0 = time.perf_counter()
        rows = min(settings.batching.max_batch_rows, 512)
        await backend.warm(request_feeds(repo.manifest, rows, buckets[-1]), buckets)
        warm_s = time.perf_counter() - t0
        if not await backend.ready():
            raise BackendError("the backend is not ready after warming")
    except BaseException:
        await backend.close()
        raise
    b = settings.batching
    batcher = Batcher(backend, max_batch_rows=b.max_batch_rows, max_delay_s=b.max_delay_ms / 1e3,
                      queue_limit=b.queue_limit, hist_buckets=buckets, fill=b.fill_batches,
                      max_user_rows=b.max_user_rows,
                      in_flight=settings.backend.workers + b.prefetch,
                      timeout_s=settings.backend.timeout_ms / 1e3,
                      retry_after_s=settings.api.retry_after_s, metrics=metrics)  # fmt: skip
    batcher.start()
    m = repo.manifest
    log.info("model %s %s loaded (%s backend, golden diff %.2g, %d buckets warmed in %.2fs)",
             m.name, m.version, backend.name, diff, len(buckets), warm_s)  # fmt: skip
    return ModelSlot(repo, backend, batcher, n, buckets, time.time(), diff, warm_s)


class ModelHolder:
    """The current model slot and the swap procedure (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._current: ModelSlot | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.last_swap_error: str | None = None

    @property
    def current(self) -> ModelSlot | None:
        return self._current

    def _publish(self, slot: ModelSlot) -> None:
        if self.metrics:
            m = slot.manifest
            self.metrics.set_model(m.name, m.version, slot.backend.name)

    async def load_initial(self, root: Path) -> ModelSlot:
        slot = await load_slot(self.settings, root, self.metrics)
        self._current = slot
        self._publish(slot)
        return slot

    async def swap(self, root: Path, active: VersionManifest | None,
                   require_compatible: bool = True) -> tuple[ModelSlot, ModelSlot | None]:  # fmt: skip
        """Load ``root`` and make it current; (new slot, old slot). On failure raises
        and the current model keeps serving. ``active`` is the store's current
        embedding version (None when the store cannot be read)."""
        async with self._lock:
            try:
                new = await load_slot(self.settings, root, self.metrics)
            except BaseException as exc:
                self.last_swap_error = f"{type(exc).__name__}: {exc}"
                if self.metrics:
                    self.metrics.swaps.labels("refused").inc()
                raise
            if require_compatible:
                problems = (["the feature store cannot be read"] if active is None
                            else new.problems(active))  # fmt: skip
                if problems:
                    await new.close(0)
                    self.last_swap_error = "; ".join(problems)
                    if self.metrics:
                        self.metrics.swaps.labels("refused").inc()
                    raise Conflict(f"model {new.manifest.version} does not match the active "
                                   f"embeddings: {'; '.join(problems)}")  # fmt: skip
            old, self._current = self._current, new  # the swap
            self._publish(new)
            self.last_swap_error = None
            if self.metrics:
                self.metrics.swaps.labels("ok").inc()
            if old is not None:
                t = asyncio.create_task(old.close())
                self._retiring.add(t)
                t.add_done_callback(self._retiring.discard)
            log.info("model swapped: %s -> %s", old.manifest.version if old else None,
                     new.manifest.version)  # fmt: skip
            return new, old

    async def close(self) -> None:
        for t in list(self._retiring):
            await asyncio.gather(t, return_exceptions=True)
        if self._current is not None:
            await self._current.close(5.0)
            self._current = None
