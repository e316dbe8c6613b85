"""Stack inputs built once per test session by the real builder (world -> CameNN with
random weights -> ONNX export -> item-tower embeddings -> ids.json). 1,200 items so
that requests of K = 1000 candidates fit. Not a conftest (one per tree)."""

from __future__ import annotations

import pytest

from deploy.stack import StackInputs, build_inputs

_INPUTS: list[StackInputs] = []


def shared_inputs(tmp_path_factory: pytest.TempPathFactory) -> StackInputs:
    if not _INPUTS:
        root = tmp_path_factory.mktemp("stack-inputs")
        _INPUTS.append(build_inputs(root, users=600, items=1200, d_model=32, threads=1))
    return _INPUTS[0]
