"""The one interface every scoring backend implements (DESIGN section 6).

A backend scores one batch of DESIGN section 3 ranker tensors at a time. The
batcher calls :meth:`Backend.infer` with a batch that may mix several requests
(U user rows, B candidate rows, ``cand_user`` pointing each candidate at its user
row) and gets ``cvr`` (B,) float32 back, in candidate order.

Guarantees every implementation gives:

- ``infer`` never blocks the event loop (CPU work runs in worker threads; network
  backends await their client);
- a failure is raised as a :class:`BackendError` subclass, never as a raw library
  exception: :class:`BackendUnavailable` when the backend cannot be reached or is
  not ready (the service answers 503 + Retry-After), :class:`BackendOverloaded` when
  it rejects work because its own queue is full (429 + Retry-After),
  :class:`BackendError` for anything else (500 without details);
- ``warm`` runs every history-length bucket once, so the first real request does not
  pay for graph compilation or allocation.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import numpy as np

from model_export.manifest import RANKER_INPUTS

__all__ = ["RANKER_INPUTS", "Backend", "BackendError", "BackendOverloaded", "BackendUnavailable"]


class BackendError(Exception):
    """Inference failed; the message is safe to log, never sent to clients."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached or is not ready (503)."""


class BackendOverloaded(BackendError):
    """The backend rejected the batch because its queue is full (429)."""


class Backend(abc.ABC):
    """Scores ranker batches. ``name`` is reported in ``/v1/models`` and metrics."""

    name: str
    # each new input shape costs a compilation (a TensorRT engine profile): the default
    # history buckets are then a few lengths instead of every length
    compiles_shapes: bool = False

    @abc.abstractmethod
    async def infer(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """``inputs`` holds the seven :data:`RANKER_INPUTS`; returns cvr (B,) float32."""

    @abc.abstractmethod
    async def warm(self, example: Mapping[str, np.ndarray], hist_buckets: Sequence[int]) -> None:
        """Run ``example`` once per history length in ``hist_buckets``."""

    async def ready(self) -> bool:
        """True when the backend can score now (network backends ask their server)."""
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions, threads and connections."""
