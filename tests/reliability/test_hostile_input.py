"""Hostile input against a real service process (uvicorn): schemathesis with every
check against the service's own /openapi.json (0 server errors, schema-violating data
rejected, valid data accepted, every status and content type documented); oversized
bodies (declared or streamed chunked) 413; too many candidates, odd ids, deeply nested
and huge JSON 4xx; and nothing of a request (a marker planted in it) nor a traceback
in any response or in the INFO log. /docs, /openapi.json and /metrics follow settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rel_fixtures import loader, shared_inputs, version_data

from reliability.rig import Rig

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
ADMIN = "adm-key"
MARK = "ZQXJMARK"  # planted in hostile payloads; must never come back nor reach the log
LIMIT = 65536  # api.max_body_bytes here


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    inputs = shared_inputs(tmp_path_factory)
    env = {"MMRANK_API__DOCS": "true", "MMRANK_API__METRICS": "false",
           "MMRANK_API__ADMIN_API_KEYS": json.dumps([ADMIN]),
           "MMRANK_API__MAX_BODY_BYTES": str(LIMIT)}  # fmt: skip
    with Rig(inputs.repo, loader(version_data(inputs)), env,
             workdir=tmp_path_factory.mktemp("hostile")) as rig:  # fmt: skip
        yield rig


def test_schemathesis_all_checks(rig: Rig, tmp_path: Path) -> None:
    assert rig.service is not None
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", rig.service.url + "/openapi.json",
           "--checks", "all", "--max-examples", "40", "--seed", "7", "--continue-on-failure",
           "-H", f"x-api-key: {ADMIN}", "--request-timeout", "10"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in res.stdout and "Server error" not in res.stdout, tail
    assert "Traceback" not in rig.service.log()


def _raw(rig: Rig, payload: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    assert rig.service is not None
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(rig.service.url + "/v1/rank", content=payload, headers=h, timeout=30)


def test_hostile_bodies_are_4xx_without_echo(
    rig: Rig, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert rig.service is not None
    ids = json.loads(shared_inputs(tmp_path_factory).ids.read_text())
    user = ids["users"][0]

    def body(**kw: object) -> bytes:
        return json.dumps({"user_id": user, "candidates": ids["items"][:3], **kw}).encode()

    cases: list[tuple[str, bytes, set[int]]] = [
        (
            "too many candidates",
            body(candidates=[f"{MARK}{k}" for k in range(1001)])[:LIMIT],
            {413, 422},
        ),
        (
            "over the limit (1001 short ids)",
            json.dumps({"user_id": user, "candidates": [f"{k}" for k in range(1001)]}).encode(),
            {422},
        ),
        (
            "nested 100k deep",
            b'{"user_id": "'
            + MARK.encode()
            + b'", "candidates": '
            + b"[" * 30000
            + b"]" * 30000
            + b"}",
            {422},
        ),
        ("nested objects", b'{"context": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", {422}),
        ("4000-digit top_k (valid: all items)", body(top_k=int("9" * 4000)), {200}),
        ("float overflow", body().replace(b"}", b', "top_k": 1e999}'), {422}),
        ("NaN", body().replace(b"}", b', "top_k": NaN}'), {422}),
        ("unicode id", body(candidates=[f"{MARK}é"]), {422}),
        ("control char id", body(candidates=[f"{MARK}\u0000x"]), {422}),
        ("empty id", body(candidates=[""]), {422}),
        ("long id", body(candidates=[MARK * 20]), {422}),
        ("id too long for the store (>128)", body(user_id=MARK + "x" * 200), {422}),
        (
            "invalid UTF-8",
            b'{"user_id": "\xff\xfe' + MARK.encode() + b'", "candidates": ["a"]}',
            {422},
        ),
        ("not an object", b"[1, 2, 3]", {422}),
        ("empty body", b"", {422}),
        (
            "duplicate keys / wrong types",
            b'{"user_id": 5, "candidates": "' + MARK.encode() + b'"}',
            {422},
        ),
        ("deadline header NaN", body(), {422}),
    ]
    for name, payload, want in cases:
        hdr = {"x-mmrank-deadline-ms": "NaN"} if "deadline" in name else {}
        r = _raw(rig, payload, hdr)
        assert r.status_code in want, (name, r.status_code, r.text[:300])
        assert MARK not in r.text and "Traceback" not in r.text, (name, r.text[:300])
        if r.status_code != 200:
            assert set(r.json()["error"]) >= {"code", "message"}, name
    # oversized: declared, and streamed chunked with no Content-Length
    r = _raw(rig, b"x" * (LIMIT + 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"[" + MARK.encode() * 400

    r = httpx.post(rig.service.url + "/v1/rank", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413 and MARK not in r.text
    # still serving
    assert _raw(rig, body()).status_code == 200
    log = rig.service.log()
    assert MARK not in log and "Traceback" not in log


def test_docs_and_metrics_follow_settings(rig: Rig) -> None:
    assert rig.service is not None
    u = rig.service.url
    assert httpx.get(u + "/docs").status_code == 200  # docs on here
    spec = httpx.get(u + "/openapi.json").json()
    assert "413" in spec["paths"]["/v1/rank"]["post"]["responses"]
    assert httpx.get(u + "/metrics").status_code == 404  # metrics off here
    r = httpx.post(u + "/v1/admin/models", json={"repo": "/" + "x" * 300})
    assert r.status_code == 401
    r = httpx.post(
        u + "/v1/admin/models", json={"repo": "/" + "x" * 300}, headers={"x-api-key": ADMIN}
    )
    assert r.status_code == 404 and "x" * 50 not in r.text  # an invalid path: 404, not echoed


def test_docs_off_by_default() -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    app = create_app(Settings.model_validate({"store": {"kind": "redis"}}))
    c = TestClient(app)  # no lifespan: only routing is exercised
    assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404
