"""AVIF and HEIC/HEIF uploads: real files made by the encoders the packages ship (Pillow's AVIF = libavif + aom,
pillow-heif's HEIC = libheif + x265; avifenc for 10-bit AVIF, which Pillow cannot write), decoded in-process, through
a real `bentoml serve` of LeNet-5, and through the batch CLI (local and --url). Exotic formats stay refused."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

import httpx
import imagegen
import numpy as np
import pillow_heif
import pytest
from PIL import Image
from serverproc import started_server
from test_batch import cli, read_jsonl

from serving.errors import ClientError, CorruptImage
from serving.imagecheck import _boxes, _iloc_items, _leb128, _sequence_header_sizes, check_av1_frame_size
from serving.preprocess import ALLOWED_FORMATS, decode, open_image

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGIT_7 = REPO_ROOT / "examples" / "digit-7.png"
PHOTO = REPO_ROOT / "examples" / "grace_hopper.jpg"
FORMATS = ("AVIF", "HEIF")
CONTENT_TYPES = {"AVIF": "image/avif", "HEIF": "image/heic"}
SUFFIXES = {"AVIF": ".avif", "HEIF": ".heic"}
ORIENTATION = 0x0112


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def with_orientation(im: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(im, fmt, exif=exif.tobytes(), quality=95)


def sideways_digit() -> Image.Image:
    """The MNIST 7 stored rotated 90° clockwise: orientation 8 puts it upright. LeNet-5 reads the stored (sideways)
    picture as a 4, so a 7 means the orientation was honoured."""
    return Image.open(DIGIT_7).convert("RGB").transpose(Image.Transpose.ROTATE_270)


def oversized_header(fmt: str, width: int, height: int) -> bytes:
    """A real small file whose header (the `ispe` box, and HEIF's clean-aperture `clap` crop) claims width×height."""
    data = encode(Image.new("RGB", (64, 48), (200, 10, 10)), fmt)
    i = data.find(b"ispe")
    assert i > 0 and data.find(b"ispe", i + 1) < 0
    data = data[:i + 8] + struct.pack(">II", width, height) + data[i + 16:]
    c = data.find(b"clap")
    if c > 0:
        data = data[:c + 4] + struct.pack(">8i", width, 1, height, 1, 0, 1, 0, 1) + data[c + 36:]
    return data


def ten_bit(fmt: str, tmp_path: Path, grey: bool = False) -> bytes:
    """A 10-bit grey ramp 0..max over 64 columns (HEIF `grey`: one channel, which Pillow gets as I;16)."""
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)
    if fmt == "HEIF":
        channels = 1 if grey else 3
        pixels = np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (32, 64, channels)))
        heif = pillow_heif.from_bytes(mode="L;16" if grey else "RGB;16", size=(64, 32), data=pixels.tobytes())
        buf = io.BytesIO()
        heif.save(buf, quality=-1)  # lossless; pillow-heif writes 16-bit input as 10-bit
        return buf.getvalue()
    avifenc = shutil.which("avifenc")
    if avifenc is None:
        pytest.fail("avifenc is missing: `make test` installs it (scripts/apt-tools.sh)")
    png, out = tmp_path / "ramp16.png", tmp_path / "ramp10.avif"
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp[None, :], (32, 64)))).save(png)
    subprocess.run([avifenc, "--depth", "10", "-y", "444", "--min", "0", "--max", "0", str(png), str(out)],
                   check=True, capture_output=True, timeout=60)
    return out.read_bytes()


def bit_depth(fmt: str, data: bytes) -> int:
    if fmt == "HEIF":
        return pillow_heif.open_heif(io.BytesIO(data)).info["bit_depth"]
    i = data.find(b"pixi")  # pixi: version/flags (4), channel count (1), bits per channel
    return data[i + 9]


def two_frames(fmt: str) -> bytes:
    red, green = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 255, 0))
    return encode(red, fmt, save_all=True, append_images=[green], quality=95)


