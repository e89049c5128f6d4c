"""Why the benchmark uses wrk: the CPU each load generator spends per request, measured against the same server.

    python -m loadtests.generator_cost [--seconds 8] [--connections 32] [--server-cpus 1] [--client-cpus 0]

Both generators POST the LeNet-5 digit bodies to the bare Starlette hello endpoint (the cheapest server there is,
so the client's cost shows) with the same number of concurrent connections/users, each pinned to the client CPU.
Reported: requests/s, and the generator's own CPU time (user + system, from wait4 of the child) per 1000 requests.
Locust is measured as the load tests run it (FastHttpUser, one process); the locustfile here only changes the
request to POST /hello and checks the status.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests import servers
from loadtests.bench import WRK_SCRIPT, run_wrk
from loadtests.images import build_pool, for_model, write_pool
from loadtests.slo import table

HELLO_LOCUSTFILE = '''
from pathlib import Path
from locust import FastHttpUser, task
BODIES = [p.read_bytes() for p in sorted(Path(r"{folder}").iterdir())]
class HelloUser(FastHttpUser):
    i = 0
    @task
    def hello(self):
        self.i += 1
        with self.client.post("/hello", data=BODIES[self.i % len(BODIES)], headers={{"Content-Type": "image/png"}},
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(str(r.status_code))
'''


def child_cpu(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`; its output and the CPU seconds (user + system) it and its children used."""
    before = os.times()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=servers.REPO_ROOT)
    after = os.times()
    return proc, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--server-cpus", default="1")
    p.add_argument("--client-cpus", default="0")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="generator-cost-"))
    files = write_pool(for_model(build_pool(photos=0, pngs=0), "lenet5"), work / "digits")
    locustfile = work / "hello_locustfile.py"
    locustfile.write_text(HELLO_LOCUSTFILE.format(folder=work / "digits"))
    rows = []
    with servers.uvicorn_app("hello", "loadtests.baselines.hello_app:app", None, a.server_cpus, log_dir=work) as hello:
        cmd = ["wrk", "-t1", f"-c{a.connections}", f"-d{a.seconds}s", "--timeout", "30s", "-s", str(WRK_SCRIPT),
               hello.url, "--", *map(str, files)]
        env = servers.base_env({"WRK_PATH": "/hello", "WRK_CONTENT_TYPE": "image/png"})
        run_wrk(hello.url, "/hello", "image/png", files, a.connections, 2, a.client_cpus)  # warm-up
        proc, cpu = child_cpu(servers.pinned(cmd, a.client_cpus), env, a.seconds + 60)
        r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
        rows.append(["wrk 4.1, 1 thread", f"{r['requests'] / (r['duration_us'] / 1e6):.0f}",
                     f"{1000 * cpu / r['requests']:.2f}", f"{100 * cpu / a.seconds:.0f} %"])
        prefix = work / "locust"
        cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", hello.url,
               "-u", str(a.connections), "-r", str(a.connections), "-t", f"{a.seconds}s", "--json-file", str(prefix),
               "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        proc, cpu = child_cpu(servers.pinned(cmd, a.client_cpus), servers.base_env(), a.seconds + 90)
        entries = json.loads(Path(f"{prefix}.json").read_text())  # Locust's final stats, one entry per name
        requests = sum(e["num_requests"] for e in entries)
        span = max(e["last_request_timestamp"] for e in entries) - min(e["start_time"] for e in entries)
        rows.append(["Locust 2.47 FastHttpUser, 1 process", f"{requests / span:.0f}",
                     f"{1000 * cpu / max(requests, 1):.2f}", f"{100 * cpu / a.seconds:.0f} %*"])
    print(table(["generator", "req/s", "client CPU s / 1000 req", "client CPU"], rows))
    print(f"\nhello endpoint pinned to CPU(s) {a.server_cpus}, generator to {a.client_cpus}, {a.connections} "
          f"connections/users, {a.seconds} s. *Locust's CPU includes its start-up (importing, spawning users).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
