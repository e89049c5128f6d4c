"""Verify the GPU path on real hardware and measure it, one stage at a time (scripts/gpu_check.sh runs them all).

    python scripts/gpu_check.py STAGE --out DIR [--models-dir DIR] [--device cuda]

Stages (each writes DIR/STAGE.json, so one that breaks costs only its own numbers):
  env      the machine: GPU, driver, CPU, versions, the execution providers onnxruntime offers, TensorRT libraries
  inproc   each model on the device vs the CPU session on the same real inputs (fp32 and, for AlexNet, fp16), then
           model-only img/s by batch size with I/O binding (input and output stay on the GPU), and the service's
           own call (`ServedModel.logits`: host uint8 in, host logits out)
  decode   JPEG → 224² crop: serving.preprocess on one core and on every core, and nvJPEG (torchvision.io on CUDA)
           with the same resize/crop recipe, with its parity against serving.preprocess
  nvdecode nvImageCodec's hardware (and hybrid CUDA) JPEG decoders: batch-256 img/s and parity with Pillow's decode
  service  `bentoml serve` with CONVNET_DEVICE, wrk POSTing real JPEGs; img/s, p50/p99, where the CPU time goes
           (front workers vs the model worker), GPU utilisation and BentoML's adaptive batch size
  batch    the batch CLI on a folder of photos with --device
  summary  one table of everything above
`--device cpu` rehearses every stage on a machine without a GPU (what CI-like machines can check).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import onnxruntime as ort  # noqa: E402

from loadtests.bench import timed_rate  # noqa: E402
from loadtests.images import photo_jpegs  # noqa: E402
from serving.preprocess import IMAGENET, preprocess_bytes  # noqa: E402
from serving.registry import DEFAULT_MODELS_DIR, load_model  # noqa: E402
from serving.runtime import candidate_providers  # noqa: E402

PHOTO_SIDES = (375, 500)  # photo-sized JPEGs, e.g. 500×375
BATCH_SIZES = (1, 8, 32, 64, 128, 256)


def photos(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs (gradients, shapes, noise; mixed quality, progressive and 4:4:4 among them) plus the one
    real photograph the repository ships."""
    real = (REPO / "examples" / "grace_hopper.jpg").read_bytes()
    return [real] + [p.data for p in photo_jpegs(np.random.default_rng(seed), n - 1, *PHOTO_SIDES)]


def sh(cmd: str) -> str:
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (proc.stdout + proc.stderr).strip()


def rate(step, per_call: int, seconds: float) -> float:
    """Images per second, after one uncounted call (cuDNN picks its algorithms on a shape's first run)."""
    return timed_rate(step, per_call, seconds)[0]


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Logits against a float32 CPU reference: absolute and relative error, top-1 agreement."""
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    return {"max_abs_diff": diff, "max_abs_ref": float(np.abs(ref).max()),
            "rel_diff": diff / max(float(np.abs(ref).max()), 1e-30),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "n": len(ref)}


# ---------------------------------------------------------------------------------------------------------------
# Stages


def stage_env(args: argparse.Namespace) -> dict:
    import ctypes

    trt = {}
    for lib in ("libnvinfer.so.10", "libnvinfer.so.8"):
        try:
            ctypes.CDLL(lib)
            trt[lib] = "loads"
        except OSError as e:
            trt[lib] = f"missing ({str(e)[:80]})"
    versions = {"python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__}
    for name in ("torch", "torchvision", "bentoml", "PIL"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a version we can't read is reported, not fatal
            versions[name] = f"unavailable: {type(e).__name__}"
    return {"gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader"),
            "cpu": sh("lscpu | sed -n 's/^Model name:[ ]*//p'"), "cpus": os.cpu_count(),
            "kernel": platform.release(), "versions": versions,
            "available_providers": ort.get_available_providers(), "auto_picks": candidate_providers("auto"),
            "tensorrt_libraries": trt, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "auto_session": auto_session(args)}


def auto_session(args: argparse.Namespace) -> dict:
    """What `CONVNET_DEVICE=auto` really starts (a provider listed as available may fail to load its libraries)."""
    t0 = time.perf_counter()
    try:
        model = load_model(args.models_dir / "lenet5", device="auto")
        return {"providers": model.session.providers, "device": model.session.device,
                "seconds": round(time.perf_counter() - t0, 2), "cuda_wait": primary_context_schedule()}
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def primary_context_schedule() -> str:
    """How this process's CUDA calls wait for device 0 (its primary context's scheduling flags), read back from the
    driver after onnxruntime made its context: what CONVNET_CUDA_WAIT set."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver"
    device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    if cuda.cuDeviceGet(ctypes.byref(device), 0) != 0 or cuda.cuDevicePrimaryCtxGetState(
            device, ctypes.byref(flags), ctypes.byref(active)) != 0:
        return "unreadable"
    schedule = {0: "auto", 1: "spin", 2: "yield", 4: "blocking sync"}.get(flags.value & 0x7, hex(flags.value))
    return f"{schedule} (context {'active' if active.value else 'inactive'})"


