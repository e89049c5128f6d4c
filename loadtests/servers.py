"""Start the HTTP servers the load tests and benchmarks talk to, on free 127.0.0.1 ports, and always stop them.

Every server runs in its own process group (BentoML forks an arbiter and workers), optionally pinned to a set of
CPUs with `taskset` so that on a small machine the load generator and the server don't fight over the same cores.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
# The malloc settings every deployment starts the service with, and the free-port helper, have one home there.
from serverproc import ALLOCATOR_ENV, free_port, join_cgroup  # noqa: E402

SERVICE_TARGET = "serving.service:Convnet"
READY_TIMEOUT_S = 180.0  # AlexNet's 233 MB ONNX plus BentoML's start on a busy 2-core machine


def base_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra or {})
    return env


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    """`cmd` run under `taskset -c cpus` (e.g. "1" or "0-1"); unchanged when cpus is None."""
    if not cpus:
        return cmd
    if shutil.which("taskset") is None:
        raise RuntimeError("CPU pinning asked for but `taskset` (util-linux) is not installed")
    return ["taskset", "-c", cpus, *cmd]


def cpu_count_of(cpus: str | None) -> int:
    """How many CPUs a taskset list like "0", "1-3" or "0,2" names (all CPUs this process may use if None)."""
    if not cpus:
        return len(os.sched_getaffinity(0))
    n = 0
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    cpus: str | None = None
    ready_seconds: float = 0.0
    _log_file: object = field(default=None, repr=False)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""


def launch(name: str, cmd: list[str], port: int, env: dict[str, str] | None = None, cpus: str | None = None,
           log_dir: Path | None = None, cgroup: Path | None = None) -> Server:
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix="convnet-loadtest-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (owned by the Server; closed in stop)
    proc = subprocess.Popen(pinned(cmd, cpus), cwd=REPO_ROOT, env=base_env(env), stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=join_cgroup(cgroup) if cgroup else None)
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path, cpus, _log_file=log_file)


def wait_ready(server: Server, path: str, timeout: float = READY_TIMEOUT_S) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was ready:\n"
                               f"{server.log_tail()}")
        try:
            if httpx.get(server.url + path, timeout=2.0).status_code == 200:
                server.ready_seconds = time.monotonic() - t0
                return server.ready_seconds
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{server.name} at {server.url} not ready after {timeout:.0f}s:\n{server.log_tail()}")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int, tid: int | None = None) -> list[str]:
    """The fields of /proc/<pid>/stat (of thread `tid`: /proc/<pid>/task/<tid>/stat) after the command name (which
    may hold spaces): state, ppid, ..."""
    text = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def _cpu_of(fields: list[str]) -> float:
    """User + system CPU seconds from `_stat_fields` (utime, stime: fields 14 and 15 of stat)."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first, from the parent field of every /proc/<pid>/stat. Not its
    process group: BentoML's arbiter starts each worker in a session of its own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):  # exited meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree = [pid]
    for p in tree:  # grows while it is walked: breadth first
        tree.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live descendants (utime, stime: fields 14 and 15 of stat)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = _stat_fields(p)
        except OSError:  # exited in between
            continue
        total += _cpu_of(fields)
    return total


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of every thread of `pid`'s tree, summed by thread name: the OS name
    (serving/threads.py gives it ours) less a pool's index (`decode_0` → `decode`); each process's main thread is
    `main`, and threads that never named themselves keep the name they inherited."""
    by_name: dict[str, float] = {}
    for p in process_tree(pid):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:  # exited in between
            continue
        for tid in tids:
            try:
                name = Path(f"/proc/{p}/task/{tid}/comm").read_text().strip()
                fields = _stat_fields(p, tid)
            except OSError:
                continue
            name = "main" if tid == p else re.sub(r"_\d+$", "", name)
            by_name[name] = by_name.get(name, 0.0) + _cpu_of(fields)
    return by_name


def signal_tree(server: Server, sig: int) -> None:
    """Send `sig` to the server's process and every descendant (BentoML's arbiter and workers, LitServe's API server
    and inference worker); processes already gone are skipped."""
    for pid in process_tree(server.proc.pid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stopped_or_gone(pid: int) -> bool:
    try:
        return _stat_fields(pid)[0] in "TtZX"
    except OSError:
        return True


def freeze(server: Server) -> None:
    """Stop the server's processes (SIGSTOP) until `awake`: an idle server then takes no CPU from the one measured.
    LitServe's idle inference loop, for one, polls its queue at ~16% of a core. Returns once every process is
    stopped (signals are delivered asynchronously)."""
    signal_tree(server, signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not all(map(_stopped_or_gone, process_tree(server.proc.pid))):
        time.sleep(0.005)


def wait_idle(server: Server, share: float = 0.3, window: float = 0.25, timeout: float = 15.0) -> bool:
    """Wait until the server uses less than `share` of a core over `window` seconds (it has finished what a load
    generator left in flight), at most `timeout` seconds; whether it got there."""
    deadline = time.monotonic() + timeout
    before = cpu_seconds(server.proc.pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_seconds(server.proc.pid)
        if now - before < share * window:
            return True
        before = now
    return False


@contextmanager
def awake(server: Server) -> Iterator[Server]:
    """The server running (SIGCONT) for the block, then, once it has finished its work in flight (so that no
    request and no garbage collection is cut in the middle), frozen again."""
    signal_tree(server, signal.SIGCONT)
    try:
        yield server
    finally:
        wait_idle(server)
        freeze(server)


def stop(server: Server, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after `timeout`."""
    proc = server.proc
    signal_tree(server, signal.SIGCONT)  # a frozen process could not act on SIGTERM
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        try:  # workers that outlive their arbiter would keep the port
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if server._log_file is not None:
        server._log_file.close()


