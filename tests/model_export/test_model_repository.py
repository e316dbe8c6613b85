"""The model repository on disk: manifest contents, Triton configs parsed by Triton's
own protobuf, the serving side's import hygiene, and refusals of broken
repositories with errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from export_fixtures import MODELS, Exported, exported_models, save_small_run
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from data.world import USER_FIELDS
from model_export.errors import (
    ChecksumError,
    ExportError,
    GoldenMismatchError,
    ManifestError,
    MissingFileError,
    ModelFileError,
    ModelRepositoryError,
    SignatureError,
)
from model_export.export import export_run
from model_export.repository import load_golden, open_repository, sha256_file
from models.baselines import Baseline, BaselineConfig
from training.runs import save_run

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    return exported_models(tmp_path_factory)


@pytest.fixture
def copy_of(exported: dict[str, Exported], tmp_path: Path) -> Callable[[str], Path]:
    """A private copy of an exported repository, for a test to break."""

    def make(key: str) -> Path:
        dst = tmp_path / key
        shutil.copytree(exported[key].repo.root, dst)
        return dst

    return make


def edit_manifest(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def reseal(root: Path, rel: str) -> None:
    """Record ``rel``'s current sha256 in the manifest (a broken file, honestly listed)."""
    sha = sha256_file(root / rel)
    edit_manifest(root, lambda m: m["files"].__setitem__(rel, sha))


