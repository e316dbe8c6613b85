import numpy as np
import pytest

from mmrank.features import hash_column, hash_fields, hash_value


def test_hash_is_stable_across_processes() -> None:
    # blake2b-8 of "item_id=i42", little endian, mod 20010, + 1: fixed forever
    assert hash_value("item_id", "i42", 20011) == hash_value("item_id", "i42", 20011)
    import hashlib

    raw = int.from_bytes(hashlib.blake2b(b"item_id=i42", digest_size=8).digest(), "little")
    assert hash_value("item_id", "i42", 20011) == 1 + raw % 20010


def test_hash_range_and_field_separation() -> None:
    vals = [f"v{i}" for i in range(5000)]
    h = hash_column("f", vals, 97)
    assert h.dtype == np.int64 and h.min() >= 1 and h.max() < 97
    # the same value in two fields lands in different buckets for most values
    assert (hash_column("a", vals, 10007) != hash_column("b", vals, 10007)).mean() > 0.99


def test_hash_fields_shape_and_errors() -> None:
    m = hash_fields([["x", "y"], [1, 2]], ["f", "g"], [11, 13])
    assert m.shape == (2, 2)
    with pytest.raises(ValueError):
        hash_fields([["x"]], ["f", "g"], [11, 13])
    with pytest.raises(ValueError):
        hash_value("f", "x", 1)
