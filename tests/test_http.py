"""serving/http.py's multipart parsing: the fast path for the usual shape of body gives exactly what python-multipart's
full parser gives, and leaves every other body (and every error) to it. Its query-string reader gives what Starlette's
`dict(request.query_params)` gives."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import httpx
import pytest
from starlette.datastructures import QueryParams

from serving.errors import BadParameter, ClientError
from serving.http import MAX_PARTS, _parse_full, _split_simple, parse_multipart, query_dict, relative_redirects

BOUNDARY = "convnet-test-7f3a9c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def encode(parts: list[tuple[bytes, bytes]], boundary: str = BOUNDARY, epilogue: bytes = b"") -> bytes:
    """(header block, data) per part, joined the way clients do."""
    out = b"".join(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + data + b"\r\n" for head, data in parts)
    return out + b"--" + boundary.encode() + b"--" + epilogue


def outcome(parse, body: bytes):
    try:
        return [(p.name, p.filename, p.content_type, p.data) for p in parse(body, BOUNDARY.encode())]
    except ClientError as e:
        return (type(e).__name__, str(e))


def random_data(rng: random.Random) -> bytes:
    """Bytes that look like the delimiter without being it: the places a split could go wrong."""
    pieces = [b"\r\n", b"--", BOUNDARY.encode()[:rng.randrange(1, len(BOUNDARY))], b"\r\n--" + BOUNDARY.encode()[:-1],
              b"-", b"\r", b"\n", bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))]
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))


def random_head(rng: random.Random) -> bytes:
    if rng.random() < 0.7:  # what clients send
        return rng.choice([b'Content-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png',
                           b'Content-Disposition: form-data; name="top_k"', b'content-disposition: form-data; '
                           b'name="image"; filename="caf\xc3\xa9.jpg"\r\ncontent-type: image/jpeg'])
    name = rng.choice([b"image", b"top_k", b"model", b"", b"caf\xc3\xa9", b"a;b", b'q\\"x'])
    disposition = rng.choice([
        b'form-data; name="%s"' % name,
        b'form-data; name="%s"; filename="%s"' % (name, rng.choice([b"x.png", b"", b"C:\\dir\\x.png", b"a b.jpg"])),
        b'form-data;name="%s"' % name, b"Form-Data; name=%s" % name, b'form-data; name*=utf-8\'\'x; name="y"',
        b'attachment; name="%s"' % name, b"form-data"])
    lines = [rng.choice([b"Content-Disposition: ", b"CONTENT-DISPOSITION:", b"content-disposition:  "]) + disposition]
    for _ in range(rng.choice([0, 1, 1, 2])):  # twice: the last one counts
        lines.append(rng.choice([b"Content-Type:", b"content-type: "]) +
                     rng.choice([b" image/png", b"image/JPEG; q=1", b"  text/plain ", b"", b"image/caf\xc3\xa9"]))
    if rng.random() < 0.3:
        lines.append(rng.choice([b"Content-Length: 3", b"content-length:12", b"Content-Length: x"]))
    if rng.random() < 0.2:
        lines += [b"X-Extra-%d: v" % i for i in range(rng.choice([1, 7, 9]))]
    if rng.random() < 0.1:
        lines.append(rng.choice([b"bad header", b"Bad Name: v", b"X-Fold: a\r b", b": empty"]))
    rng.shuffle(lines)
    return b"\r\n".join(lines)


IMAGE = b"\x89PNG\r\n--not-a-boundary\r\n"


def test_fast_path_takes_what_clients_send() -> None:
    files = {"image": ("cat.png", IMAGE, "image/png")}
    request = httpx.Request("POST", "http://127.0.0.1/", files=files, data={"top_k": "3"})
    body, content_type = request.read(), request.headers["content-type"]
    boundary = content_type.split("boundary=")[1].encode()
    assert _split_simple(body, boundary) is not None
    parts = parse_multipart(body, content_type)
    assert [(p.name, p.filename, p.content_type, p.data) for p in parts] == \
        [("top_k", None, "", b"3"), ("image", "cat.png", "image/png", IMAGE)]


async def aiohttp_body() -> tuple[bytes, str]:
    form = aiohttp.FormData()
    form.add_field("image", IMAGE, filename="cat.png", content_type="image/png")
    form.add_field("top_k", "3")
    payload, chunks = form(), []

    class Sink:
        async def write(self, chunk: bytes) -> None:
            chunks.append(chunk)

    await payload.write(Sink())
    return b"".join(chunks), payload.content_type


def test_fast_path_takes_aiohttp_and_okhttp_shapes() -> None:
    """aiohttp puts each part's Content-Type first; OkHttp adds a Content-Length (written here as OkHttp writes it)."""
    body, content_type = asyncio.run(aiohttp_body())
    boundary = content_type.split("boundary=")[1].encode()
    assert body.startswith(b"--" + boundary + b"\r\nContent-Type: image/png\r\nContent-Disposition: form-data")
    assert _split_simple(body, boundary) is not None
    assert [(p.name, p.filename, p.content_type, p.data) for p in parse_multipart(body, content_type)] == \
        [("image", "cat.png", "image/png", IMAGE), ("top_k", None, "text/plain", b"3")]
    okhttp = encode([(b'Content-Disposition: form-data; name="image"; filename="cat.png"\r\nContent-Type: image/png'
                      b"\r\nContent-Length: %d" % len(IMAGE), IMAGE)])
    assert _split_simple(okhttp, BOUNDARY.encode()) is not None
    assert outcome(_split_simple, okhttp) == outcome(_parse_full, okhttp) == [("image", "cat.png", "image/png", IMAGE)]


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_agrees_with_python_multipart(seed: int) -> None:
    rng = random.Random(seed)
    fast = 0
    for _ in range(500):
        body = encode([(random_head(rng), random_data(rng)) for _ in range(rng.randrange(1, 4))],
                      epilogue=rng.choice([b"", b"\r\n", b"\r\nepilogue"]))
        if rng.random() < 0.2:  # damage: truncation, a preamble, a missing CRLF, padding after a delimiter
            cut = rng.randrange(len(body))
            body = rng.choice([body[:cut], b"preamble\r\n" + body, body.replace(b"\r\n", b"\n", 1),
                               body.replace(BOUNDARY.encode() + b"\r\n", BOUNDARY.encode() + b" \r\n", 1)])
        assert outcome(parse_multipart_with(body), body) == outcome(_parse_full, body), body
        fast += _split_simple(body, BOUNDARY.encode()) is not None
    assert fast > 100, "the generated bodies should exercise the fast path too"


