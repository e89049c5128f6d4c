"""The one preprocessing module: hand-computed expectations and the pathological files real clients send."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import imagegen as gen
import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin, TiffImagePlugin

from loadtests.images import mnist_sample
from serving.errors import (
    CorruptImage,
    ExtremeAspectRatio,
    ImageTooLarge,
    NotAnImage,
    UnsupportedFormat,
    UnsupportedMode,
)
from serving.preprocess import (
    ALLOWED_FORMATS,
    DIGIT,
    IMAGENET,
    LANCZOS_MAX_SIDE,
    MAX_ASPECT_RATIO,
    Recipe,
    decode,
    decoder_surprise,
    imagenet_center_crop,
    normalize_digit,
    open_image,
    preprocess_bytes,
    resize_lanczos,
    resized_size,
    to_8bit,
    upright,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_imagenet_center_crop_hand_computed():
    # 512×256, left half red, right half blue: no resize needed (shorter side already 256); crop left edge is
    # round((512-224)/2) = 144, so crop column 256-144 = 112 is the first blue one.
    a = np.zeros((256, 512, 3), dtype=np.uint8)
    a[:, :256] = (255, 0, 0)
    a[:, 256:] = (0, 0, 255)
    out = preprocess_bytes(gen.encode(Image.fromarray(a), "PNG"), IMAGENET)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out[:, :112] == (255, 0, 0)).all()
    assert (out[:, 112:] == (0, 0, 255)).all()


@pytest.mark.parametrize("size,expected", [((333, 500), (256, 384)), ((500, 333), (384, 256)), ((300, 600), (256, 512)),
                                           ((256, 256), (256, 256)), ((1, 1), (256, 256))])
def test_resized_size_matches_torchvision_rule(size, expected):
    # torchvision: shorter side to 256, longer side int(256 * long / short) (truncated).
    assert resized_size(*size, 256) == expected


def resize_then_crop(im: Image.Image, resize: int = 256, size: int = 224) -> np.ndarray:
    """The textbook way (torchvision's Resize + CenterCrop on a PIL image): resample the whole picture, keep the
    centre. What imagenet_center_crop computes in one resampling of the crop's box."""
    w, h = im.size
    rw, rh = resized_size(w, h, resize)
    a = np.asarray(im.resize((rw, rh), Image.Resampling.BILINEAR) if (rw, rh) != (w, h) else im)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    return a[top:top + size, left:left + size]


def test_one_resampling_of_the_crop_equals_resize_then_crop_up_to_rounding():
    """Never more than 1 of 255 apart: on photos, noise, up- and down-scales, portrait and landscape, and the size
    that needs no resampling at all. Where they differ it is rounding: the box's coordinates reach Pillow as
    float32, and Pillow may run the two 1-D passes in another order, rounding its 8-bit intermediate elsewhere."""
    rng = np.random.default_rng(0)
    pictures = [decode((EXAMPLES / "grace_hopper.jpg").read_bytes()).convert("RGB"),
                Image.open(io.BytesIO(gen.photo(640, 480, seed=1))).convert("RGB"),
                Image.open(io.BytesIO(gen.photo(375, 500, seed=2))).convert("RGB"),
                Image.new("RGB", (512, 256), (3, 4, 5))]
    for _ in range(40):
        w, h = (int(v) for v in rng.integers(100, 1300, size=2))
        pictures.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB"))
    for im in pictures:
        got, want = imagenet_center_crop(im, 256, 224), resize_then_crop(im)
        assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8 and got.flags.writeable
        diff = np.abs(got.astype(np.int16) - want)
        assert diff.max() <= 1, (im.size, diff.max())


def test_constant_image_stays_constant():
    out = preprocess_bytes(gen.encode(Image.new("RGB", (640, 480), (10, 200, 30)), "PNG"), IMAGENET)
    assert (out == (10, 200, 30)).all()


def test_recipe_round_trips_through_card_dict():
    for recipe in (IMAGENET, DIGIT):
        assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError):
        Recipe.from_dict({**IMAGENET.to_dict(), "kind": "sobel"})


