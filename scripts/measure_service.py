"""Quick measurement that chose the service's architecture (docs/service.md); the full benchmark is loadtests/.

For AlexNet, in one run on this machine:
  1. onnxruntime alone, in-process, on preprocessed inputs, at several batch sizes (the ceiling);
  2. each service variant over HTTP on 127.0.0.1 with real JPEG uploads (raw body), N concurrent clients.
Reports wall-clock images/s and CPU ms per image (server process tree vs onnxruntime alone): on a shared machine
the second is the stable one. Variants:
  split  = serving.service:Convnet (front service + batchable model service via bentoml.depends);
  single = scripts.single_service:ConvnetSingle (batchable endpoints in the same service, via its self-client).

    .venv/bin/python scripts/measure_service.py --seconds 20 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from serverproc import free_port, start_server, stop_server, wait_ready, worker_pids  # noqa: E402

from loadtests.images import photo_jpegs  # noqa: E402
from serving.preprocess import IMAGENET, preprocess_bytes  # noqa: E402
from serving.registry import DEFAULT_MODELS_DIR, load_model  # noqa: E402

VARIANTS = {"split": "serving.service:Convnet", "single": "scripts.single_service:ConvnetSingle"}


def ort_throughput(models_dir: Path, jpegs: list[bytes], batch_sizes: list[int], seconds: float,
                   threads: int) -> dict[int, float]:
    model = load_model(models_dir / "alexnet", device="cpu", threads=threads, verify_hash=False)
    crops = np.stack([preprocess_bytes(j, IMAGENET) for j in jpegs])
    out = {}
    for bs in batch_sizes:
        batch = crops[np.arange(bs) % len(crops)]
        model.logits(batch)  # warm-up for this shape
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            model.logits(batch)
            n += bs
        out[bs] = (n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1000)
    return out


def cpu_seconds_by_process(pid: int) -> dict[str, float]:
    """User+system CPU time of the server's processes: the arbiter and each worker ("convnet_models:1", …)."""
    import psutil

    names = {p: n for n, p in worker_pids(_Proc(pid)).items()}
    out: dict[str, float] = {}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        key = "arbiter" if p.pid == pid else names.get(p.pid, "other")
        out[key] = out.get(key, 0.0) + t.user + t.system
    return out


class _Proc:  # the little of subprocess.Popen that serverproc.worker_pids uses
    def __init__(self, pid: int) -> None:
        self.pid = pid


async def http_throughput(base: str, jpegs: list[bytes], concurrency: int, seconds: float, warmup: float,
                          server_pid: int) -> dict:
    counts = {"ok": 0, "other": 0}
    latencies: list[float] = []
    measuring = False

    async def client(i: int, deadline: float) -> None:
        nonlocal measuring
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            k = i
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                r = await c.post("/classify?model=alexnet&top_k=5", content=jpegs[k % len(jpegs)],
                                 headers={"Content-Type": "image/jpeg"})
                k += concurrency
                if measuring:
                    counts["ok" if r.status_code == 200 else "other"] += 1
                    latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    deadline = start + warmup + seconds
    tasks = [asyncio.create_task(client(i, deadline)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring, t0, cpu0, client0 = True, time.perf_counter(), cpu_seconds_by_process(server_pid), time.process_time()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    cpu1, client_cpu = cpu_seconds_by_process(server_pid), time.process_time() - client0
    per_process = {k: (v - cpu0.get(k, 0.0)) / max(counts["ok"], 1) * 1000 for k, v in cpu1.items()}
    lat = np.array(latencies) * 1000
    return {"images_per_s": counts["ok"] / elapsed, "non_200": counts["other"],
            "server_cpu_ms_per_image": sum(per_process.values()),
            "cpu_ms_per_image_by_process": {k: round(v, 1) for k, v in sorted(per_process.items())},
            "client_cpu_ms_per_image": client_cpu / max(counts["ok"], 1) * 1000,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="split,single")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--images", type=int, default=32, help="distinct JPEGs (320-1024 px sides) cycled by clients")
    p.add_argument("--batch-sizes", default="1,8,16,32,64")
    p.add_argument("--models-dir", type=Path, default=Path(os.environ.get("CONVNET_MODELS_DIR", DEFAULT_MODELS_DIR)))
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the served process (repeatable)")
    p.add_argument("--output", type=Path, help="also write the JSON report here")
    args = p.parse_args()
    jpegs = [im.data for im in photo_jpegs(np.random.default_rng(0), args.images)]
    env = dict(kv.split("=", 1) for kv in args.env)
    env.setdefault("CONVNET_MODELS_DIR", str(args.models_dir))
    report: dict = {"cpus": os.cpu_count(), "concurrency": args.concurrency, "env": env}
    # onnxruntime alone with its default settings (a thread per core, spinning on), at each batch size.
    ort = ort_throughput(args.models_dir, jpegs, [int(b) for b in args.batch_sizes.split(",")], args.seconds / 4, 0)
    best = max(ort, key=lambda b: ort[b][0])
    report["ort_in_process"] = {str(k): {"images_per_s": round(v, 1), "cpu_ms_per_image": round(c, 1)}
                                for k, (v, c) in ort.items()}
    report["ort_best"] = {"batch": best, "images_per_s": round(ort[best][0], 1),
                          "cpu_ms_per_image": round(ort[best][1], 1)}
    for name in args.variants.split(","):
        port = free_port()
        proc = start_server(port, env=env, service=VARIANTS[name])
        try:
            base = f"http://127.0.0.1:{port}"
            ready_s = wait_ready(base, proc)
            r = asyncio.run(http_throughput(base, jpegs, args.concurrency, args.seconds, args.warmup, proc.pid))
        finally:
            stop_server(proc)
        r["ready_s"] = round(ready_s, 1)
        r["vs_ort_best"] = round(r["images_per_s"] / ort[best][0], 3)
        # On a shared, busy machine wall-clock rates swing with the neighbours; CPU time per image does not: the
        # throughput ratio a dedicated machine would see is the ratio of CPU cost per image.
        r["cpu_efficiency_vs_ort_best"] = round(ort[best][1] / r["server_cpu_ms_per_image"], 3)
        report[name] = {k: round(v, 3 if k.startswith(("vs_", "cpu_eff")) else 1) if isinstance(v, float) else v
                        for k, v in r.items()}
        print(name, report[name], flush=True)
    report["loadavg_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