def bound_rate(sess: ort.InferenceSession, batch: np.ndarray, seconds: float, device: str) -> float:
    """Model-only img/s: the input is copied to the device once, the logits stay there (I/O binding)."""
    binding = sess.io_binding()
    where = "cuda" if device in ("cuda", "tensorrt") else "cpu"
    x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch), where, 0)
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, x)
    binding.bind_output(sess.get_outputs()[0].name, where)
    return rate(lambda: sess.run_with_iobinding(binding), len(batch), seconds)


def stage_inproc(args: argparse.Namespace) -> dict:
    jpegs = photos(64)
    alex_x = np.stack([preprocess_bytes(j, IMAGENET) for j in jpegs])
    rng = np.random.default_rng(1)
    out: dict = {"parity": {}, "model_only": {}, "service_call": {}, "inputs": f"{len(jpegs)} JPEGs: "
                 "examples/grace_hopper.jpg + photo-like 375-500 px, through serving.preprocess"}
    cpu_ref = {"alexnet": load_model(args.models_dir / "alexnet", device="cpu").logits(alex_x)}
    lenet_x = rng.integers(0, 256, (64, 32, 32, 1), dtype=np.uint8)
    cpu_ref["lenet5"] = load_model(args.models_dir / "lenet5", device="cpu").logits(lenet_x)
    variants = [("alexnet", "fp32"), ("alexnet", "fp16"), ("lenet5", "fp32")]
    if args.device == "cpu":
        variants = [v for v in variants if v[1] == "fp32"]
    for name, precision in variants:
        key = f"{name}/{precision}"
        try:
            t0 = time.perf_counter()
            model = load_model(args.models_dir / name, device=args.device, precision=precision)
            model.warm_up(256 if name == "alexnet" else 64)
            x = alex_x if name == "alexnet" else lenet_x
            out["parity"][key] = {**compare(cpu_ref[name], model.logits(x)), "providers": model.session.providers,
                                  "load_and_warm_up_s": round(time.perf_counter() - t0, 2)}
            print(f"parity {key}: {out['parity'][key]}", flush=True)
            sizes = args.batch_sizes if name == "alexnet" else (64, 256)
            out["model_only"][key] = {}
            out["service_call"][key] = {}
            sess, logits = model.session.session, model.logits
            for bs in sizes:
                batch = np.stack([x[i % len(x)] for i in range(bs)])
                out["model_only"][key][bs] = round(bound_rate(sess, batch, args.seconds, args.device), 1)
                out["service_call"][key][bs] = round(rate(lambda b=batch, f=logits: f(b), bs, args.seconds), 1)
                print(f"{key} batch {bs}: model-only {out['model_only'][key][bs]} img/s, "
                      f"service call {out['service_call'][key][bs]} img/s", flush=True)
            del model, sess, logits  # free the GPU memory before the next variant
        except Exception as e:  # noqa: BLE001 - report, keep measuring the other variants
            out["parity"][key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{key}: {type(e).__name__}: {e}", flush=True)
    return out


def _cpu_decode_rate(args: tuple[list[bytes], float]) -> tuple[int, float]:
    jpegs, seconds = args
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        preprocess_bytes(jpegs[n % len(jpegs)], IMAGENET)
        n += 1
    return n, time.perf_counter() - t0


def gpu_decoder():
    """nvJPEG through torchvision: decode a batch on the GPU, then torchvision's Resize(256) + CenterCrop(224)
    (bilinear, antialiased) on the GPU: the recipe serving.preprocess reproduces with Pillow."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    def run(jpegs: list[bytes]) -> np.ndarray:
        data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
        images = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        crops = [F.center_crop(F.resize(im, [256], antialias=True), [224]) for im in images]
        return torch.stack(crops).permute(0, 2, 3, 1).contiguous().cpu().numpy()

    return run


def decode_only(jpegs: list[bytes], batch_size: int):
    """nvJPEG's batched decode alone, to the GPU (no resize, no copy back): the most GPU decoding could give."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(batch_size)]

    def step() -> None:
        decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        torch.cuda.synchronize()

    return step


def stage_decode(args: argparse.Namespace) -> dict:
    jpegs = photos(64, seed=2)
    one_core = _cpu_decode_rate((jpegs, args.seconds))
    cpus = os.cpu_count() or 1
    with ProcessPoolExecutor(cpus) as pool:
        parts = list(pool.map(_cpu_decode_rate, [(jpegs, args.seconds)] * cpus))
    out: dict = {"inputs": "64 JPEGs, 375-500 px", "pillow_one_core": round(one_core[0] / one_core[1], 1),
                 "pillow_all_cores": round(sum(n for n, _ in parts) / max(s for _, s in parts), 1),
                 "cpus": cpus}
    print(f"decode: Pillow {out['pillow_one_core']} img/s on one core, {out['pillow_all_cores']} on {cpus}", flush=True)
    try:
        run = gpu_decoder()
        ref = np.stack([preprocess_bytes(j, IMAGENET) for j in jpegs])
        got = run(jpegs)
        d = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        out["nvjpeg_parity"] = {"max_abs_diff": int(d.max()), "mean_abs_diff": float(d.mean()),
                                "share_within_2": float((d <= 2).mean())}
        model = load_model(args.models_dir / "alexnet", device="cpu")
        out["nvjpeg_parity"]["top1_agreement_fp32"] = float(
            (model.logits(got).argmax(1) == model.logits(ref).argmax(1)).mean())
        for bs in (64, 256):
            batch = [jpegs[i % len(jpegs)] for i in range(bs)]
            out[f"nvjpeg_batch{bs}"] = round(rate(lambda b=batch: run(b), bs, args.seconds), 1)
        out["nvjpeg_decode_only_batch256"] = round(rate(decode_only(jpegs, 256), 256, args.seconds), 1)
        print(f"decode: nvJPEG {out}", flush=True)
    except Exception as e:  # noqa: BLE001 - no CUDA torchvision here: say so
        out["nvjpeg_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"decode: nvJPEG unavailable: {out['nvjpeg_error']}", flush=True)
    return out


NVIMG_SITE = Path(os.environ.get("NVIMG_SITE", "/tmp/nvimg"))  # where gpu_check.sh unpacks nvImageCodec's wheels


def stage_nvdecode(args: argparse.Namespace) -> dict:
    """nvImageCodec's JPEG decoders, the hardware engines (HW_GPU_ONLY) and CUDA with CPU Huffman decoding
    (HYBRID_CPU_GPU; GPU_ONLY would not start on the H200, "Could not create decoder"), against Pillow's full
    decode (the pixels `serving.preprocess` resizes): decode-only img/s at batch 256 and pixel parity. Plus what the
    Pillow resize-and-crop alone costs one core, the CPU's share if decoding moved to the GPU. Exploratory: nothing in
    the service uses it. nvImageCodec is not a locked dependency; it travels as wheels (docs/gpu.md)."""
    import ctypes
    import io

    from PIL import Image

    from serving.preprocess import imagenet_center_crop

    if not (NVIMG_SITE / "nvidia" / "nvimgcodec").is_dir():
        return {"error": f"nvImageCodec is not installed in {NVIMG_SITE}"}
    if args.device != "cpu":
        import torch  # only to wait for the device; imported before nvImageCodec's `nvidia` folder joins the path

        sync = torch.cuda.synchronize
    else:
        def sync() -> None:
            pass
    nvjpeg = NVIMG_SITE / "nvidia" / "cu13" / "lib" / "libnvjpeg.so.13"
    if nvjpeg.exists():  # loaded first, so the decoder's own dlopen by name finds it
        ctypes.CDLL(str(nvjpeg), mode=ctypes.RTLD_GLOBAL)
    sys.path.insert(0, str(NVIMG_SITE))
    from nvidia import nvimgcodec as nv

    jpegs = photos(64, seed=2)
    reference = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    out: dict = {"inputs": "64 JPEGs, 375-500 px (one of them a 512x600 photograph)",
                 "nvimgcodec": getattr(nv, "__version__", "?")}
    t0 = time.perf_counter()
    for im in reference:
        imagenet_center_crop(Image.fromarray(im), IMAGENET.resize, IMAGENET.size)
    out["pillow_crop_only_one_core"] = round(len(reference) / (time.perf_counter() - t0), 1)
    kinds = ("CPU_ONLY",) if args.device == "cpu" else ("HW_GPU_ONLY", "HYBRID_CPU_GPU")
    for kind in kinds:
        for options in ("", ":fancy_upsampling=1"):
            label = kind.lower() + ("_fancy_upsampling" if options else "")
            try:
                device_id = nv.NVIMGCODEC_DEVICE_CPU_ONLY if kind == "CPU_ONLY" else nv.NVIMGCODEC_DEVICE_CURRENT
                decoder = nv.Decoder(device_id=device_id, backends=[nv.Backend(getattr(nv.BackendKind, kind))],
                                     options=options)
                images = decoder.decode([nv.CodeStream(j) for j in jpegs])
                sync()
                # The hardware engines take baseline JPEGs only (not progressive ones, say): those are left out.
                decoded = [i for i, im in enumerate(images) if im is not None]
                if not decoded:
                    raise RuntimeError(f"none of the {len(jpegs)} JPEGs decoded")
                got = [np.asarray(images[i].cpu()) for i in decoded]
                refs = [reference[i] for i in decoded]
                shapes_differ = sum(g.shape != r.shape for g, r in zip(got, refs, strict=True))
                diffs = [np.abs(g.astype(np.int16) - r.astype(np.int16))
                         for g, r in zip(got, refs, strict=True) if g.shape == r.shape]
                result = {"decoded": len(decoded), "of": len(jpegs), "shapes_differ": shapes_differ,
                          "max_abs_diff": max((int(d.max()) for d in diffs), default=None),
                          "mean_abs_diff": float(np.mean([d.mean() for d in diffs])) if diffs else None,
                          "share_equal": float(np.mean([(d == 0).mean() for d in diffs])) if diffs else None}
                batch = [nv.CodeStream(jpegs[decoded[i % len(decoded)]]) for i in range(256)]

                def step(decoder=decoder, batch=batch) -> None:
                    decoder.decode(batch)
                    sync()

                result["batch256_img_s"] = round(rate(step, len(batch), args.seconds), 1)
            except Exception as e:  # noqa: BLE001 - a backend this machine lacks is reported, not fatal
                result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            out[label] = result
            print(f"nvdecode {label}: {result}", flush=True)
    return out


class Sampler:
    """Background samples while a load runs: CPU seconds per server process, GPU utilisation."""

    def __init__(self, pids: dict[str, int], gpu: bool) -> None:
        from loadtests.servers import cpu_seconds, thread_cpu_seconds

        self.cpu_seconds, self.pids, self.thread_cpu_seconds = cpu_seconds, pids, thread_cpu_seconds
        self.threads_start = self._threads()
        self.gpu = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                     "-lms", "250"], stdout=subprocess.PIPE, text=True) if gpu else None
        self.t0, self.start = time.perf_counter(), {k: self._cpu(p) for k, p in pids.items()}

    def _cpu(self, pid: int) -> float:
        try:
            return self.cpu_seconds(pid)
        except OSError:
            return 0.0

    def _threads(self) -> dict[str, float]:
        """CPU seconds of every worker's threads, summed by thread name (serving/threads.py names ours)."""
        total: dict[str, float] = {}
        for pid in self.pids.values():
            try:
                for name, seconds in self.thread_cpu_seconds(pid).items():
                    total[name] = total.get(name, 0.0) + seconds
            except OSError:
                continue
        return total

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy = {k: round((self._cpu(p) - self.start[k]) / wall, 2) for k, p in self.pids.items()}
        threads = {name: round((s - self.threads_start.get(name, 0.0)) / wall, 2)
                   for name, s in self._threads().items()}
        front = [v for k, v in busy.items() if not k.startswith("convnet_models")]
        out = {"model_worker_cores": sum(v for k, v in busy.items() if k.startswith("convnet_models")),
               "front_workers_cores": round(sum(front), 2), "front_workers": len(front),
               "busiest_front_worker": max(front, default=0.0),
               "thread_cores": {k: v for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.05}}
        if self.gpu is not None:
            used = [int(line.split(",")[1]) for line in sh(
                "nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits").splitlines()
                if re.fullmatch(r"\s*\d+\s*,\s*\d+\s*", line)]
            out["gpu_processes"], out["gpu_memory_mib_max_per_process"] = len(used), max(used, default=0)
            out["gpu_memory_mib_total"] = sum(used)
            self.gpu.terminate()
            samples = [float(s) for s in self.gpu.communicate()[0].split() if re.fullmatch(r"[\d.]+", s)]
            out["gpu_util_mean_pct"] = round(sum(samples) / max(len(samples), 1), 1)
        return out


