"""The feature store (DESIGN section 4): versioned item records and user features in
Redis (single node or Redis Cluster), or in one local file (the embedded store).

Serving side, no torch: :mod:`~feature_store.keys` and :mod:`~feature_store.codec`
(pure functions: key layout, binary records, the version manifest),
:mod:`~feature_store.cache` (bounded per-version LRU), :mod:`~feature_store.reader`
(the async :class:`~feature_store.reader.RedisStore`), :mod:`~feature_store.embedded`
(the same interface over a file), :mod:`~feature_store.loader` (versioned load:
write, verify, flip, clean up) and :mod:`~feature_store.bench`.
Offline side: :mod:`~feature_store.embed` (ONNX item tower over a catalog) and
:mod:`~feature_store.audit`; they read catalogs through ``data.*``.

This module imports nothing, so importing one part never pulls in the others.
"""
