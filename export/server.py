"""A real Triton Inference Server process: the `tritonserver` 2.51 binary that ships in the
`nvidia-pytriton` wheel, with the Python backend and ensemble scheduling.

The backend directory is assembled once from the wheel (libtriton_python.so,
triton_python_backend_utils.py and the stub matching this interpreter) under
~/.cache/promptmad/triton-backends/. The Python-backend stub runs model.py with the first
`python3` on PATH, so this interpreter's bin directory goes first on the server's PATH.

Host safety: the APIs of contract.RESTRICTED_APIS (shared memory, logging, trace, model repository)
answer only requests that carry the admin key in header contract.ADMIN_KEY_HEADER; in model control
mode none Triton loads a private, verified snapshot of the repository (export/snapshot.py), so the
stubs neither write nor read bytecode caches in the repository; /dev/shm regions left by crashed
servers are freed before a start.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from promptmad import contract
from promptmad.errors import ServeError
from promptmad.export.pycache_block import block_bytecode
from promptmad.export.snapshot import make_workdir, snapshot_repository
from promptmad.export.stale_shm import free_stale_regions, remove_thread_share_files

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `pip install nvidia-pytriton` (bash scripts/setup.sh does)"


def _pytriton_dirs() -> tuple[Path, Path]:
    """(tritonserver dist dir, bundled libs dir) of the nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise ServeError(f"the tritonserver binary comes with the nvidia-pytriton wheel, which is not installed: {INSTALL_HINT}") from exc
    dist = Path(pytriton.__file__).parent / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ServeError(f"{dist / 'bin' / 'tritonserver'} is missing; reinstall nvidia-pytriton ({INSTALL_HINT})")
    return dist, libs


def find_tritonserver() -> Path:
    return _pytriton_dirs()[0] / "bin" / "tritonserver"