@pytest.mark.parametrize("key", MODELS)
def test_manifest_holds_the_contract(exported: dict[str, Exported], key: str) -> None:
    e = exported[key]
    m = e.manifest
    raw = json.loads((e.repo.root / "manifest.json").read_text())
    for k in (
        "name",
        "version",
        "model",
        "attention",
        "q",
        "d",
        "user_fields",
        "item_fields",
        "hashing",
        "item_record",
        "graphs",
        "files",
        "training",
        "exported_at",
        "opset",
    ):
        assert k in raw, k
    assert (m.q, m.d) == ((2, 16) if key == "em3" else (1, 16))
    assert m.attention == (None if key == "em3" else key.removeprefix("camenn-"))
    assert [f.name for f in m.user_fields] == [f.name for f in USER_FIELDS]
    assert m.hashing["pad"] == 0 and m.training["test_auc"] == 0.5 and m.opset == 18
    ranker = m.graphs["ranker"]
    assert [t.name for t in ranker.inputs] == [
        "user_sparse",
        "hist_emb",
        "hist_sparse",
        "hist_mask",
        "cand_emb",
        "cand_sparse",
        "cand_user",
    ]
    assert ranker.inputs[1].shape == ("U", "N", m.q, m.d) and ranker.inputs[3].dtype == "bool"
    assert ranker.outputs[0].shape == ("B",) and set(ranker.dynamic_axes) == {"U", "N", "B"}
    assert ranker.parity_max_abs_diff <= ranker.tolerance == 1e-4
    # every file of the repository is listed with its sha256
    on_disk = {
        p.relative_to(e.repo.root).as_posix()
        for p in e.repo.root.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(m.files) == on_disk
    assert all(sha256_file(e.repo.root / f) == sha for f, sha in m.files.items())
    # the graphs carry the axis names of the manifest, and pass the checker
    sess_shapes = {i.name: i.shape for i in e.ranker.get_inputs()}
    assert sess_shapes["hist_emb"] == ["U", "N", m.q, m.d] and sess_shapes["cand_user"] == ["B"]
    for g in m.graphs.values():
        onnx.checker.check_model(str(e.repo.root / g.file), full_check=True)


@pytest.mark.parametrize("key", ["camenn-full", "em3"])
def test_item_record_dtype_decodes_a_request_with_one_frombuffer(
    exported: dict[str, Exported], key: str
) -> None:
    m = exported[key].manifest
    dt = m.record_dtype()
    fi = len(m.item_fields)
    assert dt.itemsize == 2 * m.q * m.d + 8 * fi + (8 if m.alignment else 0)
    assert ("ita" in (dt.names or ())) == m.alignment == (key != "em3")  # EM3: no made-up scores
    recs = np.zeros(5, dtype=dt)
    recs["emb"] = np.random.default_rng(0).standard_normal((5, m.q, m.d))
    recs["sparse"] = np.arange(5 * fi).reshape(5, fi)
    values = [r.tobytes() for r in recs]  # what the store holds, one value per key
    back = np.frombuffer(b"".join(values), dtype=dt)
    np.testing.assert_array_equal(back["sparse"], recs["sparse"])
    assert back["emb"].dtype == np.float16 and back["emb"].shape == (5, m.q, m.d)


def test_config_pbtxt_parses_into_tritons_model_config(exported: dict[str, Exported]) -> None:
    for key in ("camenn-full", "em3"):
        e = exported[key]
        for model in ("ranker", "item_tower"):
            graph = e.manifest.graphs[model]
            for cfg_path in (Path(model, "config.pbtxt"), Path(model, "configs", "gpu.pbtxt")):
                text = (e.repo.root / cfg_path).read_text()
                cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
                assert cfg.name == model and cfg.platform == "onnxruntime_onnx"
                assert [i.name for i in cfg.input] == [t.name for t in graph.inputs]
                assert [o.name for o in cfg.output] == [t.name for t in graph.outputs]
                assert (e.repo.root / model / "1" / cfg.default_model_filename).is_file()
                gpu = cfg_path.name == "gpu.pbtxt"
                kind = (
                    model_config_pb2.ModelInstanceGroup.KIND_GPU
                    if gpu
                    else (model_config_pb2.ModelInstanceGroup.KIND_CPU)
                )
                assert cfg.instance_group[0].kind == kind
                if model == "ranker":
                    # whole multi-user batches: Triton must not concatenate requests
                    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
                    assert list(cfg.input[1].dims) == [-1, -1, e.manifest.q, e.manifest.d]
                else:
                    assert cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching")
                    assert list(cfg.input[0].dims) == [-1, e.manifest.item_content["text_dim"]]
                    assert list(cfg.input[1].reshape.shape) == []  # text_len: one per item
                fp16 = gpu and key == "camenn-full"
                assert cfg.default_model_filename == ("model.fp16.onnx" if fp16 else "model.onnx")


def test_serving_side_imports_no_torch_and_serves(exported: dict[str, Exported]) -> None:
    """In a fresh interpreter: open + verify a repository, run the golden batch and the
    benchmark's request, with torch and the training code never imported."""
    root = exported["camenn-candidate-isolated"].repo.root
    code = f"""
import sys
from model_export.repository import open_repository
from model_export import bench, manifest, triton, errors
repo = open_repository({str(root)!r})
sess = repo.session("ranker")
repo.check_golden("ranker", sess)
out = sess.run(["cvr"], bench.request_feeds(repo.manifest, 10, 5))[0]
assert out.shape == (10,)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "models", "data"))
assert not bad, bad
"""
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr


def test_torch_reference_reproduces_the_golden_outputs(exported: dict[str, Exported]) -> None:
    e = exported["em3"]
    ins, want = e.repo.golden("ranker")
    np.testing.assert_allclose(e.ref.rank(ins), want["cvr"], atol=1e-6, rtol=0)
    ins, want = e.repo.golden("item_tower")
    np.testing.assert_allclose(e.ref.embed(ins)["emb"], want["emb"], atol=1e-6, rtol=0)


# --- refusals: each names the file / tensor / key at fault --------------------------------


def test_truncated_onnx_fails_its_checksum(copy_of: Callable[[str], Path]) -> None:
    root = copy_of("camenn-full")
    f = root / "ranker/1/model.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ChecksumError, match=r"ranker/1/model\.onnx: sha256 .* does not match"):
        open_repository(root)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_onnx_with_a_matching_sha_is_refused_as_a_model_file(
    copy_of: Callable[[str], Path], damage: str
) -> None:
    root = copy_of("em3")
    rel = "item_tower/1/model.onnx"
    f = root / rel
    data = f.read_bytes()
    f.write_bytes(
        {
            "truncate": data[: len(data) * 2 // 3],
            "garbage": np.random.default_rng(0).bytes(len(data)),
            "empty": b"",
        }[damage]
    )
    reseal(root, rel)
    with pytest.raises(ModelFileError, match=r"item_tower/1/model\.onnx is not a loadable ONNX"):
        open_repository(root)


def test_manifest_sha_mismatch_is_refused(copy_of: Callable[[str], Path]) -> None:
    root = copy_of("em3")
    edit_manifest(root, lambda m: m["files"].__setitem__("reference.safetensors", "0" * 64))
    with pytest.raises(ChecksumError, match=r"reference\.safetensors: sha256"):
        open_repository(root)


def test_missing_file_is_refused(copy_of: Callable[[str], Path]) -> None:
    root = copy_of("em3")
    (root / "ranker/1/model.onnx").unlink()
    with pytest.raises(MissingFileError, match=r"ranker/1/model\.onnx: listed in manifest"):
        open_repository(root)


def _set_input(i: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda m: m["graphs"]["ranker"]["inputs"][i].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set_input(1, "shape", ["U", "N", 1, 32]),
            r"input hist_emb dim 3 is 16 in the graph but 32",
        ),
        (
            _set_input(6, "dtype", "float32"),
            r"input cand_user is tensor\(int64\) in the graph but float32",
        ),
        (
            _set_input(0, "name", "user_ids"),
            r"inputs are \['user_sparse'.*\] in the graph but \['user_ids'",
        ),
        (_set_input(3, "shape", ["U"]), r"input hist_mask has rank 2 in the graph .* rank 1"),
        (
            lambda m: m["graphs"]["ranker"]["outputs"][0].__setitem__("name", "score"),
            r"outputs are \['cvr'\] in the graph but \['score'\]",
        ),
    ],
    ids=["dim", "dtype", "name", "rank", "output"],
)
def test_signature_disagreeing_with_the_manifest_is_refused(
    copy_of: Callable[[str], Path], edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    root = copy_of("camenn-candidate-isolated")
    edit_manifest(root, edit)
    with pytest.raises(
        SignatureError, match=r"ranker/1/model\.onnx \(graphs\.ranker\): " + message
    ):
        open_repository(root)


def test_another_models_graph_is_refused(
    exported: dict[str, Exported], copy_of: Callable[[str], Path]
) -> None:
    """EM3's ranker (Q = 2) dropped into a CameNN repository (Q = 1), sha updated."""
    root = copy_of("camenn-full")
    shutil.copyfile(exported["em3"].repo.path("ranker"), root / "ranker/1/model.onnx")
    reseal(root, "ranker/1/model.onnx")
    with pytest.raises(SignatureError, match=r"input hist_emb dim 2 is 2 in the graph but 1"):
        open_repository(root)


def test_graph_that_misses_its_golden_outputs_is_refused(copy_of: Callable[[str], Path]) -> None:
    root = copy_of("em3")
    ins, outs = load_golden(root / "golden_ranker.npz")
    arrays = {f"in.{k}": v for k, v in ins.items()} | {"out.cvr": outs["cvr"] + 0.01}
    np.savez(root / "golden_ranker.npz", **arrays)  # type: ignore[arg-type]
    reseal(root, "golden_ranker.npz")
    with pytest.raises(GoldenMismatchError, match=r"ranker/1/model\.onnx .* differs .* by 0\.01"):
        open_repository(root)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"manifest\.json is not valid JSON"),
        (None, r"missing key graphs"),
        ("{}", r"missing key format_version"),
    ],
)
def test_bad_manifest_is_refused(
    copy_of: Callable[[str], Path], text: str | None, message: str
) -> None:
    root = copy_of("em3")
    if text is None:
        edit_manifest(root, lambda m: m.pop("graphs"))
    else:
        (root / "manifest.json").write_text(text)
    with pytest.raises(ManifestError, match=message):
        open_repository(root)


def test_no_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"not a model repository: manifest\.json is missing"):
        open_repository(tmp_path)


def test_errors_are_one_hierarchy() -> None:
    for cls in (
        ManifestError,
        MissingFileError,
        ChecksumError,
        ModelFileError,
        SignatureError,
        GoldenMismatchError,
    ):
        assert issubclass(cls, ModelRepositoryError) and issubclass(cls, ValueError)


def test_export_refuses_to_overwrite_and_refuses_baselines(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    save_small_run(run, "em3")
    with pytest.raises(ExportError, match="exists; pass --force"):
        export_run(run, exported["em3"].repo.root)
    cfg = BaselineConfig(kind="lr", user_buckets=[11, 5], item_buckets=[7])
    save_run(tmp_path / "lr", "lr", Baseline(cfg), cfg, {"data": "tiny-world"})
    with pytest.raises(ValueError, match=r"only camenn and em3 runs export; .* holds 'lr'"):
        export_run(tmp_path / "lr", tmp_path / "out")
    assert not (tmp_path / "out").exists()
