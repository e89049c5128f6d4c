"""What JPEG draft decoding (reduced-scale DCT decode, serving.preprocess.decode) costs in accuracy and saves in time.

Same bytes through the service's preprocessing with and without draft:
  * LeNet-5 on MNIST test digits enlarged to big dark-on-white JPEGs: accuracy with vs without draft;
  * AlexNet on large photo-like JPEGs: top-1/top-5 agreement and pixel difference of the 224x224 input;
  * decode+preprocess time per image both ways.

    .venv/bin/python scripts/measure_draft.py [--digits 300] [--photos 24]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loadtests.images import photo_like  # noqa: E402
from serving.preprocess import decode, preprocess_bytes, preprocess_image  # noqa: E402
from serving.registry import DEFAULT_MODELS_DIR, load_model  # noqa: E402
from training.mnist import load_mnist  # noqa: E402


def without_draft(data: bytes, recipe) -> np.ndarray:
    return preprocess_image(decode(data, None), recipe)


def jpeg(im: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def timed(fn, items) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    return out, (time.perf_counter() - t0) / len(items) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", type=int, default=300)
    p.add_argument("--digit-side", type=int, default=1200)
    p.add_argument("--photos", type=int, default=24)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--mnist", type=Path, default=REPO / "tests" / "data" / "mnist-sample")
    args = p.parse_args()
    report = {}

    lenet = load_model(args.models_dir / "lenet5", device="cpu", verify_hash=False)
    images, labels = load_mnist(args.mnist, "test")
    images, labels = images[: args.digits], labels[: args.digits]
    big = [jpeg(Image.fromarray(255 - a).resize((args.digit_side, args.digit_side), Image.Resampling.BICUBIC))
           for a in images]
    drafted, t_draft = timed(lambda d: preprocess_bytes(d, lenet.recipe), big)
    full, t_full = timed(lambda d: without_draft(d, lenet.recipe), big)
    acc = {name: float((lenet.logits(np.stack(x)).argmax(1) == labels).mean()) for name, x in
           (("draft", drafted), ("no_draft", full))}
    report["lenet5_digits"] = {"n": len(big), "jpeg_side": args.digit_side, "accuracy": acc,
                               "ms_per_image": {"draft": round(t_draft, 2), "no_draft": round(t_full, 2)},
                               "weights": lenet.card.weights}

    alexnet = load_model(args.models_dir / "alexnet", device="cpu", verify_hash=False)
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(1600, 4001)), int(rng.integers(1200, 3001))) for _ in range(args.photos)]
    photos = [jpeg(photo_like(rng, w, h), 88) for w, h in sizes]
    drafted, t_draft = timed(lambda d: preprocess_bytes(d, alexnet.recipe), photos)
    full, t_full = timed(lambda d: without_draft(d, alexnet.recipe), photos)
    a, b = alexnet.logits(np.stack(drafted)), alexnet.logits(np.stack(full))
    top5 = lambda z: np.argsort(-z, axis=1)[:, :5]  # noqa: E731
    diff = np.abs(np.stack(drafted).astype(np.int16) - np.stack(full).astype(np.int16))
    report["alexnet_photos"] = {
        "n": len(photos), "sides": "1600-4000 x 1200-3000", "weights": alexnet.card.weights,
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "top5_overlap": float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top5(a), top5(b), strict=True)])),
        "input_mean_abs_diff": round(float(diff.mean()), 2), "input_p99_abs_diff": float(np.percentile(diff, 99)),
        "ms_per_image": {"draft": round(t_draft, 1), "no_draft": round(t_full, 1)}}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
