"""``manifest.json``: what a model repository holds and the contract of its graphs.

Pure Python + numpy (the serving side reads it). :func:`parse_manifest` either returns
a fully typed :class:`Manifest` or raises :class:`~model_export.errors.ManifestError`
naming the key that is missing or mistyped; nothing downstream re-checks types.

Shapes in a signature are lists whose entries are ints (fixed sizes) or strings
(dynamic axes, named in ``dynamic_axes``: ``U``, ``N``, ``B`` for the ranker, ``I``,
``L`` for the item tower).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np

from model_export.errors import ManifestError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
RANKER = "ranker"
ITEM_TOWER = "item_tower"

# the graphs' tensor names (DESIGN section 3), one definition for exporter and service
RANKER_INPUTS = (
    "user_sparse",  # int64 (U, Fu)
    "hist_emb",  # float32 (U, N, Q, D)
    "hist_sparse",  # int64 (U, N, Fi)
    "hist_mask",  # bool (U, N)
    "cand_emb",  # float32 (B, Q, D)
    "cand_sparse",  # int64 (B, Fi)
    "cand_user",  # int64 (B,)
)
RANKER_OUTPUTS = ("cvr",)
ITEM_TOWER_INPUTS = ("text", "text_len", "image", "has_image")

# numpy dtype name in the manifest -> ONNX Runtime's type string for the same tensor
ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "bool": "tensor(bool)",
}

RANKER_AXES = {
    "U": "user rows (requests) in the batch; >= 1",
    "N": "history positions, padded (hist_mask marks the real ones); >= 0",
    "B": "candidate rows; each points at its user row through cand_user; >= 1",
}
ITEM_TOWER_AXES = {
    "I": "items; >= 1",
    "L": "text tokens, padded (text_len marks the real ones); 1..max_text_len",
}

HASHING = {
    "function": "mmrank.features.hash_value",
    "rule": "1 + (blake2b(f'{field}={value}', digest_size=8) as little-endian uint64) "
    "% (buckets - 1)",
    "pad": 0,
    "note": "0 is reserved for padding / absent; history padding carries 0 in every field",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (int or axis name)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the repository and its signature.

    ``tolerance`` is the largest absolute difference from the PyTorch reference that
    the graph is allowed (and was checked to have at export, ``parity_max_abs_diff``);
    ``golden`` is an ``.npz`` of inputs and reference outputs the graph must reproduce
    within it."""

    file: str  # relative to the repository root
    triton_model: str  # the Triton model directory that serves it
    precision: str  # "float32" or "float16" (inputs and outputs stay float32)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_axes: dict[str, str]
    tolerance: float
    parity_max_abs_diff: float
    golden: str

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        return d


@dataclass(frozen=True)
class Field:
    """A hashed categorical field (see ``hashing``) and its bucket count."""

    name: str
    buckets: int


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``. ``files`` maps every file of the repository other
    than the manifest (relative path) to its sha256."""

    name: str
    version: str
    model: str  # "camenn" or "em3"
    attention: str | None  # CameNN: "full" / "candidate-isolated"; EM3: None
    q: int
    d: int
    max_hist: int | None  # longest history the ranker accepts (None: no limit)
    opset: int
    user_fields: tuple[Field, ...]
    item_fields: tuple[Field, ...]
    hashing: dict[str, Any]
    item_content: dict[str, int]  # text_dim, image_dim, max_text_len, n_patches
    item_record: list[list[Any]]  # numpy structured dtype: [[name, dtype, shape], ...]
    alignment: bool  # whether the item tower has ITA/TIA heads (CameNN yes, EM3 no)
    graphs: dict[str, GraphSpec]
    files: dict[str, str]
    training: dict[str, Any]
    exported_at: str
    exporter: dict[str, str]
    format_version: int = FORMAT_VERSION
    notes: dict[str, str] = field(default_factory=dict)

    def record_dtype(self) -> np.dtype:
        """The feature store's item record as a numpy structured dtype: one
        ``np.frombuffer(b"".join(values), dtype)`` decodes a whole request's items."""
        return record_dtype_from_json(self.item_record)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = {k: g.to_json() for k, g in self.graphs.items()}
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"


def item_record_json(q: int, d: int, n_item_fields: int, alignment: bool) -> list[list[Any]]:
    """The record layout: the embedding as float16 (Q, D), the item's hashed fields,
    and its ITA/TIA alignment probabilities when the model has alignment heads (EM3's
    records carry none rather than made-up scores). Little-endian, no padding."""
    rec: list[list[Any]] = [["emb", "<f2", [q, d]], ["sparse", "<i8", [n_item_fields]]]
    if alignment:
        rec += [["ita", "<f4", []], ["tia", "<f4", []]]
    return rec


def record_dtype_from_json(rec: list[list[Any]]) -> np.dtype:
    try:
        return np.dtype([(str(n), str(t), tuple(int(s) for s in shape)) for n, t, shape in rec])
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{MANIFEST}: item_record is not a numpy record layout: {exc}") from exc


T = TypeVar("T")


