"""Start and stop a real `bentoml serve` of serving.service on 127.0.0.1, for tests and scripts.

Torch-free and importable on its own: the service tests, the load tests and the benchmark scripts share it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:Convnet"
READY_TIMEOUT_S = 120.0  # generous: the CI machine has 2 cores shared by everything else
# Server settings that put every model in the separate model-service process with BentoML's adaptive batching (the
# GPU path), so tests exercise that path on a CPU machine too. Use it instead of naming the knob in a test.
MODEL_SERVICE_ENV = {"CONVNET_PLACEMENT": "model_service"}
# glibc malloc settings every deployment sets (Makefile, bentofiles, Kubernetes manifests; docs/hardening.md): without
# them large uploads leave a front worker's RSS at ~1.4 GB instead of ~0.2 GB. Must be set where the process starts.
# The trim threshold is 8 MiB, not 1: at 1 MiB each AlexNet photo faulted in ~300 fresh pages (5% of its CPU).
# `make bench` starts the service with them too (loadtests/servers.py), so it measures what ships.
ALLOCATOR_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "8388608"}


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(env: dict[str, str] | None = None, models: list[str] | None = None) -> dict[str, str]:
    full = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1",
            "PYTHONUNBUFFERED": "1", **ALLOCATOR_ENV}
    if models:
        full["CONVNET_MODELS"] = ",".join(models)
    full.update(env or {})
    return full


def start_server(port: int, env: dict[str, str] | None = None, models: list[str] | None = None,
                 log_path: Path | None = None, service: str = SERVICE,
                 preexec_fn: Callable[[], None] | None = None) -> subprocess.Popen:
    """Launch `bentoml serve` in its own process group (so stop_server can end all its workers).

    `env` adds/overrides variables (CONVNET_* tunables); `models` restricts the served models. Output goes to
    `log_path` (default: a temp file, path in `proc.log_path`) rather than a pipe nobody drains. `service` is the
    import string served (another variant, e.g. for a benchmark). `preexec_fn` runs in the child before `bentoml`
    starts (e.g. to put it in a cgroup).
    """
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"convnet-serve-{port}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    env = dict(env or {})
    home = None
    if "BENTOML_HOME" not in env:
        # Every `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts: servers sharing a home
        # wipe each other's metrics. A home of its own per server (removed by stop_server) keeps /metrics honest.
        home = env["BENTOML_HOME"] = tempfile.mkdtemp(prefix=f"convnet-bentoml-home-{port}-")
    log = open(log_path, "wb")  # noqa: SIM115 (handed to the child; closed in stop_server)
    cmd = [sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port),
           "--working-dir", str(REPO_ROOT)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=server_env(env, models), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=preexec_fn)
    proc.log_path = log_path  # type: ignore[attr-defined]
    proc.bentoml_home = home  # type: ignore[attr-defined]
    proc.log_file = log  # type: ignore[attr-defined]
    return proc


def server_log(proc: subprocess.Popen, tail: int = 4000) -> str:
    path = getattr(proc, "log_path", None)
    if path is None or not Path(path).exists():
        return ""
    return Path(path).read_bytes()[-tail:].decode("utf-8", "replace")


def wait_ready(base_url: str, proc: subprocess.Popen | None = None, timeout: float = READY_TIMEOUT_S) -> float:
    """Poll /readyz until it answers 200; returns the seconds it took. Fails fast if the server process died."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{server_log(proc)}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout:.0f}s:\n{server_log(proc) if proc else ''}")