def exotic_files() -> dict[str, bytes]:
    """Real images in formats we keep refusing. PSD: Pillow cannot write it, so a minimal valid one by hand."""
    im = Image.new("RGB", (16, 16), (1, 2, 3))
    psd = (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 16, 16, 8, 3) + struct.pack(">III", 0, 0, 0)
           + struct.pack(">H", 0) + bytes(16 * 16 * 3))
    return {"tga": encode(im, "TGA"), "pcx": encode(im, "PCX"), "ico": encode(im, "ICO"), "qoi": encode(im, "QOI"),
            "jp2": encode(im, "JPEG2000"), "psd": psd}


def error_code(data: bytes) -> str:
    with pytest.raises(ClientError) as info:
        decode(data)
    return info.value.code


# ---- in-process: the decoder's guarantees ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_photo_decodes_close_to_the_original(fmt):
    photo = Image.open(PHOTO).convert("RGB")
    data = encode(photo, fmt, quality=90)
    assert Image.open(io.BytesIO(data)).format == fmt
    out = decode(data)
    assert out.mode == "RGB" and out.size == photo.size
    assert np.abs(np.asarray(out, np.int16) - np.asarray(photo, np.int16)).mean() < 6  # lossy, not garbage


@pytest.mark.parametrize("fmt", FORMATS)
def test_orientation_is_honoured(fmt):
    """Left half red, right half blue, stored with orientation 6 (display rotated 90° clockwise): upright, the top
    rows are red and the bottom rows blue, and the picture is taller than wide."""
    a = np.zeros((60, 80, 3), np.uint8)
    a[:, :40], a[:, 40:] = (255, 0, 0), (0, 0, 255)
    out = np.asarray(decode(with_orientation(Image.fromarray(a), fmt, 6)))
    assert out.shape == (80, 60, 3)
    assert out[2, 30, 0] > 200 and out[2, 30, 2] < 50
    assert out[-3, 30, 2] > 200 and out[-3, 30, 0] < 50


@pytest.mark.parametrize(("fmt", "grey"), [("AVIF", False), ("HEIF", False), ("HEIF", True)])
def test_ten_bit_is_scaled_not_clipped(fmt, grey, tmp_path):
    """Colour: libavif/libheif hand over 8-bit, scaled; HEIF grey arrives as I;16 and to_8bit scales it."""
    data = ten_bit(fmt, tmp_path, grey)
    assert bit_depth(fmt, data) == 10
    row = np.asarray(decode(data).convert("L"), np.float64)[16]
    expected = np.linspace(0, 255, 64)
    assert np.abs(row - expected).max() <= 3, row  # clipping would saturate at 255 from ~a quarter of the ramp
    assert row[32] < 140 and row[-1] >= 250


