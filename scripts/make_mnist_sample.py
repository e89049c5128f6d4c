"""Write the small real MNIST sample committed under tests/data/mnist-sample/ (the first N train and test digits).

    .venv/bin/python scripts/make_mnist_sample.py --mnist-dir ../shared/data/mnist

Same IDX .gz format and file names as the full dataset, so everything that reads MNIST reads the sample unchanged.
The .gz files are written with a fixed mtime, so rerunning reproduces the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.data import (  # noqa: E402
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_SPLITS,
    load_mnist,
    write_idx,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mnist-dir", default="data/mnist", help="folder with the full MNIST IDX files")
    p.add_argument("--out", default="tests/data/mnist-sample")
    p.add_argument("--train", type=int, default=500, help="how many training digits (from the start)")
    p.add_argument("--test", type=int, default=300, help="how many test digits (from the start)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", args.train), ("test", args.test)):
        images, labels = load_mnist(args.mnist_dir, split)
        images_stem, labels_stem = MNIST_SPLITS[split]
        write_idx(out / f"{images_stem}.gz", images[:n], IDX_IMAGES_MAGIC)
        write_idx(out / f"{labels_stem}.gz", labels[:n], IDX_LABELS_MAGIC)
        print(f"{split}: {min(n, len(images))} digits → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
