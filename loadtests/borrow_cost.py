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
import json
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests import servers
from loadtests.bench import run_wrk
from loadtests.images import build_pool, for_model, write_pool

PATH = "/classify?model=alexnet"
SETUPS = {"service": {}, "service, borrowing": {"CONVNET_BORROW_IDLE_CPUS": "1"}}


def rss_mib(server: servers.Server) -> list[int]:
    """The resident memory of each process under the server's arbiter (its workers), MiB."""
    return sorted(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 >> 20
                  for pid in servers.process_tree(server.proc.pid)[1:])


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
    runs: dict[tuple[str, int], list[dict]] = {}
    with ExitStack() as stack:
        up = {name: stack.enter_context(servers.service(["alexnet"], env={"CONVNET_DEVICE": "cpu", **env}))
              for name, env in SETUPS.items()}
        up["naive app"] = stack.enter_context(servers.uvicorn_app(
            "naive", "loadtests.baselines.naive_app:app",
            {"NAIVE_MODELS": "alexnet", "NAIVE_THREADS": str(cpus), "NAIVE_DEVICE": "cpu"}))
        for server in up.values():
            servers.freeze(server)
        memory = {name: rss_mib(up[name]) for name in SETUPS}
        for conns in (int(c) for c in args.connections.split(",")):
            seconds = args.seconds * (2 if conns >= 32 else 1)
            for r in range(args.rounds):
                for name in (list(up) if r % 2 == 0 else list(reversed(up))):
                    with servers.awake(up[name]) as server:
                        run_wrk(server.url, PATH, "image/jpeg", files, conns, 3, None)  # warm-up, not counted
                        result = run_wrk(server.url, PATH, "image/jpeg", files, conns, seconds, None)
                    result.pop("latencies_us")
                    runs.setdefault((name, conns), []).append(result)
                    print(f"{name}, {conns} conns, round {r + 1}: {result['rate']:.1f} img/s, "
                          f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms", flush=True)
    print(f"\nAlexNet, {cpus} CPUs, unpinned, {args.rounds} rounds; medians (runs)\n")
    print("| conns | setup | img/s | p50 ms | p99 ms | borrowing / not, per round |")
    print("|---:|---|---:|---:|---:|---|")
    for conns in sorted({c for _, c in runs}):
        for name in up:
            rs = runs[(name, conns)]
            ratio = ""
            if name == "service, borrowing":
                per_round = sorted(b["rate"] / a["rate"] for a, b in zip(runs[("service", conns)], rs, strict=True))
                ratio = f"{statistics.median(per_round):.2f}× ({per_round[0]:.2f}–{per_round[-1]:.2f})"
            each = " / ".join(f"{x['rate']:.1f}" for x in rs)
            print(f"| {conns} | {name} | {statistics.median(x['rate'] for x in rs):.1f} ({each}) "
                  f"| {statistics.median(x['p50_ms'] for x in rs):.1f} "
                  f"| {statistics.median(x['p99_ms'] for x in rs):.1f} | {ratio} |")
    print("\nresident memory of the front workers, MiB, after warm-up: "
          + "; ".join(f"{name}: {' + '.join(map(str, mib))}" for name, mib in memory.items()))
    if args.json:
        args.json.write_text(json.dumps({"runs": {f"{n} @ {c}": v for (n, c), v in runs.items()},
                                         "memory_mib": memory}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
