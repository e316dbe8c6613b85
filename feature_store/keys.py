"""Redis key layout, as pure functions (tested byte for byte without Redis).

Under a namespace ``ns`` (default ``mmrank``)::

    {ns}:current                         the pointer: the current version's name
    {ns}:versions                        hash: version -> JSON (loaded_at, superseded_at)
    {ns}:v:{ver}:manifest                the version's manifest (JSON, feature_store.codec)
    {ns}:v:{ver}:i:{{b}}:{item_id}       one item record
    {ns}:v:{ver}:u:{{b}}:{user_id}       one user record (profile fields + history ids)

``{b}`` is a Redis Cluster hash tag: ``crc32(id) % key_buckets``. Keys of one bucket
share a slot, so a request's items fall into at most ``key_buckets`` slots and the
cluster client sends at most that many MGETs, grouped into one pipeline per node
(without tags, 550 keys would be ~550 single-key MGETs). The bucket count is fixed per
version (it is in the manifest); it also caps how many slots a version spreads over,
so keep it well above the number of shards (default 64 for up to ~16 shards).

Version names are ``[A-Za-z0-9._-]{1,64}`` and ids are non-empty, without newlines
(history ids are stored newline-separated); anything else is refused here, before a
key is built.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

DEFAULT_NAMESPACE = "mmrank"
DEFAULT_KEY_BUCKETS = 64
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid namespace or version name; else ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r} must match [A-Za-z0-9._-]{{1,64}}")
    return name


def check_id(kind: str, value: str) -> str:
    if not value or "\n" in value:
        raise ValueError(f"{kind} id {value!r} must be non-empty and contain no newline")
    return value


def pointer_key(ns: str) -> str:
    return f"{ns}:current"


def versions_key(ns: str) -> str:
    return f"{ns}:versions"


def version_prefix(ns: str, version: str) -> str:
    return f"{ns}:v:{version}:"


def version_pattern(ns: str, version: str) -> str:
    """SCAN MATCH pattern of every key of one version (names carry no glob characters)."""
    return f"{version_prefix(ns, version)}*"


def manifest_key(ns: str, version: str) -> str:
    return f"{ns}:v:{version}:manifest"


def bucket(id_: str, key_buckets: int) -> int:
    return zlib.crc32(id_.encode()) % key_buckets


def item_key(ns: str, version: str, item_id: str, key_buckets: int) -> str:
    return f"{ns}:v:{version}:i:{{{bucket(item_id, key_buckets)}}}:{item_id}"


def user_key(ns: str, version: str, user_id: str, key_buckets: int) -> str:
    return f"{ns}:v:{version}:u:{{{bucket(user_id, key_buckets)}}}:{user_id}"


def item_keys(ns: str, version: str, item_ids: Iterable[str], key_buckets: int) -> list[str]:
    """:func:`item_key` of each id, in order (the reader's hot path: one comprehension)."""
    head = f"{ns}:v:{version}:i:"
    crc = zlib.crc32
    return [f"{head}{{{crc(i.encode()) % key_buckets}}}:{i}" for i in item_ids]
