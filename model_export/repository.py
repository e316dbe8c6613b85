"""Open and verify a model repository; create ONNX Runtime sessions from it.

Serving side: imports numpy and onnxruntime only (no torch, no training code).

:func:`open_repository` returns a :class:`ModelRepository` only if every check
passes, in this order, and otherwise raises the
:class:`~model_export.errors.ModelRepositoryError` subclass of the first failure:

1. ``manifest.json`` parses and has every key with its type (ManifestError);
2. every file the manifest lists exists (MissingFileError) and has its sha256
   (ChecksumError);
3. every graph loads in ONNX Runtime (ModelFileError: truncated, corrupted, not ONNX);
4. every graph's inputs and outputs match the manifest's signature by name, dtype,
   rank, fixed sizes and dynamic axes (SignatureError);
5. with ``golden=True``, every graph reproduces its golden batch within the
   manifest's tolerance (GoldenMismatchError).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model_export.errors import (
    ChecksumError,
    GoldenMismatchError,
    ManifestError,
    MissingFileError,
    ModelFileError,
    SignatureError,
)
from model_export.manifest import MANIFEST, ORT_TYPES, GraphSpec, Manifest, parse_manifest

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# measured (`mmrank bench-model --levels`, 2 cores, K = 500, N = 50): "extended" (MatMul +
# scale -> FusedMatMul, Gemm + activation -> FusedGemm) saves ~10-25% on the
# candidate-isolated CameNN and EM3 rankers and ~1% on full CameNN, for ~10 ms more at
# session creation; "all" adds only NCHWc layout passes (convolutions: none here) and
# measures the same, so the portable "extended" is the default (Triton: level 1)
DEFAULT_OPT_LEVEL = "extended"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def session_options(threads: int = 1, optimization: str = DEFAULT_OPT_LEVEL) -> ort.SessionOptions:
    """ONNX Runtime options: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, the named graph optimisation level."""
    if optimization not in OPT_LEVELS:
        raise ValueError(f"optimization must be one of {list(OPT_LEVELS)}, got {optimization!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = OPT_LEVELS[optimization]
    so.log_severity_level = 3  # errors only: shape-inference warnings are noise here
    return so


def load_session(
    path: Path, label: str, options: ort.SessionOptions, providers: Sequence[str] | None
) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
    except Exception as exc:  # ORT raises its own pybind exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{label} is not a loadable ONNX model: {msg}") from exc


def _ort_shape(shape: Sequence[Any]) -> tuple[int | str | None, ...]:
    return tuple(s if isinstance(s, int | str) else None for s in shape)


def check_signature(key: str, graph: GraphSpec, session: ort.InferenceSession) -> None:
    """Raise SignatureError unless ``session``'s inputs and outputs are exactly the
    manifest's: same names in the same order, dtypes, ranks, fixed sizes, and the
    manifest's dynamic axes dynamic in the graph."""
    where = f"{graph.file} (graphs.{key})"
    for kind, want, got in (
        ("input", graph.inputs, session.get_inputs()),
        ("output", graph.outputs, session.get_outputs()),
    ):
        want_names = [t.name for t in want]
        got_names = [a.name for a in got]
        if want_names != got_names:
            raise SignatureError(
                f"{where}: {kind}s are {got_names} in the graph but {want_names} in the manifest"
            )
        for t, a in zip(want, got, strict=True):
            if ORT_TYPES[t.dtype] != a.type:
                raise SignatureError(
                    f"{where}: {kind} {t.name} is {a.type} in the graph but {t.dtype} "
                    "in the manifest"
                )
            shape = _ort_shape(a.shape)
            if len(shape) != len(t.shape):
                raise SignatureError(
                    f"{where}: {kind} {t.name} has rank {len(shape)} in the graph "
                    f"{list(shape)} but rank {len(t.shape)} in the manifest {list(t.shape)}"
                )
            for i, (m, g) in enumerate(zip(t.shape, shape, strict=True)):
                if isinstance(m, int) and g != m:
                    raise SignatureError(
                        f"{where}: {kind} {t.name} dim {i} is {g} in the graph but {m} "
                        "in the manifest"
                    )
                if isinstance(m, str) and isinstance(g, int):
                    raise SignatureError(
                        f"{where}: {kind} {t.name} dim {i} is fixed to {g} in the graph but "
                        f"the dynamic axis {m} in the manifest"
                    )


