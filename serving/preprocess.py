"""The one place that turns image bytes into a model's input. No torch.

Training evaluation, the export checks, the service and the batch CLI all call `preprocess_bytes` (or
`preprocess_image` on an already decoded picture), so what a model saw in evaluation is exactly what it sees in
production. A model's `Recipe` is written into its card by the exporter and read back from the card at serving time.

Output is always uint8 HWC (`size`×`size`×channels): the rest of the tail (float, /255, mean/std, NCHW) lives inside
the ONNX graph, so clients send compact bytes and nothing can normalise twice.
"""

from __future__ import annotations

import ctypes
import functools
import io
import logging
import math
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pillow_heif
from PIL import Image, ImageFile, ImageOps

from serving.errors import (
    CorruptImage,
    ExtremeAspectRatio,
    ImageTooLarge,
    NotAnImage,
    UnsupportedFormat,
    UnsupportedMode,
)
from serving.imagecheck import check_av1_frame_size, check_gif_first_frame

# Formats we decode. Everything else (EPS runs Ghostscript, PDF, SVG, exotic plugins) is refused before parsing.
# AVIF is Pillow's own plugin (libavif + dav1d); HEIF/HEIC is pillow-heif's (libheif + libde265). Both parse the
# container at open() without decoding (the size comes from the `ispe` box), both hand over 8-bit data for 10/12-bit
# colour images (scaled by libavif/libheif), and HEIF grey comes as I;16 (scaled by to_8bit).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF", "HEIF")
# HEIF: the primary image only, no thumbnails, depth maps or auxiliary images decoded alongside it.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
DEFAULT_MAX_PIXELS = 40_000_000
# Panoramas reach 1:10 and long screenshots 1:30. Pillow keeps a pointer per row, so a picture 1 pixel wide costs
# ~9 bytes a pixel just loaded and the digit recipe's arrays ~45 more (a 20 KB PNG of 1×10,000,000 held a worker at
# 918 MB); at 1:200 under the pixel cap the short side is at least 447, where that overhead is lost in the pixels.
MAX_ASPECT_RATIO = 200
# `is_thumbnail`: at most 128×128 colour pixels, or as many grey samples (221×221 grey), in at most 64 KiB decode and
# preprocess in 0.7 ms at most (measured: a 128×128 colour PNG photo 0.7 ms, a 200×200 grey PNG digit 0.3 ms).
THUMBNAIL_SAMPLES = 128 * 128 * 3
THUMBNAIL_BYTES = 64 * 1024
# The service decodes pictures over this many pixels (after JPEG draft: a 12 MP phone photo decodes ~0.2 MP) one at a
# time in a thread of their own, so that a slow one (a 40 MP WebP takes 0.5 s here) never holds the others' threads.
LARGE_PICTURE_PIXELS = 4_000_000

# Truncated files are errors, never silently grey-filled images.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel cap (open_image) is the hard stop, before decoding; Pillow's bomb check (it only warns up to ~180 MP)
# is off, so it never warns either.
Image.MAX_IMAGE_PIXELS = None


def _silence_libtiff_errors() -> None:
    """Set a null error handler in the libtiff this process's Pillow uses (found among the loaded libraries: Pillow's
    wheel bundles its own copy), so libtiff prints nothing on stderr. Pillow already silences its warnings, and reads
    a failure from return codes, never from these messages."""
    try:
        with open("/proc/self/maps") as maps:  # Linux; elsewhere libtiff's messages stay
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libtiff" in line}
    except OSError:
        return
    for path in paths:
        if os.path.basename(path).startswith("libtiff"):
            libtiff = ctypes.CDLL(path)  # the library already loaded: dlopen hands back the same one
            libtiff.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
            libtiff.TIFFSetErrorHandler.restype = ctypes.c_void_p
            libtiff.TIFFSetErrorHandler(None)


