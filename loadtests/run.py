"""Headless load tests with SLO gates: "how much traffic can this take, and where does it break?"

One bounded run against a service (started here on a free 127.0.0.1 port with --start-server, or at --host), with
Locust's CSV and HTML report kept in a results folder and the SLOs checked at the end:

    python -m loadtests.run --start-server --users 8 --spawn-rate 4 --run-time 60s \\
        --max-failure-ratio 0 --p95-ms 1500 --p99-ms 3000 --min-rps 5

A concurrency sweep (one bounded step per level; batching only shows under concurrency):

    python -m loadtests.run --start-server --sweep 1,2,4,8,16,32,64 --step-time 20s --max-failure-ratio 0

Re-check the SLOs of an earlier run without sending any traffic:

    python -m loadtests.run --check results/loadtest-20261124-140000 --p99-ms 500

Exit status: 0 when every objective is met, 1 when one is missed (a table says which), 2 on a usage or start error.
On a 2-core machine, pin the two sides apart: --server-cpus 1 --locust-cpus 0.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import httpx

from loadtests import servers
from loadtests.slo import Slo, Stats, check, misses_table, read_stats, stats_table, table

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
STATS_PREFIX = "locust"  # → locust_stats.csv, locust_failures.csv, locust_exceptions.csv, locust_stats_history.csv
FINAL_STATS = f"{STATS_PREFIX}_final_stats.csv"  # written by the locustfile at exit: the exact end-of-run numbers
MAX_RUN_SECONDS = 4 * 3600


def parse_duration(text: str) -> int:
    """Locust's time strings ("15s", "2m", "1h30m", or plain seconds) → seconds; must be > 0 and bounded."""
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    else:
        parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
        if not parts or not any(parts.groups()):
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 15s, 2m, 1h30m)")
        h, m, s = (int(g or 0) for g in parts.groups())
        seconds = h * 3600 + m * 60 + s
    if not 0 < seconds <= MAX_RUN_SECONDS:
        raise argparse.ArgumentTypeError(f"duration must be between 1 s and {MAX_RUN_SECONDS} s, got {text!r}")
    return seconds


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep takes user counts like 1,2,4,8, not {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("--sweep needs at least one user count >= 1")
    return levels


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--server-env takes KEY=VALUE, not {item!r}")
        env[key] = value
    return env


def run_locust(host: str, users: int, spawn_rate: float, seconds: int, out_dir: Path, models: str,
               think_time: float = 0.0, cpus: str | None = None) -> dict[str, Stats]:
    """One headless Locust run; its CSV files, HTML report and log land in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
           "-u", str(users), "-r", str(spawn_rate), "-t", f"{seconds}s", "--stop-timeout", "10",
           "--csv", str(out_dir / STATS_PREFIX), "--html", str(out_dir / "report.html"), "--only-summary",
           "--exit-code-on-error", "0", "--loglevel", "WARNING", "--models", models, "--think-time", str(think_time)]
    with open(out_dir / "locust.log", "wb") as log:
        # Bounded even if Locust hangs: its run time, its stop timeout, and start-up slack.
        proc = subprocess.run(servers.pinned(cmd, cpus), cwd=servers.REPO_ROOT, env=servers.base_env(),
                              stdout=log, stderr=subprocess.STDOUT, timeout=seconds + 90)
    stats_csv = out_dir / FINAL_STATS
    if proc.returncode != 0 or not stats_csv.is_file():
        tail = (out_dir / "locust.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"locust exited with {proc.returncode} (log: {out_dir / 'locust.log'}):\n{tail}")
    if "CPU usage" in (out_dir / "locust.log").read_text(errors="replace"):
        # Locust logs this when its own process was saturated: the numbers then measure the client, not the server.
        print(f"WARNING: Locust's CPU was saturated during this run ({out_dir / 'locust.log'}): the load generator, "
              "not the service, may have been the limit; pin it apart (--locust-cpus) or use fewer users", flush=True)
    return read_stats(stats_csv)


def report_single(stats: dict[str, Stats], slo: Slo, out_dir: Path, verdict_file: str = "slo.json") -> int:
    print(stats_table(stats))
    misses = check(stats["Aggregated"], slo)
    (out_dir / verdict_file).write_text(json.dumps({"slo": asdict(slo), "aggregated": asdict(stats["Aggregated"]),
                                                  "misses": [asdict(m) for m in misses]}, indent=2) + "\n")
    print(f"\nresults: {out_dir}  ({FINAL_STATS}, locust_failures.csv, report.html, {verdict_file})")
    if misses:
        print("\nSLO MISSED\n" + misses_table(misses))
        return 1
    print("\nall SLOs met" if not slo.is_empty() else "\nno SLO given")
    return 0


def sweep(host: str, levels: list[int], seconds: int, out_dir: Path, slo: Slo, models: str, think_time: float,
          cpus: str | None) -> int:
    rows, records, first_miss = [], [], None
    for users in levels:
        stats = run_locust(host, users, users, seconds, out_dir / f"users-{users:03d}", models, think_time, cpus)
        total = stats["Aggregated"]
        misses = check(total, slo)
        if misses and first_miss is None:
            first_miss = users
        verdict = "ok" if not misses else "MISS: " + "; ".join(f"{m.objective} {m.measured}" for m in misses)
        rows.append([str(users), f"{total.rps:.2f}", f"{total.p50_ms:g}", f"{total.p95_ms:g}", f"{total.p99_ms:g}",
                     f"{total.failures}/{total.requests}", verdict])
        records.append({"users": users, **asdict(total), "misses": [asdict(m) for m in misses]})
        print(f"users={users}: {total.rps:.2f} req/s, p50 {total.p50_ms:g} ms, p99 {total.p99_ms:g} ms, "
              f"{total.failures} failures", flush=True)
    text = table(["users", "req/s", "p50 ms", "p95 ms", "p99 ms", "failed", "SLO"], rows)
    print("\n" + text)
    (out_dir / "sweep.txt").write_text(text + "\n")
    (out_dir / "sweep.json").write_text(json.dumps({"slo": asdict(slo), "levels": records}, indent=2) + "\n")
    print(f"\nresults: {out_dir}  (sweep.txt, sweep.json, users-NNN/ with each step's CSV and HTML report)")
    if first_miss is not None:
        print(f"\nSLO first missed at {first_miss} users")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--host", help="base URL of a running service (default http://127.0.0.1:3000)")
    target.add_argument("--start-server", action="store_true",
                        help="start `bentoml serve serving.service:Convnet` on a free 127.0.0.1 port for this run")
    target.add_argument("--check", type=Path, metavar="RESULTS_DIR",
                        help="only check the SLOs against an earlier run's results folder; sends no traffic")
    p.add_argument("--models", default="alexnet,lenet5", help="models to send traffic to (and serve)")
    p.add_argument("--users", type=int, default=8, help="concurrent users (default 8)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    p.add_argument("--run-time", type=parse_duration, default=parse_duration("30s"),
                   help="how long the load lasts, e.g. 15s, 2m (default 30s; always bounded)")
    p.add_argument("--sweep", type=parse_levels, metavar="1,2,4,...",
                   help="run one step per user count instead of a single run")
    p.add_argument("--step-time", type=parse_duration, default=parse_duration("20s"),
                   help="duration of each sweep step (default 20s)")
    p.add_argument("--think-time", type=float, default=0.0, help="max seconds a user waits between requests")
    p.add_argument("--results", type=Path, help="results folder (default results/loadtest-<UTC time>)")
    p.add_argument("--max-failure-ratio", type=float, help="SLO: failed / all requests, e.g. 0 or 0.001")
    p.add_argument("--p95-ms", type=float, help="SLO: 95th percentile latency in ms")
    p.add_argument("--p99-ms", type=float, help="SLO: 99th percentile latency in ms")
    p.add_argument("--min-rps", type=float, help="SLO: minimum requests per second")
    p.add_argument("--server-cpus", help="taskset CPU list for the started server, e.g. 1")
    p.add_argument("--locust-cpus", help="taskset CPU list for Locust, e.g. 0")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the started server (CONVNET_* tunables); repeatable")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    slo = Slo(args.max_failure_ratio, args.p95_ms, args.p99_ms, args.min_rps)
    if args.check:
        stats_csv = args.check / FINAL_STATS
        if not stats_csv.is_file():
            parser.error(f"{stats_csv} does not exist")
        return report_single(read_stats(stats_csv), slo, args.check, verdict_file="slo-check.json")
    if args.users < 1:
        parser.error("--users must be >= 1")
    try:
        server_env = parse_env(args.server_env)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    out_dir = args.results or servers.REPO_ROOT / "results" / time.strftime("loadtest-%Y%m%d-%H%M%S", time.gmtime())
    out_dir.mkdir(parents=True, exist_ok=True)
    models = ",".join(m for m in args.models.split(",") if m)
    with ExitStack() as stack:
        if args.start_server:
            print(f"starting the service ({models}) ...", flush=True)
            try:
                server = stack.enter_context(servers.service(models.split(","), server_env, args.server_cpus,
                                                             log_dir=out_dir))
            except (RuntimeError, TimeoutError) as e:
                print(f"the service did not start: {e}", file=sys.stderr)
                return 2
            host = server.url
            print(f"service ready at {host} in {server.ready_seconds:.1f}s (log: {server.log_path})", flush=True)
        else:
            host = (args.host or "http://127.0.0.1:3000").rstrip("/")
            try:
                httpx.get(f"{host}/readyz", timeout=5.0).raise_for_status()
            except httpx.HTTPError as e:
                print(f"{host} is not ready ({e}); start it or use --start-server", file=sys.stderr)
                return 2
        if args.sweep:
            return sweep(host, args.sweep, args.step_time, out_dir, slo, models, args.think_time, args.locust_cpus)
        spawn_rate = args.spawn_rate or args.users
        print(f"{args.users} users for {args.run_time}s against {host} ...", flush=True)
        stats = run_locust(host, args.users, spawn_rate, args.run_time, out_dir, models, args.think_time,
                           args.locust_cpus)
        return report_single(stats, slo, out_dir)


if __name__ == "__main__":
    sys.exit(main())
