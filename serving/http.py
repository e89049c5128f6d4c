"""HTTP plumbing for the public endpoints: bounded body reading, multipart parts as raw bytes, content types, params.

No model knowledge here. Everything raises serving.errors exceptions; the endpoints turn them into JSON with
`error_body`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import parse_qsl, urlsplit

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, MultipartParser, parse_options_header
from starlette.requests import Request

from serving.errors import (
    BadParameter,
    BodyTooLarge,
    ClientError,
    MissingImage,
    NonFiniteNumber,
    UnsupportedEncoding,
    UnsupportedMediaType,
    shown,
)

# Part/body types that may carry an image: what browsers, curl and requests send for an image file.
IMAGE_CONTAINER_TYPES = ("application/octet-stream", "binary/octet-stream", "application/x-binary")
MAX_PARTS = 1000  # a multipart body with more parts than this is abuse, not a batch


def media_type(header_value: str | None) -> str:
    """"image/JPEG; charset=x" → "image/jpeg"; missing → ""."""
    return (header_value or "").split(";", 1)[0].strip().lower()


def can_be_image(mtype: str) -> bool:
    """No type, any image/*, or a generic binary type. Anything else (text, JSON, HTML, forms) cannot be an image."""
    return mtype == "" or mtype.startswith("image/") or mtype in IMAGE_CONTAINER_TYPES


def check_image_type(mtype: str, where: str) -> None:
    if not can_be_image(mtype):
        raise UnsupportedMediaType(
            f"{where} has content type {shown(mtype)}, which cannot be an image; send image/*, "
            "application/octet-stream or no type (e.g. curl -F image=@cat.jpg, or --data-binary @cat.jpg "
            "-H 'Content-Type: image/jpeg')")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing with 413 as soon as it is known to exceed `limit`: from Content-Length before
    reading anything, or while streaming a chunked upload (so at most `limit` bytes are ever held)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ClientError(f"invalid Content-Length header {shown(declared)}") from None
        if size > limit:
            raise BodyTooLarge(f"the request body is {size:,} bytes, over the {limit:,}-byte limit")
    chunks: list[bytes] = []
    received = 0
    # The ASGI messages themselves, not Starlette's `request.stream()`: an async generator per request costs more
    # than a LeNet-5 digit's inference (#10), and nothing else reads this body.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":  # nobody will read the answer; a client's doing, not a server error
            raise ClientError(f"the client disconnected after sending {received:,} bytes of the body")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received > limit:
            raise BodyTooLarge(f"the request body exceeds the {limit:,}-byte limit (stopped reading at "
                               f"{received:,} bytes)")
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)  # one chunk (the usual case) comes back as is, not copied


def _refuse_constant(token: str) -> NoReturn:
    raise NonFiniteNumber(f"the JSON body has {token}, which JSON (RFC 8259) does not allow; send finite numbers")


def _finite_float(token: str) -> float:
    value = float(token)
    if math.isinf(value):  # 1e400: valid JSON, but no float holds it, and it would be echoed back as Infinity
        raise NonFiniteNumber(f"the JSON body has the number {shown(token)}, too large for a 64-bit float")
    return value


# python-multipart logs a warning for every malformed body it reads. The client gets the same words in its 400 and
# /metrics counts the request (outcome bad_request): a line per request would let any client fill the log.
logging.getLogger("python_multipart").setLevel(logging.ERROR)

# Python's json reads NaN, Infinity and -Infinity, which strict JSON has not: a request carrying them could make an
# answer that echoes them (the v2 'parameters') invalid JSON. One decoder, built once: json.loads with hooks would
# build a decoder per call. The hooks run only for those tokens and for floats (uint8 tensors are integers).
_STRICT_JSON = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)


def loads_json(data: bytes) -> object:
    """A client's JSON body, as json.loads(data) reads it (same encoding detection, same errors) but refusing
    NaN, Infinity, -Infinity and floats that overflow to infinity with NonFiniteNumber (400). Every JSON body the
    service parses goes through here."""
    return _STRICT_JSON.decode(data.decode(json.detect_encoding(data), "surrogatepass"))


@dataclass
class Part:
    """One multipart part, its payload kept as raw bytes (Starlette would decode non-file fields as text)."""

    name: str
    filename: str | None
    content_type: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace").strip()


# What clients send (browsers, curl, httpx, requests, aiohttp, OkHttp) has one shape: the boundary a plain token, and
# each part's head a Content-Disposition naming the field (and the file) in plain quotes, with a Content-Type before or
# after it and perhaps a Content-Length. For that shape, two regexes and a few `find`s give what python-multipart
# gives, and a digit's upload costs little more than its raw body (#10, docs/service.md "Eighth pass"). Every other
# shape, and every error, goes to python-multipart's full parser; tests/test_http.py compares the two.
_SIMPLE_CONTENT_TYPE = re.compile(r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,\-./:=?]{1,200})", re.IGNORECASE)
_PLAIN_VALUE = rb'([^"\\;\r\n]{0,1024})'  # a quoted name or filename without escapes
_SIMPLE_HEAD = re.compile(
    rb"(?:(?i:content-type): *([^\r\n]{0,1024})\r\n)?"
    rb'(?i:content-disposition): *form-data; name="' + _PLAIN_VALUE + rb'"(?:; filename="' + _PLAIN_VALUE + rb'")?\r\n'
    rb"(?:(?i:content-type): *([^\r\n]{0,1024})\r\n)?"
    rb"(?:(?i:content-length): *[0-9]{1,20}\r\n)?"
    rb"\r\n")
NO_DISPOSITION = "a multipart part has no Content-Disposition: form-data; name=... header"


def parse_multipart(body: bytes, content_type_header: str) -> list[Part]:
    """multipart/form-data body → its parts in order. Malformed or truncated bodies are a 400."""
    if simple := _SIMPLE_CONTENT_TYPE.fullmatch(content_type_header):
        boundary = simple.group(1).encode("ascii")
    else:
        # Starlette decodes header bytes as Latin-1, so this cannot fail to re-encode; a boundary is ASCII anyway.
        _, params = parse_options_header(content_type_header)
        boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError("multipart/form-data body without a boundary parameter in its Content-Type")
    # RFC 2046 allows 70 characters; python-multipart refuses over 256 in its constructor, with an exception of its own
    # that was a 500 here (found by probing the running server). Checked before either parser, so both refuse alike.
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise ClientError(f"the multipart boundary in the Content-Type is {len(boundary):,} characters long; at most "
                          f"{MAX_BOUNDARY_LENGTH} are accepted (RFC 2046 allows 70)")
    parts = _split_simple(body, boundary)
    return parts if parts is not None else _parse_full(body, boundary)


def _part(name: bytes, filename: bytes | None, content_type: bytes | None, data: bytes) -> Part:
    """Names and filenames are read as UTF-8 (RFC 7578 §5.1), whatever bytes they hold."""
    return Part(name.decode("utf-8", "replace"), None if filename is None else filename.decode("utf-8", "replace"),
                media_type(content_type.decode("utf-8", "replace")) if content_type else "", data)


def _split_simple(body: bytes, boundary: bytes) -> list[Part] | None:
    """The parts of a body whose every part head is of the usual shape (_SIMPLE_HEAD), or None."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + b"\r\n"):
        return None
    next_part = b"\r\n" + delimiter
    parts: list[Part] = []
    pos = len(delimiter) + 2
    while len(parts) < MAX_PARTS:
        head = _SIMPLE_HEAD.match(body, pos)
        if head is None:
            return None
        data_end = body.find(next_part, head.end())
        if data_end < 0:
            return None
        after = data_end + len(next_part)
        end = body[after:after + 2]
        if end != b"\r\n" and end != b"--":
            return None
        type_before, name, filename, type_after = head.groups()
        # A header given twice counts once, the last one, as in the full parser.
        parts.append(_part(name, filename, type_before if type_after is None else type_after,
                           body[head.end():data_end]))
        if end == b"--":
            return parts  # whatever follows the closing delimiter is an epilogue, ignored by both parsers
        pos = after + 2
    return None


def _parse_full(body: bytes, boundary: bytes) -> list[Part]:
    parts: list[Part] = []
    headers: dict[str, str] = {}
    field: list[bytes] = []
    value: list[bytes] = []
    data: list[bytes] = []
    done = False

    def on_part_begin() -> None:
        headers.clear()
        data.clear()
        if len(parts) >= MAX_PARTS:
            raise BadParameter(f"more than {MAX_PARTS} multipart parts")

    def on_header_field(b: bytes, start: int, end: int) -> None:
        field.append(b[start:end])

    def on_header_value(b: bytes, start: int, end: int) -> None:
        value.append(b[start:end])

    def on_header_end() -> None:
        # Latin-1 maps every byte to one character and back, so parse_options_header (which re-encodes to Latin-1)
        # sees the raw bytes; names and filenames are then read as UTF-8 (RFC 7578 §5.1), whatever they hold.
        headers[b"".join(field).decode("latin-1").lower()] = b"".join(value).decode("latin-1")
        field.clear()
        value.clear()

    def on_part_data(b: bytes, start: int, end: int) -> None:
        data.append(b[start:end])

    def on_part_end() -> None:
        disposition, dparams = parse_options_header(headers.get("content-disposition", ""))
        name = dparams.get(b"name")
        if disposition != b"form-data" or name is None:
            raise ClientError(NO_DISPOSITION)
        parts.append(_part(name, dparams.get(b"filename"), headers.get("content-type", "").encode("latin-1"),
                           b"".join(data)))

    def on_end() -> None:
        nonlocal done
        done = True

    try:
        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
            "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end,
        })
        parser.write(body)
        parser.finalize()
    except FormParserError as e:  # any of python-multipart's own: the body's fault, whatever the step
        raise ClientError(f"malformed multipart/form-data body: {e}") from None
    if not done:
        raise ClientError("the multipart/form-data body is truncated (no closing boundary)")
    return parts


def query_dict(query_string: bytes) -> dict[str, str]:
    """The query string as a dict (blank values kept), without building Starlette's multidict:
    `?model=lenet5&top_k=3` needs no unquoting, so it is split directly (#10: a LeNet-5 request's fixed cost);
    anything with %-escapes or '+' goes through parse_qsl. A name given twice is a 422: which value was meant is
    ambiguous (Starlette's dict keeps the last, other frameworks the first)."""
    text = query_string.decode("latin-1")
    query: dict[str, str] = {}
    if "%" in text or "+" in text:
        for name, value in parse_qsl(text, keep_blank_values=True):
            if name in query:
                _given_twice("query parameter", name)
            query[name] = value
        return query
    for pair in text.split("&"):  # the same, inline: half the time of building the pairs first (0.5 against 0.9 µs)
        if pair:
            name, _, value = pair.partition("=")
            if name in query:
                _given_twice("query parameter", name)
            query[name] = value
    return query


def _given_twice(what: str, name: str) -> NoReturn:
    raise BadParameter(f"the {what} {shown(name)} is given more than once; give it once")


@dataclass
class Upload:
    """What a request carried: its images (in order) and its parameters (query string, then form fields, which win;
    `query` keeps the query string's own values so that they are validated even when a form field overrides them)."""

    images: list[Part]
    params: dict[str, str]
    query: dict[str, str]


@functools.cache
def image_field_names(image_field: str) -> frozenset[str]:
    """The multipart field names that carry images: `image`, `images`, `image[]`, `images[]` (what HTML forms and
    client libraries send for one file or several)."""
    return frozenset((image_field, image_field + "s", image_field + "[]", image_field + "s[]"))


async def read_upload(request: Request, limit: int, image_field: str = "image", known_params: tuple[str, ...] = (),
                      allow_raw: bool = True) -> Upload:
    """One request → images + parameters.

    multipart/form-data: every part named `image_field` (or `image_field + "s"`, or with a `[]` suffix) is an
    image; other parts must be known parameters. Otherwise, when `allow_raw`, the body itself is the image.
    Unknown parameter or field names are a 422, so a typo never silently falls back to a default.
    """
    query = query_dict(request.scope.get("query_string", b""))
    params = dict(query)
    content_type = request.headers.get("content-type", "")
    # Ignored, a gzip-compressed PNG was "not an image" and a plain one labelled gzip was served as if fine. Every
    # such header is read (not only the first), from the raw list: Starlette's get() raises and catches KeyError
    # when, as nearly always, there is none (0.7 µs against 0.2).
    for name, value in request.scope["headers"]:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            raise UnsupportedEncoding(f"Content-Encoding {shown(value.decode('latin-1'))} is not accepted here: "
                                      "send the image as it is (image formats are compressed already)", "identity")
    mtype = media_type(content_type)
    images: list[Part] = []
    if mtype == "multipart/form-data":
        body = await read_body(request, limit)
        accepted_names = image_field_names(image_field)
        others: list[str] = []
        fields: set[str] = set()
        for part in parse_multipart(body, content_type):
            if part.name in accepted_names:
                images.append(part)  # its content type is checked per image, so a batch reports it per item
            elif part.name in known_params:
                if part.name in fields:
                    _given_twice("form field", part.name)
                fields.add(part.name)
                params[part.name] = part.text
            else:
                others.append(part.name)
        if others:
            raise BadParameter(f"unknown multipart field(s) {shown(sorted(set(others)))}; send the image as field "
                               f"{image_field!r} and parameters among {list(known_params)}")
        if not images:
            raise MissingImage(f"no multipart field named {image_field!r} in the request")
    elif allow_raw:
        check_image_type(mtype, "the request body")
        images.append(Part("", None, mtype, await read_body(request, limit)))  # name "": the raw body
    else:
        raise UnsupportedMediaType(f"this endpoint takes multipart/form-data with one or more {image_field!r} "
                                   f"fields, not {shown(mtype) if mtype else 'a body without a Content-Type'}")
    unknown = [name for name in params if name not in known_params]
    if unknown:
        raise BadParameter(f"unknown parameter(s) {shown(sorted(unknown))}; accepted: {list(known_params)}")
    return Upload(images, params, query)


_INTEGER = re.compile(r"-?[0-9]{1,20}")  # no bound here needs more digits; int() refuses over 4,300


def plain_int(raw: str) -> int | None:
    """An integer written as plain ASCII digits (with an optional minus), else None. int() would also take ' 5',
    '+5', '1_0' (ten) and digits of other scripts ('١٠'), which no client means as a number here."""
    return int(raw) if _INTEGER.fullmatch(raw) else None


def int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:  # absent; given but empty ("top_k=") is refused below, like any other non-integer
        return default
    value = plain_int(raw)
    if value is None:
        raise BadParameter(f"{name} must be an integer from {lo} to {hi}, not {shown(raw)}")
    if not lo <= value <= hi:
        raise BadParameter(f"{name} must be from {lo} to {hi}, not {value}")
    return value


REDIRECTS = (301, 302, 303, 307, 308)


def relative_redirects(send):
    """`send`, with a redirect's absolute Location made relative (path and query). Starlette answers `/classify/` with a
    307 to the same path without the slash, as an absolute URL built from the request's Host header: `Host:
    evil.example` got `Location: http://evil.example/classify`, what security scanners report as Host-header
    injection, and wrong behind a proxy that rewrites Host. A relative one (RFC 9110 §10.2.2) is resolved by the
    client against the URL it used. The front door wraps only requests whose path ends in a slash."""

    async def send_relative(message) -> None:
        if message["type"] == "http.response.start" and message.get("status") in REDIRECTS:
            headers = []
            for name, value in message.get("headers", []):
                if name.lower() == b"location":
                    url = urlsplit(value.decode("latin-1"))
                    if url.scheme or url.netloc:  # one leading slash: "//host/x" would name another host
                        path = "/" + url.path.lstrip("/\\")
                        value = (path + ("?" + url.query if url.query else "")).encode("latin-1")
                headers.append((name, value))
            message = {**message, "headers": headers}
        await send(message)

    return send_relative
