"""A real Triton server on this machine, for tests, benchmarks and local runs.

The ``nvidia-pytriton`` wheel carries a complete ``tritonserver`` 2.51 (Python backend
only; CPU works). It pins numpy < 2, so it lives in a venv of its own,
``.venv-triton`` at the repository root, made from Debian's ``/usr/bin/python3.11``
(the Python-backend stub fails with pyenv's 3.11.7), and runs as a separate process,
as the Triton container would in compose.

The recipe (read from ``pytriton/triton.py``, which does the same inside PyTriton):

- binary: ``site-packages/pytriton/tritonserver/bin/tritonserver``;
- shared libraries: ``site-packages/nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH``;
- backends: a directory holding ``python/libtriton_python.so``,
  ``python/triton_python_backend_utils.py`` and the stub for the venv's Python
  (``pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub``),
  passed as ``--backend-directory``;
- the venv's ``bin`` first on ``PATH``: the stub's embedded interpreter finds the venv
  (its numpy and onnxruntime) from the ``python3`` it finds there;
- a unique shared-memory prefix per server (``--backend-config
  python,shm-region-prefix-name=...``), so that several servers can run at once.

:class:`LocalTriton` starts ``tritonserver`` on free ports (gRPC, HTTP, metrics, bound
to 127.0.0.1) in a process group of its own, waits for the *model's* readiness
(``/v2/models/<model>/ready``: the server's ``/v2/health/ready`` can be 200 before a
model is loaded), and stops exactly that process group. ``kill`` / ``restart`` keep
the ports, for fault tests. ``python -m service.triton_local EXPORTED_REPO`` serves an
exported model until interrupted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".venv-triton"
BASE_PYTHON = "/usr/bin/python3.11"
# numpy < 2: pytriton's pin; onnxruntime runs the exported graph inside the stub
PACKAGES = ("nvidia-pytriton", "onnxruntime", "numpy<2")
STAMP = ".mmrank-triton-ready"


_LIVE: weakref.WeakSet[LocalTriton] = weakref.WeakSet()


@atexit.register
def _stop_live() -> None:
    """Servers still running when the interpreter exits (a crashed script) are stopped."""
    for server in list(_LIVE):
        server.stop()


class TritonSetupError(RuntimeError):
    """The Triton venv cannot be built or the server cannot be started here."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside a built ``.venv-triton``."""

    venv: Path

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / "python3.11" / "site-packages"

    @property
    def server(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"

    @property
    def backends(self) -> Path:
        """The ``--backend-directory`` (assembled by :func:`ensure_triton`)."""
        return self.venv / "triton-backends"


def _run(args: list[str], what: str, timeout: float) -> None:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TritonSetupError(f"{what} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TritonSetupError(f"{what} failed ({proc.returncode}): " + " | ".join(tail))


def ensure_triton(venv: Path = DEFAULT_VENV, python: str = BASE_PYTHON) -> TritonInstall:
    """The Triton venv at ``venv``, built first if missing (pip, from the configured
    index; about 30 s). Raises :class:`TritonSetupError` with the reason when it
    cannot be built here (no ``python``, package unavailable, ...)."""
    inst = TritonInstall(venv)
    if (venv / STAMP).is_file() and inst.server.is_file():
        return inst
    if not Path(python).is_file():
        raise TritonSetupError(f"{python} is missing (the Triton venv needs Debian's Python 3.11)")
    venv.mkdir(parents=True, exist_ok=True)
    with (venv / ".build.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # one builder at a time (parallel test runs)
        if (venv / STAMP).is_file() and inst.server.is_file():
            return inst  # built by the process we waited for
        return _build(inst, python)


def _build(inst: TritonInstall, python: str) -> TritonInstall:
    venv = inst.venv
    if not (venv / "bin" / "python").is_file():
        _run([python, "-m", "venv", str(venv)], f"{python} -m venv {venv}", 120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run([*pip, *PACKAGES], f"pip install {' '.join(PACKAGES)}", 900)
    if not inst.server.is_file():
        raise TritonSetupError(f"{inst.server} missing after installing nvidia-pytriton")
    # the backend directory: the Python backend plus the stub for this venv's Python
    py = inst.backends / "python"
    shutil.rmtree(inst.backends, ignore_errors=True)
    py.mkdir(parents=True)
    dist = inst.site_packages / "pytriton" / "tritonserver"
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / name, py / name)
    shutil.copy2(
        dist / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
        py / "triton_python_backend_stub",
    )
    (venv / STAMP).write_text(" ".join(PACKAGES) + "\n")
    return inst


def free_port() -> int:
    """A port the OS reports free on 127.0.0.1 (taken by the server right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalTriton:
    """``tritonserver`` serving the Triton model repository ``repository`` on free
    ports; started on construction, ready when the constructor returns (model
    ``model`` reports ready), stopped by :meth:`stop` or on leaving a ``with`` block
    (or at interpreter exit)."""

    def __init__(
        self,
        repository: Path | str,
        *,
        model: str = "ranker",
        install: TritonInstall | None = None,
        start_timeout: float = 60.0,
        exit_timeout_s: int = 5,
    ) -> None:
        self.repository = Path(repository)
        self.exit_timeout_s = exit_timeout_s
        self.model = model
        self.install = install or ensure_triton()
        self.start_timeout = start_timeout
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mmrank-triton-"))
        self.log_path = self.dir / "tritonserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._shm_prefix = ""
        self._reaped = False
        _LIVE.add(self)
        self.start()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def _command(self, shm_prefix: str) -> list[str]:
        return [
            str(self.install.server),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backends}",
            "--disable-auto-complete-config",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--pinned-memory-pool-byte-size=0",  # CPU only: no pinned host memory
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            # on SIGTERM: seconds Triton waits for in-flight requests and model unloads
            # (a Python-backend model takes ~2.5 s to unload); stubs left then are
            # killed with the process group
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
        ]

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")
        }
        libs = str(self.install.libs)
        env["LD_LIBRARY_PATH"] = (
            f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
        )
        env["PATH"] = f"{self.install.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def start(self) -> None:
        """Start the server (on this object's ports) and wait for the model's readiness."""
        if self.running:
            return
        self._shm_prefix = f"mmrank_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._reaped = False
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self._command(self._shm_prefix),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,  # its own process group: the stubs stop with it
            )
        self.wait_ready()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def model_ready(self) -> bool:
        """True when Triton answers 200 on the model's own readiness endpoint."""
        url = f"{self.http_url}/v2/models/{self.model}/ready"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise TritonSetupError(f"tritonserver exited ({code}):\n{self.log_tail()}")
            if self.model_ready():
                return
            time.sleep(0.05)
        self.stop()
        raise TritonSetupError(
            f"model {self.model} not ready after {self.start_timeout:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the group this object started

    def _reap(self) -> None:
        if self.proc is None or self._reaped:
            return  # never signal a group id twice: it may belong to someone else by now
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        # stubs that outlived a SIGKILLed server (same group), then their shared memory
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reaped = True
        if self._shm_prefix:
            for f in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                f.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests); ports are kept for :meth:`start`."""
        self._signal(signal.SIGKILL)
        self._reap()

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its connections but answers nothing."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports."""
        self.stop(keep_dir=True)
        self.start()

    def stop(self, keep_dir: bool = False) -> None:
        """SIGTERM the server's process group (SIGKILL after 10 s); idempotent."""
        if self.proc is not None:
            self._signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self._signal(signal.SIGTERM)
            self._reap()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve an exported model repository on a local Triton until interrupted."""
    from service.triton_repo import build_triton_repository

    ap = argparse.ArgumentParser(prog="python -m service.triton_local", description=main.__doc__)
    ap.add_argument("model_repo", type=Path, help="an exported model repository (mmrank export)")
    ap.add_argument("--instances", type=int, default=2, help="Triton instances (CPU)")
    ap.add_argument(
        "--max-queue-size", type=int, default=64, help="Triton's queue bound (0: unbounded)"
    )
    args = ap.parse_args(argv)
    try:
        install = ensure_triton()
        work = Path(tempfile.mkdtemp(prefix="mmrank-triton-repo-"))
        build_triton_repository(
            args.model_repo,
            work / "models",
            instances=args.instances,
            max_queue_size=args.max_queue_size or None,
        )
        server = LocalTriton(work / "models", install=install)
    except (TritonSetupError, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    sys.stdout.write(
        f"Triton ready: gRPC {server.grpc_url}, HTTP {server.http_url}, "
        f"log {server.log_path}\nMMRANK_BACKEND__KIND=triton "
        f"MMRANK_BACKEND__TRITON_URL={server.grpc_url}\n"
    )
    sys.stdout.flush()
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
