"""Real image files for tests, generated: the pathological ones clients send, and photo-like ones.

Every test that needs a bad or odd upload builds it here, so the service, the batch CLI and the preprocessing tests
exercise the same bytes.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 500, h: int = 375, seed: int = 0, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """A photo-like picture: gradients, noise and a few shapes (compresses like a photo, not like flat colour)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    base += rng.normal(0, 10, base.shape)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        draw.ellipse((x0, y0, x0 + int(rng.integers(10, w // 3 + 11)), y0 + int(rng.integers(10, h // 3 + 11))),
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return encode(im, fmt, **({"quality": quality} if fmt == "JPEG" else {}))


def digit_png(digit28: np.ndarray, dark_on_light: bool = False, scale: int = 1, fmt: str = "PNG") -> bytes:
    """An MNIST digit (light ink on black) as an image file, optionally as dark ink on paper and enlarged."""
    a = 255 - digit28 if dark_on_light else digit28
    im = Image.fromarray(a.astype(np.uint8), "L")
    if scale != 1:
        im = im.resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    return encode(im, fmt)


def drawn_digit_one(size: int = 200) -> bytes:
    """A "1" drawn with a thick black pen on white paper, off-centre, as a phone photo of a form would be."""
    im = Image.new("L", (size, size), 235)
    draw = ImageDraw.Draw(im)
    draw.line((size * 0.62, size * 0.15, size * 0.60, size * 0.85), fill=20, width=max(3, size // 14))
    return encode(im, "PNG")


def truncated_jpeg() -> bytes:
    data = photo(320, 240)
    return data[: len(data) // 2]


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def huge_dimension_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's first bytes)."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", then width and height, then CRC over type+data.
    ihdr_data = bytearray(data[16:29])
    ihdr_data[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr_data
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr_data)) & 0xFFFFFFFF)
    return bytes(data)


def thin_png(width: int, height: int) -> bytes:
    """A grey PNG, black but for a white first and last row: kilobytes of file for up to tens of megapixels, with a
    digit's ink box as tall as the picture (written row by row: no big array in memory)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    white, black, z = b"\x00" + b"\xff" * width, b"\x00" * (width + 1), zlib.compressobj(9)  # filter byte 0 a row
    rows = max(1, 4096 // (width + 1))  # rows per compress call
    inner = height - 2
    idat = [z.compress(white)] + [z.compress(black * rows) for _ in range(inner // rows)]
    idat += [z.compress(black * (inner % rows) + white), z.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, not interlaced
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def sixteen_bit_png() -> bytes:
    """A 16-bit grayscale ramp 0 … 65535 (left to right)."""
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    im = Image.fromarray(ramp)
    assert im.mode.startswith("I;16")
    return encode(im, "PNG")


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (255, 0, 0, 0)) -> bytes:
    return encode(Image.new("CMYK", (300, 300), cmyk), "JPEG", quality=95)


def exif_rotated_jpeg() -> bytes:
    """Stored 400×200 (left half black, right half white) with EXIF orientation 6: upright it is 200×400."""
    im = Image.new("RGB", (400, 200), (255, 255, 255))
    im.paste((0, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def palette_alpha_png() -> bytes:
    """A palette image whose left half is fully transparent (index 0) and right half opaque red."""
    im = Image.new("P", (64, 32), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (32, 0, 64, 32))
    return encode(im, "PNG", transparency=0)


def rgba_png() -> bytes:
    a = np.zeros((32, 32, 4), dtype=np.uint8)
    a[:, 16:] = (0, 0, 255, 255)  # left half transparent, right half opaque blue
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def animated_gif(colors=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> bytes:
    frames = [Image.new("RGB", (64, 64), c) for c in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def tiny_png() -> bytes:
    return encode(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG")


def float_tiff() -> bytes:
    ramp = np.tile(np.linspace(0.0, 1.0, 128, dtype=np.float32), (16, 1))
    return encode(Image.fromarray(ramp, "F"), "TIFF")


def off_allowlist_image() -> bytes:
    """A real image in a format we refuse (Targa)."""
    return encode(Image.new("RGB", (16, 16), (1, 2, 3)), "TGA")


TEXT = b"hello, this is not an image\n"
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"


def _tiff_entries(data: bytes) -> tuple[int, int]:
    """A little-endian TIFF's first directory: (offset of its first 12-byte entry, number of entries)."""
    assert data[:4] == b"II*\x00", data[:4]
    ifd = struct.unpack_from("<I", data, 4)[0]
    return ifd + 2, struct.unpack_from("<H", data, ifd)[0]


def _set_tiff_entry(data: bytearray, tag: int, new_tag: int, typ: int, count: int, value: int) -> None:
    first, n = _tiff_entries(bytes(data))
    for at in range(first, first + 12 * n, 12):
        if struct.unpack_from("<H", data, at)[0] == tag:
            struct.pack_into("<HHII", data, at, new_tag, typ, count, value)
            return
    raise KeyError(tag)


# What the decoders wrote to the log for the three kinds of TIFF below before they were quieted (docs/hardening.md,
# "Quiet decoders"): libtiff's stderr, Pillow's ERROR line, Pillow's per-tag warning.
DECODER_CHATTER = ("LZWDecode", "Using code not yet in table", "More samples per pixel", "Skipping tag 5",
                   "UserWarning")


def lzw_tiff_with_broken_strips() -> bytes:
    """An LZW TIFF whose every strip starts with a code the table does not hold yet: libtiff's decoder fails, and by
    default prints why on stderr ("LZWDecode: ...", "Using code not yet in table")."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = bytearray(encode(im, "TIFF", compression="tiff_lzw"))
    for offset in Image.open(io.BytesIO(bytes(data))).tag_v2[273]:  # StripOffsets
        data[offset:offset + 2] = b"\xff\xff"
    return bytes(data)


def tiff_with_too_many_samples(samples: int = 1000) -> bytes:
    """A TIFF whose SamplesPerPixel is `samples`: Pillow refuses it and logs "More samples per pixel than can be
    decoded" at ERROR."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "TIFF"))
    _set_tiff_entry(data, 277, 277, 3, 1, samples)  # SHORT, value in the entry
    return bytes(data)


def tiff_with_a_tag_past_the_end(tag: int) -> bytes:
    """A TIFF with private tag `tag` whose data lies past the end of the file: Pillow warns "Tag data larger than
    file. Skipping tag <tag>", a new message for each tag number."""
    info = {65000: (1, 2, 3)}
    data = bytearray(encode(Image.new("L", (8, 8)), "TIFF", tiffinfo=info))
    _set_tiff_entry(data, 65000, tag, 4, 100, 0x7FFF0000)  # 100 LONGs at an offset far past the end
    return bytes(data)