# A client's bytes must not write the server's log (docs/hardening.md, "Quiet decoders"). Each upload's answer names
# what was wrong with it and /metrics counts it (convnet_decode_failures_total): keeping the decoders quiet loses
# nothing.
# - Pillow's TIFF reader warns about a damaged file's tags with the tag's number in the text ("Tag data larger than
#   file. Skipping tag 50001"): Python prints each new text once and remembers it, so each upload could add a line
#   to the log, and an entry to memory, for as long as the worker lives.
# - Pillow logs some refusals at ERROR ("More samples per pixel than can be decoded: 1000"): one a request.
# - libtiff prints its errors on stderr ("LZWDecode: Not enough data at scanline 0"): one or more a request.
warnings.filterwarnings("ignore", module=r"(PIL|pillow_heif)(\.|$)")
logging.getLogger("PIL").setLevel(logging.CRITICAL + 1)
_silence_libtiff_errors()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

# Exceptions Pillow's decoders raise on damaged data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)
# Pillow's AVIF plugin (libavif) and pillow-heif (libheif) report every file their library refuses as RuntimeError
# ("Missing or empty image item", "Decoding of color planes failed", "Security limit exceeded", ...): fuzzing found
# it on most damaged AVIF/HEIF files, at open() and at load(). For those two formats it is the bytes' fault. So is
# ZeroDivisionError: Pillow 13's AVIF load() divides a frame's timestamp by its track's timescale, which a file can
# set to 0 (fuzzing found it; AvifImagePlugin.py, `pts_in_timescales / timescale`).
_PLUGIN_ERROR_FORMATS = ("AVIF", "HEIF")
_PLUGIN_ERRORS = (RuntimeError, ZeroDivisionError)


@dataclass(frozen=True)
class Recipe:
    """How a model's input is made; stored verbatim under "preprocessing" in the model card."""

    kind: str  # "imagenet" (resize shorter side, centre crop) or "digit" (MNIST-style normalisation)
    size: int  # side of the square the model takes
    resize: int  # imagenet: shorter side before the crop; digit: box the ink is fitted into
    color: str  # "RGB" or "L"
    mean: tuple[float, ...] = field(default_factory=tuple)  # applied inside the ONNX graph, recorded for clients
    std: tuple[float, ...] = field(default_factory=tuple)
    interpolation: str = "bilinear"

    @property
    def channels(self) -> int:
        return 3 if self.color == "RGB" else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["mean"], known["std"] = tuple(d.get("mean", ())), tuple(d.get("std", ()))
        recipe = cls(**known)
        if recipe.kind not in ("imagenet", "digit") or recipe.color not in ("RGB", "L"):
            raise ValueError(f"unknown preprocessing recipe {d!r}")
        return recipe


