"""A circuit breaker around any :class:`Backend`, so that a backend that stopped
answering costs queued requests a fast 503 instead of one call timeout each.

Without it, a frozen backend (Triton under SIGSTOP) fails one batch per
``backend.timeout_ms`` while the batches queued behind it wait; their requests pass
their deadlines and get 504. With it:

- every call is bounded by ``timeout_s`` (slightly below the batcher's own bound, so
  the breaker sees the timeout as the failure it is);
- a :class:`BackendUnavailable` (or that timeout) opens the breaker for ``open_s``:
  calls then fail at once with BackendUnavailable (503 + Retry-After);
- after ``open_s`` calls go through again (half-open); the first success closes it, a
  failure opens it for another ``open_s``. Recovery therefore takes at most ``open_s``
  after the backend is back.

Other errors (bad input, overload) pass through and do not open it. Before
:meth:`warm` has run (the golden check at load time, a TensorRT engine build) calls
pass through unbounded and never trip it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import numpy as np

from service.backends.base import Backend, BackendUnavailable


class BreakerBackend(Backend):
    def __init__(self, inner: Backend, timeout_s: float, open_s: float) -> None:
        self.inner, self.timeout_s, self.open_s = inner, timeout_s, open_s
        self.name, self.compiles_shapes = inner.name, inner.compiles_shapes
        self.open_until = 0.0  # time.monotonic() before which calls fail at once
        self.opened = 0  # how often it opened (tests, logs)
        self.armed = False  # set once warm() ran

    def _trip(self) -> None:
        self.open_until = time.monotonic() + self.open_s
        self.opened += 1

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if not self.armed:
            return await self.inner.infer(inputs)
        if time.monotonic() < self.open_until:
            raise BackendUnavailable(f"{self.name}: failing fast after a recent outage")
        try:
            async with asyncio.timeout(self.timeout_s):  # no task per call, as wait_for makes
                out = await self.inner.infer(inputs)
        except TimeoutError:
            self._trip()
            raise BackendUnavailable(f"{self.name}: no answer in {self.timeout_s:g}s") from None
        except BackendUnavailable:
            self._trip()
            raise
        self.open_until = 0.0
        return out

    async def warm(self, example: Mapping[str, np.ndarray], hist_buckets: Sequence[int]) -> None:
        await self.inner.warm(example, hist_buckets)
        self.armed = True

    async def ready(self) -> bool:
        return await self.inner.ready()

    async def close(self) -> None:
        await self.inner.close()
