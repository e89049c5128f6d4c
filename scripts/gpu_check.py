"""Verify the GPU path end to end and record GPU throughput (run by scripts/gpu_check.sh on a GPU machine).

1. onnxruntime sees CUDA (and TensorRT, if installed); serving.runtime picks them for `auto`.
2. Each model loads with device=cuda (and tensorrt when available): the session really runs on that provider,
   and its logits match the CPU session's on the same real inputs.
3. In-process throughput per batch size with I/O binding (serving.runtime.OnnxModel.run).
4. Optionally (--service, needs bentoml): `bentoml serve` with CONVNET_DEVICE, /models reports the device, and a short
   concurrent HTTP run with JPEG uploads measures end-to-end throughput.
Writes a JSON report (--output) and exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import onnxruntime as ort  # noqa: E402

try:  # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime-gpu >= 1.21); system libraries work without it
    ort.preload_dlls()
except Exception as exc:  # noqa: BLE001
    print(f"onnxruntime.preload_dlls: {exc}", file=sys.stderr)

from serving.preprocess import IMAGENET, preprocess_bytes  # noqa: E402
from serving.registry import DEFAULT_MODELS_DIR, load_model  # noqa: E402
from serving.runtime import candidate_providers  # noqa: E402


def photo_jpegs(n: int) -> list[bytes]:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(400, 1024)), int(rng.integers(300, 768))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1) + rng.normal(0, 8, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def inputs_for(model, jpegs: list[bytes], n: int) -> np.ndarray:
    r = model.recipe
    if r.kind == "imagenet":
        crops = [preprocess_bytes(j, IMAGENET) for j in jpegs]
    else:
        rng = np.random.default_rng(1)
        crops = [rng.integers(0, 256, (r.size, r.size, r.channels), dtype=np.uint8) for _ in range(8)]
    return np.stack([crops[i % len(crops)] for i in range(n)])


def throughput(model, batch: np.ndarray, seconds: float) -> float:
    model.logits(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.logits(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


async def http_run(base: str, jpegs: list[bytes], concurrency: int, seconds: float) -> dict:
    import httpx

    done = {"ok": 0, "other": 0}

    async def client(i: int, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            while time.perf_counter() < deadline:
                r = await c.post("/classify?model=alexnet", content=jpegs[i % len(jpegs)],
                                 headers={"Content-Type": "image/jpeg"})
                done["ok" if r.status_code == 200 else "other"] += 1
                i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, t0 + seconds) for i in range(concurrency)))
    return {"images_per_s": round(done["ok"] / (time.perf_counter() - t0), 1), "non_200": done["other"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--batch-sizes", default="1,8,32,64,128")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--service", action="store_true", help="also serve over HTTP and measure (needs bentoml)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--output", type=Path, default=REPO / "results" / "gpu_check.json")
    args = p.parse_args()
    report: dict = {"python": platform.python_version(), "onnxruntime": ort.__version__,
                    "available_providers": ort.get_available_providers(), "checks": {}, "throughput": {}}
    failures: list[str] = []

    def check(name: str, ok: bool, detail) -> None:
        report["checks"][name] = {"ok": bool(ok), "detail": detail}
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    auto = candidate_providers("auto")
    check("auto prefers a GPU provider", auto[0] != "CPUExecutionProvider", auto)
    devices = ["cuda"] + (["tensorrt"] if "TensorrtExecutionProvider" in ort.get_available_providers() else [])
    jpegs = photo_jpegs(16)
    for name in ("alexnet", "lenet5"):
        model_dir = args.models_dir / name
        if not (model_dir / "model.json").exists():
            check(f"{name} present", False, f"no card under {model_dir}: run make models")
            continue
        cpu = load_model(model_dir, device="cpu")
        x = inputs_for(cpu, jpegs, 16)
        ref = cpu.logits(x)
        for device in devices:
            key = f"{name}/{device}"
            try:
                t0 = time.perf_counter()
                gpu = load_model(model_dir, device=device)
                gpu.warm_up()
                load_s = time.perf_counter() - t0
                check(f"{key} runs on {device}", gpu.session.device == device,
                      {"providers": gpu.session.providers, "load_and_warm_up_s": round(load_s, 2)})
                diff = float(np.abs(gpu.logits(x) - ref).max())
                tol = 5e-2 if device == "tensorrt" else 1e-2  # TensorRT builds fp16 engines
                check(f"{key} matches CPU logits", diff <= tol * max(1.0, float(np.abs(ref).max())),
                      {"max_abs_diff": diff})
                report["throughput"][key] = {
                    str(bs): round(throughput(gpu, inputs_for(gpu, jpegs, bs), args.seconds), 1)
                    for bs in (int(b) for b in args.batch_sizes.split(","))}
                print(f"{key} images/s by batch size: {report['throughput'][key]}", flush=True)
            except Exception as e:  # noqa: BLE001 (report every failure, keep checking the rest)
                check(f"{key} loads", False, f"{type(e).__name__}: {e}")
                traceback.print_exc()

    if args.service:
        from serverproc import free_port, start_server, stop_server, wait_ready

        port = free_port()
        proc = start_server(port, env={"CONVNET_DEVICE": "cuda", "CONVNET_MODELS_DIR": str(args.models_dir)})
        try:
            base = f"http://127.0.0.1:{port}"
            ready_s = wait_ready(base, proc)
            import httpx

            cards = httpx.get(f"{base}/models").json()["models"]
            check("service /models reports cuda", all(c["runtime"]["device"] == "cuda" for c in cards),
                  {c["name"]: c["runtime"] for c in cards})
            run = asyncio.run(http_run(base, jpegs, args.concurrency, args.seconds * 4))
            report["service"] = {"ready_s": round(ready_s, 1), "concurrency": args.concurrency, **run}
            check("service answers 200 under load", run["non_200"] == 0 and run["images_per_s"] > 0, run)
        finally:
            stop_server(proc)

    report["failures"] = failures
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.output} ({'all checks passed' if not failures else f'FAILED: {failures}'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
