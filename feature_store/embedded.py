"""The embedded store: the :class:`~feature_store.store.FeatureStore` interface over one
local file, for a quick run with no Redis (``mmrank demo`` uses it by default).

The file is an ``.npz`` (no pickle) holding one version: its manifest, the item ids and
records, the user ids and records. :func:`write_embedded` writes beside the target,
verifies what it wrote (count, record size, every record byte for byte) and renames it
into place: the rename is the pointer flip, and a failed write leaves the old file.
:class:`EmbeddedStore` re-checks the file (inode, mtime) when its pointer TTL expires
and keeps the previous version's tables, so a read never mixes two versions.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from feature_store.cache import RecordCache
from feature_store.codec import VersionManifest, parse_manifest
from feature_store.errors import LoadError, VersionError
from feature_store.loader import VersionData
from feature_store.store import FeatureStore


def _arrays(data: VersionData) -> dict[str, np.ndarray]:
    blob = b"".join(data.user_values)
    offsets = np.cumsum([0, *(len(v) for v in data.user_values)]).astype(np.int64)
    size = data.manifest.record_size
    return {
        "manifest": np.array(data.manifest.dumps()),
        "item_ids": np.array(data.item_ids, dtype=str),
        "records": np.frombuffer(data.records.tobytes(), np.uint8).reshape(-1, size),
        "user_ids": np.array(data.user_ids, dtype=str),
        "user_blob": np.frombuffer(blob, np.uint8),
        "user_offsets": offsets,
    }


class _Tables:
    def __init__(self, z: dict[str, np.ndarray]) -> None:
        self.manifest_raw = str(z["manifest"][()])
        self.manifest = parse_manifest(self.manifest_raw)
        recs = z["records"]
        if recs.ndim != 2 or recs.shape[1] != self.manifest.record_size:
            raise VersionError("embedded store: records do not match the manifest's record size")
        ids = z["item_ids"].tolist()
        self.items = dict(zip(ids, (r.tobytes() for r in recs), strict=True))
        blob = z["user_blob"].tobytes()
        off = z["user_offsets"]
        self.users = {u: blob[off[k] : off[k + 1]] for k, u in enumerate(z["user_ids"].tolist())}


def _read(path: Path) -> _Tables:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        return _Tables({k: z[k] for k in z.files})


def read_embedded(path: Path | str) -> VersionData:
    """The version held by an embedded store file, ready for :func:`load_version`
    (e.g. to put the same features into Redis)."""
    t = _read(Path(path))
    ids = list(t.items)
    records = np.frombuffer(b"".join(t.items[i] for i in ids), t.manifest.dtype()).copy()
    return VersionData(t.manifest, ids, records, list(t.users), list(t.users.values()))


def write_embedded(path: Path | str, data: VersionData) -> None:
    """Write ``data`` to ``path`` atomically after verifying it (LoadError on failure;
    the previous file stays in place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            cast(Any, np.savez)(f, **_arrays(data))
        t = _read(tmp)
        if len(t.items) != len(data.item_ids) or len(t.users) != len(data.user_ids):
            raise LoadError("embedded store: counts differ after writing")
        want = data.records.tobytes()
        got = b"".join(t.items[i] for i in data.item_ids)
        if got != want:
            raise LoadError("embedded store: records read back different")
        os.replace(tmp, path)
    except OSError as exc:
        raise LoadError(f"embedded store: cannot write {path}: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


class EmbeddedStore(FeatureStore):
    """The feature store over one file written by :func:`write_embedded`."""

    def __init__(self, path: Path | str, cache_items: int = 100_000,
                 pointer_ttl_s: float = 1.0) -> None:  # fmt: skip
        super().__init__(RecordCache(cache_items), pointer_ttl_s)
        self.path = Path(path)
        self._stat: tuple[int, int] | None = None
        self._tables: dict[str, _Tables] = {}
        self._current: str | None = None

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns)
        if key == self._stat:
            return
        t = _read(self.path)
        self._stat = key
        self._tables[t.manifest.version] = t
        while len(self._tables) > 2:  # the current and the previous version
            self._tables.pop(next(iter(self._tables)))
        self._current = t.manifest.version

    async def _get_pointer(self) -> str | None:
        self._refresh()
        return self._current

    async def _get_manifest(self, version: str) -> bytes | None:
        t = self._tables.get(version)
        return None if t is None else t.manifest_raw.encode()

    async def _fetch(
        self, manifest: VersionManifest, user_id: str | None, item_ids: Sequence[str]
    ) -> tuple[bytes | None, list[bytes | None]]:
        t = self._tables.get(manifest.version)
        if t is None:
            return None, [None] * len(item_ids)
        get = t.items.get
        return (t.users.get(user_id) if user_id is not None else None), [get(i) for i in item_ids]

    async def ping(self) -> bool:
        return self.path.is_file()
