"""Benchmark of the batch CLI: its throughput against onnxruntime in-process, and its peak RSS against input count.

    python -m loadtests.batch_bench throughput --model alexnet --images 512 --batch-size 32
    python -m loadtests.batch_bench rss --model lenet5 --counts 1000,10000
    python -m loadtests.batch_bench all --json results/batch_bench.json

throughput: N photo-size JPEGs (500×375, deterministic photo-like content from `loadtests.images`) are written to a
folder. (a) onnxruntime alone: the same images pre-decoded with `serving.preprocess`, run through the model's
session in batches of the same size, with the same onnxruntime thread count; (b) the CLI as a real subprocess over
the folder, its images/s taken over the pipeline (model loading excluded; the wall time including it is reported
too). The two are interleaved (a, b, a, b, ...) in one run so a neighbour's load hits both alike, and the ratio of
medians is the result. The target is ≥ 0.90.

rss: the CLI over folders of 1k and 10k inputs (hard links to a pool of real JPEGs, so making 10k files is cheap
and every input is still decoded), peak RSS of the child from wait4(). Flat means streaming works.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loadtests.images import DEFAULT_SEED, encode_jpeg, photo_like
from serving.preprocess import preprocess_bytes, stack_batch
from serving.registry import DEFAULT_MODELS_DIR, load_model, read_card

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTO_SIZE = (500, 375)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1", **(extra or {})}


def make_photo_folder(folder: Path, count: int, seed: int = DEFAULT_SEED, size: tuple[int, int] = PHOTO_SIZE,
                      quality: int = 90) -> list[Path]:
    """`count` distinct photo-like JPEGs of one size; files already there (same name) are reused."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"photo-{i:05d}.jpg"
        im = photo_like(rng, *size)  # drawn even when the file exists, so image i is the same for any count
        if not path.exists():
            path.write_bytes(encode_jpeg(im, quality))
        paths.append(path)
    return paths


def link_folder(folder: Path, sources: list[Path], count: int) -> Path:
    """`count` inputs as hard links cycling over `sources`: real, distinct paths without writing `count` files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = folder / f"img-{i:06d}.jpg"
        if not link.exists():
            os.link(sources[i % len(sources)], link)
    return folder


def ort_throughput(model_dir: Path, arrays: list[np.ndarray], batch_size: int, threads: int) -> tuple[float, float]:
    """(images/s, CPU ms/image) of onnxruntime alone on pre-decoded uint8 batches: the ceiling the CLI is
    measured against."""
    model = load_model(model_dir, device="cpu", threads=threads, verify_hash=False)
    batches = [stack_batch(arrays[i:i + batch_size]) for i in range(0, len(arrays), batch_size)]
    model.logits(batches[0])  # warm-up, as the CLI's first batch is part of its pipeline but allocation isn't
    cpu0, t0 = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)), time.perf_counter()
    for b in batches:
        model.logits(b)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - cpu0
    return len(arrays) / wall, 1000 * cpu / len(arrays)


def _cpu_seconds(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def run_cli(inputs: list[str], model: str, batch_size: int, workers: int, threads: int, out_dir: Path,
            extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    """The CLI as a subprocess; its summary JSON plus the child's peak RSS (wait4) and exit status."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    cmd = [sys.executable, "-m", "serving.batch", *inputs, "--model", model, "--batch-size", str(batch_size),
           "--workers", str(workers), "--threads", str(threads), "--device", "cpu", "--progress", "off",
           "--output", str(out_dir / "out.jsonl"), "--summary-json", str(summary_path), *(extra_args or [])]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr.decode(errors='replace')}")
    summary = json.loads(summary_path.read_text())
    summary.update(exit_status=proc.returncode, outer_wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024,
                   cpu_s=_cpu_seconds(usage))
    return summary