def parse_multipart_with(body: bytes):
    return lambda b, _boundary: parse_multipart(b, CONTENT_TYPE)


def test_part_cap_is_enforced_by_both_paths() -> None:
    body = encode([(b'Content-Disposition: form-data; name="image"', b"x")] * (MAX_PARTS + 1))
    with pytest.raises(ClientError, match=f"more than {MAX_PARTS}"):
        parse_multipart(body, CONTENT_TYPE)
    assert len(parse_multipart(encode([(b'Content-Disposition: form-data; name="image"', b"x")] * MAX_PARTS),
                               CONTENT_TYPE)) == MAX_PARTS


@pytest.mark.parametrize("shape", ["simple", "full"])
def test_a_boundary_over_256_characters_is_refused_by_both_paths(shape: str) -> None:
    """python-multipart refuses such a boundary in its constructor, with an exception that was a 500 (found by a probe
    of the real server); the fast path would have read the same body. Both refuse it now, and 256 still reads."""
    head = b'Content-Disposition: form-data; name="image"'
    if shape == "full":  # a head the fast path does not take: the full parser reads it
        head += b"\r\nX-Other: 1"
    for length, ok in ((256, True), (257, False), (300, False)):
        boundary = "b" * length
        body = encode([(head, b"x")], boundary=boundary)
        if shape == "full":
            assert _split_simple(body, boundary.encode()) is None
        if ok:
            assert [p.data for p in parse_multipart(body, f"multipart/form-data; boundary={boundary}")] == [b"x"]
        else:
            with pytest.raises(ClientError, match=f"boundary in the Content-Type is {length} characters long"):
                parse_multipart(body, f"multipart/form-data; boundary={boundary}")


def test_redirects_are_made_relative_and_never_name_another_host() -> None:
    sent = []

    async def send(message) -> None:
        sent.append(message)

    async def redirect(location: bytes, status: int = 307) -> bytes:
        await relative_redirects(send)({"type": "http.response.start", "status": status,
                                        "headers": [(b"content-length", b"0"), (b"location", location)]})
        return dict(sent[-1]["headers"])[b"location"]

    cases = {b"http://evil.example/classify?model=lenet5&top_k=3": b"/classify?model=lenet5&top_k=3",
             b"https://evil.example": b"/", b"http://h//evil.example/x": b"/evil.example/x",
             b"http://h/\\\\evil.example/x": b"/evil.example/x", b"/demo": b"/demo",
             b"//evil.example/x": b"/x"}
    for location, relative in cases.items():
        assert asyncio.run(redirect(location)) == relative, location
    assert asyncio.run(redirect(b"http://evil.example/x", status=200)) == b"http://evil.example/x"  # not a redirect


def test_query_string_reads_as_starlette_reads_it_and_a_name_given_twice_is_refused() -> None:
    pieces = ["model", "top_k", "=", "&", "3", "lenet5", "", "%20", "%zz", "+", ";", "é", "==", "&&", "a b"]
    rng = random.Random(7)
    strings = ["", "model=lenet5&top_k=3", "top_k=", "top_k", "&model=a&model=b&", "a=b=c", "model=a&mod%65l=b"]
    strings += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(20_000)]
    twice = 0
    for text in strings:
        raw = text.encode("utf-8")
        names = [name for name, _ in QueryParams(raw).multi_items()]
        if len(names) == len(set(names)):
            assert query_dict(raw) == dict(QueryParams(raw)), text
            continue
        twice += 1
        with pytest.raises(BadParameter, match="is given more than once; give it once"):
            query_dict(raw)
    assert twice > 200  # both kinds of string were tried