def _get(obj: Any, key: str, typ: type[T] | tuple[type, ...], where: str) -> T:
    if not isinstance(obj, dict):
        raise ManifestError(f"{MANIFEST}: {where or 'top level'} must be an object")
    if key not in obj:
        raise ManifestError(f"{MANIFEST}: missing key {where + '.' if where else ''}{key}")
    val = obj[key]
    # bool is an int in Python; an int field must not accept true/false
    if isinstance(val, bool) and typ in (int, float):
        raise ManifestError(f"{MANIFEST}: {where + '.' if where else ''}{key} must be {typ}")
    if typ is float and isinstance(val, int):
        val = float(val)
    if not isinstance(val, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise ManifestError(
            f"{MANIFEST}: {where + '.' if where else ''}{key} must be {name}, "
            f"got {type(val).__name__}"
        )
    return val  # type: ignore[return-value]


def _tensor(obj: Any, where: str) -> TensorSpec:
    name = _get(obj, "name", str, where)
    dtype = _get(obj, "dtype", str, where)
    if dtype not in ORT_TYPES:
        raise ManifestError(f"{MANIFEST}: {where}.dtype {dtype!r} is not one of {list(ORT_TYPES)}")
    shape = _get(obj, "shape", list, where)
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int | str):
            raise ManifestError(f"{MANIFEST}: {where}.shape entries must be ints or axis names")
    return TensorSpec(name, dtype, tuple(shape))


def _graph(obj: Any, where: str) -> GraphSpec:
    axes = _get(obj, "dynamic_axes", dict, where)
    g = GraphSpec(
        file=_get(obj, "file", str, where),
        triton_model=_get(obj, "triton_model", str, where),
        precision=_get(obj, "precision", str, where),
        inputs=tuple(
            _tensor(t, f"{where}.inputs[{i}]")
            for i, t in enumerate(_get(obj, "inputs", list, where))
        ),
        outputs=tuple(
            _tensor(t, f"{where}.outputs[{i}]")
            for i, t in enumerate(_get(obj, "outputs", list, where))
        ),
        dynamic_axes={str(k): str(v) for k, v in axes.items()},
        tolerance=_get(obj, "tolerance", float, where),
        parity_max_abs_diff=_get(obj, "parity_max_abs_diff", float, where),
        golden=_get(obj, "golden", str, where),
    )
    for t in (*g.inputs, *g.outputs):
        for s in t.shape:
            if isinstance(s, str) and s not in g.dynamic_axes:
                raise ManifestError(
                    f"{MANIFEST}: {where}: {t.name} uses axis {s!r} not in dynamic_axes"
                )
    return g


def _fields(obj: Any, key: str) -> tuple[Field, ...]:
    return tuple(
        Field(_get(f, "name", str, f"{key}[{i}]"), _get(f, "buckets", int, f"{key}[{i}]"))
        for i, f in enumerate(_get(obj, key, list, ""))
    )


def parse_manifest(text: str) -> Manifest:
    """Parse and type-check ``manifest.json``; raises ManifestError naming the bad key."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON: {exc}") from exc
    version = _get(obj, "format_version", int, "")
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{MANIFEST}: format_version {version} is not supported (expected {FORMAT_VERSION})"
        )
    graphs_obj = _get(obj, "graphs", dict, "")
    graphs = {str(k): _graph(v, f"graphs.{k}") for k, v in graphs_obj.items()}
    for required in (RANKER, ITEM_TOWER):
        if required not in graphs:
            raise ManifestError(f"{MANIFEST}: graphs.{required} is missing")
    files = _get(obj, "files", dict, "")
    for path, sha in files.items():
        if not isinstance(sha, str) or len(sha) != 64:
            raise ManifestError(f"{MANIFEST}: files[{path!r}] must be a sha256 hex digest")
    attention = obj.get("attention")
    max_hist = obj.get("max_hist")
    m = Manifest(
        format_version=version,
        name=_get(obj, "name", str, ""),
        version=_get(obj, "version", str, ""),
        model=_get(obj, "model", str, ""),
        attention=attention if isinstance(attention, str) else None,
        q=_get(obj, "q", int, ""),
        d=_get(obj, "d", int, ""),
        max_hist=max_hist if isinstance(max_hist, int) else None,
        opset=_get(obj, "opset", int, ""),
        user_fields=_fields(obj, "user_fields"),
        item_fields=_fields(obj, "item_fields"),
        hashing=_get(obj, "hashing", dict, ""),
        item_content={str(k): int(v) for k, v in _get(obj, "item_content", dict, "").items()},
        item_record=_get(obj, "item_record", list, ""),
        alignment=_get(obj, "alignment", bool, ""),
        graphs=graphs,
        files={str(k): str(v) for k, v in files.items()},
        training=_get(obj, "training", dict, ""),
        exported_at=_get(obj, "exported_at", str, ""),
        exporter={str(k): str(v) for k, v in _get(obj, "exporter", dict, "").items()},
        notes={str(k): str(v) for k, v in obj.get("notes", {}).items()},
    )
    m.record_dtype()  # raises ManifestError if the layout is not a numpy dtype
    for key, g in graphs.items():
        for path in (g.file, g.golden):
            if path not in m.files:
                raise ManifestError(f"{MANIFEST}: graphs.{key} names {path}, absent from files")
    return m
