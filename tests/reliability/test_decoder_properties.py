"""Property tests of the item-record decoder on hostile values (what a corrupted or
foreign Redis could return): any byte string of the wrong size, a truncated or
extended record, NaN/inf anywhere in the floats. The decoder never raises, accepts a
value only when it is exactly one record with every float finite, returns zeros (never
data) for the rest, and reports every position exactly once as present, missing or
rejected."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from feature_store.codec import (
    REJECT_NONFINITE,
    REJECT_SIZE,
    decode_items,
    encode_items,
    record_dtype,
    split_records,
)

DT = record_dtype(2, 4, 3, alignment=True)
SIZE = DT.itemsize


def _good(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return split_records(encode_items(DT, rng.normal(size=(n, 2, 4)).astype(np.float32),
                                      rng.integers(0, 1 << 40, (n, 3)),
                                      rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)))  # fmt: skip


def _check(values: list[bytes | None]) -> None:
    dec = decode_items(values, DT)
    n = len(values)
    assert dec.records.shape == (n,) and dec.present.shape == (n,)
    rejected = dict(dec.rejected)
    for k, v in enumerate(values):
        verdicts = [bool(dec.present[k]), k in dec.missing, k in rejected]
        assert sum(verdicts) == 1, (k, verdicts)
        if v is None:
            assert k in dec.missing
        elif len(v) != SIZE:
            assert rejected[k] == REJECT_SIZE
        if not dec.present[k]:
            assert not dec.records[k].tobytes().strip(b"\0")  # zeros, never the bad data
        else:
            assert dec.records[k].tobytes() == v
            r = dec.records[k]
            assert (
                np.isfinite(r["emb"].astype(np.float32)).all()
                and np.isfinite([r["ita"], r["tia"]]).all()
            )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=3 * SIZE)), max_size=12))
def test_arbitrary_values_never_raise(values: list[bytes | None]) -> None:
    _check(values)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 1000), data=st.data())
def test_truncated_extended_and_nonfinite(n: int, seed: int, data: st.DataObject) -> None:
    values: list[bytes | None] = list(_good(n, seed))
    for k in range(n):
        what = data.draw(st.sampled_from(["keep", "truncate", "extend", "nan", "inf", "none"]))
        v = values[k]
        assert v is not None
        if what == "truncate":
            values[k] = v[: data.draw(st.integers(0, SIZE - 1))]
        elif what == "extend":
            values[k] = v + data.draw(st.binary(min_size=1, max_size=SIZE))
        elif what in ("nan", "inf"):
            rec = np.frombuffer(v, DT).copy()
            field = data.draw(st.sampled_from(["emb", "ita", "tia"]))
            bad = np.nan if what == "nan" else -np.inf
            if field == "emb":
                flat = rec["emb"].reshape(-1)
                flat[data.draw(st.integers(0, flat.size - 1))] = bad
                rec["emb"] = flat.reshape(rec["emb"].shape)
            else:
                rec[field] = bad
            values[k] = rec.tobytes()
        elif what == "none":
            values[k] = None
    _check(values)
    dec = decode_items(values, DT)
    reasons = dict(dec.rejected)
    for k, v in enumerate(values):
        if v is not None and len(v) == SIZE and not dec.present[k]:
            assert reasons[k] == REJECT_NONFINITE
