"""Soak: a long run at ~80% of measured capacity, good and bad uploads on both models; statuses, RSS and p99 watched.

    python -m loadtests.soak --duration 600 --write docs/soak.md     # what `make soak` runs (10 min)
    python -m loadtests.soak --duration 30                           # the short version tests/test_soak.py runs

Capacity is measured first (closed loop, `--probe-clients` clients for `--probe-seconds`), then requests are sent
open-loop at `--load` × that rate. Every request has one expected status (200 for a good image, the documented
4xx for each bad one, or 503 server_busy + Retry-After when shedding); anything else is "unexpected". Each window
records p99 of the good requests and every worker's RSS. Exit 1 on an unexpected status.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
import imagegen  # noqa: E402
from serverproc import started_server, worker_pids  # noqa: E402

MIB = 1 << 20
MAX_IN_FLIGHT = 32  # requests the soak client has outstanding at most; beyond, a due request is counted "not sent"
DIGIT = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
PHOTO = (REPO_ROOT / "examples" / "grace_hopper.jpg").read_bytes()


@dataclass(frozen=True)
class Upload:
    name: str
    model: str
    data: bytes
    content_type: str
    expected: int  # the status this upload must get (besides 503 server_busy, always allowed)
    params: dict = field(default_factory=dict)


def mix() -> list[Upload]:
    """Mostly good uploads on both models, one in four bad in a documented way."""
    good = [Upload("photo", "alexnet", PHOTO, "image/jpeg", 200), Upload("digit", "lenet5", DIGIT, "image/png", 200),
            Upload("photo-png", "alexnet", imagegen.photo(640, 480, fmt="PNG"), "image/png", 200),
            Upload("digit-photo", "lenet5", imagegen.drawn_digit_one(), "image/png", 200),
            Upload("cmyk", "alexnet", imagegen.cmyk_jpeg(), "image/jpeg", 200),
            Upload("16-bit", "lenet5", imagegen.sixteen_bit_png(), "image/png", 200)]
    bad = [Upload("not-an-image", "alexnet", imagegen.random_bytes(), "image/jpeg", 400),
           Upload("truncated", "lenet5", imagegen.truncated_jpeg(), "image/jpeg", 400),
           Upload("bomb", "alexnet", imagegen.huge_dimension_png(), "image/png", 413),
           Upload("unknown-model", "resnet", DIGIT, "image/png", 422),
           Upload("top_k-0", "lenet5", DIGIT, "image/png", 422, {"top_k": "0"}),
           Upload("text", "alexnet", b"hello", "text/plain", 415)]
    return good * 3 + bad  # 18 good : 6 bad


def send(client: httpx.Client, base: str, u: Upload) -> tuple[str, int, float, bool]:
    """(name, status, seconds, expected?)"""
    t0 = time.perf_counter()
    try:
        r = client.post(f"{base}/classify", params={"model": u.model, **u.params},
                        files={"image": (u.name, u.data, u.content_type)})
    except httpx.HTTPError:
        return u.name, 0, time.perf_counter() - t0, False
    ok = r.status_code == u.expected or (r.status_code == 503 and r.json().get("error") == "server_busy"
                                         and "retry-after" in r.headers)
    return u.name, r.status_code, time.perf_counter() - t0, ok


def probe_capacity(base: str, uploads: list[Upload], clients: int, seconds: float) -> float:
    """Requests per second the server sustains with `clients` back-to-back clients, in the mix's proportions.

    The clients take the next upload from one shared sequence, as the open loop does. Were each client to walk its
    own stride of the list, the clients with cheap uploads (digits, refusals) would run many more of them than the
    mix has, and the capacity would be that of a cheaper mix: the open loop then could not keep up with 80% of it."""
    stop = time.monotonic() + seconds
    sequence, done = itertools.count(), itertools.count()  # next() on either is atomic under the GIL

    def loop() -> None:
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                send(c, base, uploads[next(sequence) % len(uploads)])
                next(done)

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    return next(done) / (time.monotonic() - t0)


def soak(base: str, proc, uploads: list[Upload], rate: float, duration: float, window: float) -> list[dict]:
    """Open loop at `rate` req/s for `duration` s; one summary dict per `window` seconds."""
    windows: list[dict] = []
    results: list[tuple[str, int, float, bool]] = []
    lock = threading.Lock()
    local = threading.local()

    in_flight, skipped = [0], [0]

    def one(u: Upload) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
        try:
            res = send(local.client, base, u)
        finally:
            with lock:
                in_flight[0] -= 1
        with lock:
            results.append(res)

    start = time.monotonic()
    next_window = start + window
    with ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT) as pool:
        i = 0
        while (now := time.monotonic()) < start + duration:
            due = start + i / rate
            if due > now:
                time.sleep(min(due - now, max(0.0, next_window - now)))
            else:
                with lock:  # the client side never queues more than its threads can send: a bounded run
                    full = in_flight[0] >= MAX_IN_FLIGHT
                    in_flight[0] += 0 if full else 1
                if full:
                    skipped[0] += 1
                else:
                    pool.submit(one, uploads[i % len(uploads)])
                i += 1
            if time.monotonic() >= next_window:
                with lock:
                    batch, results[:] = list(results), []
                windows.append({**summarise(batch, proc, time.monotonic() - start), "not_sent": skipped[0]})
                skipped[0] = 0
                next_window += window
    with lock:
        if results:
            windows.append({**summarise(results, proc, time.monotonic() - start), "not_sent": skipped[0]})
    return windows


def summarise(batch: list[tuple[str, int, float, bool]], proc, at: float) -> dict:
    import psutil

    good = [s for name, status, s, ok in batch if status == 200]
    rss = {}
    for name, pid in worker_pids(proc).items():
        try:
            rss[name] = psutil.Process(pid).memory_info().rss / MIB
        except psutil.Error:
            pass
    statuses: dict[int, int] = {}
    for _, status, _, _ in batch:
        statuses[status] = statuses.get(status, 0) + 1
    return {"t": round(at), "requests": len(batch), "unexpected": sum(not ok for *_, ok in batch),
            "unexpected_examples": sorted({f"{n}->{s}" for n, s, _, ok in batch if not ok})[:5],
            "statuses": statuses, "p50_ms": float(np.percentile(good, 50) * 1e3) if good else None,
            "p99_ms": float(np.percentile(good, 99) * 1e3) if good else None, "rss_mib": rss}


def report(capacity: float, rate: float, windows: list[dict]) -> str:
    names = sorted({n for w in windows for n in w["rss_mib"]})
    lines = [f"capacity (closed loop) {capacity:.1f} req/s; sent open-loop at {rate:.1f} req/s", "",
             "| t (s) | requests | not sent | unexpected | p50 ms | p99 ms | "
             + " | ".join(f"RSS {n} MiB" for n in names) + " |", "|---" * (6 + len(names)) + "|"]
    for w in windows:
        p50 = f"{w['p50_ms']:.0f}" if w["p50_ms"] is not None else "-"
        p99 = f"{w['p99_ms']:.0f}" if w["p99_ms"] is not None else "-"
        lines.append(f"| {w['t']} | {w['requests']} | {w['not_sent']} | {w['unexpected']} | {p50} | {p99} | "
                     + " | ".join(f"{w['rss_mib'].get(n, 0):.0f}" for n in names) + " |")
    return "\n".join(lines)


def run(duration: float, load: float = 0.8, window: float = 30.0, probe_clients: int = 4,
        probe_seconds: float = 20.0) -> tuple[float, float, list[dict]]:
    uploads = mix()
    with started_server() as (base, proc):
        probe_capacity(base, uploads, 1, 3)  # warm-up
        capacity = probe_capacity(base, uploads, probe_clients, probe_seconds)
        rate = max(0.5, load * capacity)
        return capacity, rate, soak(base, proc, uploads, rate, duration, window)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity")
    p.add_argument("--window", type=float, default=30)
    p.add_argument("--write", type=Path, help="a Markdown file for the result table (e.g. docs/soak.md)")
    args = p.parse_args()
    capacity, rate, windows = run(args.duration, args.load, args.window)
    table = report(capacity, rate, windows)
    print(table)
    if args.write:
        args.write.write_text("# Soak result\n\nWritten by `make soak` (`python -m loadtests.soak --duration "
                              f"{args.duration:.0f} --write {args.write}`): good and bad uploads on both models at "
                              f"{args.load:.0%} of the capacity measured first, on this machine.\n\n{table}\n")
    return 1 if any(w["unexpected"] for w in windows) else 0


if __name__ == "__main__":
    sys.exit(main())
