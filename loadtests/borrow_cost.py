"""Borrowing idle cores, measured: the service with and without CONVNET_BORROW_IDLE_CPUS=1, side by side.

    python -m loadtests.borrow_cost [--connections 1,4,32] [--rounds 3] [--seconds 8]

AlexNet, JPEG photos as raw bodies, wrk on every core with the servers (unpinned: borrowing is about the cores a
loaded server would use). The two services and the naive app (loadtests/baselines/naive_app.py, onnxruntime on every
CPU: what a tutorial serves with) are up at once, each frozen (SIGSTOP) while another is measured, in rounds whose
order reverses every other round, as in `make bench`. Prints, per number of connections, each one's median rate and
latencies and the ratio of borrowing to not, taken within each round; then the front workers' memory.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests import servers
from loadtests.images import build_pool, for_model, write_pool
from loadtests.rounds import in_rounds, memory_and_runs, rss_mib, table

SETUPS = {"service": {}, "service, borrowing": {"CONVNET_BORROW_IDLE_CPUS": "1"}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", default="1,4,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=8, help="per run; runs at 32 connections or more take twice that")
    p.add_argument("--images", type=Path, default=None, help="a folder for the photos (default: a temporary one)")
    p.add_argument("--json", type=Path, default=None, help="also write every run here")
    args = p.parse_args(argv)
    folder = args.images or Path(tempfile.mkdtemp(prefix="convnet-borrow-"))
    folder.mkdir(parents=True, exist_ok=True)
    files = write_pool(for_model(build_pool(), "alexnet"), folder)
    cpus = servers.cpu_count_of(None)
    with ExitStack() as stack:
        up = {name: stack.enter_context(servers.service(["alexnet"], env={"CONVNET_DEVICE": "cpu", **env}))
              for name, env in SETUPS.items()}
        up["naive app"] = stack.enter_context(servers.uvicorn_app(
            "naive", "loadtests.baselines.naive_app:app",
            {"NAIVE_MODELS": "alexnet", "NAIVE_THREADS": str(cpus), "NAIVE_DEVICE": "cpu"}))
        for server in up.values():
            servers.freeze(server)
        memory = {name: rss_mib(up[name]) for name in SETUPS}
        runs = in_rounds(up, files, [int(c) for c in args.connections.split(",")], args.rounds, args.seconds)
    print(f"\nAlexNet, {cpus} CPUs, unpinned, {args.rounds} rounds; medians (runs)\n")
    print(table(runs, list(up), "service", "borrowing / not, per round",
                compared=["service, borrowing"]))  # the naive app is there for its latency
    memory_and_runs(runs, memory, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
