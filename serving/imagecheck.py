"""What a picture's container says that Pillow does not check before it allocates: a GIF's first frame, the frames
an AVIF's AV1 stream holds. `serving.preprocess.open_image` calls these on every upload of those formats, before
the picture is decoded (found by fuzzing the decoders, docs/hardening.md "Decoder fuzzing").

Both run where `open_image` does: on the event loop for uploads of up to 64 KiB, in a decoding thread for larger
ones (serving/api.py). The AVIF walk is bounded whatever the upload (64 `av1C` boxes, 10,000
`iloc` fields, 20,000 OBUs). The GIF walk steps over the blocks before the first frame as Pillow's own open()
then does again, at about a sixth of its cost (10 MB of 1-byte comment blocks: 0.3 s here, 1.65 s in Pillow).
Anything a walk cannot follow is left to Pillow and the codec to refuse.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator

from serving.errors import CorruptImage, ImageTooLarge


def check_gif_first_frame(data: bytes, max_pixels: int) -> None:
    """Refuses a GIF whose first frame reaches past the pixel cap, before Pillow opens it.

    Pillow's GIF open() reads the first frame's descriptor, grows the picture to hold a frame that reaches past the
    logical screen, and for a frame that is disposed to the background allocates and fills a frame-sized picture
    then and there. Its only guard is its bomb check, which `Image.MAX_IMAGE_PIXELS = None` turns off, so the cap in
    `open_image` came too late: a 2.9 KB GIF with a 48×40 screen and a 64,655×94,844 frame took 1.3 GB and 0.8 s
    inside Image.open, on the event loop (found by fuzzing; a frame can be 65,535×65,535 at 65,535,65,535). The
    walk is Pillow's own (header, colour table, extension blocks and stray bytes, which it skips, up to the first
    image descriptor); anything it cannot follow is left to Pillow to refuse.
    """
    n = len(data)
    if n < 13:
        return
    screen_w, screen_h = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while pos < n:
        if data[pos] == 0x21:  # extension: a label, then sub-blocks of (length, bytes) ended by a 0 length
            pos += 2
            while pos < n and data[pos]:
                pos += data[pos] + 1
            pos += 1
        elif data[pos] == 0x2C and pos + 9 <= n:  # the first image descriptor: x, y, width, height
            x, y, w, h = struct.unpack_from("<4H", data, pos + 1)
            width, height = max(screen_w, x + w), max(screen_h, y + h)
            if width * height > max_pixels:
                raise ImageTooLarge(f"the GIF's first frame reaches {width}x{height} = {width * height / 1e6:.1f} "
                                    f"MP, over the {max_pixels / 1e6:.0f} MP limit")
            return
        elif data[pos] == 0x3B:  # the trailer: no image at all
            return
        else:  # Pillow skips any other byte between blocks, so a frame may follow junk
            found = _GIF_BLOCK_START.search(data, pos + 1)  # + 1: a descriptor cut short lands here too
            if found is None:
                return
            pos = found.start()


_GIF_BLOCK_START = re.compile(rb"[\x21\x2c\x3b]")


def check_av1_frame_size(data: bytes, w: int, h: int) -> None:
    """Refuses an AVIF whose AV1 stream is larger than its `ispe` box says.

    Pillow sizes an AVIF by its `ispe` box, but dav1d decodes the frame the stream's AV1 sequence header describes
    (up to libavif's 16384×16384 default) and Pillow converts all of it: a 1 KB file claiming 64×64 and holding
    8192×8192 took 143 MB and 0.3 s, past the pixel cap, the decode budget and, as a "thumbnail", on the event loop
    (found by fuzzing, docs/hardening.md). Sequence headers lead each image item's data (`iloc`) and each track's
    first sample (`stco`/`co64`, `stsz`), but a stream may hold more than one, and the decoder obeys the latest: a
    small one first and a large one after it passed when only the first was read. So every sequence header of every
    stream is read, and the largest frame each allows must fit in the header's area (a grid's tiles are smaller
    than the grid, an alpha plane is the image's size).
    """
    budget = [_AV1_MAX_OBUS]
    for stream in _av1_streams(data):
        for width, height in _sequence_header_sizes(stream, budget):
            if width * height > w * h:
                raise CorruptImage(f"the AVIF header says {w}x{h} but its AV1 stream holds frames up to "
                                   f"{width}x{height}")


# This runs with the GIL held (open_image), so a 20 MB upload of repeated boxes or tiny OBUs must not make it loop
# millions of times: at most this many `av1C` boxes (a file has one per coded item or track), _ILOC_MAX_FIELDS `iloc`
# fields, and _AV1_MAX_OBUS OBUs in all (a frame has at most 4,096 tiles, and usually one tile group for all).
_AV1C_MAX = 64
_AV1_MAX_OBUS = 20_000


def _boxes(data: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of each ISOBMFF box in data[start:end]; stops at a malformed one."""
    while start + 8 <= end:
        size, kind, head = int.from_bytes(data[start:start + 4], "big"), data[start + 4:start + 8], 8
        if size == 1 and start + 16 <= end:
            size, head = int.from_bytes(data[start + 8:start + 16], "big"), 16
        elif size == 0:
            size = end - start
        if size < head or start + size > end:
            return
        yield kind, start + head, start + size
        start += size


def _av1_streams(data: bytes) -> Iterator[bytes | memoryview]:
    """The data of every AVIF image item and the first sample of every track (AV1 streams, each a run of OBUs), and
    the config OBUs of every `av1C` box (libavif writes none, but a file may carry its sequence header there).

    Views, not copies: thousands of items may each name the whole file. An item in several extents is joined, and
    all such joins together may not exceed the file's size (extents of real items do not overlap)."""
    n, start, view = len(data), 0, memoryview(data)
    for _ in range(_AV1C_MAX):
        if (i := data.find(b"av1C", start)) < 4:
            break
        start = i + 4
        size = int.from_bytes(data[i - 4:i], "big")
        if 12 <= size <= n - i + 4:  # else not a box: the bytes happen to spell "av1C"
            yield view[i + 8:i - 4 + size]
    joined_left = n
    for kind, start, end in _boxes(data, 0, n):
        if kind == b"meta":
            children = {k: (s, e) for k, s, e in _boxes(data, start + 4, end)}  # meta is a full box
            idat = children.get(b"idat", (0, 0))
            if b"iloc" in children:
                for method, extents in _iloc_items(data, *children[b"iloc"]):
                    if method not in (0, 1):
                        continue
                    base, limit = (0, n) if method == 0 else idat  # in the file or in `idat`; length 0: to its end
                    parts = [view[base + offset:min(base + offset + (length or limit), limit)]
                             for offset, length in extents]
                    if len(parts) == 1:
                        yield parts[0]
                    elif parts:
                        joined_left -= sum(len(part) for part in parts)
                        if joined_left < 0:
                            raise CorruptImage("the AVIF's items name more data than the file holds")
                        yield b"".join(parts)
        elif kind == b"moov":
            for offset, size in _first_samples(data, start, end):
                yield view[offset:offset + size]


# The most fields of an `iloc` box read: field sizes of 0 bytes make a 20 MB upload describe billions of extents.
_ILOC_MAX_FIELDS = 10_000


def _iloc_items(data: bytes, start: int, end: int) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """(construction_method, [(offset, length), ...]) of each item in an `iloc` box's payload (ISO/IEC 14496-12)."""
    pos, fields = start, 0

    def read(nbytes: int) -> int:
        nonlocal pos, fields
        fields += 1
        if pos + nbytes > end or fields > _ILOC_MAX_FIELDS:
            raise EOFError
        pos += nbytes
        return int.from_bytes(data[pos - nbytes:pos], "big")

    try:
        version = read(4) >> 24
        sizes = read(2)
        offset_size, length_size, base_size, index_size = sizes >> 12, sizes >> 8 & 15, sizes >> 4 & 15, sizes & 15
        for _ in range(read(2 if version < 2 else 4)):
            read(2 if version < 2 else 4)  # item_ID
            method = read(2) & 15 if version in (1, 2) else 0
            read(2)  # data_reference_index
            base = read(base_size)
            extents = []
            for _ in range(read(2)):
                if version in (1, 2) and index_size:
                    read(index_size)
                extents.append((base + read(offset_size), read(length_size)))
            yield method, extents
    except EOFError:
        return


def _first_samples(data: bytes, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, size) of each track's first sample (moov/trak/mdia/minf/stbl: the first chunk's offset in `stco` or
    `co64`, the sample's size in `stsz`; to the end of the file if there is no size)."""
    path = (b"trak", b"mdia", b"minf", b"stbl")
    level = [(start, end)]
    for name in path:
        level = [(s, e) for ls, le in level for k, s, e in _boxes(data, ls, le) if k == name]
    for ls, le in level:
        offset, size = None, len(data)
        for kind, s, e in _boxes(data, ls, le):
            width = 4 if kind == b"stco" else 8 if kind == b"co64" else 0
            if width and s + 8 + width <= e and int.from_bytes(data[s + 4:s + 8], "big") > 0:
                offset = int.from_bytes(data[s + 8:s + 8 + width], "big")
            elif kind == b"stsz" and s + 12 <= e:  # version/flags, sample_size (0: each its own), sample_count
                size = int.from_bytes(data[s + 4:s + 8], "big")
                if size == 0 and s + 16 <= e and int.from_bytes(data[s + 8:s + 12], "big") > 0:
                    size = int.from_bytes(data[s + 12:s + 16], "big")
        if offset is not None:
            yield offset, size or len(data)


def _sequence_header_sizes(obus: bytes | memoryview, budget: list[int]) -> Iterator[tuple[int, int]]:
    """(max_frame_width, max_frame_height) of each sequence header OBU in an AV1 stream, per the AV1 specification's
    sequence_header_obu(). The walk reads every OBU's header and steps over its payload, whatever its type (a decoder
    ignores reserved ones and goes on), and ends where the bytes stop being OBUs: at the forbidden bit, where dav1d
    stops too. `budget[0]` is the OBUs left to read in this file; past it the file is refused."""
    pos, n = 0, len(obus)
    while pos < n:
        budget[0] -= 1
        if budget[0] < 0:
            raise CorruptImage(f"the AVIF's AV1 streams hold over {_AV1_MAX_OBUS:,} OBUs: not a picture")
        header = obus[pos]
        if header & 0x80:  # obu_forbidden_bit
            return
        obu_type, has_extension, has_size = (header >> 3) & 0xF, header >> 2 & 1, header >> 1 & 1
        pos += 1 + has_extension
        length = n - pos
        if has_size:
            length, pos = _leb128(obus, pos)
        if obu_type == 1:  # OBU_SEQUENCE_HEADER
            if (size := _parse_sequence_header(obus[pos:pos + length])) is not None:
                yield size
        pos += length


def _leb128(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The unsigned LEB128 number at buf[pos] (an OBU's size field), and the position after it."""
    value, shift = 0, 0
    while pos < len(buf) and shift < 56:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return value, pos


def _parse_sequence_header(payload: bytes | memoryview) -> tuple[int, int] | None:
    bits = int.from_bytes(payload, "big")
    total, pos = len(payload) * 8, 0

    def f(n: int) -> int:
        nonlocal pos
        if pos + n > total:
            raise EOFError
        pos += n
        return (bits >> (total - pos)) & ((1 << n) - 1)

    try:
        f(3)  # seq_profile
        f(1)  # still_picture
        if f(1):  # reduced_still_picture_header
            f(5)
        else:
            decoder_model_info = False
            if f(1):  # timing_info_present_flag
                f(32), f(32)
                if f(1):  # equal_picture_interval: num_ticks_per_picture_minus_1 is uvlc()
                    zeros = 0
                    while not f(1):
                        zeros += 1
                    if zeros < 32:
                        f(zeros)
                decoder_model_info = bool(f(1))
                if decoder_model_info:
                    buffer_delay_length = f(5) + 1
                    f(32), f(5), f(5)
            initial_display_delay = f(1)
            for _ in range(f(5) + 1):  # operating points
                f(12)
                if f(5) > 7:  # seq_level_idx
                    f(1)
                if decoder_model_info and f(1):
                    f(buffer_delay_length), f(buffer_delay_length), f(1)
                if initial_display_delay and f(1):
                    f(4)
        width_bits, height_bits = f(4) + 1, f(4) + 1
        return f(width_bits) + 1, f(height_bits) + 1
    except EOFError:
        return None
