"""Triton backend: ranker batches scored by a Triton server over KServe v2 gRPC.

Uses ``tritonclient.grpc.aio`` with binary tensors (no JSON). Works against any
Triton serving the ranker signature of DESIGN section 3 under ``model``: the
``onnxruntime_onnx`` repository from ``model_export`` (a Triton container) or the
Python-backend wrapper of :mod:`service.triton_repo` (the CPU-only Triton used here).
No torch, no training code.

Guarantees:

- every call ends within ``timeout_ms`` (a gRPC deadline; the remaining time is also
  sent as Triton's own queue timeout, so a request whose caller gave up is dropped
  from Triton's queue rather than scored);
- errors are mapped once (:func:`classify`): Triton's queue full ("Exceeds maximum
  queue size", or RESOURCE_EXHAUSTED) -> :class:`BackendOverloaded`; server
  unreachable, model unknown or not ready, deadline passed -> :class:`BackendUnavailable`;
  anything else (bad input, model failure, wrong output) -> :class:`BackendError`.
  No ``tritonclient`` or ``grpc`` exception leaves this module;
- retries only where it is safe and useful: a call that failed because the server
  could not be reached is retried on a fresh channel (at most ``retries`` times,
  within the same deadline). Scoring has no side effects, but an overloaded server is
  never retried (that would add load) and a deadline is never extended;
- no stuck channel: after a connection failure or a deadline the channel is replaced
  (at most once per ``reconnect_interval_s``; the old one is closed after its
  in-flight calls had their deadline), and gRPC's own reconnect backoff is capped at
  one second, so the same object scores again as soon as a restarted Triton is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from service.backends.base import (
    RANKER_INPUTS,
    Backend,
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
)
from service.tensors import pad_history

if TYPE_CHECKING:
    from model_export.repository import ModelRepository
    from service.settings import Settings

log = logging.getLogger(__name__)

# what the ranker graph takes (DESIGN section 3); inputs are converted to these
INPUT_DTYPES: dict[str, np.dtype] = {
    "user_sparse": np.dtype(np.int64),
    "hist_emb": np.dtype(np.float32),
    "hist_sparse": np.dtype(np.int64),
    "hist_mask": np.dtype(np.bool_),
    "cand_emb": np.dtype(np.float32),
    "cand_sparse": np.dtype(np.int64),
    "cand_user": np.dtype(np.int64),
}
OUTPUT = "cvr"
QUEUE_FULL = "exceeds maximum queue size"
# Triton's own UNAVAILABLE / NOT_FOUND answers (server up): model loading, unloaded, or
# a request that waited in Triton's queue past its timeout. Not worth an instant retry.
MODEL_NOT_SERVING = ("unknown model", "not ready", "no available versions", "timeout expired")
# gRPC channel options: tritonclient's message limits; a reconnect backoff capped at
# 1 s (gRPC's default grows to 120 s: a channel that saw Triton down for a minute would
# keep failing for up to two minutes after Triton is back); a subchannel pool per
# channel (gRPC shares connections between channels with equal options by default, so
# a "fresh" channel would inherit the failed connection and its backoff)
CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]


class _NoAnswer(BackendUnavailable):
    """The connection may be dead (deadline passed, call cancelled): replace the
    channel before the next call. Raised to callers as a plain BackendUnavailable."""


class _Unreachable(_NoAnswer):
    """The server could not be reached: replace the channel and retry on it."""


def classify(exc: InferenceServerException, model: str) -> BackendError:
    """The :class:`BackendError` for a ``tritonclient`` error (module docstring)."""
    status = str(exc.status() or "")
    msg = str(exc.message() or exc).strip()
    text = f"Triton ({model}): {status.removeprefix('StatusCode.') or 'error'}: {msg}"
    low = msg.lower()
    if QUEUE_FULL in low:
        return BackendOverloaded(text)  # Triton sends it as UNAVAILABLE
    if status.endswith("RESOURCE_EXHAUSTED") and "message larger than max" not in low:
        return BackendOverloaded(text)
    if any(m in low for m in MODEL_NOT_SERVING):
        return BackendUnavailable(text)
    if status.endswith("UNAVAILABLE"):
        return _Unreachable(text)  # transport: refused, reset, closed
    if status.endswith(("DEADLINE_EXCEEDED", "CANCELLED")):
        return _NoAnswer(text)
    return BackendError(text)


class TritonBackend(Backend):
    """Scores ranker batches on Triton model ``model`` at gRPC ``url`` (``host:port``)."""

    name = "triton"

    def __init__(
        self,
        url: str,
        model: str = "ranker",
        *,
        timeout_ms: float = 5000.0,
        ready_timeout_ms: float = 1000.0,
        retries: int = 1,
        reconnect_interval_s: float = 0.2,
    ) -> None:
        if timeout_ms <= 0 or ready_timeout_ms <= 0 or retries < 0:
            raise ValueError("timeouts must be > 0 and retries >= 0")
        self.url = url
        self.model = model
        self.timeout_s = timeout_ms / 1000.0
        self.ready_timeout_s = ready_timeout_ms / 1000.0
        self.retries = retries
        self.reconnect_interval_s = reconnect_interval_s
        self._client: triton_grpc.InferenceServerClient | None = None
        self._client_born = 0.0
        self._retired: dict[asyncio.Task[None], triton_grpc.InferenceServerClient] = {}
        self.reconnects = 0  # channels replaced after failures (for logs and tests)

    # -- channel -------------------------------------------------------------------

    def _current(self) -> triton_grpc.InferenceServerClient:
        """The live client, created on first use (inside the running event loop)."""
        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
            self._client_born = time.monotonic()
        return self._client

    def _replace(self, failed: triton_grpc.InferenceServerClient, why: BackendError) -> None:
        """Drop ``failed`` if it is still the live client and old enough; its channel is
        closed in the background once its in-flight calls had their full deadline."""
        if self._client is not failed:
            return  # another call replaced it already
        if time.monotonic() - self._client_born < self.reconnect_interval_s:
            return
        self._client = None
        self.reconnects += 1
        log.warning("Triton %s: new gRPC channel to %s after: %s", self.model, self.url, why)
        task = asyncio.get_running_loop().create_task(self._close_later(failed))
        self._retired[task] = failed
        task.add_done_callback(self._retired.pop)

    async def _close_later(self, client: triton_grpc.InferenceServerClient) -> None:
        await asyncio.sleep(self.timeout_s)
        await client.close()

    # -- Backend -------------------------------------------------------------------

    def _request(self, inputs: Mapping[str, np.ndarray]) -> tuple[list[Any], int]:
        missing = [n for n in RANKER_INPUTS if n not in inputs]
        if missing:
            raise BackendError(f"ranker inputs missing: {missing}")
        tensors = []
        for name in RANKER_INPUTS:
            a = np.ascontiguousarray(inputs[name], dtype=INPUT_DTYPES[name])
            t = triton_grpc.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            t.set_data_from_numpy(a)  # binary tensor data
            tensors.append(t)
        return tensors, int(inputs["cand_user"].shape[0])

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """cvr (B,) float32 for one batch; raises only :class:`BackendError` subclasses,
        within ``timeout_ms`` (module docstring)."""
        tensors, b = self._request(inputs)
        outputs = [triton_grpc.InferRequestedOutput(OUTPUT)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BackendUnavailable(
                    f"Triton ({self.model}): no answer within {self.timeout_s * 1000:.0f} ms"
                )
            client = self._current()
            try:
                result = await client.infer(
                    self.model,
                    tensors,
                    outputs=outputs,
                    client_timeout=remaining,
                    timeout=max(1, int(remaining * 1e6)),  # Triton's queue timeout (us)
                )
                break
            except InferenceServerException as exc:
                err = classify(exc, self.model)
            except grpc.aio.UsageError as exc:  # a channel closed under this call
                err = _Unreachable(f"Triton ({self.model}): channel closed: {exc}")
            if isinstance(err, _NoAnswer):
                self._replace(client, err)
                if isinstance(err, _Unreachable) and attempt < self.retries:
                    attempt += 1
                    continue
                err = BackendUnavailable(str(err))  # the markers stay inside this module
            raise err from None
        cvr = result.as_numpy(OUTPUT)
        if cvr is None or cvr.shape != (b,):
            got = None if cvr is None else cvr.shape
            raise BackendError(f"Triton ({self.model}): {OUTPUT} has shape {got}, expected ({b},)")
        return np.asarray(cvr, dtype=np.float32)

    async def check_signature(self) -> None:
        """Raise :class:`BackendError` unless the served model takes the seven ranker
        inputs with their dtypes and returns ``cvr`` (BackendUnavailable if unreachable)."""
        client = self._current()
        try:
            meta = await client.get_model_metadata(
                self.model, as_json=True, client_timeout=self.ready_timeout_s
            )
        except InferenceServerException as exc:
            err = classify(exc, self.model)
            if isinstance(err, _NoAnswer):
                self._replace(client, err)
                err = BackendUnavailable(str(err))
            raise err from None
        got = {t["name"]: t["datatype"] for t in meta.get("inputs", [])}
        want = {n: np_to_triton_dtype(d) for n, d in INPUT_DTYPES.items()}
        outs = [t["name"] for t in meta.get("outputs", [])]
        if got != want or OUTPUT not in outs:
            raise BackendError(
                f"Triton model {self.model} serves inputs {got} and outputs {outs}; "
                f"the ranker needs inputs {want} and output {OUTPUT}"
            )

    async def warm(self, example: Mapping[str, np.ndarray], hist_buckets: Sequence[int]) -> None:
        """Check the served signature, then score ``example`` once per history bucket."""
        await self.check_signature()
        for n in hist_buckets:
            await self.infer(pad_history(example, n))

    async def ready(self) -> bool:
        """True when Triton reports the model itself ready (not just the server: Triton's
        server readiness can be true before a model is loaded); never raises."""
        client = self._current()
        try:
            return bool(
                await client.is_model_ready(self.model, client_timeout=self.ready_timeout_s)
            )
        except InferenceServerException as exc:
            err = classify(exc, self.model)
            if isinstance(err, _NoAnswer):
                self._replace(client, err)
            return False
        except grpc.aio.UsageError:
            return False

    async def close(self) -> None:
        """Close the live channel and any replaced one still waiting to close."""
        clients = [self._client, *self._retired.values()]
        self._client = None
        for task in list(self._retired):
            task.cancel()
        for client in clients:
            if client is not None:
                await client.close()


def from_settings(settings: Settings, repo: ModelRepository) -> TritonBackend:
    """The backend ``settings.backend`` describes (``kind = "triton"``). ``repo`` is the
    exported repository the Triton model was built from; the served signature is
    checked against the ranker's in :meth:`TritonBackend.warm`."""
    b = settings.backend
    return TritonBackend(b.triton_url, b.triton_model, timeout_ms=b.timeout_ms)
