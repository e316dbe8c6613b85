"""Pure pieces: key layout byte for byte, the record codec, user records, manifests,
the per-version record cache. No Redis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_store.bench import synthetic_embeddings
from feature_store.cache import RecordCache
from feature_store.codec import (
    REJECT_NONFINITE,
    REJECT_SIZE,
    decode_items,
    decode_user,
    encode_items,
    encode_user,
    parse_manifest,
    record_dtype,
    split_records,
)
from feature_store.embed import build_version
from feature_store.errors import RecordError, VersionError
from feature_store.keys import (
    bucket,
    check_name,
    item_key,
    item_keys,
    manifest_key,
    pointer_key,
    user_key,
    version_pattern,
)
from model_export.manifest import item_record_json, record_dtype_from_json


def test_keys_byte_for_byte() -> None:
    assert pointer_key("mmrank") == "mmrank:current"
    assert manifest_key("mmrank", "v1") == "mmrank:v:v1:manifest"
    b = bucket("item7", 64)
    assert b == __import__("zlib").crc32(b"item7") % 64  # stable across processes
    assert item_key("mmrank", "v1", "item7", 64) == f"mmrank:v:v1:i:{{{b}}}:item7"
    assert user_key("ns", "v2", "u1", 8) == f"ns:v:v2:u:{{{bucket('u1', 8)}}}:u1"
    assert item_keys("mmrank", "v1", ["item7", "x"], 64) == [
        item_key("mmrank", "v1", "item7", 64),
        item_key("mmrank", "v1", "x", 64),
    ]
    assert version_pattern("mmrank", "v1") == "mmrank:v:v1:*"


@pytest.mark.parametrize("bad", ["", "a b", "v*", "v{1}", "x" * 65, "v\n"])
def test_bad_version_names_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="must match"):
        check_name("version", bad)


def test_record_dtype_is_the_model_repository_layout() -> None:
    dt = record_dtype(2, 16, 3, alignment=False)
    assert dt == record_dtype_from_json(item_record_json(2, 16, 3, False))
    assert dt.itemsize == 2 * 16 * 2 + 3 * 8 and dt.names == ("emb", "sparse")
    assert record_dtype(1, 64, 3, True).itemsize == 160


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 20),
    q=st.integers(1, 3),
    d=st.integers(1, 16),
    f=st.integers(1, 5),
    align=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_codec_round_trip(n: int, q: int, d: int, f: int, align: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dt = record_dtype(q, d, f, align)
    emb = rng.normal(size=(n, q, d)).astype(np.float32)
    sparse = rng.integers(0, 2**40, size=(n, f))
    ita, tia = (
        (rng.random(n).astype(np.float32), rng.random(n).astype(np.float32))
        if align
        else (None, None)
    )
    rec = encode_items(dt, emb, sparse, ita, tia)
    values = split_records(rec)
    assert all(len(v) == dt.itemsize for v in values)
    dec = decode_items(values, dt)
    assert dec.present.all() and not dec.missing and not dec.rejected
    np.testing.assert_array_equal(dec.records["emb"], emb.astype(np.float16))
    np.testing.assert_array_equal(dec.records["sparse"], sparse)
    if align:
        np.testing.assert_array_equal(dec.records["ita"], ita)


def test_decode_rejects_and_reports_without_raising() -> None:
    dt = record_dtype(1, 4, 2, True)
    rec = encode_items(dt, np.ones((4, 1, 4), np.float32), np.ones((4, 2), np.int64),
                       np.full(4, 0.9, np.float32), np.full(4, 0.8, np.float32))  # fmt: skip
    good = split_records(rec)
    nan = bytearray(good[2])
    nan[0:2] = np.float16(np.nan).tobytes()
    inf = rec[3:4].copy()
    inf["tia"] = np.inf
    values = [good[0], None, bytes(nan), inf.tobytes(), good[1][:-1], b"", good[1] + b"x"]
    dec = decode_items(values, dt)
    assert dec.present.tolist() == [True, False, False, False, False, False, False]
    assert dec.missing == [1]
    assert sorted(dec.rejected) == [(2, REJECT_NONFINITE), (3, REJECT_NONFINITE),
                                    (4, REJECT_SIZE), (5, REJECT_SIZE), (6, REJECT_SIZE)]  # fmt: skip
    assert not dec.records[1:].tobytes().strip(b"\0")  # rejected rows are zeros, not data


def test_encode_refuses_bad_input() -> None:
    dt = record_dtype(1, 4, 2, True)
    ok = np.ones((2, 1, 4), np.float32), np.ones((2, 2), np.int64)
    sc = np.full(2, 0.5, np.float32)
    with pytest.raises(RecordError, match="shape"):
        encode_items(dt, np.ones((2, 1, 5), np.float32), ok[1], sc, sc)
    with pytest.raises(RecordError, match="alignment"):
        encode_items(dt, *ok)
    with pytest.raises(RecordError, match="NaN/inf"):
        encode_items(dt, np.full((2, 1, 4), 1e6, np.float32), ok[1], sc, sc)  # float16 overflow


def test_user_record_round_trip_and_corruption() -> None:
    v = encode_user(np.array([5, 0, 7]), ["a", "b c", "é"])
    f, h = decode_user(v, 3)
    assert f.tolist() == [5, 0, 7] and h == ["a", "b c", "é"]
    assert decode_user(encode_user(np.array([1]), []), 1)[1] == []
    for bad, n in ((v, 4), (v[:3], 3), (v[:-1] + b"\xff", 3), (v + b"\nz", 3)):
        with pytest.raises(RecordError):
            decode_user(bad, n)
    with pytest.raises(RecordError):
        encode_user(np.array([1]), ["a\nb"])


def test_manifest_round_trip_and_refusals() -> None:
    m = build_version(synthetic_embeddings(3), version="v1").manifest
    assert parse_manifest(m.dumps(), "v1") == m
    assert m.dtype().itemsize == m.record_size == 160
    with pytest.raises(VersionError, match="names version"):
        parse_manifest(m.dumps(), "v2")
    for bad in ("not json", "[]", m.dumps().replace('"record_size": 160', '"record_size": 7'),
                m.dumps().replace('"store_format": 1', '"store_format": 9')):  # fmt: skip
        with pytest.raises(VersionError):
            parse_manifest(bad)


REC = np.dtype([("x", "<i8")])


def _recs(*xs: int) -> np.ndarray:
    return np.array([(x,) for x in xs], REC)


def _get(c: RecordCache, version: str, ids: list[str]) -> list[int | None]:
    out = np.zeros(len(ids), REC)
    hit = c.fill(version, ids, out)
    return [int(r["x"]) if h else None for r, h in zip(out, hit, strict=True)]


def test_cache_bounds_and_counters() -> None:
    c = RecordCache(max_items=2, max_versions=2)
    c.put("v1", ["a", "b"], _recs(1, 2))
    assert _get(c, "v1", ["a", "x"]) == [1, None]
    c.put("v1", ["c"], _recs(3))  # evicts b (a was used since it was put, b was not)
    assert _get(c, "v1", ["a", "b", "c"]) == [1, None, 3]
    assert (c.hits, c.misses, c.evictions) == (3, 2, 1)
    assert _get(c, "v2", ["a"]) == [None]  # versions never share records
    c.put("v2", ["b"], _recs(2))
    c.put("v3", ["a"], _recs(9))  # a third version drops the least recent (v1)
    assert _get(c, "v1", ["a"]) == [None]
    c.put("v3", ["a"], _recs(7))  # a cached id keeps its record (records are immutable)
    assert _get(c, "v3", ["a"]) == [9]
    off = RecordCache(max_items=0)
    off.put("v", ["a"], _recs(1))
    assert _get(off, "v", ["a"]) == [None] and off.misses == 1


# (put?, version, item keys)
OPS = st.tuples(st.booleans(), st.sampled_from(["v1", "v2", "v3"]),
                st.lists(st.integers(0, 9), min_size=1, max_size=8))  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    max_items=st.integers(1, 6),
    ops=st.lists(OPS, max_size=40),
)
def test_cache_returns_only_what_was_put(
    max_items: int, ops: list[tuple[bool, str, list[int]]]
) -> None:
    """Against a model: a hit is the record put for that id in that version, a version
    holds at most ``max_items`` records, the last ``max_items`` distinct ids just put
    are all found, and the counters add up."""
    c = RecordCache(max_items=max_items, max_versions=2, initial_rows=2)
    asked = 0
    for put, version, keys in ops:
        ids = [f"i{k}" for k in keys]
        if put:  # the record of id iK in version vN is N * 100 + K
            c.put(version, ids, _recs(*(int(version[1]) * 100 + k for k in keys)))
            last = list(dict.fromkeys(reversed(keys)))[:max_items]
            assert None not in _get(c, version, [f"i{k}" for k in last])
            asked += len(last)
        got = _get(c, version, ids)
        asked += len(got)
        for k, g in zip(keys, got, strict=True):
            assert g is None or g == int(version[1]) * 100 + k
        assert all(len(t.ids) == len(t.index) <= max_items for t in c._versions.values())
        assert len(c._versions) <= 2
    assert c.hits + c.misses == asked