def bench_throughput(model: str = "alexnet", images: int = 512, batch_size: int = 32, workers: int = 2,
                     threads: int = 0, rounds: int = 3, work_dir: Path | None = None,
                     models_dir: Path = DEFAULT_MODELS_DIR, decode_nice: int | None = None,
                     photos_from: Path | None = None) -> dict:
    """`photos_from`: a folder of images to cycle through (hard links) instead of generated 500×375 photos, so the
    CLI runs on the very images another measurement used (make bench: the in-process limit's)."""
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="batch-bench-"))
    if photos_from is not None:
        sources = sorted(f for f in Path(photos_from).iterdir() if f.is_file())
        photos = sorted(link_folder(work_dir / "photos", sources, images).iterdir())
    else:
        photos = make_photo_folder(work_dir / "photos", images)
    model_dir = Path(models_dir) / model
    recipe = read_card(model_dir).recipe
    arrays = [preprocess_bytes(p.read_bytes(), recipe) for p in photos]
    ort_rates, cli_rates, cli_walls, outer_walls, rss, ort_cpu, cli_cpu = [], [], [], [], [], [], []
    for r in range(rounds):
        rate, cpu_ms = ort_throughput(model_dir, arrays, batch_size, threads)
        ort_rates.append(rate)
        ort_cpu.append(cpu_ms)
        nice = [] if decode_nice is None else ["--decode-nice", str(decode_nice)]
        s = run_cli([str(work_dir / "photos")], model, batch_size, workers, threads, work_dir / f"cli-{r}",
                    ["--models-dir", str(models_dir), *nice])
        if s["processed"] != images or s["failed"]:
            raise RuntimeError(f"CLI processed {s['processed']} with {s['failed']} failures, expected {images}")
        cli_rates.append(s["images_per_s"])
        cli_walls.append(s["wall_s"])
        outer_walls.append(s["outer_wall_s"])  # the process from exec to exit: start-up and model loading included
        rss.append(s["peak_rss_mib"])
        cli_cpu.append(1000 * s["pipeline_cpu_s"] / images)
        print(f"  round {r + 1}/{rounds}: onnxruntime {ort_rates[-1]:.1f} img/s ({ort_cpu[-1]:.1f} CPU ms/img), "
              f"CLI {cli_rates[-1]:.1f} img/s ({cli_cpu[-1]:.1f} CPU ms/img), "
              f"ratio {cli_rates[-1] / ort_rates[-1]:.3f}", file=sys.stderr)
    ort_med, cli_med = statistics.median(ort_rates), statistics.median(cli_rates)
    return {"model": model, "images": images, "image_size": list(PHOTO_SIZE) if photos_from is None else None,
            "photos_from": None if photos_from is None else str(photos_from), "batch_size": batch_size,
            "workers": workers, "threads": threads, "rounds": rounds, "onnxruntime_img_s": ort_rates,
            "cli_img_s": cli_rates, "cli_wall_s": cli_walls, "cli_outer_wall_s": outer_walls,
            "cli_peak_rss_mib": rss,
            "onnxruntime_median_img_s": ort_med, "cli_median_img_s": cli_med, "ratio": cli_med / ort_med,
            "ratio_of_best": max(cli_rates) / max(ort_rates),
            "pair_ratios": [c / o for c, o in zip(cli_rates, ort_rates, strict=True)],
            "median_pair_ratio": statistics.median(c / o for c, o in zip(cli_rates, ort_rates, strict=True)),
            "onnxruntime_cpu_ms_per_img": ort_cpu, "cli_cpu_ms_per_img": cli_cpu,
            "decode_nice": decode_nice,
            "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg()}


def bench_rss(model: str = "lenet5", counts: tuple[int, ...] = (1000, 10000), pool: int = 200, batch_size: int = 32,
              workers: int = 2, threads: int = 0, work_dir: Path | None = None,
              models_dir: Path = DEFAULT_MODELS_DIR) -> dict:
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="batch-bench-"))
    sources = make_photo_folder(work_dir / "photos", pool)
    rows = []
    for n in counts:
        folder = link_folder(work_dir / f"inputs-{n}", sources, n)
        s = run_cli([str(folder)], model, batch_size, workers, threads, work_dir / f"rss-{n}",
                    ["--models-dir", str(models_dir)])
        rows.append({"inputs": n, "processed": s["processed"], "peak_rss_mib": s["peak_rss_mib"],
                     "img_s": s["images_per_s"], "wall_s": s["wall_s"]})
        print(f"  {n} inputs: peak RSS {s['peak_rss_mib']:.1f} MiB, {s['images_per_s']:.0f} img/s", file=sys.stderr)
    return {"model": model, "batch_size": batch_size, "workers": workers, "runs": rows,
            "rss_growth_mib": rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"]}


def report(results: dict) -> str:
    lines = []
    t = results.get("throughput")
    if t:
        size = f"{t['image_size'][0]}x{t['image_size'][1]}" if t["image_size"] else f"from {t['photos_from']}"
        lines.append(f"throughput ({t['model']}, {t['images']} JPEGs {size}, "
                     f"batch {t['batch_size']}, {t['workers']} decode workers, ORT threads {t['threads']}, "
                     f"median of {t['rounds']}):")
        lines.append(f"  onnxruntime in-process on pre-decoded arrays: {t['onnxruntime_median_img_s']:.1f} img/s")
        lines.append(f"  convnet-classify over the folder:             {t['cli_median_img_s']:.1f} img/s")
        lines.append(f"  ratio of medians: {t['ratio']:.3f}, of bests: {t['ratio_of_best']:.3f}, median per round: "
                     f"{t['median_pair_ratio']:.3f} ({', '.join(f'{x:.3f}' for x in t['pair_ratios'])}); "
                     "target >= 0.90")
        lines.append(f"  CPU ms/img: onnxruntime {statistics.median(t['onnxruntime_cpu_ms_per_img']):.1f}, "
                     f"CLI {statistics.median(t['cli_cpu_ms_per_img']):.1f} (pipeline only, like onnxruntime's)")
        lines.append(f"  load average at the end: {', '.join(f'{x:.2f}' for x in t['loadavg_at_end'])} on "
                     f"{t['cpu_count']} CPUs")
    r = results.get("rss")
    if r:
        lines.append(f"peak RSS ({r['model']}, batch {r['batch_size']}):")
        for row in r["runs"]:
            lines.append(f"  {row['inputs']:>7} inputs: {row['peak_rss_mib']:.1f} MiB ({row['img_s']:.0f} img/s)")
        lines.append(f"  growth: {r['rss_growth_mib']:+.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("throughput", "rss", "all"), nargs="?", default="all")
    p.add_argument("--model", default=None, help="default: alexnet for throughput, lenet5 for rss")
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--decode-nice", type=int, default=None, help="passed to the CLI (default: the CLI's default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--counts", default="1000,10000")
    p.add_argument("--work-dir", type=Path, default=None, help="where images are written (default: a temp dir)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--photos-from", type=Path, default=None,
                   help="throughput over these images (cycled) instead of generated 500x375 photos")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = p.parse_args(argv)
    results: dict = {}
    if args.what in ("throughput", "all"):
        results["throughput"] = bench_throughput(args.model or "alexnet", args.images, args.batch_size, args.workers,
                                                 args.threads, args.rounds, args.work_dir, args.models_dir,
                                                 args.decode_nice, args.photos_from)
    if args.what in ("rss", "all"):
        counts = tuple(int(c) for c in args.counts.split(","))
        results["rss"] = bench_rss(args.model or "lenet5", counts, batch_size=args.batch_size, workers=args.workers,
                                   threads=args.threads, work_dir=args.work_dir, models_dir=args.models_dir)
    print(report(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