@contextmanager
def running(name: str, cmd: list[str], port: int, ready_path: str, env: dict[str, str] | None = None,
            cpus: str | None = None, log_dir: Path | None = None,
            timeout: float = READY_TIMEOUT_S, cgroup: Path | None = None) -> Iterator[Server]:
    server = launch(name, cmd, port, env, cpus, log_dir, cgroup)
    try:
        wait_ready(server, ready_path, timeout)
        yield server
    finally:
        stop(server)


def service(models: list[str] | None = None, env: dict[str, str] | None = None, cpus: str | None = None,
            log_dir: Path | None = None, port: int | None = None,
            cgroup: Path | None = None) -> AbstractContextManager[Server]:
    """The product: `bentoml serve serving.service:Convnet`, ready when /readyz says so (started in `cgroup`, e.g.
    serverproc.cpu_quota_cgroup's, when given)."""
    port = port or free_port()
    extra = {**ALLOCATOR_ENV, **(env or {})}  # as `make serve`, the bentofiles and the manifests start it
    if models:
        extra["CONVNET_MODELS"] = ",".join(models)
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--host", "127.0.0.1", "--port", str(port),
           "--working-dir", str(REPO_ROOT)]
    return running("service", cmd, port, "/readyz", extra, cpus, log_dir, cgroup=cgroup)


def python_module(name: str, module: str, env: dict[str, str] | None = None, cpus: str | None = None,
                  log_dir: Path | None = None, ready_path: str = "/health") -> AbstractContextManager[Server]:
    """A server that is a Python module taking --port (the LitServe peer)."""
    port = free_port()
    return running(name, [sys.executable, "-m", module, "--port", str(port)], port, ready_path, env, cpus, log_dir)


def uvicorn_app(name: str, target: str, env: dict[str, str] | None = None, cpus: str | None = None,
                log_dir: Path | None = None, ready_path: str = "/healthz") -> AbstractContextManager[Server]:
    """A plain ASGI app (the baselines) under one uvicorn worker."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--log-level", "warning", "--no-access-log"]
    return running(name, cmd, port, ready_path, env, cpus, log_dir)