# torchvision's ImageNet evaluation preset (Resize(256, bilinear) + CenterCrop(224)).
IMAGENET = Recipe(kind="imagenet", size=224, resize=256, color="RGB", mean=IMAGENET_MEAN, std=IMAGENET_STD)
# The way MNIST was made: ink fitted into 20×20, centred by mass in 28×28; LeNet-5 takes it padded to 32×32.
DIGIT = Recipe(kind="digit", size=32, resize=20, color="L", mean=MNIST_MEAN, std=MNIST_STD)


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only: refuses non-images, formats off the allowlist and images over the pixel cap."""
    if not data:
        raise NotAnImage("the upload is empty (0 bytes)")
    if data[:6] in (b"GIF87a", b"GIF89a"):
        check_gif_first_frame(data, max_pixels)
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # no bomb warning: MAX_IMAGE_PIXELS is None
    except Image.UnidentifiedImageError:
        if claimed := _claimed_format(data):  # its signature says it is one of ours, but its header does not parse
            raise CorruptImage(f"the {claimed} header is truncated or corrupt ({len(data)} bytes)") from None
        try:  # tell "a real image we don't take" apart from "not an image at all"
            other = Image.open(io.BytesIO(data))
            raise UnsupportedFormat(
                f"image format {other.format} is not accepted; use one of {', '.join(ALLOWED_FORMATS)}"
            ) from None
        except (Image.UnidentifiedImageError, *_DECODE_ERRORS):
            raise NotAnImage(
                f"the data is not a recognised image ({len(data)} bytes; accepted: {', '.join(ALLOWED_FORMATS)})"
            ) from None
    except _DECODE_ERRORS as e:
        raise CorruptImage(f"the image header could not be parsed: {e}") from None
    except _PLUGIN_ERRORS as e:
        if (claimed := _claimed_format(data)) not in _PLUGIN_ERROR_FORMATS:
            raise
        raise CorruptImage(f"the {claimed} header could not be parsed: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise CorruptImage(f"the image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageTooLarge(f"the image is {w}x{h} = {w * h / 1e6:.1f} MP, over the {max_pixels / 1e6:.0f} MP limit")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ExtremeAspectRatio(f"the image is {w}x{h}: one side is over {MAX_ASPECT_RATIO} times the other")
    if im.format == "AVIF":
        check_av1_frame_size(data, w, h)
    if im.format == "TIFF" and not all(type(tile.offset) is int for tile in im.tile):
        # A StripOffsets/TileOffsets tag typed RATIONAL or DOUBLE gives Pillow 13 a float or IFDRational offset, and
        # load() raised TypeError seeking to it (found by fuzzing). Offsets are whole numbers; refuse it here.
        raise CorruptImage("the TIFF strip or tile offsets are not whole numbers")
    return im


def _claimed_format(data: bytes) -> str | None:
    """The allowed format whose signature the data starts with (e.g. an AVIF `ftyp` box), if any."""
    Image.init()
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN[fmt][1] if fmt in Image.OPEN else None
        if accept is not None and accept(data[:16]) is True:
            return fmt
    return None


def decoder_surprise(exc: Exception) -> CorruptImage:
    """A decoder's unexpected exception on hostile bytes (a Pillow or plugin bug) is still the bytes' fault: the
    caller answers it as a corrupt image, named by the exception's type, and logs it (serving/api.py)."""
    return CorruptImage(f"the image could not be decoded ({type(exc).__name__})")


