"""A container's CPU quota, measured: the service sized for its quota against the service sized for the machine.

    python -m loadtests.quota_cost [--quota 1] [--as-if 2,8] [--connections 1,4,32] [--rounds 3] [--seconds 8]

Each server runs in a real cgroup of its own whose CFS quota allows `--quota` CPUs (what `docker run --cpus 1` or a
pod's CPU limit sets; serverproc.cpu_quota_cgroup, needs root). One sizes itself as it ships (serving/cpus.py reads
the quota); the others as they did before, for all the machine's CPUs, which `--as-if N` imitates with CONVNET_CPUS=N
(N = this machine's CPUs is exactly the old behaviour here; a larger N is a larger host's). AlexNet, JPEG photos as
raw bodies, wrk unpinned outside the cgroups. The servers are up at once, each frozen (SIGSTOP) while another is
measured, in rounds whose order reverses every other round, as in `make bench`. Prints each one's median rate,
latencies, the share of the quota's periods in which it was throttled (stopped until the next period) and the time
it spent so, per run; the ratio of the quota-sized service's rate to each other's, within each round; memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests import servers
from loadtests.bench import run_wrk
from loadtests.borrow_cost import rss_mib
from loadtests.images import build_pool, for_model, write_pool

sys.path.insert(0, str(servers.REPO_ROOT / "tests"))
from serverproc import cgroup_throttling, cpu_quota_cgroup  # noqa: E402

PATH = "/classify?model=alexnet"
SIZED = "sized for the quota"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quota", type=float, default=1.0, help="CPUs each server's cgroup may use (default 1)")
    p.add_argument("--as-if", default=f"{servers.cpu_count_of(None)},8",
                   help="the machines the old sizing is imitated for (CONVNET_CPUS), comma-separated")
    p.add_argument("--connections", default="1,4,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=8, help="per run; runs at 32 connections or more take twice that")
    p.add_argument("--json", type=Path, default=None, help="also write every run here")
    args = p.parse_args(argv)
    files = write_pool(for_model(build_pool(), "alexnet"), Path(tempfile.mkdtemp(prefix="convnet-quota-")))
    setups = {SIZED: {}} | {f"sized for {n} CPUs (before)": {"CONVNET_CPUS": n} for n in args.as_if.split(",")}
    runs: dict[tuple[str, int], list[dict]] = {}
    with ExitStack() as stack:
        up, cgroups = {}, {}
        for i, (name, env) in enumerate(setups.items()):
            cgroups[name] = stack.enter_context(cpu_quota_cgroup(args.quota, f"s{i}"))
            up[name] = stack.enter_context(servers.service(["alexnet"], env={"CONVNET_DEVICE": "cpu", **env},
                                                           cgroup=cgroups[name]))
            servers.freeze(up[name])
        memory = {name: rss_mib(server) for name, server in up.items()}
        for conns in (int(c) for c in args.connections.split(",")):
            seconds = args.seconds * (2 if conns >= 32 else 1)
            for r in range(args.rounds):
                for name in (list(up) if r % 2 == 0 else list(reversed(up))):
                    with servers.awake(up[name]) as server:
                        run_wrk(server.url, PATH, "image/jpeg", files, conns, 3, None)  # warm-up, not counted
                        before = cgroup_throttling(cgroups[name])
                        result = run_wrk(server.url, PATH, "image/jpeg", files, conns, seconds, None)
                        after = cgroup_throttling(cgroups[name])
                    result.pop("latencies_us")
                    periods = max(after[0] - before[0], 1)
                    result["throttled_share"] = (after[1] - before[1]) / periods
                    result["throttled_s"] = after[2] - before[2]
                    runs.setdefault((name, conns), []).append(result)
                    print(f"{name}, {conns} conns, round {r + 1}: {result['rate']:.1f} img/s, p50 "
                          f"{result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, throttled in "
                          f"{result['throttled_share']:.0%} of the periods ({result['throttled_s']:.1f} s)", flush=True)
    print(f"\nAlexNet, each server in a cgroup of {args.quota:g} CPU(s) on a {servers.cpu_count_of(None)}-CPU machine, "
          f"{args.rounds} rounds; medians (runs)\n")
    print("| conns | setup | img/s | p50 ms | p99 ms | periods throttled | s throttled a run "
          "| quota-sized / this, per round |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for conns in sorted({c for _, c in runs}):
        for name in up:
            rs = runs[(name, conns)]
            ratio = ""
            if name != SIZED:
                per_round = sorted(a["rate"] / b["rate"] for a, b in zip(runs[(SIZED, conns)], rs, strict=True))
                ratio = f"{statistics.median(per_round):.2f}× ({per_round[0]:.2f}–{per_round[-1]:.2f})"
            each = " / ".join(f"{x['rate']:.1f}" for x in rs)
            print(f"| {conns} | {name} | {statistics.median(x['rate'] for x in rs):.1f} ({each}) "
                  f"| {statistics.median(x['p50_ms'] for x in rs):.1f} "
                  f"| {statistics.median(x['p99_ms'] for x in rs):.1f} "
                  f"| {statistics.median(x['throttled_share'] for x in rs):.0%} "
                  f"| {statistics.median(x['throttled_s'] for x in rs):.1f} | {ratio} |")
    print("\nresident memory of the workers, MiB, after warm-up: "
          + "; ".join(f"{name}: {' + '.join(map(str, mib))}" for name, mib in memory.items()))
    if args.json:
        args.json.write_text(json.dumps({"runs": {f"{n} @ {c}": v for (n, c), v in runs.items()},
                                         "memory_mib": memory}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
