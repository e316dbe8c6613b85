"""The cross-request batcher (DESIGN section 6): candidate rows of concurrent requests
scored together, one backend call per batch.

Each request is a :class:`Job` with a future. One collector task loops: wait for a free
slot (``in_flight`` batches handed to the backend at most: its workers plus the batches
queued at it, ``batching.prefetch``), wait for the first job, then let the
batch fill until it holds ``max_batch_rows`` rows or the oldest job has waited
``max_delay`` (whichever first; a job that already waited for a slot closes the batch
at once), take rows from the front of the queue and hand the batch to the backend in a
task of its own, so the next batch is collected (and the next requests' features are
fetched) while this one is scored.

Guarantees:

- a batch holds at least one row, at most ``max_batch_rows`` rows, and its requests x
  rows stay within ``max_user_rows`` (0: no bound) unless it holds one request: the
  exported CameNN graph scores every candidate against every user row of its batch
  (:func:`models.common.attend_own_user`), so that product is its attention work; with
  ``fill`` a
  request larger than the room left is split (the rest goes into the next batches);
  without it only a request larger than a whole batch is split, and a batch closes
  when the next request does not fit. Split scores are merged back in candidate
  order; one request is scored by one backend only;
- the queue holds at most ``queue_limit`` requests: :meth:`Batcher.submit` refuses
  the next one at once with :class:`~service.errors.Overloaded` (429);
- a job whose deadline passed gets :class:`~service.errors.DeadlineExceeded` without
  being scored; a job whose future was cancelled (client left, caller timed out) is
  skipped;
- if the backend fails, every job of that batch gets the error; the row count of the
  output is checked against the input's;
- :meth:`Batcher.drain` returns when every accepted job has its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.backends.base import Backend, BackendError, BackendUnavailable
from service.errors import DeadlineExceeded, Overloaded
from service.metrics import Metrics
from service.tensors import Piece, UserSide, assemble

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One request's candidates, its deadline (``time.monotonic()``) and its answer."""

    user: UserSide
    cand_emb: np.ndarray  # (K, Q, D) float32
    cand_sparse: np.ndarray  # (K, Fi) int64
    deadline: float
    future: asyncio.Future[np.ndarray]
    scores: np.ndarray = field(init=False)  # (K,) float32, filled piece by piece
    taken: int = 0  # rows handed to batches so far
    in_flight: int = 0  # pieces being scored
    enqueued: float = 0.0
    dispatched: float | None = None  # when the first piece went to the backend
    done_at: float | None = None

    def __post_init__(self) -> None:
        self.scores = np.empty(len(self.cand_emb), np.float32)

    @property
    def rows(self) -> int:
        return len(self.cand_emb)


