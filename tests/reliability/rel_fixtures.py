"""Real parts for the reliability tests: small stack inputs built once per session by
the real builder (world -> random-weight CameNN d=16 -> ONNX export -> item-tower
embeddings -> ids.json), the loader that writes them to a real redis-server, and
ranking requests over their ids. Not a conftest (one per tree)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from deploy.stack import StackInputs, build_inputs
from feature_store.catalogs import resolve
from feature_store.embed import build_version, load_embeddings
from feature_store.loader import VersionData, load_version
from reliability.load import RequestSource

_INPUTS: list[StackInputs] = []
NS = "mmrank"  # the service's default namespace


def shared_inputs(tmp_path_factory: pytest.TempPathFactory) -> StackInputs:
    if not _INPUTS:
        root = tmp_path_factory.mktemp("rel-inputs")
        _INPUTS.append(build_inputs(root, users=300, items=600, d_model=16, threads=1))
    return _INPUTS[0]


def version_data(inputs: StackInputs, version: str = "v1") -> VersionData:
    users = resolve(f"world:{inputs.world}")[2]
    return build_version(load_embeddings(inputs.embeddings), users, version)


def loader(data: VersionData) -> Callable[[Any], None]:
    def load(client: Any) -> None:
        load_version(client, data, NS, grace_s=0)

    return load


def source(inputs: StackInputs, n: int = 64, k: int = 50, seed: int = 0) -> RequestSource:
    ids = json.loads(inputs.ids.read_text())
    return RequestSource.sample(ids["users"], ids["items"], n, k, seed)
