"""A Triton model repository that serves an exported ranker through the Python backend.

Why a Python-backend wrapper: the Triton available here (the ``tritonserver`` 2.51
inside the ``nvidia-pytriton`` wheel) has the Python backend only, no ONNX Runtime
backend, so the ``onnxruntime_onnx`` ``config.pbtxt`` that ``model_export`` writes
cannot be loaded by it. :func:`build_triton_repository` writes, instead, a model whose
``model.py`` (this package's :mod:`service.triton_repo.model`) runs the *same*
exported ``model.onnx`` with ONNX Runtime inside Triton. The client side is identical:
same model name, same input/output names, dtypes and dims, KServe v2 gRPC. A real
Triton container (compose, GPU) serves the exported repository itself with the
``onnxruntime_onnx`` config from ``model_export``; :class:`service.backends.triton.TritonBackend`
talks to either.

Layout written under ``out``::

    manifest.json              # copy of the exported manifest (model name/version, Q, D)
    <model>/config.pbtxt       # backend "python", max_batch_size 0, bounded queue
    <model>/1/model.py         # service/triton_repo/model.py
    <model>/1/model.onnx       # the exported graph, sha256 checked after the copy

Config choices:

- ``max_batch_size: 0``: one Triton request is already a multi-user batch whose
  ``cand_user`` indexes its own user rows; Triton must not concatenate requests.
- ``dynamic_batching`` is present only for its queue policy: ``max_queue_size``
  bounds the requests waiting for an instance (beyond it Triton rejects at once with
  "Exceeds maximum queue size"), and ``allow_timeout_override`` lets the client pass
  its remaining deadline so a request whose caller gave up is dropped from the queue
  instead of being scored. ``max_queue_size=None`` leaves the block out: Triton then
  queues without bound (the client's deadline is the only limit).
- ``instance_group`` of ``instances`` CPU instances (one stub process and one ONNX
  Runtime session each, ``threads`` intra-op threads each); 2 by default, as the
  ``onnxruntime_onnx`` config. Size it to at least the service's ``backend.workers``
  (batches in flight) so that Triton's queue is empty in normal operation.

Measured here (Triton 2.51, CPU): with ``dynamic_batching`` and ``max_batch_size: 0``,
a burst of many simultaneous requests queued behind *one* busy instance is served in
500 ms steps (24 small requests at once: 5-9 s, against 0.02 s without the
``dynamic_batching`` block; the scheduler's 500 ms idle wait). With 2 instances the
same burst takes 0.02-0.1 s (rarely one 500 ms step), and 4 steady streams of
requests (the service's workers) see no step on either. The queue bound is for
overload, not for steady traffic.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model_export.errors import ChecksumError
from model_export.manifest import MANIFEST, RANKER, TensorSpec
from model_export.repository import open_repository, sha256_file
from model_export.triton import TRITON_TYPES

MODEL_PY = Path(__file__).with_name("model.py")


def _tensor(t: TensorSpec) -> str:
    dims = ", ".join(str(s) if isinstance(s, int) else "-1" for s in t.shape)
    return f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: [ {dims} ] }}'


def render_python_config(
    name: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    *,
    max_queue_size: int | None,
    instances: int,
    threads: int,
    delay_ms: float,
) -> str:
    """``config.pbtxt`` text of the Python-backend ranker (module docstring: choices)."""
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 0",
        "input [",
        ",\n".join(_tensor(t) for t in inputs),
        "]",
        "output [",
        ",\n".join(_tensor(t) for t in outputs),
        "]",
    ]
    if max_queue_size is not None:
        lines += [
            "dynamic_batching {",
            "  default_queue_policy {",
            f"    max_queue_size: {max_queue_size}",
            "    timeout_action: REJECT",
            "    allow_timeout_override: true",
            "  }",
            "}",
        ]
    lines += [
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        "version_policy: { latest: { num_versions: 1 } }",
        'parameters { key: "onnx_file" value: { string_value: "model.onnx" } }',
        f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{threads}" }} }}',
        f'parameters {{ key: "delay_ms" value: {{ string_value: "{delay_ms:g}" }} }}',
    ]
    return "\n".join(lines) + "\n"


def build_triton_repository(
    model_repo: Path | str,
    out: Path | str,
    *,
    model_name: str = RANKER,
    graph: str = RANKER,
    max_queue_size: int | None = 64,
    instances: int = 2,
    threads: int = 1,
    delay_ms: float = 0.0,
) -> Path:
    """Write a Triton model repository at ``out`` serving graph ``graph`` of the
    exported repository ``model_repo`` as Triton model ``model_name``; returns ``out``.

    ``model_repo`` is verified first (``open_repository``: manifest, checksums,
    signature, golden batch); the copied graph is checked against the manifest's
    sha256. ``out`` may hold other models (call again with another ``model_name``
    to serve several), but not ``model_name`` itself. ``delay_ms`` > 0 slows every
    request down (tests only: it makes Triton's queue fill for real).
    """
    if (max_queue_size is not None and max_queue_size < 1) or min(instances, threads) < 1:
        raise ValueError("max_queue_size (or None), instances and threads must be >= 1")
    if delay_ms < 0:
        raise ValueError("delay_ms must be >= 0")
    repo = open_repository(model_repo)
    if graph not in repo.manifest.graphs:
        raise KeyError(f"no graph {graph!r}; {model_repo} has {list(repo.manifest.graphs)}")
    spec = repo.manifest.graphs[graph]
    out = Path(out)
    if (out / model_name).exists():
        raise FileExistsError(f"{out / model_name} exists already")
    version_dir = out / model_name / "1"
    version_dir.mkdir(parents=True)
    shutil.copyfile(repo.root / MANIFEST, out / MANIFEST)
    onnx = version_dir / "model.onnx"
    shutil.copyfile(repo.path(graph), onnx)
    if sha256_file(onnx) != repo.manifest.files[spec.file]:
        raise ChecksumError(f"{onnx}: sha256 differs from {spec.file} after the copy")
    shutil.copyfile(MODEL_PY, version_dir / "model.py")
    config = render_python_config(
        model_name,
        spec.inputs,
        spec.outputs,
        max_queue_size=max_queue_size,
        instances=instances,
        threads=threads,
        delay_ms=delay_ms,
    )
    (out / model_name / "config.pbtxt").write_text(config)
    return out
