"""Binary records and the version manifest, as pure functions (numpy only).

An item record is one fixed-size little-endian numpy structured record; its layout is
the model repository's ``item_record`` (:func:`model_export.manifest.item_record_json`,
the one source of truth): ``emb`` float16 (Q, D), ``sparse`` int64 (Fi,) hashed item
fields, and, when the item tower has alignment heads, ``ita`` / ``tia`` float32
probabilities. A request's records are joined and decoded with one ``np.frombuffer``.

A user record is ``<u2 Fu, <u2 n_hist, Fu x <i8 fields``, then the history item ids
(most recent first) as UTF-8 joined by newlines.

Guarantees of :func:`decode_items`: it never raises on what Redis returns; a value is
either accepted (exact record size, every float finite) or reported missing / rejected
with a reason, and rejected records are never returned as data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from feature_store.errors import RecordError, VersionError
from model_export.manifest import item_record_json, record_dtype_from_json

STORE_FORMAT = 1
REJECT_SIZE = "size"  # value length is not the record size
REJECT_NONFINITE = "nonfinite"  # NaN or inf in the embedding or the alignment scores
_USER_HEAD = struct.Struct("<HH")


@dataclass(frozen=True)
class VersionManifest:
    """What a stored embedding version holds, so a reader can decode its records and
    the service can check that its ranker was trained with the item tower that built
    them (``model_name``/``model_version``/``item_tower_sha256``, ``q``, ``d``, fields)."""

    version: str
    record: list[list[Any]]  # numpy structured dtype: [[name, dtype, shape], ...]
    record_size: int
    q: int
    d: int
    alignment: bool
    item_fields: list[list[Any]]  # [[name, buckets], ...]
    user_fields: list[list[Any]]
    model_name: str
    model_version: str
    item_tower_sha256: str
    n_items: int
    n_users: int
    key_buckets: int
    created_at: str
    source: dict[str, Any] = field(default_factory=dict)  # data reference, embed job
    store_format: int = STORE_FORMAT

    def dtype(self) -> np.dtype:
        """The record layout (built once per manifest: reads call this per request)."""
        dt: np.dtype | None = self.__dict__.get("_dtype")
        if dt is None:
            dt = record_dtype_from_json(self.record)
            object.__setattr__(self, "_dtype", dt)  # a cache, not a field (frozen, eq, asdict)
        return dt

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def record_dtype(q: int, d: int, n_item_fields: int, alignment: bool) -> np.dtype:
    """The item record layout (see the module docstring)."""
    return record_dtype_from_json(item_record_json(q, d, n_item_fields, alignment))


def parse_manifest(text: str | bytes, version: str | None = None) -> VersionManifest:
    """Parse a stored manifest; VersionError if it is not one (or names another
    version than ``version``), never another exception."""
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise TypeError("not an object")
        if obj.get("store_format") != STORE_FORMAT:
            raise TypeError(f"store_format {obj.get('store_format')!r} != {STORE_FORMAT}")
        m = VersionManifest(**obj)
        dt = m.dtype()
        if dt.itemsize != m.record_size:
            raise TypeError(f"record_size {m.record_size} != layout size {dt.itemsize}")
        if dt["emb"].shape != (m.q, m.d) or dt["sparse"].shape != (len(m.item_fields),):
            raise TypeError("record layout disagrees with q, d or item_fields")
        if m.key_buckets < 1:
            raise TypeError("key_buckets must be >= 1")
    except Exception as exc:  # JSON, missing/extra keys, a bad layout (ManifestError)
        raise VersionError(f"version {version or '?'}: unreadable manifest: {exc}") from exc
    if version is not None and m.version != version:
        raise VersionError(f"manifest of {version} names version {m.version}")
    return m


def encode_items(
    dtype: np.dtype,
    emb: np.ndarray,
    sparse: np.ndarray,
    ita: np.ndarray | None = None,
    tia: np.ndarray | None = None,
) -> np.ndarray:
    """(I,) records of ``dtype``; RecordError on a shape mismatch, NaN/inf, or
    alignment scores given / missing against the layout. ``emb`` is cast to float16
    and must stay finite after the cast."""
    n = len(emb)
    rec = np.zeros(n, dtype=dtype)
    want = dtype["emb"].shape
    if emb.shape != (n, *want):
        raise RecordError(f"embeddings have shape {emb.shape}, the layout wants (I, {want})")
    if sparse.shape != (n, *dtype["sparse"].shape):
        raise RecordError(
            f"fields have shape {sparse.shape}, the layout wants (I, {dtype['sparse'].shape})"
        )
    with np.errstate(over="ignore"):  # an overflow becomes inf: refused below, by row
        rec["emb"] = emb.astype(np.float16)
    rec["sparse"] = sparse
    has_align = dtype.names is not None and "ita" in dtype.names
    if has_align != (ita is not None and tia is not None):
        raise RecordError("alignment scores must be given exactly when the layout has them")
    if has_align:
        assert ita is not None and tia is not None
        if ita.shape != (n,) or tia.shape != (n,):
            raise RecordError("ita/tia must have one score per item")
        rec["ita"], rec["tia"] = ita, tia
    bad = ~finite_rows(rec)
    if bad.any():
        raise RecordError(
            f"{int(bad.sum())} items have NaN/inf (or overflow float16), e.g. row {int(np.flatnonzero(bad)[0])}"
        )
    return rec


def _nonfinite(a: np.ndarray) -> np.ndarray:
    """Elementwise NaN/inf of a float array; float16 through its bits (exponent all
    ones), ~7x faster than ``np.isfinite``, which has no float16 fast path."""
    if a.dtype == np.float16:
        return np.asarray((a.view(np.uint16) & 0x7C00) == 0x7C00)
    return np.asarray(~np.isfinite(a))


def finite_rows(rec: np.ndarray) -> np.ndarray:
    """(I,) bool: every float of the record is finite."""
    emb = rec["emb"].reshape(len(rec), math.prod(rec.dtype["emb"].shape))  # (I, Q*D)
    nf = _nonfinite(emb)  # (I, Q*D)
    # one reduction over the whole array first: the common answer is "all finite"
    bad = np.asarray(nf.any(axis=1)) if nf.any() else np.zeros(len(rec), bool)  # (I,)
    if rec.dtype.names is not None and "ita" in rec.dtype.names:
        bad |= _nonfinite(rec["ita"]) | _nonfinite(rec["tia"])
    return ~bad


def split_records(rec: np.ndarray) -> list[bytes]:
    """One ``bytes`` value per record (little-endian, exactly ``itemsize`` long)."""
    buf = rec.tobytes()
    size = rec.dtype.itemsize
    return [buf[i : i + size] for i in range(0, len(buf), size)]


@dataclass
class DecodedItems:
    """Records of a request, aligned with the ids asked for.

    ``records[k]`` is item k's record where ``present[k]``, zeros elsewhere (never
    scored as data). ``missing`` holds the positions with no value; ``rejected``
    (position, reason) the values refused by validation."""

    records: np.ndarray  # (K,) structured
    present: np.ndarray  # (K,) bool
    missing: list[int]
    rejected: list[tuple[int, str]]


def decode_items(values: Sequence[bytes | None], dtype: np.dtype) -> DecodedItems:
    """Validate and decode raw values (one per requested id; None = no such key)
    with one ``np.frombuffer`` (see the module docstring)."""
    size = dtype.itemsize
    n = len(values)
    buf = b"".join(values) if None not in values else b""  # type: ignore[arg-type]
    if len(buf) == n * size and n and min(map(len, values)) == size:  # type: ignore[arg-type]
        # the common case: every value is a record (equal total and equal minimum
        # length: every length equals ``size``)
        present, missing, rejected = np.ones(n, bool), [], []
    else:
        lens = [-1 if v is None else len(v) for v in values]
        ok = [x == size for x in lens]
        missing = [k for k, x in enumerate(lens) if x < 0]
        rejected = [(k, REJECT_SIZE) for k, x in enumerate(lens) if x >= 0 and x != size]
        zero = bytes(size)
        buf = b"".join(v if good else zero for v, good in zip(values, ok, strict=True))  # type: ignore[misc]
        present = np.asarray(ok, dtype=bool)
    records = np.frombuffer(buf, dtype=dtype, count=n).copy() if n else np.zeros(0, dtype)
    if n:
        fin = finite_rows(records)
        bad = present & ~fin
        if bad.any():
            for k in np.flatnonzero(bad):
                rejected.append((int(k), REJECT_NONFINITE))
            present &= fin
            records[bad] = np.zeros(1, dtype)
    return DecodedItems(records, present, missing, rejected)


def encode_user(fields: np.ndarray, history: Sequence[str]) -> bytes:
    """A user record: hashed profile fields (Fu,) int64 and history ids, newest first."""
    fields = np.asarray(fields, dtype="<i8")
    if fields.ndim != 1:
        raise RecordError("user fields must be one vector")
    for h in history:
        if not h or "\n" in h:
            raise RecordError(f"history id {h!r} must be non-empty without newlines")
    ids = "\n".join(history).encode()
    return _USER_HEAD.pack(len(fields), len(history)) + fields.tobytes() + ids


def decode_user(value: bytes, n_fields: int) -> tuple[np.ndarray, list[str]]:
    """(fields (Fu,) int64, history ids); RecordError when the value is not a user
    record with ``n_fields`` fields."""
    if len(value) < _USER_HEAD.size:
        raise RecordError("user record shorter than its header")
    fu, nh = _USER_HEAD.unpack_from(value)
    end = _USER_HEAD.size + 8 * fu
    if fu != n_fields or len(value) < end:
        raise RecordError(f"user record has {fu} fields, expected {n_fields}")
    fields = np.frombuffer(value, dtype="<i8", count=fu, offset=_USER_HEAD.size).astype(np.int64)
    try:
        tail = value[end:].decode()
    except UnicodeDecodeError as exc:
        raise RecordError("user history is not UTF-8") from exc
    hist = tail.split("\n") if nh else []
    if len(hist) != nh:
        raise RecordError(f"user record says {nh} history items, holds {len(hist)}")
    return fields, hist
