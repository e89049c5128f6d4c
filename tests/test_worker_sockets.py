"""Front workers each listen on a socket of their own (serving/upstream.py `balance_connections`).

With BentoML's one shared socket, the worker that wakes first takes every connection of a burst: a client's
keep-alive pool of 32 connections split 25/7 or worse over two workers in half of the runs measured (32/0 in the
first run after each start), and the other core idled (BentoML #5426). Here the kernel spreads them by address hash.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest
from serverproc import REPO_ROOT, free_port, server_env, server_log, started_server, wait_ready, worker_pids

pytestmark = pytest.mark.serial  # how connections spread over busy workers: `make test` runs it alone

TWO_FRONT_WORKERS = {"CONVNET_API_WORKERS": "2", "CONVNET_MODELS": "lenet5"}
CONNECTIONS = 32


def front_workers(proc: subprocess.Popen) -> dict[str, int]:
    return {name: pid for name, pid in worker_pids(proc).items() if name.split(":")[0] == "convnet"}


def connections_per_worker(proc: subprocess.Popen, port: int) -> list[int]:
    """Open a keep-alive pool of CONNECTIONS connections, one request answered on each, and count how many each
    front worker holds (from the kernel's table of each worker's sockets)."""
    pool = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(CONNECTIONS)]
    try:
        for s in pool:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n")
        for s in pool:
            assert s.recv(65536).startswith(b"HTTP/1.1 200"), "a pooled connection was not answered"
        return sorted(sum(1 for c in psutil.Process(pid).net_connections("tcp")
                          if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)
                      for pid in front_workers(proc).values())
    finally:
        for s in pool:
            s.close()


def test_a_keep_alive_pool_is_spread_over_the_front_workers_also_after_a_restart():
    with started_server(env=TWO_FRONT_WORKERS) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        # Each worker's own socket, bound to the same address: not one socket shared by every process.
        listening = {pid: [c for c in psutil.Process(pid).net_connections("tcp")
                           if c.laddr.port == port and c.status == psutil.CONN_LISTEN]
                     for pid in front_workers(proc).values()}
        assert len(listening) == 2 and all(len(s) == 1 for s in listening.values()), listening
        inodes = {os.readlink(f"/proc/{pid}/fd/{s[0].fd}") for pid, s in listening.items()}  # "socket:[inode]"
        assert len(inodes) == 2, inodes
        # Uniform hashing puts fewer than 6 of 32 on one worker with probability ~1e-4; upstream, all 32 often did.
        for _ in range(3):
            counts = connections_per_worker(proc, port)
            assert sum(counts) == CONNECTIONS and counts[0] >= 6, counts

        # A worker killed and restarted by the arbiter gets a socket of its own again, and its share.
        name, pid = next(iter(front_workers(proc).items()))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            workers = front_workers(proc)
            if len(workers) == 2 and pid not in workers.values():
                try:
                    if all(httpx.get(f"{base}/readyz", timeout=5).status_code == 200 for _ in range(8)) and \
                            f"(pid {pid}) died without shutting down" in server_log(proc, 100_000):
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"worker {name} was not back after 120 s:\n{server_log(proc)}")
        wait_ready(base, proc)
        time.sleep(2)  # the new worker's model warm-up is done once it listens; give its first accept a moment
        counts = connections_per_worker(proc, port)
        assert sum(counts) == CONNECTIONS and counts[0] >= 6, counts


def test_a_port_already_in_use_stops_the_start_with_the_reason():
    """Sockets that each set SO_REUSEPORT could share a port with another server of the same user; the arbiter checks
    the port first, so a second server fails to start, as it did with the shared socket."""
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:Convnet", "--host", "127.0.0.1", "--port",
               str(port), "--working-dir", str(REPO_ROOT)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=server_env(TWO_FRONT_WORKERS), capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stdout + proc.stderr
