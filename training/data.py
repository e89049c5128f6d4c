"""Training data: MNIST from IDX files and ImageNet-layout folders, both yielding uint8 NHWC batches.

Every dataset here yields exactly what the served model receives (the serving input contract): MNIST digits go
through `serving.preprocess.preprocess_image(…, DIGIT)` and ImageNet validation images through
`preprocess_image(…, IMAGENET)`, so the accuracy measured in training is the accuracy of the served model.

Datasets are indexed with a *list* of indices and return a whole batch `(uint8 NHWC tensor, int64 labels)`; the loop
wraps a sampler in a `BatchSampler` and uses `DataLoader(batch_size=None)`, so in-memory MNIST costs one fancy-index
per batch instead of 128 Python calls, and folder datasets decode a whole batch per worker task.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from serving.errors import ClientError
from serving.preprocess import DIGIT, IMAGENET, Recipe, decode, preprocess_image
from training.mnist import (  # noqa: F401  (re-exported: the MNIST file format lives there, torch-free)
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    MNIST_CLASSES,
    MNIST_SPLITS,
    DatasetError,
    IdxFormatError,
    load_mnist,
    read_idx,
    read_mnist_images,
    read_mnist_labels,
    write_idx,
)
from training.transforms import random_resized_crop_flip

# Official file names and md5 of the .gz files (as torchvision lists them). Verified on download only: a local copy
# may legitimately differ (see ../shared/data/README.md: a re-ordered train-images file with the same digits).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


def digit_inputs(images: np.ndarray, progress: bool = False) -> np.ndarray:
    """28×28 MNIST digits → (N, 32, 32, 1) uint8 through the serving digit preprocessing (crop to ink, fit 20×20,
    centre of mass, pad), the very path an uploaded digit takes."""
    out = np.empty((len(images), DIGIT.size, DIGIT.size, 1), dtype=np.uint8)
    it = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="normalize_digit", unit="img", mininterval=2.0, leave=False)
    for i in it:
        out[i] = preprocess_image(Image.fromarray(images[i], "L"), DIGIT)
    return out


def cached_digit_inputs(images: np.ndarray, cache_dir: str | os.PathLike | None, progress: bool = False
                        ) -> np.ndarray:
    """`digit_inputs`, cached as a .npy keyed by the raw pixels and the recipe (so a changed recipe recomputes)."""
    if cache_dir is None:
        return digit_inputs(images, progress)
    key = hashlib.sha256(images.tobytes() + repr(DIGIT).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"mnist-digits-{key}.npy"
    if path.is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(images), DIGIT.size, DIGIT.size, 1) and cached.dtype == np.uint8:
            return cached
    out = digit_inputs(images, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, out, allow_pickle=False)
    os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return out


# ---------------------------------------------------------------------------------------------------------------
# Datasets


class ArrayDataset(torch.utils.data.Dataset):
    """Preprocessed uint8 NHWC images held in memory (MNIST)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]):
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"need uint8 NHWC images and one label each, got {images.shape} {images.dtype}, "
                             f"{len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]


def mnist_dataset(data_dir: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None,
                  progress: bool = False, limit: int | None = None) -> ArrayDataset:
    images, labels = load_mnist(data_dir, split)
    if limit:
        images, labels = images[:limit], labels[:limit]
    return ArrayDataset(cached_digit_inputs(images, cache_dir, progress), labels, MNIST_CLASSES)


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[Sample]]:
    """`root/<class>/<image>` → (sorted class names, samples); class index = position in the sorted list."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class folders (expected {root}/<wnid>/*.JPEG)")
    samples = [Sample(p, i) for i, c in enumerate(classes) for p in sorted((root / c).iterdir())
               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not samples:
        raise DatasetError(f"{root}: the class folders hold no images")
    return classes, samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageNet layout (`train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`), decoded by the serving decoder.

    train=True: torchvision's RandomResizedCrop(224) + RandomHorizontalFlip on the full-resolution decode, with a
    generator seeded by (seed, epoch, index) so a batch is the same whichever worker makes it and after a resume.
    train=False: `preprocess_image(…, IMAGENET)`, the serving path (resize 256, centre crop 224).
    """

    def __init__(self, root: str | os.PathLike, train: bool, recipe: Recipe = IMAGENET, seed: int = 0,
                 classes: list[str] | None = None):
        self.root = Path(root)
        found, self.samples = scan_image_folder(self.root)
        if classes is not None and found != classes:
            raise DatasetError(f"{self.root}: classes {found[:3]}… differ from the training classes {classes[:3]}…")
        self.classes = found
        self.train, self.recipe, self.seed = train, recipe, seed
        self.epoch = 0  # set by the training loop before each epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        try:
            data = sample.path.read_bytes()
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                return random_resized_crop_flip(decode(data).convert("RGB"), self.recipe.size, rng)
            return preprocess_image(decode(data, self.recipe), self.recipe)
        except (OSError, ClientError) as e:
            raise DatasetError(f"{sample.path}: {e}") from None

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([self.load(i) for i in indices])
        labels = torch.tensor([self.samples[i].target for i in indices], dtype=torch.long)
        return torch.from_numpy(images), labels


def batch_loader(dataset: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, batch_size: int,
                 workers: int = 0, drop_last: bool = False, pin_memory: bool = False
                 ) -> torch.utils.data.DataLoader:
    """Batches of (uint8 NHWC, int64 labels) drawn in the sampler's order."""
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
    return torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers,
                                       pin_memory=pin_memory, persistent_workers=False)


# ---------------------------------------------------------------------------------------------------------------
# Download (networked users only; nothing in the project's normal use or tests calls this)


def md5_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download_mnist(dest: str | os.PathLike, mirrors: Sequence[str] = MNIST_MIRRORS,
                   log: Callable[[str], None] = print) -> Path:
    """Fetch the four official MNIST .gz files into `dest`, verifying each download's md5.

    Files already present are kept as they are (and not re-verified), so a local copy that differs from the official
    bytes, like the shared re-ordered train-images, is never replaced.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in MNIST_FILES.items():
        target = dest / name
        if target.is_file():
            log(f"{target} exists, kept")
            continue
        errors = []
        for mirror in mirrors:
            tmp = target.with_suffix(".part")
            try:
                log(f"downloading {mirror}{name}")
                with urllib.request.urlopen(mirror + name, timeout=60) as r, open(tmp, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                got = md5_file(tmp)
                if got != md5:
                    raise DatasetError(f"md5 {got} != official {md5}")
                os.replace(tmp, target)
                break
            except (OSError, DatasetError) as e:
                tmp.unlink(missing_ok=True)
                errors.append(f"{mirror}: {e}")
        else:
            raise DatasetError(f"could not download {name}: " + "; ".join(errors))
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download MNIST (official files, md5-verified)")
    dl.add_argument("--dest", default="data/mnist")
    check = sub.add_parser("check", help="read and validate an MNIST folder, print its sizes")
    check.add_argument("--data-dir", default="data/mnist")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download_mnist(args.dest)
        else:
            for split in MNIST_SPLITS:
                images, labels = load_mnist(args.data_dir, split)
                counts = np.bincount(labels, minlength=10).tolist()
                print(f"{split}: {len(images)} images {images.shape[1]}x{images.shape[2]}, per class {counts}")
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
