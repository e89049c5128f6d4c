"""MNIST IDX reading, the committed sample, the ImageNet-layout folder dataset and the augmentations."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from imagegen import digit_png, photo
from PIL import Image

from serving.preprocess import DIGIT, IMAGENET, preprocess_bytes
from training.data import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    DatasetError,
    IdxFormatError,
    ImageFolderDataset,
    batch_loader,
    cached_digit_inputs,
    load_mnist,
    mnist_dataset,
    read_mnist_images,
    read_mnist_labels,
    write_idx,
)
from training.transforms import random_affine_uint8, random_resized_crop_flip, random_resized_crop_params

SAMPLE = Path(__file__).parent / "data" / "mnist-sample"
# The first ten training labels of MNIST, as published.
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


@pytest.fixture
def digits() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_reads_raw_and_gzip_idx(tmp_path, digits, name):
    path = tmp_path / name
    write_idx(path, digits, IDX_IMAGES_MAGIC)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_mnist_images(path)
    assert out.dtype == np.uint8 and out.shape == (7, 28, 28)
    np.testing.assert_array_equal(out, digits)


def test_gzip_detected_by_content_not_name(tmp_path, digits):
    path = tmp_path / "images-raw-but-named.gz"
    path.write_bytes(idx_bytes(digits, IDX_IMAGES_MAGIC))
    np.testing.assert_array_equal(read_mnist_images(path), digits)


def test_labels_roundtrip(tmp_path):
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    write_idx(tmp_path / "l.gz", labels, IDX_LABELS_MAGIC)
    np.testing.assert_array_equal(read_mnist_labels(tmp_path / "l.gz"), labels)


def test_wrong_magic_is_a_clear_error(tmp_path, digits):
    write_idx(tmp_path / "labels.gz", np.zeros(7, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(IdxFormatError, match=r"magic number 2049 .*expected 2051"):
        read_mnist_images(tmp_path / "labels.gz")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(IdxFormatError, match="magic number"):
        read_mnist_labels(tmp_path / "png")


def test_truncated_data_is_a_clear_error(tmp_path, digits):
    raw = idx_bytes(digits, IDX_IMAGES_MAGIC)
    (tmp_path / "cut").write_bytes(raw[:-100])
    with pytest.raises(IdxFormatError, match=r"truncated: .* the header \(7, 28, 28\) says 5504"):
        read_mnist_images(tmp_path / "cut")
    (tmp_path / "cut-header").write_bytes(raw[:10])
    with pytest.raises(IdxFormatError, match="truncated header"):
        read_mnist_images(tmp_path / "cut-header")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(IdxFormatError, match="too short"):
        read_mnist_images(tmp_path / "tiny")


def test_truncated_gzip_is_a_clear_error(tmp_path, digits):
    compressed = gzip.compress(idx_bytes(digits, IDX_IMAGES_MAGIC))
    (tmp_path / "cut.gz").write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(IdxFormatError, match="corrupt or truncated gzip"):
        read_mnist_images(tmp_path / "cut.gz")


def test_trailing_bytes_are_an_error(tmp_path, digits):
    (tmp_path / "long").write_bytes(idx_bytes(digits, IDX_IMAGES_MAGIC) + b"\x00" * 3)
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read_mnist_images(tmp_path / "long")


def test_wrong_dimensions_are_an_error(tmp_path):
    write_idx(tmp_path / "small", np.zeros((4, 27, 28), np.uint8), IDX_IMAGES_MAGIC)
    with pytest.raises(IdxFormatError, match=r"dimensions 4×27×28, expected N×28×28"):
        read_mnist_images(tmp_path / "small")
    # Right magic number but a 2-d array: the magic's dimension byte says 2, MNIST images need 3.
    data = bytearray(idx_bytes(np.zeros((4, 784), np.uint8), IDX_IMAGES_MAGIC))
    data[3] = 2
    (tmp_path / "flat").write_bytes(bytes(data))
    with pytest.raises(IdxFormatError):
        read_mnist_images(tmp_path / "flat")


def test_labels_must_be_digits(tmp_path):
    write_idx(tmp_path / "l", np.array([1, 12], np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(IdxFormatError, match="label 12 is not a digit"):
        read_mnist_labels(tmp_path / "l")


def test_missing_file_and_count_mismatch(tmp_path, digits):
    with pytest.raises(DatasetError, match=r"no train-images-idx3-ubyte\[\.gz\].*training.data download"):
        load_mnist(tmp_path, "train")
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", digits, IDX_IMAGES_MAGIC)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(6, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(DatasetError, match="7 images but 6 labels"):
        load_mnist(tmp_path, "test")


# ---------------------------------------------------------------------------------------------------------------
# The committed sample and the digit preprocessing


def test_committed_sample_is_real_mnist():
    train_x, train_y = load_mnist(SAMPLE, "train")
    test_x, test_y = load_mnist(SAMPLE, "test")
    assert train_x.shape == (500, 28, 28) and test_x.shape == (300, 28, 28)
    assert train_y[:10].tolist() == FIRST_TRAIN_LABELS
    assert set(train_y.tolist()) == set(range(10)) and set(test_y.tolist()) == set(range(10))
    assert train_x.max() == 255 and 0.1 < (train_x > 0).mean() < 0.3  # ink strokes on black, like MNIST


def test_mnist_dataset_is_the_serving_preprocessing(tmp_path):
    ds = mnist_dataset(SAMPLE, "test", cache_dir=tmp_path, limit=20)
    images, labels = ds[list(range(20))]
    assert images.dtype == torch.uint8 and images.shape == (20, 32, 32, 1) and labels.dtype == torch.int64
    raw, raw_labels = load_mnist(SAMPLE, "test")
    assert labels.tolist() == raw_labels[:20].tolist()
    for i in (0, 7, 19):  # what an uploaded PNG of the digit becomes in the service
        np.testing.assert_array_equal(images[i].numpy(), preprocess_bytes(digit_png(raw[i]), DIGIT))


def test_digit_cache_is_reused_and_keyed_by_content(tmp_path):
    raw, _ = load_mnist(SAMPLE, "test")
    first = cached_digit_inputs(raw[:10], tmp_path)
    files = list(tmp_path.glob("mnist-digits-*.npy"))
    assert len(files) == 1
    np.save(files[0], np.full_like(first, 7))  # a hit reads the file instead of recomputing
    assert (cached_digit_inputs(raw[:10], tmp_path) == 7).all()
    other = cached_digit_inputs(raw[10:20], tmp_path)  # other pixels, other key
    assert len(list(tmp_path.glob("mnist-digits-*.npy"))) == 2 and other.shape == (10, 32, 32, 1)


# ---------------------------------------------------------------------------------------------------------------
# ImageNet-layout folders


def make_image_folder(root: Path, classes: dict[str, list[tuple[int, int]]]) -> None:
    """`root/<wnid>/<wnid>_<k>.JPEG`: real photo-like JPEGs of the given sizes."""
    seed = 0
    for wnid, sizes in classes.items():
        (root / wnid).mkdir(parents=True)
        for k, (w, h) in enumerate(sizes):
            seed += 1
            (root / wnid / f"{wnid}_{k}.JPEG").write_bytes(photo(w, h, seed=seed))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    make_image_folder(tmp_path / "train", {"n02": [(300, 200), (256, 256)], "n01": [(500, 320), (240, 400)],
                                           "n03": [(640, 60)]})
    make_image_folder(tmp_path / "val", {"n02": [(320, 240)], "n01": [(260, 300)], "n03": [(400, 300)]})
    return tmp_path


def test_folder_dataset_classes_and_train_batches(image_folder):
    ds = ImageFolderDataset(image_folder / "train", train=True, seed=3)
    assert ds.classes == ["n01", "n02", "n03"] and len(ds) == 5
    assert [s.target for s in ds.samples] == [0, 0, 1, 1, 2]
    images, labels = ds[[0, 2, 4]]
    assert images.dtype == torch.uint8 and images.shape == (3, 224, 224, 3)
    assert labels.tolist() == [0, 1, 2]
    again, _ = ds[[0, 2, 4]]
    assert torch.equal(images, again)  # seeded by (seed, epoch, index): same batch from any worker
    ds.epoch = 1
    other, _ = ds[[0, 2, 4]]
    assert not torch.equal(images, other)


def test_folder_dataset_val_is_the_serving_preprocessing(image_folder):
    train = ImageFolderDataset(image_folder / "train", train=True)
    val = ImageFolderDataset(image_folder / "val", train=False, classes=train.classes)
    images, labels = val[[0, 1, 2]]
    assert labels.tolist() == [0, 1, 2] and images.shape == (3, 224, 224, 3)
    for i, sample in enumerate(val.samples):
        np.testing.assert_array_equal(images[i].numpy(), preprocess_bytes(sample.path.read_bytes(), IMAGENET))


def test_folder_dataset_errors(image_folder, tmp_path):
    with pytest.raises(DatasetError, match="differ from the training classes"):
        ImageFolderDataset(image_folder / "val", train=False, classes=["n01", "n02"])
    (tmp_path / "empty" / "n01").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(tmp_path / "empty", train=True)
    with pytest.raises(DatasetError, match="not a folder"):
        ImageFolderDataset(tmp_path / "absent", train=True)
    bad = image_folder / "train" / "n01" / "n01_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])
    ds = ImageFolderDataset(image_folder / "train", train=True)
    with pytest.raises(DatasetError, match=r"(?i)n01_0\.JPEG: .*(corrupt|truncated)"):
        ds[[0]]


def test_batch_loader_follows_the_sampler(image_folder):
    ds = ImageFolderDataset(image_folder / "val", train=False)
    batches = list(batch_loader(ds, [2, 0, 1], batch_size=2))
    assert [b[1].tolist() for b in batches] == [[2, 0], [1]]
    assert batches[0][0].shape == (2, 224, 224, 3)


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


def test_random_resized_crop_params_stay_inside_and_in_range():
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (224, 224), (100, 800), (37, 29)]:
        for _ in range(200):
            top, left, h, w = random_resized_crop_params(width, height, rng)
            assert 0 <= top and 0 <= left and 0 < h and 0 < w
            assert top + h <= height and left + w <= width
            if (h, w) != (height, width):  # not the fallback: scale and ratio as drawn, up to rounding
                assert 0.08 * 0.9 <= h * w / (width * height) <= 1.0
                assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_random_resized_crop_falls_back_to_a_centre_crop():
    # So elongated that no drawn crop fits: torchvision's fallback, the largest centred crop within ratio 3/4-4/3.
    assert random_resized_crop_params(1000, 10, np.random.default_rng(0)) == (0, 493, 10, 13)
    assert random_resized_crop_params(10, 1000, np.random.default_rng(0)) == (493, 0, 13, 10)


def test_random_resized_crop_flip_output_flip_and_determinism():
    a = np.random.default_rng(2).integers(0, 256, size=(180, 240, 3), dtype=np.uint8)
    im = Image.fromarray(a, "RGB")
    out = random_resized_crop_flip(im, 224, np.random.default_rng(5))
    assert out.dtype == np.uint8 and out.shape == (224, 224, 3)
    np.testing.assert_array_equal(out, random_resized_crop_flip(im, 224, np.random.default_rng(5)))
    assert not np.array_equal(out, random_resized_crop_flip(im, 224, np.random.default_rng(6)))
    kept = random_resized_crop_flip(im, 64, np.random.default_rng(9), flip_p=0.0)
    flipped = random_resized_crop_flip(im, 64, np.random.default_rng(9), flip_p=1.0)
    np.testing.assert_array_equal(flipped, kept[:, ::-1])
    # Full-image crop (scale 1, the image's own ratio) is just a resize: the crop box is the picture.
    whole = random_resized_crop_flip(im, 60, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3),
                                     flip_p=0.0)
    np.testing.assert_array_equal(whole, np.asarray(im.resize((60, 60), Image.Resampling.BILINEAR)))
    gray = random_resized_crop_flip(im.convert("L"), 32, np.random.default_rng(0))
    assert gray.shape == (32, 32, 1)


def test_random_affine_uint8():
    raw, _ = load_mnist(SAMPLE, "train")
    batch = torch.from_numpy(np.stack([np.pad(d, 2) for d in raw[:16]])[..., None])
    out = random_affine_uint8(batch, torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == batch.shape
    assert torch.equal(out, random_affine_uint8(batch, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, batch)
    # Small distortions: the ink stays (mass within ±25% for ±10% scale) and stays where it was, roughly.
    mass_in, mass_out = batch.float().sum((1, 2, 3)), out.float().sum((1, 2, 3))
    assert ((mass_out / mass_in - 1).abs() < 0.25).all()
    changed = (out.int() - batch.int()).abs().float().mean()
    assert 0 < changed < 40
    identity = random_affine_uint8(batch, torch.Generator().manual_seed(0), degrees=0, scale=0, shift_px=0)
    assert torch.equal(identity, batch)


def test_random_affine_shift_moves_the_ink():
    """Shift only (no rotation or zoom): every image's ink moves by at most shift_px along each axis, keeps its mass,
    and the shifts are spread over both directions of both axes, independently. Measured on the output alone."""
    n, shift = 256, 2.0
    img = torch.zeros(n, 32, 32, 1, dtype=torch.uint8)
    img[:, 14:18, 14:18] = 255
    out = random_affine_uint8(img, torch.Generator().manual_seed(1), degrees=0, scale=0, shift_px=shift)
    out = out[..., 0].float()
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = out.sum((1, 2))
    dx, dy = (xs * out).sum((1, 2)) / mass - 15.5, (ys * out).sum((1, 2)) / mass - 15.5
    assert ((mass / (16 * 255) - 1).abs() < 0.02).all()  # a translated square keeps its ink
    assert (dx.abs() <= shift + 0.05).all() and (dy.abs() <= shift + 0.05).all()
    for d in (dx, dy):
        assert d.min() < -0.75 * shift and d.max() > 0.75 * shift  # both directions reached
        assert abs(float(d.mean())) < 0.3  # centred: uniform in [-shift, shift]
    assert abs(float(torch.corrcoef(torch.stack([dx, dy]))[0, 1])) < 0.2  # x and y drawn independently
