"""Large and hostile uploads sent over and over, with every serving worker's RSS read after each pass.

Used by tests/test_memory.py and, for the numbers in docs/hardening.md, on its own:

    .venv/bin/python tests/memload.py --passes 10 [--env MALLOC_ARENA_MAX=2 ...] [--memory-limit-mib 1024]

With --memory-limit-mib the server runs in a real cgroup with that memory limit (a container's `--memory`; root):
it then also reports the workers that died (killed for memory) and what the clients got meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import imagegen
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serverproc import join_cgroup, memory_limit_cgroup, server_log, started_server, worker_pids  # noqa: E402

MIB = 1 << 20


def _gradient(w: int, h: int, mode: str) -> Image.Image:
    """A smooth picture: tens of megapixels that compress to a few MB, so it passes the body limit and decodes big."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    bands = {"R": x + 0 * y, "G": y + 0 * x, "B": (x + y) / 2, "A": 255 - y / 2 + 0 * x}
    arrays = [np.asarray(bands[c], dtype=np.uint8) for c in mode]
    return Image.fromarray(np.stack(arrays, axis=-1) if len(arrays) > 1 else arrays[0], mode)


def corpus() -> list[tuple[str, bytes, str]]:
    """(name, bytes, content type): the uploads that made the front worker grow to ~1 GB (issue 15)."""
    big16 = Image.fromarray(np.tile(np.linspace(0, 65535, 6000).astype(np.uint16), (6000, 1)))
    return [
        ("png-rgb-39mp", imagegen.encode(_gradient(7300, 5400, "RGB"), "PNG"), "image/png"),
        ("png-rgba-36mp", imagegen.encode(_gradient(6000, 6000, "RGBA"), "PNG"), "image/png"),
        ("png-16bit-36mp", imagegen.encode(big16, "PNG"), "image/png"),
        ("jpeg-cmyk-36mp", imagegen.encode(Image.new("CMYK", (6000, 6000), (200, 30, 0, 10)), "JPEG", quality=90),
         "image/jpeg"),
        ("jpeg-rgb-35mp", imagegen.encode(_gradient(7000, 5000, "RGB"), "JPEG", quality=90), "image/jpeg"),
        ("tiff-rgb-25mp", imagegen.encode(_gradient(5000, 5000, "RGB"), "TIFF", compression="tiff_deflate"),
         "image/tiff"),
        ("bomb-10g-pixels", imagegen.huge_dimension_png(), "image/png"),
        # 10 MP in 20 KB, 1 pixel wide: refused from its header (400 extreme_aspect_ratio). It once held a worker
        # at 918 MB: Pillow's row pointers, the digit recipe's arrays, and a 1.6 GB Lanczos weight matrix, kept.
        ("png-line-1x10m", imagegen.thin_png(1, 10_000_000), "image/png"),
        ("png-thin-447x89k", imagegen.thin_png(447, 89_400), "image/png"),  # the thinnest 40 MP picture accepted
        ("photo", imagegen.photo(), "image/jpeg"),
    ]


def rss_by_worker(proc) -> dict[str, int]:
    import psutil

    out = {}
    for name, pid in worker_pids(proc).items():
        try:
            out[name] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def one_pass(base: str, uploads: list[tuple[str, bytes, str]], concurrency: int) -> dict[str, int]:
    """Every upload to both models, `concurrency` at a time; the status codes seen, counted."""

    def send(job):
        (name, data, ctype), model = job
        try:
            r = httpx.post(f"{base}/classify", params={"model": model}, files={"image": (name, data, ctype)},
                           timeout=120)
        except httpx.HTTPError as e:  # a worker killed mid-request (a memory limit) drops the connection
            return f"no answer ({type(e).__name__})"
        return f"{r.status_code} {r.json().get('error', 'ok')}"

    jobs = [(u, m) for u in uploads for m in ("alexnet", "lenet5")]
    counts: dict[str, int] = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for outcome in pool.map(send, jobs):
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def measure(passes: int, env: dict[str, str] | None = None, concurrency: int = 4,
            memory_limit_mib: int | None = None) -> dict:
    """Start a server (in a cgroup with `memory_limit_mib`, if given), warm it up, send the corpus `passes` times;
    RSS (bytes) per worker after warm-up, each pass; and the workers that died meanwhile (their successors say so)."""
    uploads = corpus()
    with contextlib.ExitStack() as stack:
        cgroup = stack.enter_context(memory_limit_cgroup(memory_limit_mib << 20)) if memory_limit_mib else None
        base, proc = stack.enter_context(started_server(env=env, preexec_fn=join_cgroup(cgroup) if cgroup else None))
        one_pass(base, [u for u in uploads if u[0] == "photo"], 1)
        history = {"warm": rss_by_worker(proc), "passes": [], "peaks": [], "statuses": []}
        for _ in range(passes):
            peak: dict[str, int] = {}
            done = threading.Event()

            def sample(peak=peak, done=done) -> None:  # the peak is what a pod's memory limit meets
                while not done.wait(0.05):
                    for name, rss in rss_by_worker(proc).items():
                        peak[name] = max(peak.get(name, 0), rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            history["statuses"].append(one_pass(base, uploads, concurrency))
            done.set()
            sampler.join(timeout=10)
            history["passes"].append(rss_by_worker(proc))
            history["peaks"].append(peak)
        history["worker_deaths"] = server_log(proc, 10_000_000).count("died without shutting down")
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (repeatable)")
    p.add_argument("--memory-limit-mib", type=int, default=None, help="run the server under this memory limit")
    args = p.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)
    h = measure(args.passes, env, args.concurrency, args.memory_limit_mib)
    for name in sorted(h["warm"]):
        series = [h["warm"][name]] + [p.get(name, 0) for p in h["passes"]]
        print(f"{name:18s} MiB after warm-up, then each pass: " + " ".join(f"{v / MIB:.0f}" for v in series))
        print(f"{'':18s} peak MiB during each pass: " + " ".join(f"{p.get(name, 0) / MIB:.0f}" for p in h["peaks"]))
    for i, statuses in enumerate(h["statuses"]):
        print(f"pass {i + 1}: {json.dumps(statuses)}")
    print(f"workers that died and were restarted: {h['worker_deaths']}")


if __name__ == "__main__":
    main()