@pytest.mark.parametrize("fmt", FORMATS)
def test_first_image_of_a_sequence(fmt):
    data = two_frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    r, g, b = np.asarray(decode(data))[24, 32]
    assert r > 200 and g < 60, (r, g, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_is_corrupt(fmt, fraction):
    data = encode(Image.open(PHOTO).convert("RGB"), fmt, quality=80)
    assert error_code(data[:int(len(data) * fraction)]) == "corrupt_image"


@pytest.mark.parametrize("fmt", FORMATS)
def test_pixel_cap_is_checked_from_the_header_before_decoding(fmt):
    """The header claims 8000×8000 (64 MP, over the 40 MP cap) over 64×48 of coded data. The cap refuses it at
    open(); the same lie under the cap (640×480) shows what decoding it would have done instead."""
    assert open_image(oversized_header(fmt, 640, 480)).size == (640, 480)
    assert error_code(oversized_header(fmt, 8000, 8000)) == "image_too_large"
    with pytest.raises(ClientError, match="over the 1 MP limit"):
        open_image(oversized_header(fmt, 1200, 1000), max_pixels=1_000_000)


def undersized_header(fmt: str, side: int, claimed: int = 64) -> bytes:
    """A real side×side image whose `ispe` box claims claimed×claimed: the coded stream is larger than its header."""
    data = encode(Image.new("RGB", (side, side), (200, 10, 10)), fmt, quality=30)
    i = data.find(b"ispe")
    return data[:i + 8] + struct.pack(">II", claimed, claimed) + data[i + 16:]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_stream_larger_than_its_header_is_never_decoded(fmt):
    """Decoder fuzzing (docs/hardening.md): an AVIF whose `ispe` claimed 64×64 over an 8192×8192 AV1 stream (1 KB)
    was decoded whole, 143 MB past the pixel cap, on the event loop as a "thumbnail". AVIF is now refused from the
    stream's sequence header at open(); libheif refuses the HEIF lie itself at load() with a RuntimeError, which
    is now a corrupt_image too."""
    data = undersized_header(fmt, 512)
    if fmt == "AVIF":
        with pytest.raises(CorruptImage, match="AV1 stream holds frames up to 512x512"):
            open_image(data)
    assert error_code(data) == "corrupt_image"


def obus_of(data: bytes) -> tuple[int, int, list[bytes]]:
    """(offset, length, OBUs) of a one-item AVIF's item data, as libavif writes it (one extent, meta before mdat)."""
    meta = next((s, e) for k, s, e in _boxes(data, 0, len(data)) if k == b"meta")
    iloc = next((s, e) for k, s, e in _boxes(data, meta[0] + 4, meta[1]) if k == b"iloc")
    (_, [(offset, length)]), = _iloc_items(data, *iloc)
    obus, pos = [], offset
    while pos < offset + length:  # a header byte (libavif writes no extension), then the size
        size, data_at = _leb128(data, pos + 1)
        obus.append(data[pos:data_at + size])
        pos = data_at + size
    return offset, length, obus


def with_item_obus(data: bytes, obus: list[bytes]) -> bytes:
    """The AVIF with its item's data replaced by these OBUs: the `iloc` length and the `mdat` size follow."""
    offset, length, _ = obus_of(data)
    new = b"".join(obus)
    grow = len(new) - length
    meta = next((s, e) for k, s, e in _boxes(data, 0, len(data)) if k == b"meta")
    iloc_at = data.find(b"iloc", meta[0])
    length_at = data.find(struct.pack(">I", length), iloc_at)
    out = bytearray(data[:offset] + new + data[offset + length:])
    out[length_at:length_at + 4] = struct.pack(">I", length + grow)
    mdat = out.find(b"mdat")
    out[mdat - 4:mdat] = struct.pack(">I", int.from_bytes(out[mdat - 4:mdat], "big") + grow)
    return bytes(out)


@pytest.mark.parametrize("between", ["nothing", "5 KB of padding"])
def test_a_larger_sequence_header_after_a_small_one_is_read_too(between):
    """dav1d obeys the latest sequence header. A file claiming 64×64 whose stream holds a 64×64 sequence header, then
    the real 4096×4096 one, passed the check when it read only the first (and, as the 4 KB it read, anything past
    some padding): dav1d then decoded the large frame, 42 MB for a 1 KB upload at 4096², 554 MB and 0.47 s for a
    3.5 KB one at libavif's 16384², on the event loop as a "thumbnail". Every sequence header is read now."""
    big = undersized_header("AVIF", 4096)
    small_header = next(o for o in obus_of(encode(Image.new("RGB", (64, 64)), "AVIF", quality=30))[2]
                        if o[0] >> 3 & 15 == 1)
    padding = [bytes([15 << 3 | 2]) + bytes([0x80 | 5000 & 0x7F, 5000 >> 7]) + bytes(5000)] if between != "nothing" \
        else []
    data = with_item_obus(big, [small_header, *padding, *obus_of(big)[2]])
    offset, length, obus = obus_of(data)
    stream = data[offset:offset + length]
    assert next(_sequence_header_sizes(stream, [100])) == (64, 64)  # what the old check read, and let through
    with pytest.raises(CorruptImage, match="AV1 stream holds frames up to 4096x4096"):
        open_image(data)
    assert error_code(data) == "corrupt_image"


def avif_of_items(items: int, extents: int, padding: int) -> bytes:
    """An ftyp, then a meta holding only an iloc of `items` items, each of `extents` extents naming the whole file
    (from its second byte to its end), then `padding` bytes: what the walk reads, not what libavif opens."""
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", 8 + len(payload)) + kind + payload
    item = lambda i: struct.pack(">HHH", i, 0, extents) + struct.pack(">II", 1, 0) * extents  # noqa: E731
    iloc = box(b"iloc", struct.pack(">I", 0) + bytes([0x44, 0x00]) + struct.pack(">H", items)
               + b"".join(item(i) for i in range(items)))
    return box(b"ftyp", b"avif" + bytes(4) + b"avifmif1") + box(b"meta", bytes(4) + iloc) + bytes(padding)


def test_thousands_of_items_naming_the_whole_file_cost_no_copies():
    """The walk reads each item's data whole now: 1,600 items each naming a 20 MB file are read as views. Copied
    (32 GB), they held the GIL 2.1 s. Items of several extents, which must be joined, may not add up to more than
    the file."""
    data = avif_of_items(1_600, 1, 20_000_000)
    t0 = time.perf_counter()
    check_av1_frame_size(data, 64, 64)
    assert time.perf_counter() - t0 < 0.5
    with pytest.raises(CorruptImage, match="name more data than the file holds"):
        check_av1_frame_size(avif_of_items(800, 2, 5_000_000), 64, 64)


def test_an_avif_of_too_many_obus_is_refused_before_decoding():
    """The walk reads every OBU's header with the GIL held, so it is bounded: a file of 25,000 empty padding OBUs
    (50 KB) is refused, where a real picture has a handful."""
    data = encode(Image.new("RGB", (64, 48), (200, 10, 10)), "AVIF", quality=60)
    assert open_image(data).size == (64, 48)
    padded = with_item_obus(data, [bytes([15 << 3 | 2, 0])] * 25_000 + obus_of(data)[2])
    with pytest.raises(CorruptImage, match="over 20,000 OBUs"):
        open_image(padded)


@pytest.mark.parametrize("where", ["pitm", "mdat"])
def test_an_avif_libavif_refuses_is_a_corrupt_image(where):
    """libavif's refusals come out of Pillow as RuntimeError, at open() (a primary item that is not there) and at
    load() (coded data dav1d cannot decode): fuzzing found both on most damaged AVIF files. Both are the bytes'
    fault: corrupt_image, not the exception the service logs as a decoder surprise."""
    data = encode(Image.new("RGB", (64, 48), (200, 10, 10)), "AVIF", quality=60)
    i = data.find(where.encode())
    if where == "pitm":  # the primary item's ID (a full box: 4 bytes of version and flags) → an item that is missing
        data = data[:i + 8] + struct.pack(">H", 99) + data[i + 10:]
    else:  # keep the sequence header at the start of the coded data, garble the frame after it
        data = data[:i + 24] + b"\xff" * (len(data) - i - 24)
    assert error_code(data) == "corrupt_image"


def test_an_avif_track_with_a_timescale_of_0_is_a_corrupt_image():
    """Pillow 13's AVIF load() divides the frame's timestamp by the track's timescale (mdhd): 0 raised
    ZeroDivisionError (found by fuzzing)."""
    data = two_frames("AVIF")
    i = data.find(b"mdhd")  # a full box: version, flags, then creation and modification times (8 bytes each in v1)
    at = i + (24 if data[i + 4] == 1 else 16)
    assert error_code(data[:at] + bytes(4) + data[at + 4:]) == "corrupt_image"


def test_exotic_formats_stay_unsupported():
    files = exotic_files()
    for name, data in files.items():
        assert Image.open(io.BytesIO(data)).format not in ALLOWED_FORMATS, name
        assert error_code(data) == "unsupported_format", name


# ---- through the service -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_server():
    with started_server(models=["lenet5"]) as (base, _proc):
        yield base


def classify(base: str, data: bytes, content_type: str) -> httpx.Response:
    return httpx.post(f"{base}/classify", params={"model": "lenet5", "top_k": 1},
                      files={"image": ("upload", data, content_type)}, timeout=60)


@pytest.mark.parametrize("fmt", FORMATS)
def test_service_classifies_avif_and_heic(lenet_server, fmt):
    digit = Image.open(DIGIT_7).convert("RGB")
    cases = {"plain": encode(digit, fmt, quality=95), "oriented": with_orientation(sideways_digit(), fmt, 8)}
    for name, data in cases.items():
        r = classify(lenet_server, data, CONTENT_TYPES[fmt])
        assert r.status_code == 200, (name, r.text)
        assert r.json()["predictions"][0]["label"] == "7", (name, r.json())
    raw = httpx.post(f"{lenet_server}/classify", params={"model": "lenet5"}, content=cases["plain"],
                     headers={"Content-Type": CONTENT_TYPES[fmt]}, timeout=60)
    assert raw.status_code == 200 and raw.json()["predictions"][0]["label"] == "7", raw.text


@pytest.mark.parametrize("fmt", FORMATS)
def test_service_refuses_bad_avif_and_heic_with_the_right_code(lenet_server, fmt):
    data = encode(Image.open(DIGIT_7).convert("RGB"), fmt, quality=95)
    cases = [(data[:len(data) // 2], 400, "corrupt_image"), (oversized_header(fmt, 8000, 8000), 413,
                                                              "image_too_large")]
    for body, status, code in cases:
        r = classify(lenet_server, body, CONTENT_TYPES[fmt])
        assert (r.status_code, r.json()["error"]) == (status, code), r.text


def test_service_refuses_exotic_formats(lenet_server):
    for name, data in exotic_files().items():
        r = classify(lenet_server, data, "application/octet-stream")
        assert (r.status_code, r.json()["error"]) == (400, "unsupported_format"), (name, r.text)


# ---- through the batch CLI ---------------------------------------------------------------------------------


def test_batch_cli_reads_avif_and_heic_locally_and_with_url(lenet_server, tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    digit = Image.open(DIGIT_7).convert("RGB")
    for fmt in FORMATS:
        suffix = SUFFIXES[fmt]
        (folder / f"seven{suffix}").write_bytes(encode(digit, fmt, quality=95))
        (folder / f"sideways{suffix}").write_bytes(with_orientation(sideways_digit(), fmt, 8))
        (folder / f"truncated{suffix}").write_bytes(encode(digit, fmt)[:60])
        (folder / f"huge{suffix}").write_bytes(oversized_header(fmt, 8000, 8000))
    (folder / "legacy.tga").write_bytes(exotic_files()["tga"])  # named explicitly below: folder walks skip .tga
    expected = {}
    for suffix in SUFFIXES.values():
        expected.update({f"seven{suffix}": "7", f"sideways{suffix}": "7", f"truncated{suffix}": "corrupt_image",
                         f"huge{suffix}": "image_too_large"})
    expected["legacy.tga"] = "unsupported_format"
    for mode, extra in (("local", []), ("url", ["--url", lenet_server])):
        out = tmp_path / f"{mode}.jsonl"
        r = cli(str(folder), str(folder / "legacy.tga"), "--model", "lenet5", "--top-k", "1", "-o", str(out),
                "--progress", "off", *extra)
        assert r.returncode in (0, 1), r.stderr  # 1: some inputs failed, as planned
        got = {Path(rec["path"]).name: rec.get("error") or rec["predictions"][0]["label"] for rec in read_jsonl(out)}
        assert got == expected, (mode, json.dumps(got, indent=1))


def test_batch_cli_says_what_a_hostile_tiff_is_and_nothing_else(tmp_path):
    """The CLI decodes with serving/preprocess.py too: its stderr holds its own summary, not libtiff's and Pillow's
    chatter about each damaged file (tests/test_abuse.py checks the service's log)."""
    files = {"broken-strips.tif": imagegen.lzw_tiff_with_broken_strips(),
             "samples.tif": imagegen.tiff_with_too_many_samples(),
             **{f"tag{tag}.tif": imagegen.tiff_with_a_tag_past_the_end(tag) for tag in range(50_001, 50_006)}}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out.jsonl"
    r = cli(str(tmp_path), "--model", "lenet5", "--top-k", "1", "-o", str(out), "--progress", "off")
    assert r.returncode == 1, r.stderr  # two files fail, the rest are classified
    errors = {Path(rec["path"]).name: rec.get("error") for rec in read_jsonl(out)}
    assert errors == {name: "corrupt_image" if name in ("broken-strips.tif", "samples.tif") else None
                      for name in files}, errors
    assert not [word for word in imagegen.DECODER_CHATTER if word in r.stderr], r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # the one-line summary
