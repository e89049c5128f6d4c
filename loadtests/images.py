"""A deterministic pool of request images for load tests and benchmarks.

Same seed → byte-identical images on every machine with the same Pillow, so every Locust process (and every
benchmark run) sends the same traffic without shipping image files. The pool mixes what real clients send:

- photo-sized JPEGs of varied dimensions (320–1024 px sides) and quality (70–95), some progressive or 4:4:4, built
  from gradients, shapes and sensor-like noise so the encoder and decoder do real work (flat colour would be unfairly
  cheap to decode);
- a few PNGs, some with an alpha channel (the service composites it onto white);
- MNIST digits from the committed sample `tests/data/mnist-sample/`, rendered at several sizes, half of them as
  dark ink on white paper, for LeNet-5.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.mnist import load_mnist

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_SAMPLE_DIR = REPO_ROOT / "tests" / "data" / "mnist-sample"
DEFAULT_SEED = 20260124


@dataclass(frozen=True)
class PoolImage:
    name: str  # a file name, unique in the pool (also used when the pool is written to a folder)
    data: bytes
    content_type: str
    model: str  # the model this picture is meant for: "alexnet" (photos) or "lenet5" (digits)
    width: int
    height: int
    label: int | None = None  # the true digit for MNIST images


# ---------------------------------------------------------------------------------------------------------------
# Photo-like pictures


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A picture with a photo's statistics: smooth gradients, overlapping shapes, soft focus and sensor noise."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    corners = rng.uniform(0, 255, size=(4, 3)).astype(np.float32)
    base = (corners[0] * (1 - xs) * (1 - ys) + corners[1] * xs * (1 - ys)
            + corners[2] * (1 - xs) * ys + corners[3] * xs * ys)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(8, 24))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.05, 0.6) * width, y0 + rng.uniform(0.05, 0.6) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            points = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(points, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.5))))
    a = np.asarray(im, dtype=np.int16)
    noise = rng.normal(0.0, float(rng.uniform(1.5, 5.0)), size=a.shape).astype(np.int16)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8), "RGB")


def encode_jpeg(im: Image.Image, quality: int, progressive: bool = False, subsampling: int = 2) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, progressive=progressive, subsampling=subsampling)
    return buf.getvalue()


def encode_png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def photo_jpegs(rng: np.random.Generator, count: int, min_side: int = 320, max_side: int = 1024) -> list[PoolImage]:
    out = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        quality = int(rng.integers(70, 96))
        progressive = bool(rng.random() < 0.25)
        subsampling = 0 if rng.random() < 0.2 else 2  # mostly 4:2:0 like cameras, some 4:4:4
        data = encode_jpeg(photo_like(rng, w, h), quality, progressive, subsampling)
        out.append(PoolImage(f"photo-{i:03d}-{w}x{h}-q{quality}.jpg", data, "image/jpeg", "alexnet", w, h))
    return out


def photo_pngs(rng: np.random.Generator, count: int) -> list[PoolImage]:
    out = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(224, 513, size=2))
        im = photo_like(rng, w, h)
        if i % 2 == 1:  # screenshots and cut-outs come with transparency
            alpha = Image.fromarray(rng.integers(128, 256, size=(h, w), dtype=np.uint8), "L")
            im = im.convert("RGBA")
            im.putalpha(alpha)
        out.append(PoolImage(f"photo-{i:03d}-{w}x{h}-{im.mode.lower()}.png", encode_png(im), "image/png",
                             "alexnet", w, h))
    return out


# ---------------------------------------------------------------------------------------------------------------
# MNIST digits


def mnist_sample(sample_dir: Path = MNIST_SAMPLE_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The committed test-split sample: (images N×28×28, labels N), read by the project's one IDX reader."""
    return load_mnist(sample_dir, "test")


def digit_images(rng: np.random.Generator, count: int, sample_dir: Path = MNIST_SAMPLE_DIR) -> list[PoolImage]:
    images, labels = mnist_sample(sample_dir)
    picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
    out = []
    for i, idx in enumerate(sorted(int(p) for p in picks)):
        side = int(rng.choice([28, 56, 96, 160]))
        im = Image.fromarray(images[idx], "L").resize((side, side), Image.Resampling.BILINEAR)
        if i % 2 == 1:  # a digit written on paper: dark ink on a light ground
            im = Image.fromarray(255 - np.asarray(im), "L")
        label = int(labels[idx])
        out.append(PoolImage(f"digit-{i:03d}-label{label}-{side}px.png", encode_png(im), "image/png", "lenet5",
                             side, side, label))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The pool


def build_pool(seed: int = DEFAULT_SEED, photos: int = 16, pngs: int = 4, digits: int = 32,
               sample_dir: Path = MNIST_SAMPLE_DIR) -> list[PoolImage]:
    """The whole pool, in a fixed order. Each kind draws from its own seeded stream, so changing one count never
    changes the other kinds' images."""
    streams = np.random.SeedSequence(seed).spawn(3)
    pool = photo_jpegs(np.random.default_rng(streams[0]), photos)
    pool += photo_pngs(np.random.default_rng(streams[1]), pngs)
    if digits:
        pool += digit_images(np.random.default_rng(streams[2]), digits, sample_dir)
    return pool


def for_model(pool: list[PoolImage], model: str) -> list[PoolImage]:
    return [p for p in pool if p.model == model]


def write_pool(pool: list[PoolImage], folder: Path) -> list[Path]:
    """Write the images as files (for wrk bodies and the batch CLI); returns the paths in pool order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in pool:
        path = folder / p.name
        path.write_bytes(p.data)
        paths.append(path)
    return paths
