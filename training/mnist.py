"""MNIST's IDX files: a validating reader and a writer, numpy only.

Kept apart from training.data (which needs torch) so the load generator, the service tests and the measurement
scripts read the committed sample with this same reader instead of writing their own.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
MNIST_CLASSES = [str(d) for d in range(10)]

MNIST_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetError(Exception):
    """A dataset on disk is missing, malformed or inconsistent. The message names the file and what is wrong."""


class IdxFormatError(DatasetError):
    """An IDX file whose header or length is not what MNIST's format says."""


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":  # judged by content, not by name: a raw file named .gz still reads
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a cut-off stream is an EOFError
        raise IdxFormatError(f"{path}: corrupt or truncated gzip data ({e})") from None


def read_idx(path: str | os.PathLike, expected_magic: int, expected_dims: Sequence[int | None] | None = None
             ) -> np.ndarray:
    """An IDX file (raw or gzip-compressed) of unsigned bytes → uint8 array shaped as its header says.

    `expected_dims` checks sizes after the first: e.g. (28, 28) for MNIST images; None in it accepts any size.
    """
    path = Path(path)
    try:
        data = _read_maybe_gzip(path)
    except OSError as e:
        raise IdxFormatError(f"cannot read {path}: {e}") from None
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise IdxFormatError(f"{path}: magic number {magic} (0x{magic:08x}), expected {expected_magic} "
                             f"(0x{expected_magic:08x}); is this the right file?")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path}: truncated header ({len(data)} bytes, need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if expected_dims is not None:
        if len(shape) != 1 + len(expected_dims) or any(
                e is not None and s != e for s, e in zip(shape[1:], expected_dims, strict=True)):
            want = "N×" + "×".join("?" if e is None else str(e) for e in expected_dims) if expected_dims else "N"
            raise IdxFormatError(f"{path}: dimensions {'×'.join(map(str, shape))}, expected {want}")
    expected_len = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_len:
        kind = "truncated" if len(data) < expected_len else "has trailing bytes"
        raise IdxFormatError(f"{path}: {kind}: {len(data)} bytes, the header {shape} says {expected_len}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_mnist_images(path: str | os.PathLike) -> np.ndarray:
    """→ uint8 (N, 28, 28)."""
    return read_idx(path, IDX_IMAGES_MAGIC, (28, 28))


def read_mnist_labels(path: str | os.PathLike) -> np.ndarray:
    """→ uint8 (N,), every value a digit 0-9."""
    labels = read_idx(path, IDX_LABELS_MAGIC, ())
    if labels.size and labels.max() > 9:
        raise IdxFormatError(f"{path}: label {int(labels.max())} is not a digit 0-9")
    return labels


def find_idx_file(data_dir: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DatasetError(f"{data_dir}: no {stem}[.gz]; get MNIST with `python -m training.data download --dest "
                       f"{data_dir}` or point --data-dir at a folder with the four IDX files")


def load_mnist(data_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of the "train" or "test" split."""
    data_dir = Path(data_dir)
    images_stem, labels_stem = MNIST_SPLITS[split]
    images = read_mnist_images(find_idx_file(data_dir, images_stem))
    labels = read_mnist_labels(find_idx_file(data_dir, labels_stem))
    if len(images) != len(labels):
        raise DatasetError(f"{data_dir} {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def write_idx(path: str | os.PathLike, array: np.ndarray, magic: int) -> None:
    """uint8 array → IDX file (gzip-compressed when the name ends in .gz, with a fixed mtime so bytes reproduce)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