class Batcher:
    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_rows: int,
        max_delay_s: float,
        queue_limit: int,
        hist_buckets: Sequence[int],
        in_flight: int,
        timeout_s: float,
        retry_after_s: int,
        metrics: Metrics | None = None,
        fill: bool = True,
        max_user_rows: int = 0,
    ) -> None:
        self.backend = backend
        self.max_batch_rows = max_batch_rows
        self.max_user_rows = max_user_rows
        self.fill = fill
        self.max_delay_s = max_delay_s
        self.queue_limit = queue_limit
        self.hist_buckets = list(hist_buckets)
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._rows_waiting = 0
        self._changed = asyncio.Event()
        self._slots = asyncio.Semaphore(in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = 0
        self._answered = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._collector: asyncio.Task[None] | None = None

    # -- producer side -------------------------------------------------------------
    def start(self) -> None:
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect_forever(), name="batcher")

    def submit(self, job: Job) -> asyncio.Future[np.ndarray]:
        """Queue ``job``; Overloaded at once when ``queue_limit`` requests wait."""
        if len(self._queue) >= self.queue_limit:
            if self.metrics:
                self.metrics.rejected("queue_full")
            raise Overloaded(
                f"the ranking queue is full ({self.queue_limit} requests)",
                retry_after=self.retry_after_s,
            )
        job.enqueued = time.monotonic()
        self._queue.append(job)
        self._rows_waiting += job.rows
        self._accepted += 1
        self._idle.clear()
        job.future.add_done_callback(lambda _f: self._answer())
        self._depth()
        self._changed.set()
        return job.future

    def _answer(self) -> None:
        self._answered += 1
        if self._answered == self._accepted:
            self._idle.set()

    def _depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- collector -----------------------------------------------------------------
    async def _collect_forever(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                pieces = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(self._score(pieces))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _drop_dead(self) -> None:
        """Remove jobs at the front that must not be scored (answered, cancelled,
        or past their deadline)."""
        now = time.monotonic()
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # cancelled (client left / caller timed out) or failed
                reason = "client_gone" if job.future.cancelled() else None
            elif now >= job.deadline:
                reason = "deadline"
                job.future.set_exception(
                    DeadlineExceeded("the deadline passed while the request was queued")
                )
            else:
                return
            self._queue.popleft()
            self._rows_waiting -= job.rows - job.taken
            if reason and self.metrics:
                self.metrics.rejected(reason)

    async def _collect(self) -> list[tuple[Job, Piece]]:
        """Wait for rows, then take up to ``max_batch_rows`` of them from jobs at the
        front of the queue (within ``max_user_rows``): (job, piece of its candidates)
        pairs, one per job."""
        while True:
            self._drop_dead()
            if not self._queue:
                self._changed.clear()
                await self._changed.wait()
                continue
            close_at = self._queue[0].enqueued + self.max_delay_s
            while self._rows_waiting < self.max_batch_rows:
                wait = close_at - time.monotonic()
                if wait <= 0:
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    break
            self._drop_dead()
            out: list[tuple[Job, Piece]] = []
            room = self.max_batch_rows
            while self._queue and room:
                job = self._queue[0]
                if job.future.done() or time.monotonic() >= job.deadline:
                    self._drop_dead()
                    continue
                left = job.rows - job.taken
                if out and not self.fill and left > room:
                    break  # the next request waits for a batch of its own
                take = min(left, room)
                cap = self.max_user_rows
                if out and cap and (len(out) + 1) * (self.max_batch_rows - room + take) > cap:
                    break  # one more user row would cost more attention than it saves
                piece = Piece(job.user, job.cand_emb, job.cand_sparse, job.taken, job.taken + take)
                out.append((job, piece))
                job.taken += take
                job.in_flight += 1
                room -= take
                self._rows_waiting -= take
                if job.taken == job.rows:
                    self._queue.popleft()
            self._depth()
            if out:
                return out

    # -- scoring -------------------------------------------------------------------
    async def _score(self, batch: list[tuple[Job, Piece]]) -> None:
        jobs = [j for j, _ in batch]
        pieces = [p for _, p in batch]
        t0 = time.monotonic()
        for j in jobs:
            if j.dispatched is None:
                j.dispatched = t0
        try:
            try:
                inputs = assemble(pieces, self.hist_buckets)
                b = len(inputs["cand_user"])
                if self.metrics:
                    self.metrics.batch(b, len(pieces))
                async with asyncio.timeout(self.timeout_s):
                    out = await self.backend.infer(inputs)
                out = np.asarray(out, dtype=np.float32).reshape(-1)
                if out.shape != (b,):
                    raise BackendError(f"backend returned {out.shape[0]} scores for {b} rows")
            except TimeoutError:  # a frozen or swamped backend: 503 + Retry-After, not a 500
                raise BackendUnavailable(
                    f"inference took longer than {self.timeout_s:g}s"
                ) from None
        except BaseException as exc:
            log.warning("batch of %d requests failed: %s", len(jobs), exc)
            if self.metrics:
                self.metrics.inference_failures.inc()
            for j in jobs:
                j.in_flight -= 1
                if not j.future.done():
                    j.future.set_exception(exc if isinstance(exc, Exception) else BackendError(
                        "inference cancelled"))  # fmt: skip
            self._slots.release()
            if not isinstance(exc, Exception):
                raise
            return
        self._slots.release()
        done = time.monotonic()
        if self.metrics:
            self.metrics.stage("inference", done - t0)
        o = 0
        for j, p in zip(jobs, pieces, strict=True):
            j.scores[p.start : p.stop] = out[o : o + p.rows]
            o += p.rows
            j.in_flight -= 1
            if j.taken == j.rows and j.in_flight == 0 and not j.future.done():
                j.done_at = done
                j.future.set_result(j.scores)

    # -- lifecycle -----------------------------------------------------------------
    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until every accepted job has its answer (True) or ``timeout_s`` passed."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop collecting; queued jobs that were never scored get Unavailable-like errors."""
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
            self._collector = None
        for t in list(self._tasks):
            await asyncio.gather(t, return_exceptions=True)
        while self._queue:
            j = self._queue.popleft()
            if not j.future.done():
                j.future.set_exception(BackendError("the model was unloaded"))
        self._depth()