def worker_pids(proc: subprocess.Popen) -> dict[str, int]:
    """PIDs of the server's worker processes by service name ("convnet", "convnet_models", …)."""
    import psutil

    pids = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            args = child.cmdline()
        except psutil.Error:
            continue
        if "_bentoml_impl.worker.service" in args:
            name = args[args.index("--service-name") + 1] if "--service-name" in args else "?"
            pids[f"{name}:{args[args.index('--worker-id') + 1]}" if "--worker-id" in args else name] = child.pid
    return pids


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the arbiter (it stops its workers), then SIGKILL whatever of the tree is left after `timeout`.

    The workers run in process groups of their own, so the tree is collected before anything is signalled.
    """
    import psutil

    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # start_new_session made the arbiter a group leader
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in alive:  # workers outliving the arbiter would hold ports and memory
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)
    log = getattr(proc, "log_file", None)
    if log is not None:
        log.close()
    if getattr(proc, "bentoml_home", None):
        shutil.rmtree(proc.bentoml_home, ignore_errors=True)


def started_server(env: dict[str, str] | None = None, models: list[str] | None = None,
                   preexec_fn: Callable[[], None] | None = None):
    """Context manager: a ready server's base URL and process; always stopped afterwards."""
    from contextlib import contextmanager

    @contextmanager
    def _cm():
        port = free_port()
        proc = start_server(port, env=env, models=models, preexec_fn=preexec_fn)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_ready(base, proc)
            yield base, proc
        finally:
            stop_server(proc)

    return _cm()


@contextlib.contextmanager
def uvicorn_thread(app, **config) -> Iterator:
    """uvicorn serving the ASGI `app` on 127.0.0.1 (a free port) in a thread of this process, `config` given to
    uvicorn.Config (e.g. `http=GuardedHttpProtocol`): the uvicorn.Server once it has started; asked to exit after."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="critical",
                                           **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(10)


def uvicorn_port(server) -> int:
    return server.servers[0].sockets[0].getsockname()[1]


def cgroup_hierarchy(controller: str = "cpu") -> Path:
    """Where the cgroup v1 hierarchy of `controller` is mounted, writable (root): these machines have them; cgroup v2
    hosts would need the controller delegated first."""
    from serving.cgroups import cgroup_mounts  # the service's own reading of /proc/self/mountinfo

    for point, _ in cgroup_mounts(Path("/proc/self/mountinfo").read_text(), controller)["v1"]:
        if not os.access(point, os.W_OK):
            raise PermissionError(f"{point} is not writable: making a cgroup needs root")
        return point
    raise RuntimeError(f"no cgroup v1 {controller} hierarchy is mounted here")


@contextlib.contextmanager
def limited_cgroup(controller: str, limits: dict[str, str], name: str = "") -> Iterator[Path]:
    """A real cgroup of `controller` with `limits` (file name → value), and a child with none of its own to put
    processes in, as a container's processes sit below the limit set on their pod. Yields the child; removed
    afterwards, anything left in it moved back out first."""
    top = cgroup_hierarchy(controller)
    parent = top / f"convnet-{controller}-{os.getpid()}{'-' + name if name else ''}"
    child = parent / "inside"
    child.mkdir(parents=True)
    try:
        for file, value in limits.items():
            (parent / file).write_text(value)
        yield child
    finally:
        for cg in (child, parent):
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (top / "cgroup.procs").write_text(pid)
            cg.rmdir()


def cpu_quota_cgroup(cpus: float, name: str = "") -> contextlib.AbstractContextManager[Path]:
    """A real cgroup whose processes together get `cpus` CPUs' time (a container's `--cpus`: a CFS quota per 100 ms
    period)."""
    return limited_cgroup("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(round(cpus * 100000))},
                          name)


def memory_limit_cgroup(limit_bytes: int, name: str = "") -> contextlib.AbstractContextManager[Path]:
    """A real cgroup whose processes together may hold `limit_bytes` of memory (a container's `--memory`)."""
    return limited_cgroup("memory", {"memory.limit_in_bytes": str(limit_bytes)}, name)


def cgroup_throttling(cgroup: Path) -> tuple[int, int, float]:
    """(periods, periods throttled, seconds throttled) so far of the quota over `cgroup` (its parent's cpu.stat)."""
    stat = dict(line.split() for line in (cgroup.parent / "cpu.stat").read_text().splitlines())
    return int(stat["nr_periods"]), int(stat["nr_throttled"]), int(stat["throttled_time"]) / 1e9


def join_cgroup(cgroup: Path) -> Callable[[], None]:
    """A preexec_fn that moves the child process into `cgroup` before it runs anything."""
    return lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))
