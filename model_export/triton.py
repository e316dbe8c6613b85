"""Triton ``config.pbtxt`` for the two graphs (pure text, no torch, no protobuf).

The text is protobuf text format for Triton's ``ModelConfig`` (the tests parse it with
the ``model_config_pb2`` that ``tritonclient`` ships). Choices:

- **ranker**: ``max_batch_size: 0``, no Triton dynamic batching. One ranker request is
  already a batch of several users' requests (U user rows, B candidate rows), and
  ``cand_user`` holds row indices *within* that request: Triton concatenating two
  requests along dim 0 would leave the second request's ``cand_user`` pointing at
  the first request's users. mmrank's own batcher packs requests (offsetting
  ``cand_user``), so Triton must run each request as it comes. Run Triton with
  ``--disable-auto-complete-config`` so that it does not guess a batch size for a
  graph whose every first dimension is dynamic.
- **item_tower**: items are independent, so Triton's dynamic batcher may merge
  requests along the item axis (``max_batch_size`` items); requests merge only when
  their text length ``L`` agrees (the embedding job pads text to ``max_text_len``).
- CPU instances by default (ONNX Runtime, one intra-op thread each: throughput comes
  from instances, latency from small graphs); ``configs/gpu.pbtxt`` is the GPU
  variant (Triton's ``--model-config-name=gpu``), reading the float16 file when one
  was exported.
"""

from __future__ import annotations

from collections.abc import Sequence

from model_export.manifest import GraphSpec, TensorSpec

TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
ITEM_TOWER_MAX_BATCH = 1024


def _dims(shape: Sequence[int | str]) -> str:
    return "[ " + ", ".join(str(s) if isinstance(s, int) else "-1" for s in shape) + " ]"


def _tensor(t: TensorSpec, batched: bool) -> str:
    """One input/output entry; with ``batched`` the leading (batch) axis is implied."""
    shape = t.shape[1:] if batched else t.shape
    parts = [f'name: "{t.name}"', f"data_type: {TRITON_TYPES[t.dtype]}"]
    if batched and not shape:
        # a per-item scalar: Triton wants at least one dim, the graph has none
        parts += ["dims: [ 1 ]", "reshape: { shape: [ ] }"]
    else:
        parts.append(f"dims: {_dims(shape)}")
    return "  {\n    " + "\n    ".join(parts) + "\n  }"


def render_config(
    name: str,
    graph: GraphSpec,
    *,
    gpu: bool = False,
    model_filename: str = "model.onnx",
    header: str = "",
) -> str:
    """``config.pbtxt`` text for Triton model ``name`` serving ``graph``."""
    batched = name != "ranker"
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f'default_model_filename: "{model_filename}"',
        f"max_batch_size: {ITEM_TOWER_MAX_BATCH if batched else 0}",
        "input [",
        ",\n".join(_tensor(t, batched) for t in graph.inputs),
        "]",
        "output [",
        ",\n".join(_tensor(t, batched) for t in graph.outputs),
        "]",
    ]
    if batched:
        lines.append("dynamic_batching { max_queue_delay_microseconds: 2000 }")
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    count = 1 if gpu else 2
    lines += [
        f"instance_group [ {{ count: {count} kind: {kind} }} ]",
        "version_policy: { latest: { num_versions: 1 } }",
        # ORT backend: level 1 = basic + extended graph optimisations (see bench)
        "optimization { graph: { level: 1 } }",
        'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }',
        'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }',
    ]
    return "\n".join(lines) + "\n"
