"""The benchmark harness behind `make bench`: every number in docs/benchmarks.md, measured in one run.

    python -m loadtests.bench                      # ~15 min on 2 cores; writes docs/benchmarks.md
    python -m loadtests.bench --quick              # 1 repeat, short runs: a smoke test of the harness
    python -m loadtests.bench --server-cpus 0-1 --client-cpus 0-1 --out /tmp/unpinned.md

What it measures, all on the same machine, each run bounded and repeated (medians reported):

1. onnxruntime in process, per model, at batch 1 / 8 / 32, on pre-processed uint8 input: the model's own limit,
   pinned to the server's cores with as many intra-op threads as the server gets (the honest denominator);
   plus decode + preprocess + onnxruntime per image in one thread. THE LIMIT for uploads: decode + preprocess of
   32 uploads in one thread, then one onnxruntime call on them, sampled by a child that keeps the models loaded
   (LimitProbe) before and after every round of (2)-(3b) and around (5).
2. the service (`bentoml serve`) at saturation with real uploads: JPEG photos for AlexNet, PNG digits for LeNet-5,
   as raw bodies and as multipart (`curl -F`), and its garbage-collector pauses under that load (its /metrics).
3. a naive Starlette app (loadtests/baselines/naive_app.py): one decode + one onnxruntime call per request;
   3b. LitServe (loadtests/baselines/litserve_app.py), the peer: batch 32, 5 ms batch timeout, fast_queue, our decode,
   multipart uploads (LitServe reads form or JSON bodies, not raw ones).
   (2), (3) and (3b) are up at once and measured in rounds, side by side (load_runs); every ratio between them is
   taken within a round, so a machine whose speed drifts during the benchmark does not decide it.
   2c. multipart against raw bodies on the service alone, in many short turns that alternate (multipart_vs_raw):
   the two differ by a per cent or two, less than (2)'s rounds of 8 s vary by, so they get a finer A/B of their own.
   2d. the service against the naive app the same way (service_vs_naive), raw bodies: LeNet-5's rounds of (2)-(3)
   spread 0.93-1.55x on this machine, wider than the 1.2x goal they judge.
4. a bare Starlette "hello" endpoint (loadtests/baselines/hello_app.py): the HTTP ceiling for LeNet-5's requests/s.
5. the batch CLI over a folder of JPEGs (loadtests/batch_bench.py, owned by the batch CLI).
6. the Open Inference Protocol (loadtests/v2_cost.py): server CPU per image of /classify vs v2 with encoded images
   (BYTES) vs v2 with the model's own uint8 tensor (decoded by the client), on the same service.

The load generator is wrk (C, epoll; `apt-get install wrk`) with loadtests/wrk_post.lua: one thread pinned to the
client cores, far lighter than Python generators, so on a 2-core box the server keeps its core to itself. wrk is a
closed loop, and it corrects its latencies for coordinated omission: a response slower than twice a connection's mean
interval adds the samples a client keeping that pace would have waited for (wrk 4's stats_correct). Both are
reported: p50/p99 of the answered requests as they were (`undo_wrk_correction` recovers them exactly from the
histogram wrk_post.lua writes) and wrk's corrected ones, which show what a stall costs the requests behind it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from itertools import pairwise
from pathlib import Path

import httpx

from loadtests import servers, v2_cost
from loadtests.contract import check_predictions
from loadtests.images import build_pool, for_model, write_pool
from serving.config import ServiceConfig, parallelism
from serving.threads import DECODE_THREADS, INFER_THREADS

try:  # the load group has it; a GPU machine running only run_wrk (scripts/gpu_check.py) may not
    LITSERVE_VERSION = version("litserve")
except PackageNotFoundError:
    LITSERVE_VERSION = "not installed"
REPO_ROOT = servers.REPO_ROOT
V2_IMAGES = {"alexnet": REPO_ROOT / "examples" / "grace_hopper.jpg", "lenet5": REPO_ROOT / "examples" / "digit-7.png"}
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
BATCH_BENCH = Path(__file__).resolve().parent / "batch_bench.py"
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks.md"
# Everything from this line to the end of the report is written by people and kept when the report is regenerated.
NOTES_MARKER = "<!-- Notes: everything below this line is kept when `make bench` rewrites this file. -->"
ORT_BATCHES = (1, 8, 32)
LIMIT_BATCH = 32  # the in-process limit for uploads: decode then onnxruntime at this batch size
TOP_K = {"alexnet": 5, "lenet5": 3}


@dataclass
class Row:
    section: str  # "1" … "5"
    what: str
    model: str
    setup: str
    runs: list[float]  # images/s (or requests/s) of each repeat
    unit: str = "img/s"
    p50_ms: list[float] = field(default_factory=list)  # of the answered requests, as they were
    p99_ms: list[float] = field(default_factory=list)
    p50_co_ms: list[float] = field(default_factory=list)  # wrk's, corrected for coordinated omission
    p99_co_ms: list[float] = field(default_factory=list)
    per_cpu_s: list[float] = field(default_factory=list)  # images (answers) per CPU second of the process(es)
    # the service's: per run, CPU ms per answer by kind of thread (`cpu_split`): where an image's CPU goes
    cpu_split: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0
    ratio: str = ""
    limit: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")


def median_or_blank(values: list[float], fmt: str = "{:.0f}") -> str:
    return fmt.format(statistics.median(values)) if values else ""


def tail_text(p50_ms: list[float], p99_ms: list[float]) -> str:
    """p99/p50 of the medians, with both: "1.27 (72.4 / 92.2 ms)"."""
    p50, p99 = statistics.median(p50_ms), statistics.median(p99_ms)
    return f"{p99 / p50:.2f} ({p50:.1f} / {p99:.1f} ms)"


# ---------------------------------------------------------------------------------------------------------------
# 1. onnxruntime in process (runs in a pinned child: `python -m loadtests.bench _ort ...`)


def ort_child(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench _ort")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=Path, required=True, help="folder of the model's images")
    a = p.parse_args(argv)
    import numpy as np

    from serving.preprocess import preprocess_bytes, stack_batch
    from serving.registry import DEFAULT_MODELS_DIR, load_model

    model = load_model(DEFAULT_MODELS_DIR / a.model, device="cpu", threads=a.threads)
    files = sorted(a.images.iterdir())
    blobs = [f.read_bytes() for f in files]
    arrays = [preprocess_bytes(b, model.recipe) for b in blobs]

    out = {"model": a.model, "threads": a.threads, "affinity": sorted(os.sched_getaffinity(0)), "batches": {},
           "batches_cpu": {}}
    for b in (int(x) for x in a.batches.split(",")):
        batch = stack_batch([arrays[i % len(arrays)] for i in range(b)])
        runs = [timed_rate(lambda batch=batch: model.logits(batch), b, a.seconds) for _ in range(a.repeats)]
        out["batches"][str(b)], out["batches_cpu"][str(b)] = [r[0] for r in runs], [r[1] for r in runs]
    cursor = iter(range(1 << 62))

    def pipeline_step() -> None:
        blob = blobs[next(cursor) % len(blobs)]
        model.logits(np.expand_dims(preprocess_bytes(blob, model.recipe), 0))

    runs = [timed_rate(pipeline_step, 1, a.seconds) for _ in range(a.repeats)]
    out["pipeline_b1"], out["pipeline_b1_cpu"] = [r[0] for r in runs], [r[1] for r in runs]
    print(json.dumps(out))


def timed_rate(step, per_call: int, seconds: float) -> tuple[float, float]:
    """Call `step` (after one uncounted warm-up call) for at least `seconds` and 3 calls: (images per wall second,
    images per CPU second of this process). The second is what the work costs whatever else the machine runs, the
    first what it delivered in this moment."""
    step()
    calls, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while True:
        step()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= 3:
            return calls * per_call / elapsed, calls * per_call / max(time.process_time() - cpu0, 1e-9)


def limit_child(argv: list[str]) -> None:
    """The in-process limit on demand: loads the models once, then for each model name read on stdin decodes and
    preprocesses LIMIT_BATCH uploads in one thread and runs one onnxruntime call on them, for `--seconds`, and
    answers a JSON line. Idle, it blocks on stdin and takes no CPU from the servers beside it."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench _limit")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("images", nargs="+", help="MODEL=FOLDER of that model's uploads")
    a = p.parse_args(argv)
    from serving.preprocess import preprocess_bytes, stack_batch
    from serving.registry import DEFAULT_MODELS_DIR, load_model

    steps = {}
    for spec in a.images:
        name, folder = spec.split("=", 1)
        model = load_model(DEFAULT_MODELS_DIR / name, device="cpu", threads=a.threads)
        blobs = [f.read_bytes() for f in sorted(Path(folder).iterdir())]

        def step(model=model, blobs=blobs, cursor=iter(range(1 << 62))) -> None:
            t0 = time.thread_time()
            batch = stack_batch([preprocess_bytes(blobs[next(cursor) % len(blobs)], model.recipe)
                                 for _ in range(LIMIT_BATCH)])
            t1, p1 = time.thread_time(), time.process_time()  # onnxruntime's own threads, where it has them, too
            model.logits(batch)
            split["decode"] += t1 - t0
            split["onnxruntime"] += time.process_time() - p1
            split["images"] += LIMIT_BATCH

        steps[name] = step
    split = {"decode": 0.0, "onnxruntime": 0.0, "images": 0}
    for line in sys.stdin:
        split.update(decode=0.0, onnxruntime=0.0, images=0)
        wall, cpu = timed_rate(steps[line.strip()], LIMIT_BATCH, a.seconds)
        n = split["images"]
        print(json.dumps({"rate": wall, "cpu_rate": cpu, "decode_ms": split["decode"] * 1000 / n,
                          "onnxruntime_ms": split["onnxruntime"] * 1000 / n}), flush=True)


