"""Servers measured side by side, for the scripts that compare settings of the service (borrow_cost, quota_cost).

All the servers are up at once, each frozen (SIGSTOP) while another is measured, in rounds whose order reverses every
other round, as in `make bench`: so every pair compared ran under the same machine weather. AlexNet photos as raw
bodies, wrk unpinned. Ratios are taken within each round, then summarised as their median (lowest–highest).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

from loadtests import servers
from loadtests.bench import ratio_text, run_ratios, run_wrk

PATH = "/classify?model=alexnet"
Runs = dict[tuple[str, int], list[dict]]
# Called before a counted run with the server's name; what it returns is called after the run and returns fields to
# add to the run's record (e.g. how long a cgroup was throttled meanwhile).
Observer = Callable[[str], Callable[[], dict]]


def rss_mib(server: servers.Server) -> list[int]:
    """The resident memory of each process under the server's arbiter (its workers), MiB."""
    return sorted(int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 >> 20
                  for pid in servers.process_tree(server.proc.pid)[1:])


def in_rounds(up: dict[str, servers.Server], files: list[Path], connections: list[int], rounds: int, seconds: int,
              observe: Observer | None = None, describe: Callable[[dict], str] = lambda run: "") -> Runs:
    """Each server's runs at each number of connections (runs at 32 or more last twice `seconds`), in rounds; a 3-s
    warm-up before each counted run. The servers must be frozen when called; they are left frozen."""
    runs: Runs = {}
    for conns in connections:
        length = seconds * (2 if conns >= 32 else 1)
        for r in range(rounds):
            for name in (list(up) if r % 2 == 0 else list(reversed(up))):
                with servers.awake(up[name]) as server:
                    run_wrk(server.url, PATH, "image/jpeg", files, conns, 3, None)  # warm-up, not counted
                    finish = observe(name) if observe else dict
                    result = run_wrk(server.url, PATH, "image/jpeg", files, conns, length, None)
                    result.update(finish())
                result.pop("latencies_us")
                runs.setdefault((name, conns), []).append(result)
                print(f"{name}, {conns} conns, round {r + 1}: {result['rate']:.1f} img/s, p50 {result['p50_ms']:.1f} "
                      f"ms, p99 {result['p99_ms']:.1f} ms{describe(result)}", flush=True)
    return runs


def table(runs: Runs, names: list[str], reference: str, ratio_title: str, reference_over_row: bool = False,
          columns: dict[str, Callable[[list[dict]], str]] | None = None, compared: list[str] | None = None) -> str:
    """A Markdown table of medians (and each run's rate) per number of connections and server, with the ratio of
    each `compared` server's rate (default: all but the reference) to the reference's in the same round (or the
    reference's to its, `reference_over_row`), and any further `columns`."""
    columns = columns or {}
    compared = [n for n in names if n != reference] if compared is None else compared
    lines = ["| conns | setup | img/s | p50 ms | p99 ms | " + "".join(f"{c} | " for c in columns) + ratio_title + " |",
             "|---:|---|---:|---:|---:|" + "---:|" * len(columns) + "---|"]
    for conns in sorted({c for _, c in runs}):
        for name in names:
            rs = runs[(name, conns)]
            shown = ""
            if name in compared:
                rates, reference_rates = [x["rate"] for x in rs], [x["rate"] for x in runs[(reference, conns)]]
                shown = ratio_text(run_ratios(reference_rates, rates) if reference_over_row
                                   else run_ratios(rates, reference_rates))
            each = " / ".join(f"{x['rate']:.1f}" for x in rs)
            lines.append(f"| {conns} | {name} | {statistics.median(x['rate'] for x in rs):.1f} ({each}) "
                         f"| {statistics.median(x['p50_ms'] for x in rs):.1f} "
                         f"| {statistics.median(x['p99_ms'] for x in rs):.1f} | "
                         + "".join(f"{column(rs)} | " for column in columns.values()) + f"{shown} |")
    return "\n".join(lines)


def memory_and_runs(runs: Runs, memory: dict[str, list[int]], json_path: Path | None) -> None:
    """Print the servers' memory (rss_mib of each, taken after warm-up); write every run to `json_path` if given."""
    print("\nresident memory of the workers, MiB, after warm-up: "
          + "; ".join(f"{name}: {' + '.join(map(str, mib))}" for name, mib in memory.items()))
    if json_path:
        json_path.write_text(json.dumps({"runs": {f"{n} @ {c}": v for (n, c), v in runs.items()},
                                         "memory_mib": memory}, indent=1))