def decode(data: bytes, recipe: Recipe | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes → an upright 8-bit RGB or L picture (first frame; alpha composited onto white; 16-bit scaled down).

    With a recipe, large JPEGs are decoded at a reduced scale (`draft`) that still leaves every side at least as
    big as the recipe needs, which cuts decode time several-fold for photos.
    """
    return decode_opened(open_image(data, max_pixels), recipe)


def decoded_pixels(im: Image.Image, recipe: Recipe | None) -> int:
    """How many pixels decoding `im` for `recipe` makes: its size, after the JPEG draft (set here, once)."""
    if recipe is not None and im.format == "JPEG":
        _draft_jpeg(im, recipe)
    return im.size[0] * im.size[1]


def is_large_picture(im: Image.Image, recipe: Recipe | None) -> bool:
    """Whether the service decodes `im` where large pictures go (LARGE_PICTURE_PIXELS)."""
    return decoded_pixels(im, recipe) > LARGE_PICTURE_PIXELS


def decode_opened(im: Image.Image, recipe: Recipe | None = None, budgeted: bool = True) -> Image.Image:
    """`decode` for a picture whose header `open_image` has already parsed and checked. It first waits for its
    pixels in DECODE_BUDGET, unless `budgeted` is False: for a caller that bounds its decodes otherwise."""
    fmt = im.format  # `_shrink` and `exif_transpose` return pictures without one
    pixels = decoded_pixels(im, recipe)
    with DECODE_BUDGET.hold(pixels) if budgeted else nullcontext():
        try:
            im.seek(0)
            im.load()
            if recipe is not None:
                im = _shrink(im if im.mode in _REDUCIBLE_MODES else to_8bit(im), recipe)
            im = upright(im)
        except _DECODE_ERRORS as e:
            raise CorruptImage(f"the {im.format} data is corrupt or truncated: {e}") from None
        except _PLUGIN_ERRORS as e:
            if fmt not in _PLUGIN_ERROR_FORMATS:
                raise
            raise CorruptImage(f"the {fmt} data is corrupt or truncated: {e}") from None
        return to_8bit(im)


# Where Pillow's `getexif` finds an orientation (Pillow 13): EXIF (JPEG, PNG, WebP, AVIF, HEIF), a PNG's text
# profile, XMP, a TIFF's own tags. tests/test_preprocess.py turns a picture upright from each.
_ORIENTATION_SOURCES = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})


def upright(im: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose` for a loaded picture, without its cost (parsing an empty EXIF, then a copy) when
    the picture carries nothing an orientation could come from: most uploads, and every digit we measured (#10)."""
    if im.info.keys().isdisjoint(_ORIENTATION_SOURCES) and not hasattr(im, "tag_v2"):
        return im
    return ImageOps.exif_transpose(im)


class PixelBudget:
    """At most `capacity` pixels being decoded at once in this process, across its decoding threads.

    A 40 MP upload costs ~160 MB decoded (Pillow keeps RGB as 4 bytes a pixel) and more while it is converted; the
    budget makes a second large upload wait instead of doubling that, so a worker's peak is bounded by the budget,
    not by how many large files arrive together. An image larger than the whole budget waits for all of it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = self.free = capacity
        self._cond = threading.Condition()

    def resize(self, capacity: int) -> None:
        with self._cond:
            self.free += capacity - self.capacity
            self.capacity = capacity
            self._cond.notify_all()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            n = min(pixels, self.capacity)
            self._cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._cond:
                self.free += n
                self._cond.notify_all()


DECODE_BUDGET = PixelBudget(DEFAULT_MAX_PIXELS)
# Modes Image.reduce averages directly; others (palette, 16-bit) are made 8-bit first.
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")


def _shrink(im: Image.Image, recipe: Recipe) -> Image.Image:
    """What JPEG draft does, for every other format: a large picture is box-reduced by 2, 4 or 8 while its shorter
    side stays at least what the recipe needs, before the costly steps (mode conversion, alpha, resize) see it."""
    need = recipe.resize if recipe.kind == "imagenet" else recipe.resize * 4
    short = min(im.size)
    factor = 1
    while factor < 8 and short // (factor * 2) >= need:
        factor *= 2
    return im if factor == 1 else im.reduce(factor)


def _draft_jpeg(im: Image.Image, recipe: Recipe) -> None:
    w, h = im.size
    # EXIF rotation swaps sides later, but draft keeps both sides >= what we ask, so ask for the shorter side twice.
    need = recipe.resize if recipe.kind == "imagenet" else recipe.resize * 4
    short = min(w, h)
    if short >= 2 * need:
        scale = need / short
        im.draft("RGB" if im.mode not in ("L",) else "L", (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))))


# 16-bit value → the same 8-bit value as rint(v * 255 / 65535), by lookup: 1 byte a pixel instead of float64's 8.
_SIXTEEN_TO_8BIT = np.rint(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _sixteen_to_8bit(im: Image.Image) -> Image.Image:
    return Image.fromarray(_SIXTEEN_TO_8BIT[np.asarray(im)], "L")


def to_8bit(im: Image.Image) -> Image.Image:
    """Any Pillow mode → "RGB" or "L", scaling wide modes rather than clipping them."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16"):
        return _sixteen_to_8bit(im)
    if mode in ("I", "F"):
        with np.errstate(invalid="ignore"):  # a signalling NaN warns as it widens; nan_to_num below handles it
            a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            finite = a[np.isfinite(a)]  # NaN and ±inf say nothing of the range (an all-NaN TIFF has none)
            hi = max(float(finite.max()), 1.0) if finite.size else 1.0
        else:  # 32-bit int: usually a 16-bit PNG Pillow widened; fall back to the data's own range
            peak = float(a.max()) if a.size else 0.0
            hi = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
        a = np.nan_to_num(a, nan=0.0, posinf=hi, neginf=0.0)
        out = np.clip(np.rint(a * (255.0 / max(hi, 1e-12))), 0, 255).astype(np.uint8)
        return Image.fromarray(out, "L")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = (im.convert("LA") if mode == "La" else im).convert("RGBA")  # Pillow has no La → RGBA conversion
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    raise UnsupportedMode(f"image mode {mode} is not supported")


