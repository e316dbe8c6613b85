"""Resolve a ``--data`` reference (a world directory or ``movielens``) to a dataset."""

from __future__ import annotations

from pathlib import Path

from data.dataset import RankingData

DEFAULT_MOVIELENS = Path("../shared/data/movielens100k")
DEFAULT_CACHE = Path.home() / ".cache" / "mmrank"


def load_data(ref: str, max_hist: int = 50, movielens_dir: Path = DEFAULT_MOVIELENS,
              cache_dir: Path = DEFAULT_CACHE) -> RankingData:  # fmt: skip
    """``movielens`` -> MovieLens-100K (title tokens cached in ``cache_dir``); anything
    else is the path of a world written by ``mmrank world``."""
    if ref == "movielens":
        from data.movielens import load_movielens

        if not movielens_dir.is_dir():
            raise FileNotFoundError(
                f"MovieLens-100K not found at {movielens_dir} (--movielens-dir)"
            )
        return load_movielens(movielens_dir, cache_dir, max_hist=max_hist)
    from data.world import load_world

    path = Path(ref)
    if not (path / "interactions.parquet").is_file():
        raise FileNotFoundError(
            f"{path} is not a world directory (run `mmrank world --out {path}`)"
        )
    return load_world(path, max_hist=max_hist)