def backend_directory() -> Path:
    """Assembles (once) a backend directory with the Python backend for this interpreter."""
    dist, _ = _pytriton_dirs()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no Python-backend stub for Python {version} ({stub})")
    root = Path(os.environ.get("PROMPTMAD_CACHE", Path.home() / ".cache" / "promptmad")) / "triton-backends" / f"py{version}"
    target = root / "python"
    files = {
        "libtriton_python.so": dist / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": dist / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    if all((target / n).is_file() and (target / n).stat().st_size == src.stat().st_size for n, src in files.items()):
        return root
    tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=root.parent if root.parent.exists() else None))
    try:
        (tmp / "python").mkdir(parents=True)
        for name, src in files.items():
            shutil.copy2(src, tmp / "python" / name)
        root.parent.mkdir(parents=True, exist_ok=True)
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_admin_key(key: str | None = None) -> str:
    """The admin key: `key`, else $PROMPTMAD_ADMIN_KEY (contract.ADMIN_KEY_ENV), else a fresh random one.
    It travels inside tritonserver's --*-restricted-* flags, whose syntax forbids `,:=` and spaces."""
    key = key or os.environ.get(contract.ADMIN_KEY_ENV) or secrets.token_urlsafe(32)
    if len(key) < 16 or any(c in key for c in ",:= \t\n"):
        raise ServeError(f"the admin key (${contract.ADMIN_KEY_ENV}) must be at least 16 characters without ',', ':', '=' "
                         "or spaces; e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return key


def restricted_api_flags(key: str) -> list[str]:
    """tritonserver flags that put contract.RESTRICTED_APIS behind header ADMIN_KEY_HEADER = key."""
    spec = f"{','.join(contract.RESTRICTED_APIS)}:{contract.ADMIN_KEY_HEADER}={key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class TritonServer:
    """`with TritonServer(repo) as server: ...` starts tritonserver, waits until it is ready, and
    stops it on exit. Ports 0 = free ports. Binds 127.0.0.1 and uses model control mode NONE by
    default: nothing is reachable from other machines and models cannot be loaded remotely.
    `admin_key` (default: $PROMPTMAD_ADMIN_KEY or a fresh random key) unlocks the restricted APIs."""

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        model_control_mode: str = "none",
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
        startup_timeout: float = 180.0,
        log_file: str | Path | None = None,
        verify_manifest: bool = False,
        wait_for: str = "ready",
        admin_key: str | None = None,
    ):
        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ServeError(f"ports must differ: http {self.http_port}, grpc {self.grpc_port}, metrics {self.metrics_port}")
        if model_control_mode not in ("none", "poll", "explicit"):
            raise ServeError(f"model_control_mode {model_control_mode!r}: choose none, poll or explicit")
        self.model_control_mode = model_control_mode
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.verify_manifest = verify_manifest
        if wait_for not in ("ready", "live"):
            raise ServeError(f"wait_for {wait_for!r}: 'ready' (all models loaded) or 'live' (process up)")
        self.wait_for = wait_for
        self.admin_key = resolve_admin_key(admin_key)
        self._workdir: Path | None = None  # private per start: snapshot/, cwd/ (see _prepare)
        self.served_repository = self.repository  # the snapshot while one is served
        self._own_log = log_file is None
        self.log_path = Path(log_file) if log_file else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self._proc: subprocess.Popen | None = None
        self._log_fh = None

    # -- urls ------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle -------------------------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            str(find_tritonserver()),
            f"--model-repository={self.served_repository}",
            f"--backend-directory={backend_directory()}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            # explicit mode loads nothing at start unless told: every model, as the other modes do
            *(["--load-model=*"] if self.model_control_mode == "explicit" else []),
            "--strict-readiness=true",
            # a model that fails to load stops the server (ready mode) instead of serving a broken ensemble
            f"--exit-on-error={'true' if self.wait_for == 'ready' else 'false'}",
            "--exit-timeout-secs=10",
            f"--log-verbose={self.log_verbose}",
            *restricted_api_flags(self.admin_key),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        _, libs = _pytriton_dirs()
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        # the Python-backend stub runs model.py with the first python3 on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", "1")
        # no bytecode caches for what the models start themselves (Triton 2.51's stub interpreter
        # ignores these; the snapshot keeps its caches out of the repository)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if self._workdir is not None:
            env["PYTHONPYCACHEPREFIX"] = str(self._workdir / "pycache")
        return env

    def _prepare(self) -> None:
        """A private folder for this start: the stubs' working directory (it is on their sys.path,
        so it must hold nothing), and in model control mode none the snapshot Triton loads. The
        other modes watch or load from the repository itself (`promptmad classes` adds versions to
        it while it serves), so there its version folders get bytecode blockers (pycache_block.py)."""
        self._workdir = make_workdir()
        (self._workdir / "cwd").mkdir()
        self.served_repository = self.repository
        if self.model_control_mode == "none":
            self.served_repository = snapshot_repository(self.repository, self._workdir / "repository")
        else:
            block_bytecode(self.repository)
        if self.verify_manifest:
            from promptmad.export.manifest import verify_repository_checksums

            verify_repository_checksums(self.served_repository, shown_as=self.repository)

    def start(self) -> "TritonServer":
        if self._proc and self._proc.poll() is None:
            return self
        if not self.repository.is_dir():
            raise ServeError(f"{self.repository}: model repository not found (create it with `promptmad export`)")
        for name, port in (("http", self.http_port), ("grpc", self.grpc_port), ("metrics", self.metrics_port)):
            if port_in_use(self.host, port):
                raise ServeError(f"{name} port {self.host}:{port} is already in use; stop the other server or pass --{name}-port")
        free_stale_regions()  # what servers killed with -9 left in /dev/shm
        free_stale_regions(prefix=contract.THREAD_SHARE_PREFIX)
        try:
            self._prepare()
        except BaseException:
            self._release()
            raise
        self._log_fh = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.command(), stdout=self._log_fh, stderr=subprocess.STDOUT, env=self.environment(),
            start_new_session=True,  # own process group: stop() reaches the backend stubs too
            cwd=self._workdir / "cwd",
        )
        log.info("tritonserver pid %d, log %s", self._proc.pid, self.log_path)
        try:
            self.wait_ready(self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def is_ready(self, what: str = "ready") -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/{what}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ServeError(self._failure_message())
            if self.is_ready(self.wait_for):
                return
            time.sleep(0.25)
        raise ServeError(f"tritonserver did not become ready within {timeout:.0f}s; last log lines:\n{self._tail()}")

    def _tail(self, n: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _failure_message(self) -> str:
        text = self.log_text()
        if "Address already in use" in text or "address already in use" in text:
            return f"tritonserver could not bind its ports (already in use):\n{self._tail()}"
        failed = [line for line in text.splitlines() if "failed to load" in line or "UNAVAILABLE" in line or "Invalid argument" in line]
        if failed:
            return "tritonserver refused the model repository " + str(self.repository) + ":\n" + "\n".join(failed[:8])
        return f"tritonserver exited with code {self._proc.returncode if self._proc else '?'}; last log lines:\n{self._tail()}"

    def stop(self, timeout: float = 20.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        if proc is not None:
            try:  # stubs left behind by a crashed server
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            remove_thread_share_files(proc.pid)
        self._release()

    def _release(self) -> None:
        """The log handle and the per-start private folder (snapshot included)."""
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self.served_repository = self.repository

    def kill(self) -> None:
        """Hard kill (for fault tests): no graceful shutdown."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            remove_thread_share_files(proc.pid)
        self._release()

    def restart(self, grace_s: float = 20.0) -> "TritonServer":
        """Start again on the same ports (after stop() or kill(); a running server gets `grace_s`
        seconds to finish its requests)."""
        self.stop(timeout=grace_s)
        deadline = time.monotonic() + 30
        while any(port_in_use(self.host, p) for p in (self.http_port, self.grpc_port, self.metrics_port)):
            if time.monotonic() > deadline:
                raise ServeError("ports of the previous server are still taken after 30s")
            time.sleep(0.2)
        return self.start()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)
