"""Triton Python-backend model: the exported ranker run by ONNX Runtime.

Copied into ``<triton repository>/<model>/1/model.py`` by
:func:`service.triton_repo.build_triton_repository`; it runs inside Triton's Python
backend stub (the ``.venv-triton`` interpreter, numpy < 2), never inside the service.

Guarantees:

- one ONNX Runtime CPU session per Triton instance, made once in ``initialize`` from
  ``model.onnx`` beside this file, with the exporter's default options (one intra-op
  thread, ``extended`` graph optimisation), so scores equal the exported graph run
  directly in ONNX Runtime;
- each Triton request is scored on its own (``max_batch_size: 0``): a request already
  is a batch of several users, and its ``cand_user`` indexes its own user rows;
- a request that fails (bad shapes, wrong dtype) gets an error response of its own;
  the other requests of the same ``execute`` call are still answered.

Config parameters (``parameters`` in ``config.pbtxt``, string values):

- ``onnx_file``: the graph file in the version directory (default ``model.onnx``);
- ``intra_op_thread_count``: ONNX Runtime intra-op threads (default 1);
- ``delay_ms``: an artificial delay before each request is scored (default 0). It
  exists only so tests can make Triton's queue fill for real (queue-full rejection);
  leave it at 0 in any real deployment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """The Python-backend entry points Triton calls: initialize, execute, finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        config: dict[str, Any] = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.delay_s = float(params.get("delay_ms", "0")) / 1000.0
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.log_severity_level = 3
        path = Path(args["model_repository"]) / args["model_version"]
        path = path / params.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(
            str(path), sess_options=so, providers=["CPUExecutionProvider"]
        )
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def _score(self, request: Any) -> Any:
        feeds: dict[str, np.ndarray] = {}
        for name in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name} is missing")
            feeds[name] = tensor.as_numpy()
        if self.delay_s:
            time.sleep(self.delay_s)
        outs = self.session.run(self.outputs, feeds)
        tensors = [
            pb_utils.Tensor(n, np.ascontiguousarray(o))
            for n, o in zip(self.outputs, outs, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                responses.append(self._score(request))
            except Exception as exc:  # one bad request must not fail the others
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(msg)))
        return responses

    def finalize(self) -> None:
        self.session = None
