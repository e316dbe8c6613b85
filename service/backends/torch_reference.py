"""The PyTorch reference backend: the repository's reference weights in PyTorch eager
(:class:`model_export.torch_reference.TorchReference`), for comparisons.

torch is imported when this backend is built, never when the service is imported; it
needs the ``train`` extra. Runs in one worker thread (torch releases the GIL in its
kernels).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from service.backends.base import Backend, BackendError
from service.tensors import pad_history


class TorchReferenceBackend(Backend):
    name = "torch"

    def __init__(self, root: Path, threads: int = 1) -> None:
        try:
            from model_export.torch_reference import TorchReference
        except ImportError as exc:  # a serving install has no torch
            raise ValueError(f"backend torch needs the training extra: {exc}") from exc
        self.ref: Any = TorchReference.from_repository(root, threads=threads)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="torch")

    def _run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        try:
            return np.asarray(self.ref.rank(feeds), dtype=np.float32)
        except Exception as exc:
            raise BackendError(f"torch: {str(exc)[:300]}") from exc

    async def infer(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, inputs)

    async def warm(self, example: Mapping[str, np.ndarray], hist_buckets: Sequence[int]) -> None:
        for n in hist_buckets:
            await self.infer(pad_history(example, n))

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