def load_golden(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) of a golden ``.npz`` (keys ``in.NAME`` /
    ``out.NAME``; loaded without pickle)."""
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        ins = {k[3:]: z[k] for k in z.files if k.startswith("in.")}
        outs = {k[4:]: z[k] for k in z.files if k.startswith("out.")}
    return ins, outs


def max_abs_diff(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference over the outputs both mappings hold (shapes must
    agree); NaN anywhere counts as infinitely far."""
    worst = 0.0
    for name, w in want.items():
        g = np.asarray(got[name], dtype=np.float64)
        w64 = np.asarray(w, dtype=np.float64)
        if g.shape != w64.shape:
            return float("inf")
        if g.size:
            d = np.abs(g - w64)
            worst = max(worst, float("inf") if np.isnan(d).any() else float(d.max()))
    return worst


@dataclass(frozen=True)
class ModelRepository:
    """A verified model repository (see :func:`open_repository`)."""

    root: Path
    manifest: Manifest

    def path(self, key: str) -> Path:
        return self.root / self.manifest.graphs[key].file

    def session(
        self,
        key: str = "ranker",
        *,
        threads: int = 1,
        optimization: str = DEFAULT_OPT_LEVEL,
        providers: Sequence[str] | None = None,
    ) -> ort.InferenceSession:
        """A new ONNX Runtime session for graph ``key`` (``ranker``, ``item_tower``,
        or a ``*_fp16`` variant when exported)."""
        if key not in self.manifest.graphs:
            raise KeyError(f"no graph {key!r}; this repository has {list(self.manifest.graphs)}")
        return load_session(
            self.path(key),
            self.manifest.graphs[key].file,
            session_options(threads, optimization),
            providers,
        )

    def golden(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return load_golden(self.root / self.manifest.graphs[key].golden)

    def check_golden(self, key: str, session: ort.InferenceSession) -> float:
        """Run the golden batch through ``session``; returns the max abs difference,
        raises GoldenMismatchError above the graph's tolerance."""
        graph = self.manifest.graphs[key]
        ins, want = self.golden(key)
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, ins), strict=True))
        diff = max_abs_diff(got, want)
        if not diff <= graph.tolerance:
            raise GoldenMismatchError(
                f"{graph.file} (graphs.{key}): golden batch differs from the reference by "
                f"{diff:.3g} > tolerance {graph.tolerance:g}"
            )
        return diff


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} is not a model repository: {MANIFEST} is missing")
    return parse_manifest(path.read_text())


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file exists and has its recorded sha256."""
    for rel, sha in manifest.files.items():
        p = root / rel
        if not p.is_file():
            raise MissingFileError(f"{rel}: listed in {MANIFEST} but missing from {root}")
        got = sha256_file(p)
        if got != sha:
            raise ChecksumError(
                f"{rel}: sha256 {got[:16]}... does not match {MANIFEST} ({sha[:16]}...)"
            )


def open_repository(root: Path | str, *, golden: bool = True) -> ModelRepository:
    """Verify the repository at ``root`` (checks 1-5 of the module docstring) and
    return it. Sessions made for verification are discarded."""
    root = Path(root)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    repo = ModelRepository(root, manifest)
    for key, graph in manifest.graphs.items():
        sess = load_session(root / graph.file, graph.file, session_options(1, "disable"), None)
        check_signature(key, graph, sess)
        if golden:
            repo.check_golden(key, sess)
    return repo
