"""The ONNX Runtime backend: the repository's ranker in process.

One :class:`onnxruntime.InferenceSession` (thread-safe for concurrent ``run``) and a
pool of ``workers`` threads; ``run`` releases the GIL, so the event loop keeps parsing
requests and fetching features while a batch is scored. Execution providers: CPU by
default; with ``device="auto"`` TensorRT, then CUDA, where this onnxruntime build has
them (``onnxruntime-gpu``), CPU otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from model_export.manifest import RANKER
from model_export.repository import ModelRepository
from service.backends.base import RANKER_INPUTS, Backend, BackendError
from service.tensors import pad_history

log = logging.getLogger(__name__)
GPU_PROVIDERS = {
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def choose_providers(device: str, available: Sequence[str] | None = None) -> list[str]:
    """Execution providers for ``device`` (auto | cpu | cuda | tensorrt) among those this
    build has; ValueError when an explicitly asked GPU provider is absent."""
    have = list(available if available is not None else ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "auto":
        for key in ("tensorrt", "cuda"):
            if GPU_PROVIDERS[key][0] in have:
                return [p for p in GPU_PROVIDERS[key] if p in have]
        return ["CPUExecutionProvider"]
    want = GPU_PROVIDERS[device]
    if want[0] not in have:
        raise ValueError(f"device={device}: {want[0]} is not available (have {have})")
    return [p for p in want if p in have]


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        repo: ModelRepository,
        *,
        device: str = "cpu",
        workers: int = 1,
        threads: int = 1,
        optimization: str = "extended",
    ) -> None:
        self.providers = choose_providers(device)
        self.compiles_shapes = self.providers[0] == "TensorrtExecutionProvider"
        self.session = repo.session(
            RANKER, threads=threads, optimization=optimization, providers=self.providers
        )
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ort")
        self._outputs = ["cvr"]
        log.info("ONNX Runtime ranker on %s, %d worker(s) x %d thread(s)",
                 self.session.get_providers(), workers, threads)  # fmt: skip

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            return self.session.run(self._outputs, feeds)[0]
        except Exception as exc:  # ORT raises its own pybind exception types
            raise BackendError(f"onnxruntime: {str(exc).strip()[:300]}") from exc

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        feeds = {k: inputs[k] for k in RANKER_INPUTS}
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, self._run, feeds)
        except RuntimeError as exc:  # the pool was shut down (model unloaded)
            raise BackendError(f"onnxruntime: {exc}") from exc

    async def warm(self, example: Mapping[str, np.ndarray], hist_buckets: Sequence[int]) -> None:
        for n in hist_buckets:
            await self.infer(pad_history(example, n))

    async def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