def test_digit_dark_on_light_is_inverted_cropped_and_centred():
    out = normalize_digit(np.asarray(Image.open(io.BytesIO(gen.drawn_digit_one()))))
    assert out.shape == (32, 32) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[:, 0].max() == 0  # ground is black, ink is light
    rows = np.nonzero(out.max(axis=1) > 50)[0]
    assert 18 <= rows.max() - rows.min() + 1 <= 21  # fitted into the 20-pixel box (tallest side)
    ys, xs = np.indices(out.shape)
    mass = out.astype(float).sum()
    cy, cx = (ys * out).sum() / mass, (xs * out).sum() / mass
    assert abs(cy - 15.5) < 1.0 and abs(cx - 15.5) < 1.0  # centre of mass at the centre of the 28×28 inside 32×32


def test_lanczos_resize_equals_pillows_exactly():
    # normalize_digit fits every digit's ink box into 20 pixels with this, in place of Pillow's resize; the shipped
    # LeNet-5 was trained on Pillow's values, so they must not move by one grey level. Every box a digit picture can
    # have (up to the 160-pixel side a 2x-reduced 320-pixel upload keeps), then arbitrary sizes, up and down.
    rng = np.random.default_rng(0)
    sizes = [(h, w, max(1, round(h * 20 / max(h, w))), max(1, round(w * 20 / max(h, w))))
             for h in range(1, 161) for w in range(1 + h % 3, 161, 3)]
    sizes += [tuple(int(v) for v in rng.integers(1, 120, 4)) for _ in range(1000)]
    for h, w, out_h, out_w in sizes:
        a = rng.integers(0, 256, (h, w), dtype=np.uint8)
        if (h + w) % 2:
            a = np.where(a > 200, 255, 0).astype(np.uint8)  # ink on a ground: the clipping at 0 and 255 matters
        want = np.asarray(Image.fromarray(a, "L").resize((out_w, out_h), Image.Resampling.LANCZOS))
        assert np.array_equal(resize_lanczos(a, out_w, out_h), want), (h, w, out_h, out_w)


