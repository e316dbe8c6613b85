"""docker-compose.yml and the Dockerfile, checked without a Docker engine
(deploy.checks): the repository's files pass, and each check fails on a planted
mistake written to a mutated copy."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy import checks
from deploy.checks import compose_problems, dockerfile_problems

ROOT = Path(__file__).resolve().parents[2]


def test_schema_is_the_official_one() -> None:
    assert checks.SCHEMA.is_file(), f"the Compose JSON schema is missing at {checks.SCHEMA}"
    assert '"$id": "compose_spec.json"' in checks.SCHEMA.read_text()[:500]


def test_compose_file_passes() -> None:
    assert compose_problems(ROOT / "docker-compose.yml") == []


def test_gpu_override_passes_and_fails_on_planted_mistakes(tmp_path: Path) -> None:
    base, gpu = ROOT / "docker-compose.yml", ROOT / "deploy" / "compose.gpu.yml"
    assert checks.override_problems(gpu, base) == []
    bad = tmp_path / "compose.gpu.yml"
    bad.write_text(_replace("MMRANK_BACKEND__DEVICE: cuda", "MMRANK_BACKEND__DEVICE: gpu")(
        gpu.read_text()))  # fmt: skip
    assert any("MMRANK_BACKEND__DEVICE" in p for p in checks.override_problems(bad, base))
    bad.write_text(_replace("capabilities: [gpu]", "capabilities: gpu")(gpu.read_text()))
    assert any("schema:" in p for p in checks.override_problems(bad, base))
    bad.write_text(_replace("  ranker:", "  rankr:")(gpu.read_text()))
    assert any("'rankr'" in p for p in checks.override_problems(bad, base))


def test_dockerfile_passes_hadolint_and_checks() -> None:
    assert dockerfile_problems(ROOT / "Dockerfile") == []


def _replace(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, f"the planted mistake no longer applies: {old!r} not found"
        return text.replace(old, new, count)

    return edit


COMPOSE_MISTAKES = [
    ("condition typo (schema)",
     _replace("condition: service_completed_successfully", "condition: service_completed"),
     "schema:"),
    ("unknown top-level key (schema)", _replace("services:\n", "service:\n"), "schema:"),
    ("setting name typo", _replace("MMRANK_BATCHING__QUEUE_LIMIT:", "MMRANK_BATCHING__QUEUE_LIMT:"),
     "MMRANK_BATCHING__QUEUE_LIMT is not a setting"),
    ("invalid setting value", _replace("${MMRANK_QUEUE_LIMIT:-64}", "${MMRANK_QUEUE_LIMIT:-0}"),
     "MMRANK_BATCHING__QUEUE_LIMIT: Input should be greater than or equal to 1"),
    ("bad backend kind", _replace("${MMRANK_BACKEND:-onnxruntime}", "${MMRANK_BACKEND:-onnx}"),
     "MMRANK_BACKEND__KIND"),
    ("published port differs", _replace('"${MMRANK_PORT:-8000}:8000"', '"${MMRANK_PORT:-8000}:8080"'),
     "do not publish the serving port"),
    ("serving port differs from the image's health check",
     _replace('"--port", "8000"]', '"--port", "8080"]'), "the image's HEALTHCHECK uses 8000"),
    ("health check on the live path", _replace(
        "urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)\"]\n      interval: 10s",
        "urlopen('http://127.0.0.1:8000/v2/health/live', timeout=2)\"]\n      interval: 10s"),
     "healthcheck does not ask :8000/v2/health/ready"),
    ("loader dependency too weak", _replace(
        "loader:\n        condition: service_completed_successfully",
        "loader:\n        condition: service_started"),
     "depends_on loader should be service_completed_successfully"),
    ("grace shorter than drain", _replace("stop_grace_period: 45s", "stop_grace_period: 10s"),
     "is not longer than the service's drain time 30s"),
    ("evicting memory policy", _replace("- noeviction", "- allkeys-lru"),
     "--maxmemory-policy is 'allkeys-lru', want 'noeviction'"),
    ("missing mounted file", _replace("./deploy/prometheus.yml:", "./deploy/prometheus.yaml:"),
     "mounted ./deploy/prometheus.yaml does not exist"),
    ("prometheus scrapes a wrong port", None, "ranker does not listen on 9000"),
    ("command path outside the mounts", _replace("- /models/embeddings", "- /data/embeddings"),
     "loader: /data/embeddings in the command is not inside a mounted volume"),
    ("repo path outside the mounts", _replace(
        '["serve", "--repo", "/models/repo"', '["serve", "--repo", "/mnt/repo"'),
     "ranker: /mnt/repo in the command is not inside a mounted volume"),
    ("build target that is no stage", _replace("${MMRANK_TARGET:-runtime}", "${MMRANK_TARGET:-slim}"),
     "build target 'slim' is not a stage"),
    ("triton outside its profile", _replace('profiles: ["triton"]', 'profiles: ["gpu"]'),
     "triton: should be in profile 'triton'"),
    ("triton without a GPU", _replace("capabilities: [gpu]", "capabilities: [compute]"),
     "triton: no GPU device reservation"),
    ("wrong triton model", _replace("--load-model=ranker", "--load-model=item_tower"),
     "--load-model should be the exported ranker"),
    ("triton required though profile-only", _replace("required: false", "required: true"),
     "must be required: false"),
    ("required password unset", _replace(
        '">${MMRANK_REDIS_RANKER_PASSWORD:?', '">${MMRANK_REDIS_RANKER_PASSWRD:?'),
     "interpolation:"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "expect"), [(e, x) for _, e, x in COMPOSE_MISTAKES],
                         ids=[n for n, _, _ in COMPOSE_MISTAKES])  # fmt: skip
def test_compose_check_fails_on_planted_mistake(
    tmp_path: Path, edit: Callable[[str], str] | None, expect: str
) -> None:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copytree(ROOT / "loadtests", tmp_path / "loadtests")
    shutil.copy(ROOT / "Dockerfile", tmp_path / "Dockerfile")
    text = (ROOT / "docker-compose.yml").read_text()
    if edit is None:  # the mistake is in prometheus.yml
        prom = tmp_path / "deploy" / "prometheus.yml"
        prom.write_text(_replace('["ranker:8000"]', '["ranker:9000"]')(prom.read_text()))
    else:
        text = edit(text)
    (tmp_path / "docker-compose.yml").write_text(text)
    problems = compose_problems(tmp_path / "docker-compose.yml", root=tmp_path)
    assert any(expect in p for p in problems), problems


DOCKERFILE_MISTAKES = [
    ("runtime as root", _replace(
        "USER 10001:10001\nWORKDIR /tmp\nEXPOSE 8000\n# urlopen",
        "WORKDIR /tmp\nEXPOSE 8000\n# urlopen"), "runtime: runs as root"),
    ("explicit root user", _replace(
        "USER 10001:10001\nWORKDIR /tmp\nEXPOSE 8000\n# urlopen",
        "USER root\nWORKDIR /tmp\nEXPOSE 8000\n# urlopen"), "DL3002"),
    ("health check on the wrong path", _replace(
        "8000/v2/health/ready', timeout=2)\"]\nENTRYPOINT [\"mmrank\"]\nCMD [\"serve\", \"--repo\", "
        "\"/models/repo\", \"--host\", \"0.0.0.0\", \"--port\", \"8000\"]\n\n# ---- runtime",
        "8000/v2/health/live', timeout=2)\"]\nENTRYPOINT [\"mmrank\"]\nCMD [\"serve\", \"--repo\", "
        "\"/models/repo\", \"--host\", \"0.0.0.0\", \"--port\", \"8000\"]\n\n# ---- runtime"),
     "gpu: no HEALTHCHECK on :8000/v2/health/ready"),
    ("unpinned apt without cleanup", _replace(
        "COPY --from=build /opt/venv /opt/venv\nRUN groupadd",
        "COPY --from=build /opt/venv /opt/venv\nRUN apt-get update && apt-get install -y curl\n"
        "RUN groupadd"), "hadolint: "),
    ("unexplained hadolint ignore", _replace(
        "# DL3008 (pin apt versions): the CUDA base tag pins the distribution; jammy's python3.11\n"
        "# gets security updates we want on rebuild, which a version pin would block.\n", ""),
     "hadolint ignore=DL3008 is not explained"),
    ("torch in the serving image", _replace(
        'RUN pip install --no-cache-dir .\n', 'RUN pip install --no-cache-dir ".[train]"\n'),
     "installs the training stack"),
    ("runtime no longer the default target", _replace(
        "FROM ${PYTHON_IMAGE} AS runtime", "FROM ${PYTHON_IMAGE} AS serve"),
     "the last stage (docker build's default target) should be 'runtime'"),
    ("gpu image without onnxruntime-gpu", _replace(
        ' \\\n    && pip uninstall -y onnxruntime \\\n    && pip install --no-cache-dir '
        '"onnxruntime-gpu==${ORT_GPU_VERSION}"', ""), "onnxruntime-gpu is never installed"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "expect"), [(e, x) for _, e, x in DOCKERFILE_MISTAKES],
                         ids=[n for n, _, _ in DOCKERFILE_MISTAKES])  # fmt: skip
def test_dockerfile_check_fails_on_planted_mistake(
    tmp_path: Path, edit: Callable[[str], str], expect: str
) -> None:
    df = tmp_path / "Dockerfile"
    df.write_text(edit((ROOT / "Dockerfile").read_text()))
    problems = dockerfile_problems(df)
    assert any(expect in p for p in problems), problems


def test_interpolation_matches_compose_rules() -> None:
    env = {"A": "1", "E": ""}
    assert checks.interpolate("${A}-${B:-x}-${E:-y}-${B}", env) == "1-x-y-"
    with pytest.raises(ValueError, match="need it"):
        checks.interpolate("${B:?need it}", env)
