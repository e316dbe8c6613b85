"""Categorical feature hashing shared by training, export and serving.

Pure numpy, no torch: the serving path imports it. A value is hashed with
blake2b over ``"{field}={value}"`` into ``[1, buckets)``; 0 is reserved for
"padding / absent", so a padded history position never collides with a real id.
The mapping is stable across processes, machines and Python versions
(unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

PAD = 0


def hash_value(field: str, value: object, buckets: int) -> int:
    """Bucket of one categorical value; always in ``[1, buckets)``."""
    if buckets < 2:
        raise ValueError(f"field {field!r}: buckets must be >= 2, got {buckets}")
    digest = hashlib.blake2b(f"{field}={value}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % (buckets - 1)


def hash_column(field: str, values: Iterable[object], buckets: int) -> np.ndarray:
    """Vectorised :func:`hash_value` (each distinct value hashed once); int64 (n,)."""
    values = list(values)
    cache: dict[object, int] = {}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        h = cache.get(v)
        if h is None:
            h = cache[v] = hash_value(field, v, buckets)
        out[i] = h
    return out


def hash_fields(
    columns: Sequence[Iterable[object]], fields: Sequence[str], buckets: Sequence[int]
) -> np.ndarray:
    """Hash several columns into one int64 matrix (n, len(fields))."""
    if not (len(columns) == len(fields) == len(buckets)):
        raise ValueError("columns, fields and buckets must have the same length")
    return np.stack(
        [hash_column(f, c, b) for c, f, b in zip(columns, fields, buckets, strict=True)], axis=1
    )