def _normalize_digit_per_pixel(gray: np.ndarray) -> np.ndarray:
    """normalize_digit as it was until the twenty-first session: every pixel step on a float32 copy of the picture.
    The shipped function runs those steps on the 256 grey levels and looks them up (#10); it must equal this."""
    a = np.asarray(gray, dtype=np.float32)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    if border.mean() > 127.5:
        a, border = 255.0 - a, 255.0 - border
    n = len(border)
    middle = np.sort(border)
    a = np.maximum(a - float((middle[(n - 1) // 2] + middle[n // 2]) / 2), 0.0)
    peak = float(a.max())
    out = np.zeros((32, 32), dtype=np.uint8)
    if peak <= 0:
        return out
    a *= 255.0 / peak
    ink = a > 0.2 * 255.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    a = a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.uint8)
    h, w = a.shape
    nh, nw = max(1, int(round(h * 20 / max(h, w)))), max(1, int(round(w * 20 / max(h, w))))
    fitted = np.asarray(Image.fromarray(a, "L").resize((nw, nh), Image.Resampling.LANCZOS))
    mass = int(fitted.sum(dtype=np.int64))
    cy = int(fitted.sum(axis=1, dtype=np.int64) @ np.arange(nh)) / mass
    cx = int(fitted.sum(axis=0, dtype=np.int64) @ np.arange(nw)) / mass
    top, left = int(round(13.5 - cy)), int(round(13.5 - cx))
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + nh, 28), min(left + nw, 28)
    out[2 + y0:2 + y1, 2 + x0:2 + x1] = fitted[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def test_digit_levels_looked_up_equal_every_pixel_computed():
    rng = np.random.default_rng(7)
    pictures = [d for d in mnist_sample()[0]] + [255 - d for d in mnist_sample()[0][:200]]
    for i in range(1500):
        h, w = (int(v) for v in rng.integers(1, 120, 2))
        kind = i % 4
        if kind == 0:  # noise
            g = rng.integers(0, 256, (h, w), dtype=np.uint8)
        elif kind == 1:  # sparse ink on black
            g = np.where(rng.random((h, w)) > 0.9, 255, 0).astype(np.uint8)
        elif kind == 2:  # grey around the inversion threshold, where rounding would show
            g = rng.integers(100, 156, (h, w), dtype=np.uint8)
        else:  # a dark stroke on a light ground
            g = np.full((h, w), rng.integers(150, 256), np.uint8)
            y, x = rng.integers(0, h), rng.integers(0, w)
            g[y:y + rng.integers(1, 30), x:x + rng.integers(1, 30)] = rng.integers(0, 120)
        pictures.append(g)
    for g in pictures:
        assert np.array_equal(normalize_digit(g), _normalize_digit_per_pixel(g)), g.shape


def test_a_very_long_ink_box_costs_bounded_memory_and_still_draws_its_ink():
    # Only a thin picture (up to MAX_ASPECT_RATIO) gets a digit's ink box past LANCZOS_MAX_SIDE (_shrink cannot
    # shorten its long side), and it is box-averaged first. Before, each 1×2,000,000 line built a 20×2,000,000 float64
    # weight matrix (320 MB), and the cache kept one per height; a 1×10,000,000 PNG of 20 KB took 25 s in the service.
    tracemalloc.start()
    try:
        for h in (2_000_000, 2_000_001, 2_000_003):
            line = np.zeros((h, 1), np.uint8)
            line[0] = line[-1] = 255
            normalize_digit(line)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 128 << 20, f"{peak / (1 << 20):.0f} MiB"  # the picture's own copies are ~48 MiB of it
    bar = np.zeros((3 * LANCZOS_MAX_SIDE, 40), np.uint8)
    bar[:, 10:30] = 255  # ink 20 wide, 3,072 tall: fitted to 1×20 and centred
    out = normalize_digit(bar)
    assert list(np.flatnonzero(out.any(axis=1))) == list(range(6, 26)) and list(np.flatnonzero(out.any(axis=0))) == [16]
    assert out.max() == 255


def test_a_picture_thinner_than_the_aspect_limit_is_refused_from_its_header():
    for w, h in ((1, MAX_ASPECT_RATIO + 1), (MAX_ASPECT_RATIO + 1, 1), (2, 2 * MAX_ASPECT_RATIO + 1)):
        with pytest.raises(ExtremeAspectRatio, match=f"is {w}x{h}: one side is over {MAX_ASPECT_RATIO} times"):
            open_image(gen.thin_png(w, h))
    for w, h in ((1, MAX_ASPECT_RATIO), (MAX_ASPECT_RATIO, 1), (447, 89_400)):  # the last: the thinnest 40 MP
        assert preprocess_bytes(gen.thin_png(w, h), DIGIT).shape == (32, 32, 1)
    assert (ExtremeAspectRatio("x").status, ExtremeAspectRatio("x").code) == (400, "extreme_aspect_ratio")


def test_digit_blank_picture_is_all_zero():
    assert normalize_digit(np.full((40, 40), 255, dtype=np.uint8)).max() == 0


def test_mnist_digit_keeps_its_shape_through_the_service_path():
    # An MNIST-style digit (light on dark, already normalised) as a PNG, and the same digit enlarged and inverted
    # as a scan would be: both land on nearly the same 32×32 input.
    rng = np.random.default_rng(0)
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    digit[6:9, 9:13] = 200
    digit = np.clip(digit.astype(int) + rng.integers(0, 3, digit.shape), 0, 255).astype(np.uint8)
    a = preprocess_bytes(gen.digit_png(digit), DIGIT)[..., 0].astype(int)
    b = preprocess_bytes(gen.digit_png(digit, dark_on_light=True, scale=4), DIGIT)[..., 0].astype(int)
    assert np.abs(a - b).mean() < 12


def test_sixteen_bit_is_scaled_not_clipped():
    im = decode(gen.sixteen_bit_png())
    a = np.asarray(im)
    assert im.mode == "L"
    assert a[0, 0] == 0 and a[0, -1] == 255  # 65535 → 255 (clipping would have made most of the ramp 255)
    assert 120 <= a[0, 128] <= 135


def test_float_image_is_scaled():
    a = np.asarray(decode(gen.float_tiff()))
    assert a[0, 0] == 0 and a[0, -1] == 255


def test_float_image_without_a_finite_value_is_black_and_warns_nothing():
    # An all-NaN TIFF once made numpy warn ("All-NaN slice", "invalid value in cast") into the server's log.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nan = np.asarray(to_8bit(Image.fromarray(np.full((4, 4), np.nan, np.float32), "F")))
        mixed = np.asarray(to_8bit(Image.fromarray(np.array([[0, 100], [np.nan, np.inf]], np.float32), "F")))
    assert nan.max() == 0 and mixed.tolist() == [[0, 255], [0, 255]]  # NaN → 0, +inf → the top of the finite range


def test_cmyk_becomes_rgb():
    im = decode(gen.cmyk_jpeg((255, 0, 0, 0)))  # pure cyan ink
    r, g, b = np.asarray(im)[150, 150]
    assert im.mode == "RGB" and r < 40 and g > 200 and b > 200


def test_exif_orientation_is_applied():
    im = decode(gen.exif_rotated_jpeg())
    assert im.size == (200, 400)  # stored 400×200, displayed rotated
    a = np.asarray(im.convert("L"))
    assert a[:150].mean() < 30 and a[250:].mean() > 225  # the black half is now on top


def _oriented_6(source: str) -> bytes:
    """Left half red, right half blue, 80×60, with orientation 6 (rotate 90° clockwise) carried in `source`."""
    a = np.zeros((60, 80, 3), np.uint8)
    a[:, :40], a[:, 40:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    png_text = PngImagePlugin.PngInfo()
    if source == "png-raw-profile":
        png_text.add_text("Raw profile type exif", f"\nexif\n{len(raw):8}\n{raw.hex()}\n")
    elif source == "png-xmp":
        png_text.add_itxt("XML:com.adobe.xmp", xmp)
    tiff_tags = TiffImagePlugin.ImageFileDirectory_v2()
    tiff_tags[0x0112] = 6
    fmt, options = {"jpeg-exif": ("JPEG", {"exif": raw, "quality": 95}), "png-exif": ("PNG", {"exif": raw}),
                    "png-raw-profile": ("PNG", {"pnginfo": png_text}), "png-xmp": ("PNG", {"pnginfo": png_text}),
                    "webp-xmp": ("WEBP", {"xmp": xmp.encode(), "lossless": True}),
                    "tiff-tag": ("TIFF", {"tiffinfo": tiff_tags})}[source]
    return gen.encode(Image.fromarray(a), fmt, **options)


@pytest.mark.parametrize("source", ["jpeg-exif", "png-exif", "png-raw-profile", "png-xmp", "webp-xmp", "tiff-tag"])
def test_every_place_pillow_reads_an_orientation_from_is_honoured(source):
    # `upright` skips Pillow's EXIF parsing when a picture carries none of these; each must still turn it upright.
    data = _oriented_6(source)
    loaded = Image.open(io.BytesIO(data))
    loaded.load()
    assert ImageOps.exif_transpose(loaded).size == (60, 80)  # Pillow itself reads this source
    out = np.asarray(decode(data))
    assert out.shape == (80, 60, 3)
    assert out[2, 30, 0] > 200 and out[2, 30, 2] < 50 and out[-3, 30, 2] > 200 and out[-3, 30, 0] < 50


def test_a_picture_without_metadata_is_not_copied_to_be_turned_upright():
    im = Image.open(EXAMPLES / "digit-7.png")
    im.load()
    assert upright(im) is im


def test_palette_transparency_is_composited_on_white():
    a = np.asarray(decode(gen.palette_alpha_png()))
    assert (a[:, :30] == 255).all()  # transparent → white, not the palette's black
    assert (a[:, 34:] == (255, 0, 0)).all()


def test_rgba_transparency_is_composited_on_white():
    a = np.asarray(decode(gen.rgba_png()))
    assert (a[:, :14] == 255).all() and (a[:, 18:] == (0, 0, 255)).all()


def test_animated_gif_uses_first_frame():
    a = np.asarray(decode(gen.animated_gif()))
    assert tuple(a[32, 32]) == (255, 0, 0)


def test_tiny_image_is_upscaled():
    out = preprocess_bytes(gen.tiny_png(), IMAGENET)
    assert out.shape == (224, 224, 3) and (out == (200, 100, 50)).all()


def test_huge_dimension_header_refused_before_decoding():
    with pytest.raises(ImageTooLarge, match="10000.0 MP"):
        preprocess_bytes(gen.huge_dimension_png(), IMAGENET)
    # The file holds pixel data for 8x8 only: decoding it first would end in corrupt_image (and, at the size above,
    # a 10 GB allocation). image_too_large can only come from reading the header alone.
    with pytest.raises(ImageTooLarge, match="81.0 MP"):
        preprocess_bytes(gen.huge_dimension_png(9000, 9000), IMAGENET)


def test_pixel_cap_is_configurable():
    data = gen.photo(400, 300)
    with pytest.raises(ImageTooLarge):
        preprocess_bytes(data, IMAGENET, max_pixels=100_000)
    assert preprocess_bytes(data, IMAGENET, max_pixels=120_000).shape == (224, 224, 3)


@pytest.mark.parametrize("data,error", [
    (b"", NotAnImage), (gen.TEXT, NotAnImage), (gen.HTML, NotAnImage), (gen.random_bytes(), NotAnImage),
    (gen.truncated_jpeg(), CorruptImage), (gen.off_allowlist_image(), UnsupportedFormat),
])
def test_bad_inputs_raise_specific_errors(data, error):
    with pytest.raises(error) as info:
        preprocess_bytes(data, IMAGENET)
    assert info.value.detail and info.value.status == 400


def test_truncated_png_is_corrupt():
    data = gen.encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(CorruptImage):
        preprocess_bytes(data[: len(data) * 2 // 3], IMAGENET)


def test_jpeg_draft_decodes_smaller_and_stays_close():
    data = gen.photo(2000, 1500, seed=3)
    im = decode(data, IMAGENET)
    assert min(im.size) >= 256 and im.size[0] < 2000  # decoded at reduced scale, still big enough for the crop
    fast = preprocess_bytes(data, IMAGENET).astype(int)
    # The reference, written out independently of serving.preprocess: a full decode, torchvision's Resize(256)
    # (shorter side 256, longer side truncated, bilinear with antialias, which Pillow's resize is), CenterCrop(224).
    full = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = full.size
    resized = np.asarray(full.resize((int(256 * w / h), 256), Image.Resampling.BILINEAR)).astype(int)
    top, left = int(round((256 - 224) / 2)), int(round((resized.shape[1] - 224) / 2))
    exact = resized[top:top + 224, left:left + 224]
    assert np.abs(fast - exact).mean() < 4  # a few grey levels; not an accuracy measurement (see docs/benchmarks.md)


def _encode(a: np.ndarray, mode: str, fmt: str, **kw) -> bytes:
    return gen.encode(Image.fromarray(a, mode), fmt, **kw)


RGB = np.random.default_rng(7).integers(0, 256, (24, 40, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("PPM", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_decode_to_the_exact_pixels(fmt, kw):
    data = _encode(RGB, "RGB", fmt, **kw)
    assert Image.open(io.BytesIO(data)).format == fmt
    np.testing.assert_array_equal(np.asarray(decode(data)), RGB)


def test_ycbcr_tiff_is_converted_with_the_jfif_formula():
    data = _encode(RGB, "YCbCr", "TIFF")  # the same bytes read as Y, Cb, Cr
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    y, cb, cr = (RGB[..., i].astype(float) for i in range(3))
    expected = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                         y + 1.772 * (cb - 128)], -1)
    got = np.asarray(decode(data)).astype(float)
    assert np.abs(got - np.clip(np.rint(expected), 0, 255)).max() <= 2


def test_lab_tiff_is_converted_to_srgb():
    # Neutral greys (a* = b* = 0): L* → sRGB by the CIE formula (D65 white), independent of Pillow.
    lightness = np.array([0, 64, 128, 192, 255], dtype=np.uint8)
    lab = np.zeros((1, 5, 3), dtype=np.uint8)
    lab[0, :, 0] = lightness
    got = np.asarray(decode(_encode(lab, "LAB", "TIFF")))[0]
    big_l = lightness / 255 * 100
    lum = np.where(big_l > 8, ((big_l + 16) / 116) ** 3, big_l / 903.3)
    srgb = np.where(lum <= 0.0031308, 12.92 * lum, 1.055 * lum ** (1 / 2.4) - 0.055) * 255
    assert (got.max(axis=1) - got.min(axis=1) <= 2).all()  # grey stays grey
    assert np.abs(got[:, 1] - srgb).max() <= 3, (got, srgb)
    # a* > 0 is red, b* < 0 is blue (Pillow's LAB stores a*, b* as signed bytes).
    red, blue = np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1, 3), np.uint8)
    red[0, 0] = (128, 60, 0)
    blue[0, 0] = (128, 0, 256 - 60)
    r = np.asarray(decode(_encode(red, "LAB", "TIFF")))[0, 0].astype(int)
    b = np.asarray(decode(_encode(blue, "LAB", "TIFF")))[0, 0].astype(int)
    assert r[0] > r[1] + 50 and r[0] > r[2] + 50, r
    assert b[2] > b[0] + 50 and b[2] > b[1] + 50, b


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n0 0 moveto 16 16 lineto stroke\n%%EOF\n"


def test_eps_is_refused_before_ghostscript_could_run(tmp_path, monkeypatch):
    """The allowlist's security reason: rendering EPS runs Ghostscript, a PostScript interpreter. A `gs` that leaves
    a mark when run is put first on PATH; the upload is refused and the mark never appears."""
    from PIL import EpsImagePlugin

    mark = tmp_path / "ghostscript-ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir()
    gs.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo 10.05.1 && exit 0\ntouch {mark}\nexit 1\n')
    gs.chmod(gs.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{gs.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks gs up again, and finds ours
    assert EpsImagePlugin.has_ghostscript()
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # Pillow would take it
    with pytest.raises(UnsupportedFormat, match="EPS is not accepted"):
        preprocess_bytes(EPS, IMAGENET)
    assert not mark.exists()
    assert "EPS" not in ALLOWED_FORMATS and "PDF" not in ALLOWED_FORMATS


def test_every_pillow_mode_becomes_8_bit_rgb_or_grey():
    """UnsupportedMode (400 unsupported_mode) guards modes a future Pillow may add: today every mode Pillow has is
    converted, so no upload reaches it (the 400 is the mapping below)."""
    for mode in Image.MODES:
        assert to_8bit(Image.new(mode, (4, 4))).mode in ("RGB", "L"), mode
    assert (UnsupportedMode("x").status, UnsupportedMode("x").code) == (400, "unsupported_mode")


def test_a_decoder_surprise_is_answered_as_a_corrupt_image_naming_the_exception():
    # The service (serving/api.py) and the batch CLI's decode processes (serving/decode_procs.py) both answer an
    # exception no decoder should raise this way: a 400 that names it, never a 500 or a crashed worker.
    err = decoder_surprise(KeyError("tile"))
    assert isinstance(err, CorruptImage) and err.status == 400
    assert err.to_dict() == {"error": "corrupt_image", "detail": "the image could not be decoded (KeyError)"}


def test_a_tiff_whose_strip_offsets_are_fractions_is_corrupt():
    """Decoder fuzzing (docs/hardening.md): StripOffsets typed RATIONAL (or DOUBLE) gave Pillow a non-integer offset
    and load() raised TypeError, answered only as a logged decoder surprise. It is refused from the header now."""
    data = bytearray(gen.encode(Image.fromarray(np.arange(480, dtype=np.uint16).reshape(20, 24)), "TIFF"))
    assert data[:4] == b"II*\x00"  # little-endian; IFD: a 2-byte count, then 12-byte entries (tag, type, count, value)
    ifd = int.from_bytes(data[4:8], "little")
    entries = [ifd + 2 + 12 * k for k in range(int.from_bytes(data[ifd:ifd + 2], "little"))]
    strip_offsets = next(e for e in entries if int.from_bytes(data[e:e + 2], "little") == 273)
    data[strip_offsets + 2:strip_offsets + 4] = (5).to_bytes(2, "little")  # LONG → RATIONAL
    with pytest.raises(CorruptImage, match="offsets are not whole numbers"):
        open_image(bytes(data))
    with pytest.raises(CorruptImage):
        preprocess_bytes(bytes(data), IMAGENET)


# Pillow skips stray bytes before a block (the fuzzed file had some)
@pytest.mark.parametrize("stray", [b"", b"\x00\x99"])
def test_a_gif_frame_past_the_pixel_cap_is_refused_before_pillow_allocates_it(monkeypatch, stray):
    """Decoder fuzzing (docs/hardening.md): a 48x40 GIF whose first frame's descriptor said 64,655 wide at an offset,
    disposed to the background, made Pillow's open() fill a frame-sized picture: 1.3 GB and 0.8 s before the pixel
    cap was checked. The frame is refused from its descriptor now, before Pillow sees the file."""
    data = bytearray(gen.encode(Image.new("P", (48, 40), 1), "GIF", disposal=2))
    i = data.index(b"\x2c\x00\x00\x00\x00")  # the image descriptor: x, y, width, height (little-endian)
    data[i + 5:i + 9] = (30000).to_bytes(2, "little") + (20000).to_bytes(2, "little")
    data[i:i] = stray

    def not_opened(*args, **kwargs):
        raise AssertionError("Pillow opened a GIF whose first frame is over the cap")

    monkeypatch.setattr(Image, "open", not_opened)
    with pytest.raises(ImageTooLarge, match="first frame reaches 30000x20000"):
        open_image(bytes(data))


def test_a_gif_cut_inside_its_first_image_descriptor_is_corrupt_not_a_hang():
    # The descriptor walk above looped for ever on a file ending inside the descriptor (found by fuzzing it).
    data = gen.encode(Image.new("P", (8, 8), 1), "GIF")
    with pytest.raises(CorruptImage):
        open_image(data[:data.index(b"\x2c\x00\x00\x00\x00") + 5])


WARM_CHECK = """
import sys
from pathlib import Path
from serving.errors import ClientError
from serving.preprocess import DIGIT, IMAGENET, preprocess_bytes, warm_decoding
if sys.argv[2] == "warm":
    warm_decoding([DIGIT, IMAGENET])
for path in sorted(Path(sys.argv[1]).iterdir()):
    before = set(sys.modules)
    for recipe in (DIGIT, IMAGENET):
        try:
            preprocess_bytes(path.read_bytes(), recipe)
        except ClientError:
            pass
    print(path.name, len(set(sys.modules) - before))
"""


def test_after_warm_decoding_no_upload_imports_anything(tmp_path):
    """A fresh process's first WebP, TIFF or non-image upload imported Pillow's plugins then (`Image.init()`, 110-190
    ms on a server's event loop, which every other request waits on). The service's workers run `warm_decoding`
    before they are ready: after it, no upload of an accepted format, a refused one or junk imports a module."""
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    for fmt in (*ALLOWED_FORMATS, "ICO", "PCX"):
        (tmp_path / f"picture.{fmt.lower()}").write_bytes(gen.encode(picture, fmt))
    (tmp_path / "junk.bin").write_bytes(b"0123456789")
    imported = {}
    for state in ("cold", "warm"):
        run = subprocess.run([sys.executable, "-c", WARM_CHECK, str(tmp_path), state], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, timeout=120, check=True)
        imported[state] = dict(line.split() for line in run.stdout.splitlines())
    assert len(imported["warm"]) == len(ALLOWED_FORMATS) + 3
    assert all(count == "0" for count in imported["warm"].values()), imported["warm"]
    assert any(count != "0" for count in imported["cold"].values()), imported["cold"]  # the check can see imports
