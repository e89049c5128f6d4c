"""A container's CPU quota, measured: the service sized for its quota against the service sized for the machine.

    python -m loadtests.quota_cost [--quota 1] [--as-if 2,8] [--connections 1,4,32] [--rounds 3] [--seconds 8]

Each server runs in a real cgroup of its own whose CFS quota allows `--quota` CPUs (what `docker run --cpus 1` or a
pod's CPU limit sets; serverproc.cpu_quota_cgroup, needs root). One sizes itself as it ships (serving/cgroups.py reads
the quota); the others as they did before, for all the machine's CPUs, which `--as-if N` imitates with CONVNET_CPUS=N
(N = this machine's CPUs is exactly the old behaviour here; a larger N is a larger host's). AlexNet, JPEG photos as
raw bodies, wrk unpinned outside the cgroups. The servers are up at once, each frozen (SIGSTOP) while another is
measured, in rounds whose order reverses every other round, as in `make bench`. Prints each one's median rate,
latencies, the share of the quota's periods in which it was throttled (stopped until the next period) and the time
it spent so, per run; the ratio of the quota-sized service's rate to each other's, within each round; memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from loadtests import servers
from loadtests.images import build_pool, for_model, write_pool
from loadtests.rounds import in_rounds, memory_and_runs, rss_mib, table

sys.path.insert(0, str(servers.REPO_ROOT / "tests"))
from serverproc import cgroup_throttling, cpu_quota_cgroup  # noqa: E402

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
    with ExitStack() as stack:
        up, cgroups = {}, {}
        for i, (name, env) in enumerate(setups.items()):
            cgroups[name] = stack.enter_context(cpu_quota_cgroup(args.quota, f"s{i}"))
            up[name] = stack.enter_context(servers.service(["alexnet"], env={"CONVNET_DEVICE": "cpu", **env},
                                                           cgroup=cgroups[name]))
            servers.freeze(up[name])
        memory = {name: rss_mib(server) for name, server in up.items()}

        def throttling(name: str):
            before = cgroup_throttling(cgroups[name])

            def during() -> dict:
                after = cgroup_throttling(cgroups[name])
                return {"throttled_share": (after[1] - before[1]) / max(after[0] - before[0], 1),
                        "throttled_s": after[2] - before[2]}
            return during

        runs = in_rounds(up, files, [int(c) for c in args.connections.split(",")], args.rounds, args.seconds,
                         observe=throttling, describe=lambda run: f", throttled in {run['throttled_share']:.0%} of "
                         f"the periods ({run['throttled_s']:.1f} s)")
    print(f"\nAlexNet, each server in a cgroup of {args.quota:g} CPU(s) on a {servers.cpu_count_of(None)}-CPU machine, "
          f"{args.rounds} rounds; medians (runs)\n")
    print(table(runs, list(up), SIZED, "quota-sized / this, per round", reference_over_row=True,
                columns={"periods throttled": lambda rs: f"{statistics.median(x['throttled_share'] for x in rs):.0%}",
                 "s throttled a run": lambda rs: f"{statistics.median(x['throttled_s'] for x in rs):.1f}"}))
    memory_and_runs(runs, memory, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
