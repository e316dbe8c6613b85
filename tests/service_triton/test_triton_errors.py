"""The one error mapping of the Triton backend (pure: no server), on the status codes
and messages Triton and gRPC actually send (seen in the real-server tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.utils import InferenceServerException

from service.backends.base import BackendError, BackendOverloaded, BackendUnavailable
from service.backends.triton import classify

CASES = [
    # Triton's dynamic-batcher queue bound (sent as UNAVAILABLE)
    ("StatusCode.UNAVAILABLE", "[request id: <id_unknown>] Exceeds maximum queue size", BackendOverloaded),
    ("StatusCode.RESOURCE_EXHAUSTED", "rate limit", BackendOverloaded),
    # transport: server down, connection reset
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: "
     "ipv4:127.0.0.1:1: Failed to connect to remote host: Connection refused", BackendUnavailable),
    ("StatusCode.UNAVAILABLE", "Socket closed", BackendUnavailable),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", BackendUnavailable),
    # Triton up, model not there / not ready / request timed out in Triton's queue
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'nope' is not found", BackendUnavailable),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'ranker' has no available versions", BackendUnavailable),
    ("StatusCode.UNAVAILABLE", "Request timeout expired", BackendUnavailable),
    # anything else: bad input, model failure
    ("StatusCode.INVALID_ARGUMENT", "[request id: <id_unknown>] unexpected shape for input "
     "'cand_emb' for model 'ranker'. Expected [-1,1,16], got [6,1,3]", BackendError),
    ("StatusCode.INTERNAL", "Failed to process the request(s) for model 'ranker'", BackendError),
    ("StatusCode.RESOURCE_EXHAUSTED", "Received message larger than max (5 vs. 4)", BackendError),
    (None, "model version must be a string", BackendError),
]  # fmt: skip


@pytest.mark.parametrize(("status", "msg", "kind"), CASES)
def test_classify(status: str | None, msg: str, kind: type[BackendError]) -> None:
    err = classify(InferenceServerException(msg, status=status), "ranker")
    assert isinstance(err, kind)
    if kind is BackendError:
        assert not isinstance(err, BackendUnavailable | BackendOverloaded)
    if kind is BackendUnavailable:
        assert not isinstance(err, BackendOverloaded)
    assert "ranker" in str(err) and msg in str(err)


def test_triton_modules_do_not_import_torch() -> None:
    """The serving path stays torch-free (a fresh interpreter: this one has torch)."""
    code = (
        "import sys, service.backends.triton, service.triton_repo, service.triton_local; "
        "bad = [m for m in ('torch', 'training', 'model_export.export') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