class LimitProbe:
    """The in-process limit (1), sampled on demand by a pinned child that keeps the models loaded (`_limit`): each
    HTTP run is divided by the samples taken just before and just after its round, so a machine whose speed drifts
    during the benchmark moves numerator and denominator together."""

    def __init__(self, image_dirs: dict[str, Path], models: list[str], cpus: str | None, threads: int,
                 seconds: float, log: Path) -> None:
        cmd = [sys.executable, "-m", "loadtests.bench", "_limit", "--threads", str(threads), "--seconds", str(seconds),
               *(f"{m}={image_dirs[m]}" for m in models)]
        self.log = log.open("w")
        self.proc = subprocess.Popen(servers.pinned(cmd, cpus), cwd=REPO_ROOT, env=servers.base_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)
        self.samples: dict[str, list[tuple[float, float]]] = {m: [] for m in models}  # (img/s, img per CPU-s)
        self.splits: dict[str, list[tuple[float, float]]] = {m: [] for m in models}  # CPU ms an image: decode, ORT

    def sample(self, model: str) -> float:
        self.proc.stdin.write(model + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the in-process limit child exited ({self.proc.wait()}); see {self.log.name}")
        r = json.loads(line)
        self.samples[model].append((r["rate"], r["cpu_rate"]))
        self.splits[model].append((r["decode_ms"], r["onnxruntime_ms"]))
        return r["rate"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def measure_ort(model: str, images: Path, cpus: str | None, threads: int, seconds: float, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "loadtests.bench", "_ort", "--model", model, "--threads", str(threads),
           "--batches", ",".join(map(str, ORT_BATCHES)), "--seconds", str(seconds), "--repeats", str(repeats),
           "--images", str(images)]
    budget = 60 + repeats * (len(ORT_BATCHES) + 2) * (seconds + 30)
    proc = subprocess.run(servers.pinned(cmd, cpus), cwd=REPO_ROOT, env=servers.base_env(), capture_output=True,
                          text=True, timeout=budget)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process onnxruntime benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# 2-4. HTTP under wrk


def wrk_version() -> str:
    if shutil.which("wrk") is None:
        return ""
    proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (proc.stdout + proc.stderr).split("Copyright")[0].strip()


def run_wrk(url: str, path: str, content_type: str, files: list[Path], connections: int, seconds: int,
            cpus: str | None, multipart: bool = False) -> dict:
    """One wrk run (one thread, `connections` keep-alive connections) POSTing the files in turn, as raw bodies or as
    the multipart field `image`."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(WRK_SCRIPT), url,
           "--", *map(str, files)]
    env = servers.base_env({"WRK_PATH": path, "WRK_CONTENT_TYPE": content_type, "WRK_MULTIPART": str(int(multipart))})
    proc = subprocess.run(servers.pinned(cmd, cpus), env=env, capture_output=True, text=True, timeout=seconds + 60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    r = json.loads(lines[-1])
    e = r["errors"]
    # Only answered requests with a 2xx status count towards throughput; the rest are reported as errors.
    ok = r["requests"] - e["status"]
    flat = r["histogram"]
    measured = undo_wrk_correction(dict(zip(flat[::2], flat[1::2], strict=True)),
                                   wrk_interval_us(r["duration_us"], r["requests"], connections))
    return {"rate": ok / (r["duration_us"] / 1e6), "ok": ok, "errors": sum(e.values()), "requests": r["requests"],
            "p50_ms": wrk_percentile(measured, 50) / 1000, "p99_ms": wrk_percentile(measured, 99) / 1000,
            "p50_co_ms": r["latency_us"]["p50"] / 1000, "p99_co_ms": r["latency_us"]["p99"] / 1000,
            "latencies_us": measured}


def wrk_interval_us(duration_us: int, requests: int, connections: int) -> int:
    """The interval wrk 4 corrects with: the run's length over the requests one connection made (integer maths, as
    in wrk.c); 0 when no connection finished a request, and then wrk corrects nothing."""
    per_connection = requests // connections
    return duration_us // per_connection if per_connection else 0


def undo_wrk_correction(corrected: dict[int, int], interval_us: int) -> dict[int, int]:
    """wrk's latency histogram (µs → count) as measured, before its coordinated-omission correction.

    stats_correct (wrk 4, stats.c) adds, for every measured latency n >= 2 × interval, its count at n - interval,
    n - 2 × interval, ... while above the interval. A bucket only ever receives from larger ones, so going down from
    the largest, each bucket's own count is what it holds minus what the larger ones (already recovered) added.
    """
    if interval_us <= 0:
        return dict(corrected)
    measured: dict[int, int] = {}
    added: dict[int, int] = {}
    for n in sorted(corrected, reverse=True):
        count = corrected[n] - added.pop(n, 0)
        if count < 0:
            raise ValueError(f"not a histogram wrk corrected with a {interval_us} us interval (bucket {n} us)")
        if count:
            measured[n] = count
            m = n - interval_us  # below 2 × interval, m is already at or under it: nothing was added
            while m > interval_us:
                added[m] = added.get(m, 0) + count
                m -= interval_us
    return measured


def wrk_percentile(histogram: dict[int, int], p: float) -> int:
    """wrk's own percentile rule (stats_percentile): the smallest value whose cumulative count reaches
    round(p / 100 × count + 0.5)."""
    rank = math.floor(p / 100 * sum(histogram.values()) + 0.5 + 0.5)  # C round() of a positive number
    total = 0
    for value in sorted(histogram):
        total += histogram[value]
        if total >= rank:
            return value
    return 0


def preflight(url: str, path: str, content_type: str, body: bytes, model: str | None, multipart: bool = False) -> None:
    """One request before the load: a server that answers fast but wrong must not produce a benchmark number."""
    if multipart:
        r = httpx.post(url + path, files={"image": ("upload", body, content_type)}, timeout=60)
    else:
        r = httpx.post(url + path, content=body, headers={"Content-Type": content_type}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"pre-flight POST {path} answered {r.status_code}: {r.text[:300]}")
    if model is not None:
        problem = check_predictions(r.json(), model, TOP_K[model])
        if problem:
            raise RuntimeError(f"pre-flight POST {path}: wrong answer: {problem}")


def run_seconds(rate: float, connections: int, args: argparse.Namespace) -> int:
    """How long each measured run lasts: `--duration`, or longer when one round of answers would be a coarse step.

    A closed loop whose server answers in batches completes up to `connections` requests at once, so a run of d
    seconds counts its rate in steps of up to connections / d. AlexNet at 32 connections answers ~64 img/s in
    batches of 32: 8 s runs count in steps of 4 img/s, 6% of the rate. Runs are stretched until a step is at most
    `--resolution` of the warm-up's rate, up to `--max-duration`."""
    if rate <= 0:
        return args.duration
    return max(args.duration, min(resolving_seconds(rate, connections, args.resolution),
                                  args.max_duration or args.duration))


def resolving_seconds(rate: float, connections: int, resolution: float) -> int:
    """The shortest run whose rate step (up to `connections` answers at once) is at most `resolution` of `rate`."""
    return math.ceil(connections / (resolution * rate)) if rate > 0 else sys.maxsize


@dataclass
class Target:
    """One row of (2)-(4): what wrk sends (`path`, raw or multipart bodies) to which running server."""

    row: Row
    server: servers.Server
    path: str
    multipart: bool = False
    split_cpu: bool = False  # also where its CPU goes, by kind of thread (the service's threads are named)


def load_runs(targets: list[Target], content_type: str, files: list[Path], model: str | None, connections: int,
              args: argparse.Namespace, between: Callable[[], object] | None = None) -> None:
    """Fills each target's row with `--repeats` runs, in rounds: every target runs once per round, in turn, the
    order reversed every other round (A B C, C B A, ...), and `between` (a sample of the in-process limit) runs
    before the first round and after each. Targets that are compared are thus measured seconds apart, not minutes,
    and a linear drift in the machine's speed cancels out of their ratio. Only the target measured is awake
    (servers.awake): an idle server cannot slow it."""
    seconds = args.duration
    for t in targets:
        with servers.awake(t.server):
            preflight(t.server.url, t.path, content_type, files[0].read_bytes(), model, t.multipart)
            # Warm-up at the same concurrency (not counted): lazy allocations, batch-size ramp, connection set-up.
            warm = run_wrk(t.server.url, t.path, content_type, files, connections, max(2, args.duration // 3),
                           args.client_cpus, t.multipart)
        seconds = max(seconds, run_seconds(warm["rate"], connections, args))
    if between:
        between()
    for k in range(args.repeats):
        for t in targets if k % 2 == 0 else targets[::-1]:
            with servers.awake(t.server):
                cpu_before = servers.cpu_seconds(t.server.proc.pid)
                threads_before = servers.thread_cpu_seconds(t.server.proc.pid) if t.split_cpu else {}
                r = run_wrk(t.server.url, t.path, content_type, files, connections, seconds, args.client_cpus,
                            t.multipart)
                cpu = servers.cpu_seconds(t.server.proc.pid) - cpu_before
                if t.split_cpu and r["ok"]:
                    t.row.cpu_split.append(cpu_split(threads_before, servers.thread_cpu_seconds(t.server.proc.pid),
                                                     r["ok"]))
            t.row.runs.append(r["rate"])
            if cpu > 0:  # answers per CPU second of the server's whole process tree: what an answer costs
                t.row.per_cpu_s.append(r["ok"] / cpu)
            for key in ("p50_ms", "p99_ms", "p50_co_ms", "p99_co_ms"):
                getattr(t.row, key).append(r[key])
            t.row.errors += r["errors"]
        if between:
            between()
    for t in targets:
        row = t.row
        if seconds != args.duration:
            row.setup += f", {seconds} s runs"
        runs = ", ".join(f"{x:.1f}" for x in row.runs)
        print(f"  {row.what} {row.model} x{connections}: {row.median:.1f} {row.unit} (runs {runs}),"
              f" p50 {median_or_blank(row.p50_ms)} ms, p99 {median_or_blank(row.p99_ms)} ms (corrected "
              f"{median_or_blank(row.p50_co_ms)} / {median_or_blank(row.p99_co_ms)}), errors {row.errors}",
              flush=True)


# The service's threads by kind, from their names (serving/threads.py): MicroBatcher's `infer-<model>` threads run
# onnxruntime, the API's `decode` pools run Pillow and the preprocessing, and the rest is each worker's event loop
# (HTTP, multipart, answers, metrics; LeNet-5's inference and small decodes too) and whatever else BentoML runs.
SPLIT_KINDS = ("inference", "decoding", "event loop and the rest")


def cpu_split(before: dict[str, float], after: dict[str, float], answers: int) -> dict[str, float]:
    """CPU ms per answer by kind of thread, between two `servers.thread_cpu_seconds` readings."""
    split = dict.fromkeys(SPLIT_KINDS, 0.0)
    for name, seconds in after.items():
        kind = ("inference" if name.startswith(INFER_THREADS) else "decoding" if name.startswith(DECODE_THREADS)
                else "event loop and the rest")
        split[kind] += max(seconds - before.get(name, 0.0), 0.0) * 1000 / answers
    return split


def cpu_split_text(m: str, connections: int, mp: Row, raw: Row, limit_splits: list[tuple[float, float]],
                   limit_cpu: float, lit_per_cpu_s: float) -> str:
    """Where a served image's CPU goes, next to the limit's, and what that leaves any server against LitServe."""
    def med(row: Row, kind: str) -> float:
        return statistics.median(run[kind] for run in row.cpu_split)

    ours_ms = sum(med(mp, kind) for kind in SPLIT_KINDS)
    decode_ms, ort_ms = (statistics.median(s[i] for s in limit_splits) for i in (0, 1))
    limit_ms, lit_ms = 1000 / limit_cpu, 1000 / lit_per_cpu_s
    inference = (f"{med(mp, 'inference'):.2f} in its inference thread" if med(mp, "inference") > 0
                 else "no inference thread (the model runs on the event loop)")
    return (f"**{m}, where an image's CPU goes** ({connections} conns, ms per image, medians of the runs): the "
            f"service (multipart) {inference}, {med(mp, 'decoding'):.2f} "
            f"in its decoding threads, {med(mp, 'event loop and the rest'):.2f} in the event loop and the rest "
            f"(HTTP, multipart, answers, metrics), {ours_ms:.2f} in all ({med(raw, 'event loop and the rest'):.2f} "
            f"in the event loop with raw uploads); the limit {decode_ms:.2f} decoding and {ort_ms:.2f} in "
            f"onnxruntime, {limit_ms:.2f} per image by its CPU rate; LitServe {lit_ms:.2f}, "
            f"{lit_ms - limit_ms:+.2f} on the limit's. A server with no cost of its own, at the limit's CPU rate, "
            f"would get **{limit_cpu / lit_per_cpu_s:.3g}× of LitServe's images** out of a CPU second here")


def gc_under_load(url: str) -> dict[str, float]:
    """The service's garbage collector so far, from its /metrics: collections, the longest pause in wall time and in
    the collecting thread's CPU time (upper bounds of their histogram buckets; 0 when there was no collection), full
    collections, and the objects the collector tracks, per worker (the largest)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    buckets: dict[str, dict[float, float]] = {"wall": {}, "cpu": {}}
    total = full = tracked = 0.0
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name in ("convnet_gc_pause_seconds_bucket", "convnet_gc_pause_cpu_seconds_bucket"):
            le = rest.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            kind = buckets["cpu" if "_cpu_" in name else "wall"]
            kind[bound] = kind.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
        elif name == "convnet_gc_pause_seconds_count":
            total += float(line.rsplit(" ", 1)[1])
            full += float(line.rsplit(" ", 1)[1]) if 'generation="2"' in line else 0.0
        elif name == "convnet_gc_tracked_objects":
            tracked = max(tracked, float(line.rsplit(" ", 1)[1]))
    longest = {kind: min((b for b, n in counts.items() if n >= total), default=float("nan")) if total else 0.0
               for kind, counts in buckets.items()}
    return {"collections": total, "longest_ms": longest["wall"] * 1000, "longest_cpu_ms": longest["cpu"] * 1000,
            "full": full, "tracked_objects": tracked}


# ---------------------------------------------------------------------------------------------------------------
# 5. the batch CLI (its own script measures it; we take its JSON)


def measure_batch_cli(cpus: str | None, threads: int, images: int, repeats: int, results: Path,
                      photos_from: Path) -> dict | None:
    """`python -m loadtests.batch_bench throughput` pinned like the servers, over `photos_from` (the limit's images,
    cycled): its CLI runs and its own ratio."""
    if not BATCH_BENCH.is_file():
        print(f"  {BATCH_BENCH.name} is missing: skipped", flush=True)
        return None
    out = results / "batch_bench.json"
    cmd = [sys.executable, "-m", "loadtests.batch_bench", "throughput", "--model", "alexnet", "--images", str(images),
           "--batch-size", "32", "--threads", str(threads), "--rounds", str(repeats), "--work-dir",
           str(results / "batch-cli"), "--photos-from", str(photos_from), "--json", str(out)]
    proc = subprocess.run(servers.pinned(cmd, cpus), cwd=REPO_ROOT, env=servers.base_env(), capture_output=True,
                          text=True, timeout=900)
    (results / "batch_bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out.is_file():
        print(f"  batch CLI benchmark failed ({proc.returncode}); see {results / 'batch_bench.log'}", flush=True)
        return None
    return json.loads(out.read_text())["throughput"]


# ---------------------------------------------------------------------------------------------------------------
# The machine and the report


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    versions = {}
    for name in ("onnxruntime", "bentoml", "locust", "numpy", "pillow", "starlette", "uvicorn"):
        try:
            from importlib.metadata import version

            versions[name] = version(name if name != "onnxruntime" else "onnxruntime-gpu")
        except Exception:  # noqa: BLE001 (a missing package is reported as such)
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": mem, "os": platform.platform(),
            "python": platform.python_version(), **versions, "wrk": wrk_version() or "not installed"}


def service_parallelism(cpus: int) -> str:
    w = parallelism(ServiceConfig(), uses_gpu=False, model_service=False, cpus=cpus)
    return f"{w['api_workers']} worker(s) × {w['front_ort_threads']} onnxruntime thread(s)"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3g}×" if b else ""


def render(rows: list[Row], headlines: list[str], notes: list[str], info: dict[str, str], args: argparse.Namespace,
           started: float, load_before: str, load_after: str) -> str:
    n_server = servers.cpu_count_of(args.server_cpus)
    server_side = (f"pinned to CPU(s) `{args.server_cpus}`" if args.server_cpus else "not pinned") + \
        f" ({n_server} core(s), onnxruntime intra-op threads = {n_server})"
    client_side = f"pinned to CPU(s) `{args.client_cpus}`" if args.client_cpus else "not pinned"
    title = args.title or (f"Serving side on {n_server} core(s), load generator on its own core"
                           if args.server_cpus and args.client_cpus else "Unpinned: everything shares every core")
    lines = [] if args.append else [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m loadtests.bench`); how to run it and what each number means is in",
        "[loadtests.md](loadtests.md). Re-run it on a quiet machine before quoting these numbers.",
        "",
    ]
    lines += [
        f"## {title}",
        "",
        f"- Command: `{shlex.join(['python', '-m', 'loadtests.bench', *sys.argv[1:]])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"took {(time.time() - started) / 60:.1f} min",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory']} RAM, no GPU used (CPU execution provider);"
        f" {info['os']}",
        f"- Versions: Python {info['python']}, onnxruntime-gpu {info['onnxruntime']}, bentoml {info['bentoml']}, "
        f"starlette {info['starlette']}, uvicorn {info['uvicorn']}, numpy {info['numpy']}, pillow {info['pillow']}, "
        f"locust {info['locust']}, {info['wrk']}",
        f"- CPU split: servers and in-process runs {server_side}; load generator wrk, 1 thread, {client_side}, "
        f"closed loop over {args.connections} keep-alive connections (the `conns` in each setup)",
        f"- Servers: the service with `CONVNET_DEVICE=cpu` and every other setting at its default (serving/config.py: "
        f"on {n_server} core(s), {service_parallelism(n_server)}) and the glibc malloc settings every deployment "
        f"sets ({' '.join(f'{k}={v}' for k, v in servers.ALLOCATOR_ENV.items())}); the naive app and LitServe, under "
        f"glibc's defaults, with onnxruntime at "
        f"{n_server} intra-op thread(s); the naive and hello apps under one uvicorn worker",
        f"- Each number is the median of {args.repeats} runs of {args.duration} s after an uncounted warm-up (up to "
        f"{args.max_duration} s where the setup says so: a server that answers in batches of `conns` would otherwise "
        f"count its rate in steps over {args.resolution:.0%} of it); the individual runs are in the `runs` column",
        "- Side by side: the service, the naive app and LitServe are up at once on the same cores, each frozen "
        "(SIGSTOP) while another is measured; at each model and `conns` they run in rounds, one run each, the order "
        "reversed every other round, and the limit (1) is sampled for "
        f"{args.ort_seconds} s before the first round and after each. onnxruntime alone (1) runs {args.repeats} "
        "times first and as many last",
        f"- Load average (1/5/15 min) before: {load_before}; after: {load_after}",
    ]
    lines += [f"- Note: {n}" for n in ([args.note] if args.note else []) + notes]
    lines += [
        "",
        "| # | measurement | model | setup | median | runs | per CPU-s | p50 ms | p99 ms | p50 / p99 ms corrected "
        "| errors | ratio | limited by |",
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.section):  # stable: each section keeps its order
        runs = " / ".join(f"{x:.1f}" for x in r.runs)
        cpu, p50, p99, p50_co, p99_co = (median_or_blank(v, "{:.1f}") for v in (r.per_cpu_s, r.p50_ms, r.p99_ms,
                                                                                   r.p50_co_ms, r.p99_co_ms))
        corrected = f"{p50_co} / {p99_co}" if p50_co else ""
        lines.append(f"| {r.section} | {r.what} | {r.model} | {r.setup} | {r.median:.1f} {r.unit} | {runs} | {cpu} | "
                     f"{p50} | {p99} | {corrected} | {r.errors if r.section[0] in '234' else ''} | {r.ratio} | "
                     f"{r.limit} |")
    lines += ["", "Ratios in the table are taken per round, between runs measured side by side, then summarised as the",
              "median (lowest–highest) over the rounds: (2), (3) and (3b) divided by the limit (1) (decode +",
              f"onnxruntime at batch {LIMIT_BATCH}, one process, the same cores) sampled either side of their round;",
              "raw (2) also by (3), multipart (2) by (3b) and by raw (2). (5) is divided by the limit sampled just",
              "before and after it. (2c), in the headlines, compares multipart with raw once more, on the service",
              f"alone in {args.ab_pairs} pairs of {args.ab_seconds}-s turns: a difference of a per cent or two is",
              "smaller than the rounds of (2) vary by; (2d) compares the service with the naive app in such turns.",
              "p50/p99: of the answered requests, as they were measured;",
              "`corrected`: wrk's",
              "own, corrected for coordinated omission (each response slower than twice a connection's mean",
              "interval also counts the requests a client keeping that pace would have sent meanwhile), which",
              "shows what a stall costs the requests behind it. `per CPU-s`: images per CPU",
              "second (median): of the in-process run's process, or of the server's whole process tree (user +",
              "system, /proc) while wrk ran. Contention from other processes (a noisy neighbour, steal) slows a",
              "run but does not lower this number, so it compares what an image costs more steadily than img/s.", "",
              "Headline ratios:", ""]
    lines += [f"- {h}" for h in headlines] + [""]
    return "\n".join(lines)


def write_report(path: Path, section: str, append: bool) -> None:
    """Write the generated report (or add a section to it), keeping the hand-written notes after NOTES_MARKER."""
    old = path.read_text() if path.is_file() else ""
    body, marker, notes = old.partition(NOTES_MARKER)
    text = (body.rstrip("\n") + "\n\n" + section) if append and body.strip() else section
    if marker:
        text = text.rstrip("\n") + "\n\n" + marker + notes
    path.write_text(text)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="alexnet,lenet5")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per number (median reported)")
    p.add_argument("--duration", type=int, default=8, help="seconds per HTTP run")
    p.add_argument("--resolution", type=float, default=0.02,
                   help="longest step in which a run may count its rate, as a fraction of it (see run_seconds)")
    p.add_argument("--max-duration", type=int, default=0, help="seconds a stretched run may last (default 3x "
                   "--duration; --quick: --duration)")
    p.add_argument("--ort-seconds", type=float, default=2.0, help="seconds per in-process run")
    p.add_argument("--connections", default="4,32",
                   help="wrk connection counts (concurrent requests) for (2) and (3); (4) uses the largest")
    p.add_argument("--server-cpus", default="1",
                   help="taskset CPUs for servers and in-process runs (default 1; '' = not pinned)")
    p.add_argument("--client-cpus", default="0", help="taskset CPUs for wrk (default 0; '' = not pinned)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown report (default docs/benchmarks.md)")
    p.add_argument("--results", type=Path, help="raw results folder (default results/bench-<UTC time>)")
    p.add_argument("--note", default="", help="a line about the conditions, printed in the report")
    p.add_argument("--title", default="", help="the report section's title (default: says how CPUs were split)")
    p.add_argument("--append", action="store_true", help="add this run as a new section at the end of --out")
    p.add_argument("--quick", action="store_true", help="1 repeat, 4 s runs: checks the harness, not the numbers")
    p.add_argument("--skip-batch-cli", action="store_true")
    p.add_argument("--ab-pairs", type=int, default=16, help="(2c), (2d) pairs of turns (default 16)")
    p.add_argument("--ab-seconds", type=int, default=2, help="(2c), (2d) seconds per turn (default 2)")
    return p


UPLOADS = {"alexnet": ("image/jpeg", "JPEG photos 320-1024 px"), "lenet5": ("image/png", "PNG digits")}


def run_ratios(a: list[float], b: list[float]) -> list[float]:
    """Run k of `a` over run k of `b`: ratios of numbers measured side by side, in the same round."""
    return [x / y for x, y in zip(a, b, strict=True) if y]


def ratio_text(ratios: list[float]) -> str:
    """The median ratio, and its range over the rounds."""
    if not ratios:
        return ""
    spread = f" ({min(ratios):.3g}–{max(ratios):.3g})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.3g}×{spread}"


def middle_half(ratios: list[float]) -> str:
    """The middle half (quartiles) of short turns' pair ratios, for (2c) and (2d)."""
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"middle half {q1:.3g}–{q3:.3g}"


def errors_note(ab: dict) -> str:
    return f"; **{ab['errors']} errors**" if ab.get("errors") else ""


def mp_vs_raw_text(m: str, ab: dict) -> str:
    """The headline of (2c)."""
    if "skipped" in ab:
        return (f"{m} multipart vs raw in short turns (2c): not run, {ab['skipped']}; its multipart/raw is the "
                "rounds' above")
    return (f"**{m} multipart vs raw in short turns** (2c: the service alone, {ab['connections']} conns, "
            f"{ab['pairs']} pairs of {ab['seconds']} s turns in alternating order): multipart **"
            f"{ratio_text(ab['ratios'])}** of raw ({middle_half(ab['ratios'])}); the server's CPU "
            f"{statistics.median(ab['extra_cpu_us']):+.1f} µs an answer (median of the pairs) on "
            f"{statistics.median(ab['raw_cpu_us']):.0f} µs for a raw one{errors_note(ab)}")


def vs_naive_text(m: str, ab: dict) -> str:
    """The headline of (2d)."""
    if "skipped" in ab:
        return (f"{m} against the naive app in short turns (2d): not run, {ab['skipped']}; its ratio is the rounds' "
                "above")
    return (f"**{m} against the naive app in short turns** (2d: raw uploads, {ab['connections']} conns, "
            f"{ab['pairs']} pairs of {ab['seconds']} s turns in alternating order, each server frozen during the "
            f"other's): the service **{ratio_text(ab['ratios'])}** of the naive app's answers a second "
            f"({middle_half(ab['ratios'])}); server CPU an answer {statistics.median(ab['service_cpu_us']):.0f} µs "
            f"against {statistics.median(ab['naive_cpu_us']):.0f} (medians of the turns){errors_note(ab)}")


@dataclass
class Bench:
    """One benchmark run: its settings, its image files, and the rows measured so far."""

    args: argparse.Namespace
    results: Path
    models: list[str]
    image_dirs: dict[str, Path]
    files: dict[str, list[Path]]
    probe: LimitProbe
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)  # (1) at its best batch size, per model
    limit: dict[str, float] = field(default_factory=dict)  # (1) the upload limit: median of all its samples
    round_limit: dict[tuple[str, int], list[float]] = field(default_factory=dict)  # per round of a (2)-(3b) step
    first_half: dict[str, dict] = field(default_factory=dict)
    service_rows: dict[tuple[str, int], Row] = field(default_factory=dict)  # raw uploads
    service_mp_rows: dict[tuple[str, int], Row] = field(default_factory=dict)  # multipart uploads
    naive_rows: dict[tuple[str, int], Row] = field(default_factory=dict)
    lit_rows: dict[tuple[str, int], Row] = field(default_factory=dict)
    gc: dict[str, float] = field(default_factory=dict)  # the service's collector under load (its /metrics)
    gc_series: list[tuple[float, float]] = field(default_factory=list)  # (seconds into (2), tracked objects)
    v2_tables: list[str] = field(default_factory=list)  # (6), one Markdown table per model
    hello_row: Row | None = None
    cli: tuple[Row, dict, float] | None = None  # the row, batch_bench's JSON, the limit around it
    mp_vs_raw: dict[str, dict] = field(default_factory=dict)  # (2c), per model
    vs_naive: dict[str, dict] = field(default_factory=dict)  # (2d), per model

    @property
    def n_server(self) -> int:
        return servers.cpu_count_of(self.args.server_cpus)

    @property
    def pin(self) -> str:
        return f"{self.n_server} core(s)"

    @property
    def levels(self) -> list[int]:
        return sorted({int(c) for c in str(self.args.connections).split(",") if c.strip()})

    def in_process(self, model: str) -> dict:
        a = self.args
        return measure_ort(model, self.image_dirs[model], a.server_cpus, self.n_server, a.ort_seconds, a.repeats)

    def in_process_first_half(self) -> None:
        # onnxruntime alone runs twice, first and last, and both halves go into its medians: on a machine whose
        # load drifts, these rows then span the same period as the rest. The limit itself is sampled around every
        # round (LimitProbe).
        print(f"1. onnxruntime in process on CPU(s) {self.args.server_cpus}, {self.n_server} thread(s)", flush=True)
        self.first_half = {m: self.in_process(m) for m in self.models}

    def in_process_second_half(self) -> None:
        print("1. onnxruntime in process, second half", flush=True)
        rows = []
        for m in self.models:
            first, again = self.first_half[m], self.in_process(m)
            drift = statistics.median(again["batches"]["32"]) / statistics.median(first["batches"]["32"])
            if not 0.8 <= drift <= 1.25:
                self.notes.append(f"{m} in process at batch 32 ran {drift:.2f}× as fast at the end as at the start:"
                                  " the machine's load changed during the run")
            ort_rows = [Row("1", f"onnxruntime in process, batch {b}", m, f"{self.pin}, pre-processed uint8",
                            first["batches"][str(b)] + again["batches"][str(b)], limit="model compute only",
                            per_cpu_s=first["batches_cpu"][str(b)] + again["batches_cpu"][str(b)])
                        for b in ORT_BATCHES]
            self.best[m] = max(r.median for r in ort_rows)
            pipe = Row("1", "decode + preprocess + onnxruntime in process, batch 1", m,
                       f"{self.pin}, {UPLOADS[m][1]}, 1 thread of decode", first["pipeline_b1"] + again["pipeline_b1"],
                       limit="serial decode then compute",
                       per_cpu_s=first["pipeline_b1_cpu"] + again["pipeline_b1_cpu"])
            pipe.ratio = f"{ratio(pipe.median, self.best[m])} of best (1)"
            samples = self.probe.samples[m]
            limit = Row("1", f"decode + preprocess + onnxruntime in process, batch {LIMIT_BATCH}: THE LIMIT", m,
                        f"{self.pin}, {UPLOADS[m][1]}, 1 thread of decode, {len(samples)} samples around the "
                        "rounds of (2)-(3b) and (5)", [w for w, _ in samples],
                        limit="serial decode then compute, perfectly batched", per_cpu_s=[c for _, c in samples])
            self.limit[m] = limit.median
            for r in [*ort_rows, pipe, limit]:
                print(f"  {m} {r.what}: {r.median:.1f} img/s", flush=True)
            rows += [*ort_rows, pipe, limit]
        self.rows[0:0] = rows

    def batch_cli(self) -> None:
        print("5. batch CLI", flush=True)
        before = self.probe.sample("alexnet")
        r = measure_batch_cli(self.args.server_cpus, self.n_server, 64 if self.args.quick else 256,
                              self.args.repeats, self.results, self.image_dirs["alexnet"])
        after = self.probe.sample("alexnet")
        if r is not None:
            row = Row("5", "batch CLI (convnet-classify) over a folder", "alexnet",
                      f"{self.pin}, {r['images']} inputs cycling over (1)'s {UPLOADS['alexnet'][1]}, batch "
                      f"{r['batch_size']}, {r['workers']} decode threads", list(r["cli_img_s"]),
                      limit="decode threads + model on the same cores")
            print(f"  batch CLI: {row.median:.1f} img/s", flush=True)
            self.cli = (row, r, (before + after) / 2)

    def servers_in_turns(self) -> None:
        """(2), (3) and (3b): the service, the naive app and LitServe up at once on the same cores, frozen but for
        the one being measured, each step's rows measured in rounds with the limit sampled between rounds."""
        a = self.args
        print(f"2-3b. the service, the naive app and LitServe in turns, wrk on CPU(s) {a.client_cpus}, connections "
              f"{self.levels}", flush=True)
        # The service at its defaults: on several cores it runs several workers, each with its own onnxruntime
        # threads (CPUs / workers). Forcing every worker to use every core oversubscribes them (p99 at 4 connections
        # 1.3-2× p50 instead of 1.2-1.4×, measured unpinned on 2 cores).
        env = {"CONVNET_DEVICE": "cpu"}
        naive_env = {"NAIVE_MODELS": ",".join(self.models), "NAIVE_THREADS": str(self.n_server), "NAIVE_DEVICE": "cpu"}
        with (servers.service(self.models, env, a.server_cpus, log_dir=self.results) as srv,
              servers.uvicorn_app("naive", "loadtests.baselines.naive_app:app", naive_env, a.server_cpus,
                                  log_dir=self.results) as naive):
            servers.freeze(srv)
            servers.freeze(naive)
            early: dict[str, float] = {}
            started = time.monotonic()
            for m in self.models:
                lit_env = {"LIT_MODEL": m, "LIT_THREADS": str(self.n_server), "LIT_TOP_K": str(TOP_K[m])}
                with servers.python_module("litserve", "loadtests.baselines.litserve_app", lit_env, a.server_cpus,
                                           log_dir=self.results, ready_path="/health") as lit:
                    servers.freeze(lit)
                    for c in self.levels:
                        if self.service_rows:  # after each load step: tracked objects over time ("flat")
                            with servers.awake(srv):
                                step = gc_under_load(srv.url)
                            early = early or step
                            self.gc_series.append((time.monotonic() - started, step["tracked_objects"]))
                        self.step(m, c, srv, naive, lit)
            with servers.awake(srv):
                self.gc = {**gc_under_load(srv.url),
                           "tracked_objects_early": early.get("tracked_objects", float("nan"))}
                self.gc_series.append((time.monotonic() - started, self.gc["tracked_objects"]))
                print(f"  garbage collector under that load: {self.gc}", flush=True)
                # After the collector's reading: (2c)'s short turns open 32 new connections every 2 s, and closed
                # connections leave objects the collector tracks until they are freed (tracked objects 2,100 →
                # 2,700-3,900 and back, bounded): churn, not the steady load whose tracked objects (2) reports.
                for m in self.models:
                    self.multipart_vs_raw(srv, m)
                print("6. Open Inference Protocol vs /classify, server CPU per image", flush=True)
                for m in self.models:
                    costs = v2_cost.measure(srv.url, srv.proc.pid, m, V2_IMAGES[m],
                                            requests=10 if a.quick else 60)
                    self.v2_tables.append(f"**{m}** (`{V2_IMAGES[m].relative_to(REPO_ROOT)}`, one image per request, "
                                          f"sequential):\n\n{v2_cost.render(costs)}")
                    print(self.v2_tables[-1], flush=True)
            for m in self.models:
                self.service_vs_naive(srv, naive, m)

    def step(self, m: str, c: int, srv: servers.Server, naive: servers.Server, lit: servers.Server) -> None:
        """One model at one concurrency: LitServe and the service multipart, the service raw and the naive app,
        in rounds (load_runs), so that each pair that is compared runs side by side."""
        ours = "decode + micro-batched model in the worker, plus HTTP"
        raw = Row("2", "service (bentoml serve), raw uploads", m, f"{self.pin}, {UPLOADS[m][1]}, {c} conns", [],
                  limit=ours)
        mp = Row("2", "service (bentoml serve), multipart uploads", m, raw.setup, [],
                 limit=f"{ours}, plus multipart parsing")
        naive_row = Row("3", "naive Starlette app, raw uploads", m, f"{self.pin}, 1 uvicorn worker, {c} conns", [],
                        limit="one decode + one batch-1 call per request, no batching")
        lit_row = Row("3b", f"LitServe {LITSERVE_VERSION}, multipart uploads", m,
                      f"{self.pin}, batch 32, 5 ms timeout, fast_queue, 1 worker, {c} conns", [],
                      limit="decode in its single inference worker, ZeroMQ hop")
        path = f"/classify?model={m}&top_k={TOP_K[m]}"
        samples: list[float] = []
        load_runs([Target(lit_row, lit, "/classify", True), Target(mp, srv, path, True, split_cpu=True),
                   Target(raw, srv, path, split_cpu=True), Target(naive_row, naive, path)],
                  UPLOADS[m][0], self.files[m], m, c, self.args, between=lambda: samples.append(self.probe.sample(m)))
        self.round_limit[m, c] = [(x + y) / 2 for x, y in pairwise(samples)]
        self.service_rows[m, c], self.service_mp_rows[m, c] = raw, mp
        self.naive_rows[m, c], self.lit_rows[m, c] = naive_row, lit_row
        self.rows += [raw, mp, naive_row, lit_row]

    def saturating(self, m: str) -> tuple[int, str | None]:
        """The connections where (2) saturated for `m`, and why a short turn there cannot count its rate to
        `--resolution`, if it cannot (AlexNet answers in batches of 32: it would need 24-s turns). Saturation is the
        most connections, where #10 sets its goals; not the level with the best rate: LeNet-5 saturates at 4
        already, and which of 4 and 32 came out ahead moved from run to run."""
        c = max(self.levels)
        needed = resolving_seconds(self.service_rows[m, c].median, c, self.args.resolution)
        if needed > self.args.ab_seconds:
            return c, (f"a turn would need {needed} s to count the rate to {self.args.resolution:.0%} (answers come "
                       f"{c} at a time)")
        return c, None

    def in_short_turns(self, m: str, c: int, first: tuple[servers.Server, bool], second: tuple[servers.Server, bool],
                       wake: bool) -> dict:
        """`--ab-pairs` pairs of `--ab-seconds` turns of two (server, multipart) setups at `c` connections, the order
        swapped every other pair, after a warm-up turn of each: per pair second/first answers a second, and each
        turn's server CPU per answer. `wake`: each turn wakes its server and freezes it after (else they are awake)."""
        a = self.args
        path = f"/classify?model={m}&top_k={TOP_K[m]}"
        content_type, files = UPLOADS[m][0], self.files[m]
        errors: list[int] = []  # per turn, the two warm-up turns first

        def turn(srv: servers.Server, multipart: bool) -> tuple[float, float]:
            """(answers/s, server CPU µs per answer) of one turn."""
            with servers.awake(srv) if wake else contextlib.nullcontext():
                servers.wait_idle(srv)  # the previous turn's requests in flight are not this one's CPU
                cpu_before = servers.cpu_seconds(srv.proc.pid)
                r = run_wrk(srv.url, path, content_type, files, c, a.ab_seconds, a.client_cpus, multipart)
                cpu = servers.cpu_seconds(srv.proc.pid) - cpu_before
            errors.append(r["errors"])
            return r["rate"], cpu / max(r["ok"], 1) * 1e6

        turn(*first), turn(*second)  # warm-up, not counted
        ratios, first_us, second_us = [], [], []
        setups = (first, second)
        for k in range(a.ab_pairs):
            got = {i: turn(*setups[i]) for i in ((0, 1) if k % 2 == 0 else (1, 0))}
            ratios.append(got[1][0] / got[0][0])
            first_us.append(got[0][1])
            second_us.append(got[1][1])
        return {"connections": c, "pairs": a.ab_pairs, "seconds": a.ab_seconds, "ratios": ratios,
                "first_cpu_us": first_us, "second_cpu_us": second_us, "errors": sum(errors[2:])}

    def multipart_vs_raw(self, srv: servers.Server, m: str) -> None:
        """(2c): the service alone (awake; the others frozen), raw then multipart bodies of the same images in short
        turns (`in_short_turns`), at the connections where (2) saturated. Rounds of (2) put 8 s and other servers
        between the two and spread ±4% on LeNet-5 pinned; the difference is 2-3%, so it needs turns seconds apart
        and more of them."""
        c, skipped = self.saturating(m)
        if skipped:
            self.mp_vs_raw[m] = {"connections": c, "skipped": skipped}
            print(f"2c. {m}: multipart vs raw in turns skipped ({skipped})", flush=True)
            return
        print(f"2c. {m}: multipart vs raw, {self.args.ab_pairs} pairs of {self.args.ab_seconds} s turns, {c} conns",
              flush=True)
        ab = self.in_short_turns(m, c, (srv, False), (srv, True), wake=False)
        raw_us, mp_us = ab.pop("first_cpu_us"), ab.pop("second_cpu_us")
        self.mp_vs_raw[m] = {**ab, "extra_cpu_us": [x - y for x, y in zip(mp_us, raw_us, strict=True)],
                             "raw_cpu_us": raw_us}
        print(f"  {m} multipart/raw {ratio_text(ab['ratios'])}, extra server CPU "
              f"{statistics.median(self.mp_vs_raw[m]['extra_cpu_us']):+.1f} µs an answer on "
              f"{statistics.median(raw_us):.0f}", flush=True)

    def service_vs_naive(self, srv: servers.Server, naive: servers.Server, m: str) -> None:
        """(2d): the naive app then the service, raw bodies, in short turns (`in_short_turns`), each woken for its
        own turns and frozen for the other's, at the connections where (2) saturated."""
        c, skipped = self.saturating(m)
        if skipped:
            self.vs_naive[m] = {"connections": c, "skipped": skipped}
            print(f"2d. {m}: the service vs the naive app in turns skipped ({skipped})", flush=True)
            return
        print(f"2d. {m}: the service vs the naive app, {self.args.ab_pairs} pairs of {self.args.ab_seconds} s turns, "
              f"{c} conns", flush=True)
        ab = self.in_short_turns(m, c, (naive, False), (srv, False), wake=True)
        self.vs_naive[m] = {**ab, "naive_cpu_us": ab.pop("first_cpu_us"), "service_cpu_us": ab.pop("second_cpu_us")}
        print(f"  {m} service/naive {ratio_text(ab['ratios'])}", flush=True)

    def hello(self) -> None:
        print("4. bare Starlette hello endpoint", flush=True)
        with servers.uvicorn_app("hello", "loadtests.baselines.hello_app:app", None, self.args.server_cpus,
                                 log_dir=self.results) as hello:
            self.hello_row = Row("4", "Starlette hello endpoint (reads the body)", "-",
                                 f"{self.pin}, 1 uvicorn worker, LeNet-5's bodies, {self.levels[-1]} conns", [],
                                 unit="req/s", limit="HTTP parsing + ASGI in one Python process")
            load_runs([Target(self.hello_row, hello, "/hello")], UPLOADS["lenet5"][0], self.files["lenet5"], None,
                      self.levels[-1], self.args)
            self.rows.append(self.hello_row)

    def headlines(self) -> list[str]:
        """Fills in the ratios of (2)-(5) (now that (1) is complete) and returns the headline sentences. Every ratio
        is per round (numbers measured side by side), then the median and range over the rounds."""
        out = []
        def of_limit(row: Row, key: tuple[str, int]) -> str:
            return ratio_text(run_ratios(row.runs, self.round_limit[key]))

        for key in self.round_limit:
            raw, mp, lit, naive = (rows[key] for rows in (self.service_rows, self.service_mp_rows, self.lit_rows,
                                                          self.naive_rows))
            raw.ratio = (f"{of_limit(raw, key)} of the limit (1); "
                         f"{ratio_text(run_ratios(raw.runs, naive.runs))} of naive (3)")
            mp.ratio = (f"{of_limit(mp, key)} of the limit (1); {ratio_text(run_ratios(mp.runs, lit.runs))} of "
                        f"LitServe (3b); {ratio_text(run_ratios(mp.runs, raw.runs))} of raw")
            lit.ratio = f"{of_limit(lit, key)} of the limit (1)"
            naive.ratio = f"{of_limit(naive, key)} of the limit (1)"
        low = self.levels[0]
        for m in self.models:
            c, _ = self.saturating(m)
            raw, mp, lit, naive = (rows[m, c] for rows in (self.service_rows, self.service_mp_rows, self.lit_rows,
                                                           self.naive_rows))
            out.append(f"**{m} at saturation** ({c} conns): the service {raw.median:.1f} img/s raw, {mp.median:.1f} "
                       f"multipart = **{of_limit(raw, (m, c))}** / {of_limit(mp, (m, c))} of the in-process "
                       f"limit ({statistics.median(self.round_limit[m, c]):.1f} img/s around these rounds); "
                       f"**{ratio_text(run_ratios(mp.runs, lit.runs))} of LitServe** ({lit.median:.1f}, multipart "
                       f"both); **{ratio_text(run_ratios(raw.runs, naive.runs))} of the naive app** "
                       f"({naive.median:.1f}, raw both); multipart {ratio_text(run_ratios(mp.runs, raw.runs))} of raw")
            if all(len(r.per_cpu_s) == len(r.runs) for r in (raw, mp, lit, naive)):
                limit_cpu = statistics.median(c for _, c in self.probe.samples[m])
                out.append(f"**{m}, what an image costs** ({c} conns), images per CPU second of each server's "
                           f"processes: the service {median_or_blank(raw.per_cpu_s, '{:.1f}')} raw / "
                           f"{median_or_blank(mp.per_cpu_s, '{:.1f}')} multipart, LitServe "
                           f"{median_or_blank(lit.per_cpu_s, '{:.1f}')}, the naive app "
                           f"{median_or_blank(naive.per_cpu_s, '{:.1f}')}, the limit {limit_cpu:.1f}: the service "
                           f"gets **{ratio_text(run_ratios(mp.per_cpu_s, lit.per_cpu_s))} of LitServe's images** out "
                           f"of a CPU second (multipart both), {ratio_text(run_ratios(raw.per_cpu_s, naive.per_cpu_s))}"
                           f" of the naive app's (raw both), {ratio(statistics.median(raw.per_cpu_s), limit_cpu)} of "
                           f"the limit's; multipart {ratio_text(run_ratios(mp.per_cpu_s, raw.per_cpu_s))} of raw")
                if mp.cpu_split and raw.cpu_split and self.probe.splits[m]:
                    out.append(cpu_split_text(m, c, mp, raw, self.probe.splits[m], limit_cpu,
                                              statistics.median(lit.per_cpu_s)))
            if m in self.mp_vs_raw:
                out.append(mp_vs_raw_text(m, self.mp_vs_raw[m]))
            if m in self.vs_naive:
                out.append(vs_naive_text(m, self.vs_naive[m]))
            tail, naive_tail = self.service_rows[m, low], self.naive_rows[m, low]
            if tail.p50_ms and tail.p99_ms and tail.p50_co_ms:
                out.append(f"{m} tail at {low} connections: p99/p50 = {tail_text(tail.p50_ms, tail.p99_ms)} as "
                           f"measured, {tail_text(tail.p50_co_ms, tail.p99_co_ms)} corrected for coordinated "
                           f"omission (wrk's); the naive app's {tail_text(naive_tail.p50_ms, naive_tail.p99_ms)} / "
                           f"{tail_text(naive_tail.p50_co_ms, naive_tail.p99_co_ms)}")
        if self.gc:
            pauses = (f"{self.gc['collections']:.0f} collections, the longest ≤ {self.gc['longest_ms']:g} ms of wall "
                      f"time and ≤ {self.gc['longest_cpu_ms']:g} ms of the collecting thread's CPU time (histogram "
                      f"buckets), {self.gc['full']:.0f} full" if self.gc["collections"] else "no collection at all")
            out.append(f"garbage collector in the service's worker(s) over all of (2): {pauses}; tracked objects "
                       f"{self.gc['tracked_objects_early']:.0f} after the first row, {self.gc['tracked_objects']:.0f} "
                       "at the end (per worker, largest); after each load step (s into (2): objects): "
                       + ", ".join(f"{t:.0f}: {n:.0f}" for t, n in self.gc_series))
        if "lenet5" in self.models and self.hello_row is not None:
            top = max((self.service_rows["lenet5", c] for c in self.levels), key=lambda r: r.median)
            out.append(f"lenet5: the service's {top.median:.1f} req/s = {ratio(top.median, self.hello_row.median)} of "
                       f"the bare Starlette hello endpoint's {self.hello_row.median:.1f} req/s (the HTTP ceiling on "
                       "the same core(s), measured after (2))")
        if self.cli is not None:
            row, r, limit = self.cli
            row.ratio = (f"{ratio(row.median, limit)} of the limit (1) sampled just before and after it; "
                         f"{r['ratio']:.3g}× of onnxruntime on the same pre-decoded images (its own run)")
            self.rows.append(row)
            out.append(f"alexnet: the batch CLI does {row.median:.1f} img/s = **{ratio(row.median, limit)} of the "
                       f"in-process limit** ({limit:.1f} img/s, sampled just before and after it; the same images, "
                       f"model loading excluded; {statistics.median(r['cli_outer_wall_s']):.1f} s end to end for "
                       f"{r['images']} images, start-up included); against onnxruntime at batch {r['batch_size']} "
                       f"on the same pre-decoded images, interleaved in its own run, {r['ratio']:.3g}×")
        return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_ort"]:
        ort_child(argv[1:])
        return 0
    if argv[:1] == ["_limit"]:
        limit_child(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    if args.quick:
        args.repeats, args.duration, args.ort_seconds, args.ab_pairs, args.ab_seconds = 1, 4, 1.0, 2, 1
    args.max_duration = args.max_duration or (args.duration if args.quick else 3 * args.duration)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `apt-get install wrk` (Debian/Ubuntu) or `brew install wrk`", file=sys.stderr)
        return 2
    started, load_before = time.time(), loadavg()
    models = [m for m in args.models.split(",") if m]
    results = args.results or REPO_ROOT / "results" / time.strftime("bench-%Y%m%d-%H%M%S", time.gmtime())
    results.mkdir(parents=True, exist_ok=True)
    pool = build_pool(digits=32 if "lenet5" in models else 0)
    image_dirs = {m: results / f"images-{m}" for m in ("alexnet", "lenet5")}
    # Raw uploads: the photos as JPEG for AlexNet (the PNGs are for the Locust mix), the digits as PNG for LeNet-5.
    files = {m: write_pool([p for p in for_model(pool, m) if p.content_type == UPLOADS[m][0]], image_dirs[m])
             for m in models}
    if "lenet5" not in files:  # the hello endpoint posts LeNet-5's bodies
        files["lenet5"] = write_pool(for_model(build_pool(photos=0, pngs=0), "lenet5"), image_dirs["lenet5"])
    info = machine()
    probe = LimitProbe(image_dirs, models, args.server_cpus, servers.cpu_count_of(args.server_cpus),
                       args.ort_seconds, results / "limit.log")
    try:
        bench = Bench(args, results, models, image_dirs, files, probe)
        bench.in_process_first_half()
        if "alexnet" in models and not args.skip_batch_cli:
            bench.batch_cli()
        bench.servers_in_turns()
    finally:
        probe.close()
    bench.hello()
    bench.in_process_second_half()
    headlines = bench.headlines()

    text = render(bench.rows, headlines, bench.notes, info, args, started, load_before, loadavg())
    if bench.v2_tables:
        text += ("\n### (6) Open Inference Protocol: what the v2 path costs per image\n\n"
                 "Server CPU (all its processes, /proc) per image; `image` sends the model's own uint8 tensor, so the "
                 "server decodes nothing and the client pays the decode (last column).\n\n"
                 + "\n\n".join(bench.v2_tables) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, text, args.append)
    (results / "bench.json").write_text(json.dumps({"machine": info, "rows": [r.__dict__ for r in bench.rows],
                                                    "multipart_vs_raw": bench.mp_vs_raw,
                                                    "service_vs_naive": bench.vs_naive,
                                                    "headlines": headlines}, indent=2))
    print(f"\n{text}\nwrote {args.out} (raw: {results})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
