"""The load-test tooling: the CI smoke load against a real server, the SLO gate, the image pool, the baselines.

The smoke load is the one CI relies on: `python -m loadtests.run --start-server ... --max-failure-ratio 0` must pass
with zero failures against the real service and leave Locust's CSV and HTML report behind.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from loadtests import servers
from loadtests.contract import check_batch, check_predictions
from loadtests.images import build_pool, for_model
from loadtests.run import parse_duration
from serving.preprocess import DIGIT, IMAGENET, decode, preprocess_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtests.run", *args], cwd=REPO_ROOT, env=servers.base_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The CI smoke load, run once: 4 users for 15 s against a freshly started service, zero failures allowed."""
    results = tmp_path_factory.mktemp("smoke")
    proc = run_cli("--start-server", "--users", "4", "--spawn-rate", "4", "--run-time", "15s",
                   "--max-failure-ratio", "0", "--results", str(results))
    return proc, results


@pytest.mark.slow
def test_smoke_load_passes_with_zero_failures(smoke):
    proc, results = smoke
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all SLOs met" in proc.stdout
    for name in ("locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv", "report.html"):
        assert (results / name).stat().st_size > 0, name
    with open(results / "locust_final_stats.csv", newline="") as f:  # the exact end-of-run numbers
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 20
    assert int(total["Failure Count"]) == 0
    # The mix really ran: both models, both upload styles and the batch endpoint.
    names = " ".join(rows)
    for expected in ("alexnet multipart", "alexnet raw", "lenet5 multipart", "lenet5 raw", "/classify_batch"):
        assert expected in names, f"no {expected!r} requests in {sorted(rows)}"
    html = (results / "report.html").read_text()
    assert "<html" in html.lower() and "Aggregated" in html
    verdict = json.loads((results / "slo.json").read_text())
    assert verdict["misses"] == [] and verdict["aggregated"]["failures"] == 0