# ---------------------------------------------------------------------------------------------------------------
# Model input


def preprocess_bytes(data: bytes, recipe: Recipe, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Image bytes → uint8 array (size, size, channels), ready to stack into the model's NHWC batch."""
    return preprocess_opened(open_image(data, max_pixels), recipe)


def preprocess_opened(im: Image.Image, recipe: Recipe, budgeted: bool = True) -> np.ndarray:
    """`preprocess_bytes` for a picture whose header `open_image` has already parsed and checked."""
    return preprocess_image(decode_opened(im, recipe, budgeted), recipe)


def preprocess_unless_large(data: bytes, recipe: Recipe,
                            max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | Image.Image:
    """For a decoding thread: the upload's model input, or, for a picture over LARGE_PICTURE_PIXELS, the picture
    opened (its header checked) for the caller to decode where large pictures go. Small pictures are not budgeted:
    their decoding threads bound them."""
    im = open_image(data, max_pixels)
    if is_large_picture(im, recipe):
        return im
    return preprocess_opened(im, recipe, budgeted=False)


def warm_decoding(recipes: Iterable[Recipe]) -> None:
    """Pay a process's one-time decoding costs before it serves. Pillow imports most of its format plugins only when
    an upload is in none of the five formats it loads first: in a fresh process the first WebP, TIFF or non-image
    upload took 110-190 ms (`Image.init()`) and the first PNG ~50 ms, on an event loop every other request waits
    on. Then each recipe runs once on a PNG and a JPEG it makes."""
    Image.init()
    picture = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    files = []
    for fmt in ("PNG", "JPEG"):
        encoded = io.BytesIO()
        picture.save(encoded, fmt)
        files.append(encoded.getvalue())
    for recipe in recipes:
        for data in files:
            preprocess_bytes(data, recipe)


def is_thumbnail(im: Image.Image, nbytes: int) -> bool:
    """Small enough, in pixels and in bytes, that decoding it costs well under a millisecond (LeNet-5's digits):
    less than handing it to a thread and back, so a server may decode it on its event loop. Judged from the header
    alone, so a tiny file that claims a huge picture (a decompression bomb) is never taken for one."""
    samples = im.size[0] * im.size[1] * (1 if im.mode in ("1", "L") else 3)
    return samples <= THUMBNAIL_SAMPLES and nbytes <= THUMBNAIL_BYTES


def preprocess_image(im: Image.Image, recipe: Recipe) -> np.ndarray:
    im = to_8bit(im)
    if recipe.kind == "imagenet":
        return imagenet_center_crop(im if im.mode == "RGB" else im.convert("RGB"), recipe.resize, recipe.size)
    gray = np.asarray(im if im.mode == "L" else im.convert("L"))
    return normalize_digit(gray, recipe.resize, recipe.size)[:, :, None]


def resized_size(w: int, h: int, shorter: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: shorter side to `shorter`, longer side scaled and truncated."""
    return (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)


def imagenet_center_crop(im: Image.Image, resize: int, size: int) -> np.ndarray:
    """torchvision's Resize(resize) then CenterCrop(size) (bilinear, antialiased), as one resampling of the crop.

    Resizing the whole picture and then keeping the centre throws away a third or more of the resampled pixels.
    Pillow can resample just the crop's box of the source at the whole picture's scale, its filter still reading
    the source pixels around the box, so each output pixel is computed from the same source pixels with the same
    weights. Only rounding differs (float32 box coordinates, and the order of Pillow's two 1-D passes): values are
    at most 1 of 255 apart (tests/test_preprocess.py), in 0-16% of them on photos. It takes about 40% of the time
    (docs/service.md), and training's validation data goes through this same function: nothing drifts."""
    w, h = im.size
    rw, rh = resized_size(w, h, resize)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    if (rw, rh) == (w, h):  # already at the resize's size: a crop, nothing resampled
        return np.array(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    sx, sy = w / rw, h / rh  # the whole resize's scale, so each output pixel samples where it would have
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    # np.array, not asarray: Pillow hands numpy read-only bytes, and callers may write into their array.
    return np.array(im.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def normalize_digit(gray: np.ndarray, box: int = 20, size: int = 32) -> np.ndarray:
    """A picture of one digit → MNIST's convention, padded to `size` (LeNet-5 takes 32×32).

    Light ink on a dark ground (inverted if the picture is dark-on-light, judged by its border), stretched to full
    contrast, cropped to the ink, fitted into `box`×`box` keeping its aspect ratio, then placed in 28×28 so that its
    centre of mass is at the centre: how LeCun et al. made MNIST from NIST's forms.
    """
    # The pixel steps (invert, subtract the background, clip at 0, stretch, threshold the ink, truncate to uint8) map
    # each grey level to one value, so they run on the 256 levels, not on every pixel, with the very float32
    # operations they would have had per pixel: the same output exactly, and what a digit costs stops growing with
    # its picture's size (LeNet-5's per-request cost is mostly this function and the decode; #10).
    if gray.dtype != np.uint8:
        raise TypeError(f"normalize_digit takes a uint8 picture, not {gray.dtype}")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    n = len(border)
    # Dark on light if the border's mean is over 127.5: compared in integers (float32's mean, used before, agreed
    # on every border under 65,793 pixels; past that its sum rounded).
    inverted = 2 * int(border.sum(dtype=np.int64)) > 255 * n
    middle = np.partition(border, [(n - 1) // 2, n // 2])  # the median, without np.median's overhead
    background = (int(middle[(n - 1) // 2]) + int(middle[n // 2])) / 2  # a whole or half grey level: exact
    levels = np.arange(256, dtype=np.float32)
    if inverted:
        levels = 255.0 - levels
        background = 255.0 - background  # the median of the inverted border
    levels = levels - background
    np.maximum(levels, 0.0, out=levels)
    # Every step so far keeps the levels in order (reversed when inverted): the brightest ink is at the picture's
    # darkest or lightest grey.
    peak = float(levels[gray.min() if inverted else gray.max()])
    out = np.zeros((size, size), dtype=np.uint8)
    if peak <= 0:
        return out  # a blank picture: nothing to centre
    levels *= 255.0 / peak
    is_ink = np.flatnonzero(levels > 0.2 * 255.0)  # a run of levels: those at one end
    ink = gray <= int(is_ink[-1]) if inverted else gray >= int(is_ink[0])  # int: compared as uint8
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    a = np.take(levels.astype(np.uint8), gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    h, w = a.shape
    scale = box / max(h, w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    fitted = resize_lanczos(_box_reduce(a, LANCZOS_MAX_SIDE), nw, nh)
    mass = int(fitted.sum(dtype=np.int64))
    if mass > 0:
        cy = int(fitted.sum(axis=1, dtype=np.int64) @ np.arange(nh)) / mass
        cx = int(fitted.sum(axis=0, dtype=np.int64) @ np.arange(nw)) / mass
    else:
        cy, cx = nh / 2, nw / 2
    top, left = int(round(13.5 - cy)), int(round(13.5 - cx))
    # Clip the placement to the 28×28 field (a very lopsided digit could push its bounding box off the edge).
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + nh, 28), min(left + nw, 28)
    pad = (size - 28) // 2
    out[pad + y0:pad + y1, pad + x0:pad + x1] = fitted[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


# The longest side `resize_lanczos` is given. Its exact weights cost time and memory in proportion to a side's
# length (a 1×10,000,000 PNG of 20 KB took 25 s and kept 720 MB), and `_shrink` cannot shorten the long side of a
# picture whose short side is already small. Past this, a side is box-averaged down first; no square-ish upload under
# the pixel cap gets here (`_shrink` leaves it under 1,000 pixels a side).
LANCZOS_MAX_SIDE = 1024


def _box_reduce(gray: np.ndarray, longest: int) -> np.ndarray:
    """Each side longer than `longest` averaged over boxes of whole pixels until it is at most `longest`."""
    h, w = gray.shape
    fy, fx = -(-h // longest), -(-w // longest)
    if fy == fx == 1:
        return gray
    return np.asarray(Image.fromarray(gray, "L").reduce((fx, fy)))


def resize_lanczos(gray: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's `Image.resize((width, height), LANCZOS)` of a uint8 H×W picture, the same values exactly.

    Pillow computes its filter weights (sines) again on every call, and for a digit that costs more than the
    resampling: a third of `normalize_digit` in the service (#10). Here the weights of each (size → size) are kept,
    and the two passes are a matrix product each. Pillow's arithmetic is followed step by step (Resample.c, 13.0):
    weights normalised, then rounded to integers of 22 fraction bits; each pass sums pixel × weight plus half, shifts,
    clips to 0-255; the vertical pass goes first when the height shrinks by more than twice what the width does.
    Every sum is an integer below 2**53, so float64 products are exact. tests/test_preprocess.py compares the two on
    every size a digit can have.
    """
    h, w = gray.shape
    out = gray.astype(np.float64)
    vertical_first = h - height > 0 and h - height > (w - width) * 2
    for vertical in (vertical_first, not vertical_first):
        if vertical and height != h:
            out = _clip8(_lanczos_weights(h, height) @ out)
        elif not vertical and width != w:
            out = _clip8(out @ _lanczos_weights(w, width).T)
    return out.astype(np.uint8)


_PRECISION_BITS = 22  # Pillow's PRECISION_BITS for 8-bit resampling


def _clip8(sums: np.ndarray) -> np.ndarray:
    """(sums + half) >> PRECISION_BITS, clipped to 0-255, in place. Scaling by a power of two is exact in float64,
    so multiply-and-floor gives floor_divide's integers at a fifth of its cost (numpy's float floor_divide is slow)."""
    sums += 1 << (_PRECISION_BITS - 1)
    sums *= 1.0 / (1 << _PRECISION_BITS)
    np.floor(sums, out=sums)
    np.maximum(sums, 0.0, out=sums)  # not np.clip: its Python wrapper costs three times these two calls
    return np.minimum(sums, 255.0, out=sums)


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


# 256 entries of at most 20 × LANCZOS_MAX_SIDE float64 weights (160 KB): 40 MB at worst, whatever sizes arrive.
@functools.lru_cache(maxsize=256)
def _lanczos_weights(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for LANCZOS: an (out_size, in_size) matrix of integer
    weights (as float64), read-only because it is shared."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    inv_filterscale = 1.0 / filterscale
    weights = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = []
        for x in range(xmax):
            t = (x + xmin - center + 0.5) * inv_filterscale
            k.append(_sinc(t) * _sinc(t / 3) if -3.0 <= t < 3.0 else 0.0)
        ww = 0.0
        for v in k:
            ww += v
        for x, v in enumerate(k):
            v = v / ww if ww != 0.0 else v
            weights[xx, xmin + x] = math.trunc(v * (1 << _PRECISION_BITS) + (-0.5 if v < 0 else 0.5))
    weights.flags.writeable = False
    return weights


def stack_batch(items: list[np.ndarray], out: np.ndarray | None = None) -> np.ndarray:
    """Preprocessed images → one contiguous NHWC uint8 batch (into `out`, a contiguous array of its shape, if given)."""
    if out is not None:
        return np.stack(items, axis=0, out=out)
    return np.ascontiguousarray(np.stack(items, axis=0))
