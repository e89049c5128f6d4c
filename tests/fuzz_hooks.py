"""Schemathesis extension hooks for tests/test_fuzz.py (loaded through SCHEMATHESIS_HOOKS=fuzz_hooks).

`format: binary` fields are images in our API, and "any bytes" is not a valid image: schema-valid requests would
be answered 400 not_an_image and the positive-data check could never pass. So the positive cases draw real image
files (every accepted format, odd modes and sizes, from tests/imagegen.py); negative cases still send anything.
"""

from __future__ import annotations

import re

import imagegen
import schemathesis
from hypothesis import strategies as st
from PIL import Image
from schemathesis.transport.serialization import Binary


def _images() -> list[bytes]:
    rgb = Image.frombytes("RGB", (40, 30), bytes(range(256)) * 14 + bytes(3600 - 256 * 14))
    return [
        imagegen.photo(64, 48, seed=1), imagegen.photo(300, 200, seed=2, fmt="PNG"), imagegen.tiny_png(),
        imagegen.palette_alpha_png(), imagegen.rgba_png(), imagegen.animated_gif(), imagegen.cmyk_jpeg(),
        imagegen.sixteen_bit_png(), imagegen.exif_rotated_jpeg(),
        *(imagegen.encode(rgb, fmt) for fmt in ("BMP", "TIFF", "WEBP", "PPM")),
    ]


schemathesis.openapi.format("binary", st.sampled_from(_images()).map(Binary))


def _form_field_sent_as_array(failure, case) -> bool:
    """Multipart has no arrays: a form field given as a list goes out as one part per item, so [] is no field at
    all and [7] is the field 7. The bytes on the wire are those of a valid request, and accepting them is right."""
    message = failure.message or ""
    if message.count("violates ") != 1:  # that mutation and no other
        return False
    found = re.search(r"at /properties/(\w+) \(was \w+, became array\)", message)
    if case.media_type != "multipart/form-data" or not isinstance(case.body, dict) or not found:
        return False
    value = case.body.get(found.group(1))
    return isinstance(value, list) and len(value) <= 1


@schemathesis.hook
def filter_failure(ctx, failure, case, response) -> bool:
    """Drop two kinds of "schema-violating request accepted". /classify_batch answers 200 with a per-image error for
    an image it cannot decode (documented: one bad file must not cost the others their results), and a non-"binary"
    image value is, on the wire, just bytes that are not an image. And a form field turned into an array of at most
    one item is, on the wire, no field or one field (`_form_field_sent_as_array`). Every other failure stays."""
    if failure.code != "ST201":
        return True
    if case.operation.path == "/classify_batch" and response.status_code == 200:
        results = response.json().get("results", [])
        if results and all("error" in r for r in results):
            return False
    return not _form_field_sent_as_array(failure, case)