@pytest.mark.slow
def test_impossible_slo_is_reported_and_fails(smoke):
    _, results = smoke
    proc = run_cli("--check", str(results), "--max-failure-ratio", "0", "--p95-ms", "0.001", "--p99-ms", "0.001",
                   "--min-rps", "1000000", timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "SLO MISSED" in proc.stdout
    for objective in ("p95 latency", "p99 latency", "throughput"):
        assert objective in proc.stdout
    assert "failure ratio" not in proc.stdout.split("SLO MISSED")[1]  # zero failures met the zero-failure SLO
    misses = json.loads((results / "slo-check.json").read_text())["misses"]
    assert {m["objective"] for m in misses} == {"p95 latency", "p99 latency", "throughput"}


def test_image_pool_is_deterministic_and_realistic():
    a, b = build_pool(), build_pool()
    assert [(p.name, p.data) for p in a] == [(p.name, p.data) for p in b]
    other = build_pool(seed=1)
    assert [p.data for p in other] != [p.data for p in a]
    jpegs = [p for p in a if p.content_type == "image/jpeg"]
    pngs = [p for p in for_model(a, "alexnet") if p.content_type == "image/png"]
    digits = for_model(a, "lenet5")
    assert len(jpegs) >= 8 and len(pngs) >= 2 and len(digits) >= 16
    assert all(320 <= p.width <= 1024 and 320 <= p.height <= 1024 for p in jpegs)
    assert len({(p.width, p.height) for p in jpegs}) == len(jpegs)  # varied dimensions
    assert len({p.data[:2] for p in jpegs}) == 1 and jpegs[0].data[:2] == b"\xff\xd8"
    for p in jpegs[:4] + pngs:
        im = decode(p.data)
        assert im.size == (p.width, p.height) and im.mode == "RGB"
        assert preprocess_bytes(p.data, IMAGENET).std() > 10  # photo-like content, not a flat colour
    assert {p.label for p in digits} <= set(range(10)) and len({p.label for p in digits}) >= 5
    for p in digits[:4]:
        assert preprocess_bytes(p.data, DIGIT).shape == (32, 32, 1)


def test_answer_checks_catch_fast_wrong_answers():
    good = {"model": "lenet5", "version": "1", "weights": "trained",
            "predictions": [{"index": 7, "label": "7", "score": 0.9}, {"index": 1, "label": "1", "score": 0.05},
                            {"index": 2, "label": "2", "score": 0.01}]}
    assert check_predictions(good, "lenet5", 3) is None
    assert "model" in check_predictions({**good, "model": "alexnet"}, "lenet5", 3)
    assert "expected 3" in check_predictions({**good, "predictions": good["predictions"][:2]}, "lenet5", 3)
    unsorted = {**good, "predictions": list(reversed(good["predictions"]))}
    assert "sorted" in check_predictions(unsorted, "lenet5", 3)
    assert "malformed" in check_predictions({**good, "predictions": [{"index": 99, "label": "x", "score": 0.5}] * 3},
                                            "lenet5", 3)
    batch = {"model": "lenet5", "version": "1", "weights": "trained",
             "results": [{"index": 0, "filename": "a.png", "predictions": good["predictions"]},
                         {"index": 1, "filename": "b.png", "error": "corrupt_image", "detail": "x", "status": 400}]}
    assert check_batch(batch, "lenet5", 3, 2).startswith("image 1 failed: corrupt_image")
    assert "sent 3 images" in check_batch(batch, "lenet5", 3, 3)


def test_durations_are_always_bounded():
    assert parse_duration("15s") == 15 and parse_duration("2m") == 120 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45
    for bad in ("0", "0s", "forever", "", "100h"):
        with pytest.raises(Exception, match="duration"):
            parse_duration(bad)


def test_naive_baseline_answers_like_the_service(tmp_path):
    """The baseline the benchmark compares against serves the same contract (a real uvicorn on 127.0.0.1)."""
    digit = for_model(build_pool(photos=0, pngs=0, digits=4), "lenet5")[0]
    env = {"NAIVE_MODELS": "lenet5", "NAIVE_THREADS": "1"}
    with servers.uvicorn_app("naive", "loadtests.baselines.naive_app:app", env, log_dir=tmp_path) as naive:
        r = httpx.post(f"{naive.url}/classify?model=lenet5&top_k=3", content=digit.data,
                       headers={"Content-Type": "image/png"}, timeout=30)
        assert r.status_code == 200, r.text
        assert check_predictions(r.json(), "lenet5", 3) is None
        bad = httpx.post(f"{naive.url}/classify?model=lenet5", content=b"not an image", timeout=30)
        assert bad.status_code == 400 and bad.json()["error"] == "not_an_image"
    assert naive.proc.poll() is not None  # stopped with its process group


def proc_state(pid: int) -> str:
    """The state letter in /proc/PID/stat ("T": stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_frozen_server_takes_no_cpu_and_answers_once_awake(tmp_path):
    """`make bench` keeps the servers it compares up at once and freezes all but the one it measures."""
    digit = for_model(build_pool(photos=0, pngs=0, digits=1), "lenet5")[0]
    env = {"NAIVE_MODELS": "lenet5", "NAIVE_THREADS": "1"}
    with servers.uvicorn_app("naive", "loadtests.baselines.naive_app:app", env, log_dir=tmp_path) as naive:
        servers.freeze(naive)
        assert proc_state(naive.proc.pid) == "T"
        with servers.awake(naive):
            assert proc_state(naive.proc.pid) != "T"
            r = httpx.post(f"{naive.url}/classify?model=lenet5", content=digit.data,
                           headers={"Content-Type": "image/png"}, timeout=30)
            assert r.status_code == 200, r.text
        assert proc_state(naive.proc.pid) == "T"
    assert naive.proc.poll() is not None  # a frozen server still stops


def test_freezing_reaches_workers_in_sessions_of_their_own(tmp_path):
    """BentoML's arbiter starts each worker with setsid, outside the server's process group: freezing, CPU
    accounting and stopping follow the process tree instead."""
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
              "start_new_session=True); time.sleep(600)")
    server = servers.launch("tree", [sys.executable, "-c", script], 0, log_dir=tmp_path)
    try:
        for _ in range(100):
            pids = servers.process_tree(server.proc.pid)
            if len(pids) == 2:
                break
            time.sleep(0.05)
        assert len(pids) == 2 and os.getsid(pids[1]) != os.getsid(pids[0]), pids
        servers.freeze(server)
        assert [proc_state(p) for p in pids] == ["T", "T"]
        with servers.awake(server):
            assert "T" not in [proc_state(p) for p in pids]
        assert servers.cpu_seconds(server.proc.pid) >= 0.0
    finally:
        servers.stop(server)
        os.kill(pids[1], signal.SIGKILL)  # the child outlives its parent: it is not in the group stop() ends
    assert server.proc.poll() is not None


def test_ratios_are_taken_round_by_round():
    """A machine that slows down during the run moves both sides of a round together: the per-round ratio stays."""
    from loadtests.bench import ratio_text, run_ratios

    ours, peer = [120.0, 60.0, 90.0], [100.0, 50.0, 75.0]  # the machine halved its speed in round 2
    assert run_ratios(ours, peer) == pytest.approx([1.2, 1.2, 1.2])
    assert ratio_text(run_ratios(ours, [100.0, 40.0, 100.0])) == "1.2× (0.9–1.5)"
    assert ratio_text([1.07]) == "1.07×" and ratio_text([]) == ""
    with pytest.raises(ValueError):  # runs that were not measured in the same rounds cannot be paired
        run_ratios([1.0, 2.0], [1.0])


def test_multipart_vs_raw_headline():
    """(2c)'s headline: the median and middle half of the pairs' ratios and the extra CPU; a skipped model says why
    and where its ratio is instead."""
    from loadtests.bench import mp_vs_raw_text

    ab = {"connections": 32, "pairs": 4, "seconds": 2, "ratios": [0.96, 0.98, 1.0, 0.99],
          "extra_cpu_us": [12.0, 8.0, 10.0, 9.0], "raw_cpu_us": [560.0, 570.0, 550.0, 565.0]}
    text = mp_vs_raw_text("lenet5", ab)
    assert "**0.985× (0.96–1)**" in text and "4 pairs of 2 s turns" in text, text
    assert "+9.5 µs an answer" in text and "on 562 µs" in text and "errors" not in text, text
    assert "; **3 errors**" in mp_vs_raw_text("lenet5", {**ab, "errors": 3})
    skipped = mp_vs_raw_text("alexnet", {"connections": 32, "skipped": "a turn would need 24 s"})
    assert "not run, a turn would need 24 s" in skipped and "the rounds' above" in skipped


def test_service_vs_naive_headline():
    """(2d)'s headline: the service's answers a second over the naive app's, per pair of short turns, and what an
    answer costs each."""
    from loadtests.bench import vs_naive_text

    ab = {"connections": 32, "pairs": 4, "seconds": 2, "ratios": [1.2, 1.3, 1.25, 1.1],
          "naive_cpu_us": [1100.0, 1200.0, 1150.0, 1120.0], "service_cpu_us": [900.0, 910.0, 880.0, 950.0],
          "errors": 0}
    text = vs_naive_text("lenet5", ab)
    assert "the service **1.23× (1.1–1.3)** of the naive app's" in text and "4 pairs of 2 s turns" in text, text
    assert "905 µs against 1135" in text and "errors" not in text, text
    skipped = vs_naive_text("alexnet", {"connections": 32, "skipped": "a turn would need 24 s"})
    assert "not run, a turn would need 24 s" in skipped


def test_cpu_split_by_kind_of_thread_and_its_headline():
    """Where an image's CPU goes: the service's threads by kind, from two /proc readings, and the headline that sets
    them beside the limit's decode and onnxruntime and says what a server with no cost of its own would get."""
    from loadtests.bench import Row, cpu_split, cpu_split_text

    before = {"main": 10.0, "decode": 4.0, "infer-alexnet": 20.0}
    after = {"main": 10.6, "decode": 6.8, "decode-large": 0.3, "infer-alexnet": 30.0, "infer-lenet5": 0.2}  # new since
    split = cpu_split(before, after, 1000)
    assert split == pytest.approx({"inference": 10.2, "decoding": 3.1, "event loop and the rest": 0.6}), split
    mp = Row("2", "service, multipart", "alexnet", "", [70.0, 71.0], cpu_split=[split, split])
    raw = Row("2", "service, raw", "alexnet", "", [70.0, 71.0], cpu_split=[{**split, "event loop and the rest": 0.5}])
    text = cpu_split_text("alexnet", 32, mp, raw, [(2.7, 10.0), (2.9, 10.2)], limit_cpu=75.0, lit_per_cpu_s=65.0)
    assert "10.20 in its inference thread, 3.10 in its decoding threads, 0.60 in the event loop" in text, text
    assert "13.90 in all (0.50 in the event loop with raw uploads)" in text, text
    assert "the limit 2.80 decoding and 10.10 in onnxruntime, 13.33 per image" in text, text
    assert "LitServe 15.38, +2.05 on the limit's" in text and "**1.15× of LitServe's images**" in text, text


def wrk_stats_correct(measured: dict[int, int], interval: int) -> dict[int, int]:
    """wrk 4's stats_correct (src/stats.c), line for line, on a dict histogram."""
    data = dict(measured)
    for n in range(interval * 2, max(data) + 1):
        count, m = data.get(n, 0), n - interval
        while count and m > interval:
            data[m] = data.get(m, 0) + count
            m -= interval
    return data


def test_wrk_correction_is_undone_exactly():
    """Whatever wrk added for coordinated omission comes off again, bucket for bucket: smooth runs, runs with stalls
    many intervals long, intervals of 1 µs, and none at all."""
    import random

    from loadtests.bench import undo_wrk_correction, wrk_interval_us, wrk_percentile

    rng = random.Random(7)
    for trial in range(200):
        interval = rng.choice([1, 2, 50, 997, 2400, 70_000])
        values = [max(1, int(rng.lognormvariate(0, 0.6) * interval)) for _ in range(rng.randint(1, 400))]
        values += [interval * rng.randint(2, 40) + rng.randint(0, interval) for _ in range(rng.randint(0, 5))]
        measured: dict[int, int] = {}
        for v in values:
            measured[v] = measured.get(v, 0) + 1
        assert undo_wrk_correction(wrk_stats_correct(measured, interval), interval) == measured, trial
    assert undo_wrk_correction({5: 3, 9: 1}, 0) == {5: 3, 9: 1}  # no interval: wrk corrected nothing
    assert wrk_interval_us(8_000_000, 31, 32) == 0 and wrk_interval_us(8_000_000, 3200, 32) == 80_000
    # wrk's rank rule: round(p/100 * count + 0.5), the first value whose running count reaches it
    assert [wrk_percentile({10: 1, 20: 1, 30: 1, 40: 1}, p) for p in (25, 50, 75, 99)] == [20, 30, 40, 40]
    with pytest.raises(ValueError):  # a bucket below what larger ones would have added: not wrk's correction
        undo_wrk_correction({10: 0, 30: 1, 50: 5}, 10)


STALL_SERVER = """
import asyncio, sys
answered = 0
async def handle(reader, writer):
    global answered
    try:
        while await reader.readline():
            length = 0
            while (line := await reader.readline()) not in (b"\\r\\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            answered += 1
            if answered % 200 == 0:  # one request in two hundred waits 100 ms: a stall
                await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
            await writer.drain()
    except ConnectionError:
        pass
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def test_wrk_latencies_are_reported_as_measured_and_as_wrk_corrects_them(tmp_path):
    """Real wrk against a server that stalls 100 ms on every 200th request, one connection: the answered
    requests' own p50/p99 stay fast (199 in 200 were), wrk's corrected p99 shows the stall (a client keeping pace
    would have waited behind it), and the recovered histogram counts each answered request exactly once."""
    from loadtests.bench import run_wrk

    port = servers.free_port()
    proc = subprocess.Popen([sys.executable, "-c", STALL_SERVER, str(port)])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        r = run_wrk(f"http://127.0.0.1:{port}", "/", "image/png", [REPO_ROOT / "examples" / "digit-7.png"], 1, 3, None)
    finally:
        proc.kill()
    assert r["errors"] == 0 and r["requests"] > 300, r
    assert sum(r["latencies_us"].values()) == r["requests"]
    stalls = sum(c for v, c in r["latencies_us"].items() if v >= 100_000)
    assert abs(stalls - r["requests"] / 200) <= 2, (stalls, r["requests"])
    assert r["p50_ms"] < 20 and r["p99_ms"] < 20, r  # 99.5% of the answers came without a stall
    assert r["p99_co_ms"] >= 50, r  # ... but a client sending at the run's pace would have queued behind each


def test_the_limit_probe_samples_on_demand(tmp_path):
    """The child behind the limit (1): models loaded once, one sample per request, each a positive rate."""
    from loadtests.bench import LimitProbe
    from loadtests.images import write_pool

    write_pool(for_model(build_pool(photos=0, pngs=0, digits=4), "lenet5"), tmp_path / "lenet5")
    probe = LimitProbe({"lenet5": tmp_path / "lenet5"}, ["lenet5"], None, 1, 0.2, tmp_path / "limit.log")
    try:
        assert probe.sample("lenet5") > 0 and probe.sample("lenet5") > 0
    finally:
        probe.close()
    assert len(probe.samples["lenet5"]) == 2 and min(c for _, c in probe.samples["lenet5"]) > 0
    assert len(probe.splits["lenet5"]) == 2 and min(min(s) for s in probe.splits["lenet5"]) > 0  # decode, ORT
    assert probe.proc.returncode == 0  # it ends when its stdin closes


def test_in_process_onnxruntime_measurement(tmp_path):
    """The pinned child behind benchmark row (1), on LeNet-5 with tiny time budgets."""
    from loadtests.bench import measure_ort
    from loadtests.images import write_pool

    write_pool(for_model(build_pool(photos=0, pngs=0, digits=4), "lenet5"), tmp_path)
    r = measure_ort("lenet5", tmp_path, cpus=None, threads=1, seconds=0.2, repeats=2)
    assert set(r["batches"]) == {"1", "8", "32"}
    assert set(r["batches_cpu"]) == {"1", "8", "32"}
    for key in ("batches", "batches_cpu"):
        assert all(len(v) == 2 and min(v) > 0 for v in r[key].values())
    assert len(r["pipeline_b1"]) == len(r["pipeline_b1_cpu"]) == 2 and min(r["pipeline_b1_cpu"]) > 0


def test_runs_are_stretched_until_one_batch_of_answers_is_a_fine_step():
    """AlexNet at 32 connections answers ~64 img/s in batches of 32: 8 s runs would count in 4 img/s steps (6%)."""
    from loadtests.bench import build_parser, resolving_seconds, run_seconds

    args = build_parser().parse_args([])
    args.max_duration = 3 * args.duration
    assert run_seconds(64.0, 32, args) == 24  # 32 / 24 s = 1.3 img/s, 2.1% of the rate: as fine as 3x allows
    assert run_seconds(200.0, 32, args) == 8  # 32 / 8 s = 4 req/s = 2% already
    assert run_seconds(1800.0, 32, args) == run_seconds(60.0, 4, args) == 8  # fine steps: --duration stays
    assert run_seconds(0.0, 32, args) == 8  # a warm-up that answered nothing does not stretch
    # (2c)'s 2-s turns resolve LeNet-5 at 32 connections, not AlexNet, which would need 24 s
    assert resolving_seconds(1800.0, 32, 0.02) == 1 and resolving_seconds(68.0, 32, 0.02) == 24
    args.max_duration = args.duration  # --quick
    assert run_seconds(64.0, 32, args) == 8


def test_regenerated_report_keeps_hand_written_notes(tmp_path):
    from loadtests.bench import NOTES_MARKER, write_report

    report = tmp_path / "benchmarks.md"
    write_report(report, "# Benchmarks\n\n## pinned\n| 1 |\n", append=False)
    write_report(report, "## unpinned\n| 2 |\n", append=True)
    report.write_text(report.read_text() + f"\n{NOTES_MARKER}\n\nwhat the numbers mean\n")
    write_report(report, "# Benchmarks\n\n## pinned, re-run\n| 3 |\n", append=False)
    text = report.read_text()
    assert "re-run" in text and "| 1 |" not in text and "| 2 |" not in text
    assert text.index(NOTES_MARKER) > text.index("| 3 |") and text.endswith("what the numbers mean\n")


def test_bench_harness_produces_every_row(tmp_path):
    """`make bench` end to end on LeNet-5 with tiny budgets: every section's rows, ratios and headlines are there
    (the limit, the service raw and multipart, naive, LitServe, hello, the collector). Numbers are not judged here."""
    out = tmp_path / "bench.md"
    cmd = [sys.executable, "-m", "loadtests.bench", "--quick", "--models", "lenet5", "--connections", "4",
           "--skip-batch-cli", "--out", str(out), "--results", str(tmp_path / "raw")]
    proc = subprocess.run(cmd, cwd=servers.REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    raw = json.loads((tmp_path / "raw" / "bench.json").read_text())
    rows = raw["rows"]
    whats = {(r["section"], r["what"]) for r in rows}
    for section, what in [("1", "onnxruntime in process, batch 32"),
                          ("1", "decode + preprocess + onnxruntime in process, batch 32: THE LIMIT"),
                          ("2", "service (bentoml serve), raw uploads"),
                          ("2", "service (bentoml serve), multipart uploads"),
                          ("3", "naive Starlette app, raw uploads"),
                          ("3b", f"LitServe {version('litserve')}, multipart uploads"),
                          ("4", "Starlette hello endpoint (reads the body)")]:
        assert (section, what) in whats, (section, what, sorted(whats))
    for r in rows:
        assert r["runs"] and min(r["runs"]) > 0, r
        assert r["errors"] == 0, r
        if r["section"] in ("2", "3", "3b"):  # what an answer costs: one CPU measurement per run, of the whole tree
            assert len(r["per_cpu_s"]) == len(r["runs"]) and min(r["per_cpu_s"]) > 0, r
        if r["section"] == "2":  # the service's CPU by kind of thread, every run; LeNet-5 infers on the event loop
            assert len(r["cpu_split"]) == len(r["runs"]), r
            assert all(run["event loop and the rest"] > 0 for run in r["cpu_split"]), r
        if r["section"] in ("2", "3", "3b", "4"):  # latencies as measured and as wrk corrects them, every run
            assert len(r["p99_ms"]) == len(r["p99_co_ms"]) == len(r["runs"]), r
    ab = raw["multipart_vs_raw"]["lenet5"]
    assert len(ab["ratios"]) == len(ab["extra_cpu_us"]) == len(ab["raw_cpu_us"]) == 2, ab  # --quick: 2 pairs
    assert min(ab["ratios"]) > 0 and min(ab["raw_cpu_us"]) > 0 and ab["errors"] == 0, ab
    ab = raw["service_vs_naive"]["lenet5"]
    assert len(ab["ratios"]) == len(ab["naive_cpu_us"]) == len(ab["service_cpu_us"]) == 2, ab
    assert min(ab["ratios"]) > 0 and min(ab["naive_cpu_us"]) > 0 and ab["errors"] == 0, ab
    text = out.read_text()
    for phrase in ("of the in-process limit", "of LitServe", "of the naive app", "multipart", "p99/p50",
                   "lenet5 multipart vs raw in short turns", "lenet5 against the naive app in short turns",
                   "corrected for coordinated omission",
                   "what an image costs", "of LitServe's images", "lenet5, where an image's CPU goes",
                   "A server with no cost of its own",
                   "garbage collector", "Open Inference Protocol", "v2-bytes", "v2-uint8", "v2-uint8-json"):
        assert phrase in text, phrase


def test_side_by_side_table_pairs_runs_of_the_same_round():
    """loadtests/rounds.py (borrow_cost, quota_cost): each ratio is of the two runs of one round, summarised."""
    from loadtests.rounds import table

    def run(rate: float) -> dict:
        return {"rate": rate, "p50_ms": 1000 / rate, "p99_ms": 2000 / rate, "throttled_s": rate / 100}

    runs = {("new", 4): [run(r) for r in (30.0, 15.0, 30.0)], ("old", 4): [run(r) for r in (20.0, 10.0, 25.0)],
            ("peer", 4): [run(r) for r in (5.0, 5.0, 5.0)]}
    text = table(runs, ["new", "old", "peer"], "new", "new / this", reference_over_row=True,
                 columns={"s throttled": lambda rs: f"{max(x['throttled_s'] for x in rs):.2f}"}, compared=["old"])
    lines = text.splitlines()
    assert lines[0] == "| conns | setup | img/s | p50 ms | p99 ms | s throttled | new / this |"
    assert lines[3] == "| 4 | old | 20.0 (20.0 / 10.0 / 25.0) | 50.0 | 100.0 | 0.25 | 1.5× (1.2–1.5) |"
    assert lines[4].endswith("| 0.05 |  |")  # not compared: no ratio
    assert table(runs, ["new", "old"], "new", "old / new").splitlines()[3].endswith("| 0.667× (0.667–0.833) |")