def profile(pids: dict[str, int], args: argparse.Namespace) -> subprocess.Popen | None:
    """py-spy (sampling, GIL or not) on the first model worker (else the first front worker) for most of the load
    run: where its time goes, by thread."""
    workers = sorted(k for k in pids if k.startswith("convnet_models")) or sorted(pids)  # else a front worker
    if not args.profile or not workers or shutil.which("py-spy") is None:
        return None
    return subprocess.Popen(["py-spy", "record", "-p", str(pids[workers[0]]), "-d", str(args.load_seconds - 3),
                             "-r", "200", "--threads", "-f", "raw", "-o", str(args.out / f"profile{args.label}.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def histogram_totals(metrics_text: str, metric: str) -> tuple[float, float]:
    """(sum, count) of a histogram in /metrics, over every worker's series."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(metric + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(metric + "_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def batch_size_mean(metrics_text: str) -> float | None:
    total, count = histogram_totals(metrics_text, "bentoml_service_adaptive_batch_size")
    return round(total / count, 1) if count else None


def mean_between(before: str, after: str, metric: str) -> float | None:
    """A histogram's mean over what was observed between two scrapes of /metrics (e.g. one load run)."""
    (s0, c0), (s1, c1) = histogram_totals(before, metric), histogram_totals(after, metric)
    return round((s1 - s0) / (c1 - c0), 5) if c1 > c0 else None


def stage_service(args: argparse.Namespace) -> dict:
    import httpx
    from serverproc import free_port, start_server, stop_server, wait_ready, worker_pids

    from loadtests.bench import run_wrk

    folder = Path("/tmp/gpu_check_photos")
    folder.mkdir(exist_ok=True)
    files = []
    for i, j in enumerate(photos(32, seed=3)):
        files.append(folder / f"p{i:02d}.jpg")
        files[-1].write_bytes(j)
    port = free_port()
    env = {"CONVNET_DEVICE": args.device, "CONVNET_MODELS_DIR": str(args.models_dir), **dict(
        kv.split("=", 1) for kv in args.server_env)}
    log_dir = args.out if not args.label else Path("/tmp")  # files back from the GPU machine are few: one log
    proc = start_server(port, env=env, log_path=log_dir / f"server{args.label}.log")
    out: dict = {"env": env, "runs": []}
    try:
        base = f"http://127.0.0.1:{port}"
        out["ready_s"] = round(wait_ready(base, proc, timeout=300), 1)
        out["models"] = {c["name"]: c["runtime"] for c in httpx.get(f"{base}/models").json()["models"]}
        print(f"service ready in {out['ready_s']} s: {out['models']}", flush=True)
        r = httpx.post(f"{base}/classify?model=alexnet", content=files[0].read_bytes(),
                       headers={"Content-Type": "image/jpeg"}, timeout=60)
        out["preflight"] = {"status": r.status_code, "body": r.json()}
        pids = worker_pids(proc)
        lenet = [("lenet5", 64)] if "lenet5" in out["models"] else []
        for model, connections in [("alexnet", c) for c in args.connections] + lenet:
            path = f"/classify?model={model}"
            run_files = files if model == "alexnet" else [REPO / "examples" / "digit-7.png"]
            ctype = "image/jpeg" if model == "alexnet" else "image/png"
            metrics_before = httpx.get(f"{base}/metrics").text
            sampler = Sampler(pids, gpu=args.device != "cpu")
            profiler = profile(pids, args) if model == "alexnet" and connections == args.connections[0] else None
            run = run_wrk(base, path, ctype, run_files, connections, args.load_seconds, None)
            run.pop("latencies_us")  # the whole histogram: p50/p99 of it are in the run already
            if profiler is not None:
                profiler.wait(timeout=30)
            run.update(sampler.stop())
            metrics_after = httpx.get(f"{base}/metrics").text
            before, after = batch_size_mean(metrics_before), batch_size_mean(metrics_after)
            run.update({"model": model, "connections": connections, "server_env": " ".join(args.server_env),
                        "adaptive_batch_mean_overall": after,
                        "adaptive_batch_mean_before": before,
                        # the front workers' own micro-batches during this run
                        "front_batch_rows_mean": mean_between(metrics_before, metrics_after, "convnet_batch_size"),
                        "front_inference_s_mean": mean_between(metrics_before, metrics_after,
                                                               "convnet_inference_seconds")})
            out["runs"].append(run)
            print(f"service {model} c{connections}: {json.dumps(run)}", flush=True)
    finally:
        stop_server(proc)
    return out


def stage_batch(args: argparse.Namespace) -> dict:
    folder = Path("/tmp/gpu_check_batch")
    folder.mkdir(exist_ok=True)
    jpegs = photos(64, seed=4)
    for i in range(args.batch_images):
        (folder / f"{i:05d}.jpg").write_bytes(jpegs[i % len(jpegs)])
    out: dict = {"images": args.batch_images, "runs": []}
    for batch_size, decode_in in ((64, "processes"), (256, "processes"), (256, "threads")):
        summary = Path("/tmp/gpu_check_batch_summary.json")
        summary.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "serving.batch", str(folder), "--model", "alexnet", "--device", args.device,
               "--models-dir", str(args.models_dir), "--batch-size", str(batch_size), "--output", "/tmp/batch.jsonl",
               "--summary-json", str(summary), "--progress", "off", "--decode-in", decode_in]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        s = json.loads(summary.read_text()) if summary.exists() else {}
        run = {"batch_size": batch_size, "rc": proc.returncode, "end_to_end_img_s": round(args.batch_images / wall, 1),
               **{k: s.get(k) for k in ("images_per_s", "device", "precision", "workers", "decode_in", "failed")},
               "stderr_tail": proc.stderr[-300:]}
        out["runs"].append(run)
        print(f"batch CLI: {json.dumps(run)}", flush=True)
    return out


def stage_summary(args: argparse.Namespace) -> dict:
    def load(stage: str) -> dict:
        path = args.out / f"{stage}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    env, inproc, decode, nvdecode, batch = (load(s) for s in ("env", "inproc", "decode", "nvdecode", "batch"))
    services = [load(path.stem) for path in sorted(args.out.glob("service*.json"))]
    lines = [f"GPU: {env.get('gpu')}; CPU: {env.get('cpu')} x{env.get('cpus')}; {env.get('versions')}",
             f"providers: {env.get('available_providers')}; TensorRT libraries: {env.get('tensorrt_libraries')}"]
    for key, p in inproc.get("parity", {}).items():
        lines.append(f"parity {key}: {p}")
    for key, rates in inproc.get("model_only", {}).items():
        lines.append(f"model-only {key}: {rates}; service call: {inproc['service_call'].get(key)}")
    lines.append(f"decode: {decode}")
    lines.append(f"nvdecode: {nvdecode}")
    for run in [run for service in services for run in service.get("runs", [])]:
        lines.append(f"service [{run.get('server_env', '')}] {run['model']} c{run['connections']}: "
                     f"{run['rate']:.0f} img/s, p50 {run['p50_ms']:.1f} p99 {run['p99_ms']:.1f} ms "
                     f"(corrected {run['p50_co_ms']:.1f} / {run['p99_co_ms']:.1f}), "
                     f"errors {run['errors']}, front {run.get('front_workers_cores')} cores "
                     f"({run.get('front_workers')} workers), model worker {run.get('model_worker_cores')}, "
                     f"GPU {run.get('gpu_util_mean_pct')}%, {run.get('gpu_memory_mib_total')} MiB in "
                     f"{run.get('gpu_processes')} processes, batch {run.get('adaptive_batch_mean_overall')}")
    for run in batch.get("runs", []):
        lines.append(f"batch CLI bs{run['batch_size']}: {run}")
    print("\n".join(lines))
    return {"lines": lines}


STAGES = {"env": stage_env, "inproc": stage_inproc, "decode": stage_decode, "nvdecode": stage_nvdecode,
          "service": stage_service, "batch": stage_batch, "summary": stage_summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--out", type=Path, required=True, help="folder for STAGE.json and logs")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--device", default="cuda", choices=("cuda", "tensorrt", "cpu"))
    p.add_argument("--seconds", type=float, default=1.5, help="per throughput point")
    p.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=list(BATCH_SIZES),
                   help="AlexNet's throughput points (default %(default)s)")
    p.add_argument("--load-seconds", type=int, default=15, help="per wrk run")
    p.add_argument("--connections", type=lambda s: [int(c) for c in s.split(",")], default=[64, 256])
    p.add_argument("--server-env", nargs="*", default=[], metavar="KEY=VALUE", help="extra CONVNET_* settings")
    p.add_argument("--batch-images", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="service: py-spy a model worker during the first run")
    p.add_argument("--label", default="", help="suffix of this run's file names (a second service configuration)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    threading.current_thread().name = args.stage
    result = STAGES[args.stage](args)
    result["stage_seconds"] = round(time.perf_counter() - t0, 1)
    if args.stage != "summary":
        (args.out / f"{args.stage}{args.label}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{args.stage}: done in {result['stage_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
