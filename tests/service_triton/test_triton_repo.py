"""build_triton_repository without a server: the written config is a valid Triton
ModelConfig with the ranker's exact signature, the graph is the exported file byte for
byte, and bad arguments / a corrupt export are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from triton_fixtures import exported_repo
from tritonclient.grpc import model_config_pb2

from model_export.errors import ChecksumError
from model_export.repository import ModelRepository, sha256_file
from model_export.triton import TRITON_TYPES
from service.triton_repo import MODEL_PY, build_triton_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    return exported_repo(tmp_path_factory.mktemp("triton_export"))


def test_config_is_the_ranker_signature(repo: ModelRepository, tmp_path: Path) -> None:
    out = build_triton_repository(
        repo.root, tmp_path / "m", max_queue_size=3, instances=2, delay_ms=5
    )
    cfg = text_format.Parse((out / "ranker" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())  # fmt: skip
    spec = repo.manifest.graphs["ranker"]
    assert cfg.name == "ranker" and cfg.backend == "python" and cfg.max_batch_size == 0
    for got, want in ((cfg.input, spec.inputs), (cfg.output, spec.outputs)):
        assert [t.name for t in got] == [t.name for t in want]
        for g, w in zip(got, want, strict=True):
            assert model_config_pb2.DataType.Name(g.data_type) == TRITON_TYPES[w.dtype]
            assert list(g.dims) == [s if isinstance(s, int) else -1 for s in w.shape]
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 3
    assert cfg.dynamic_batching.default_queue_policy.allow_timeout_override
    assert cfg.instance_group[0].count == 2
    assert cfg.parameters["delay_ms"].string_value == "5"
    assert sha256_file(out / "ranker" / "1" / "model.onnx") == sha256_file(repo.path("ranker"))
    assert (out / "ranker" / "1" / "model.py").read_bytes() == MODEL_PY.read_bytes()
    assert (out / "manifest.json").read_bytes() == (repo.root / "manifest.json").read_bytes()


def test_unbounded_queue_leaves_dynamic_batching_out(repo: ModelRepository, tmp_path: Path) -> None:
    out = build_triton_repository(repo.root, tmp_path / "m", max_queue_size=None)
    text = (out / "ranker" / "config.pbtxt").read_text()
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert not cfg.HasField("dynamic_batching") and cfg.instance_group[0].count == 2


def test_refusals(repo: ModelRepository, tmp_path: Path) -> None:
    out = build_triton_repository(repo.root, tmp_path / "m")
    with pytest.raises(FileExistsError):
        build_triton_repository(repo.root, out)  # the same model name twice
    build_triton_repository(repo.root, out, model_name="other")  # another one is fine
    with pytest.raises(ValueError):
        build_triton_repository(repo.root, tmp_path / "q", max_queue_size=0)
    with pytest.raises(KeyError):
        build_triton_repository(repo.root, tmp_path / "g", graph="nope")


def test_corrupt_export_is_refused(repo: ModelRepository, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(repo.root, bad)
    onnx = bad / "ranker" / "1" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        build_triton_repository(bad, tmp_path / "m")
    assert not (tmp_path / "m").exists()
