"""The Open Inference Protocol (KServe "v2" REST, what Triton serves), next to /classify.

So that `tritonclient.http`, KServe's clients and anything else written for Triton work against this service
unchanged. Per model, two inputs (send one of them):

    <card input name> ("image")  UINT8 [-1, H, W, C]  the model's own tensor, exactly what Triton is sent for the same
                                                      model repository (preprocessed client-side: no decoding here)
    image_bytes                  BYTES [-1]           encoded images (JPEG, PNG, ...), decoded server-side by the
                                                      same serving.preprocess path, limits and threads as /classify

and one output, `logits` FP32 [-1, classes], or with the classification extension BYTES [N, k] strings
"score:index:label" (score = the logit, as Triton reports it). Tensors come as JSON or with the binary tensor data
extension (`Inference-Header-Content-Length`, per-tensor `binary_data_size`), answered in binary when asked.
Inference is `ClassifierAPI.infer`, the same adaptive batching as /classify: an N-image request is one N-row batch.
The model configuration extension serves each model's Triton config (serving.triton_config, the one config.pbtxt
renders) as JSON, declaring this server's own max_batch_size; the statistics extension, Triton's per-model counts
and durations summed over every worker (serving.statistics).
Errors are the serving.errors exceptions, rendered by `v2_error_body` as the protocol's `{"error": "<message>"}`.
Not supported (said by a 404 naming it): GRPC, shared memory, model repository control, sequences.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import secrets
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Match, Route

from serving.errors import (
    BodyTooLarge,
    ClientError,
    InvalidTensor,
    ModelNotFound,
    ServerBusy,
    UnsupportedEncoding,
    shown,
    shown_path,
    v2_error_body,
)
from serving.http import Part, loads_json, media_type, plain_int, read_body
from serving.runtime import top_k
from serving.triton_config import model_config

if TYPE_CHECKING:
    from serving.api import ClassifierAPI, ModelInfo

log = logging.getLogger("convnet_serving")

SERVER_NAME = "convnet-serving"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "Inference-Header-Content-Length"
BYTES_INPUT = "image_bytes"
DATATYPES = {"uint8": "UINT8", "float32": "FP32"}  # card dtype → the protocol's datatype name
# Request parameters the protocol defines; everything else a client sends is passed back in the response.
SCHEDULING_PARAMS = ("priority", "timeout")  # accepted; the adaptive batcher has its own policy
SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")
UNSUPPORTED = ("this server speaks the Open Inference Protocol's REST health, metadata and infer endpoints with the "
               "binary_tensor_data, classification, model_configuration and statistics extensions; not GRPC, "
               "shared memory, model repository control, tracing or logging")


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as the model metadata describes it; -1 is the batch axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.description:
            d["parameters"] = {"description": self.description}
        return d

    def describe(self) -> str:
        return f"{self.name!r} ({self.datatype} {list(self.shape)})"


def tensor_input(model: ModelInfo) -> TensorSpec:
    spec = model.card.input
    return TensorSpec(spec["name"], DATATYPES[spec["dtype"]], tuple(spec["shape"]),
                      f"the model's own input: {spec['layout']} pixels preprocessed with the card's recipe "
                      f"({model.recipe.kind}); send this or '{BYTES_INPUT}'")


def bytes_input(model: ModelInfo) -> TensorSpec:
    return TensorSpec(BYTES_INPUT, "BYTES", (-1,),
                      f"encoded images (JPEG, PNG, WebP, ...), one per element, decoded and preprocessed server-side "
                      f"like /classify; send this or '{model.card.input['name']}'")


def logits_output(model: ModelInfo) -> TensorSpec:
    spec = model.card.output
    return TensorSpec(spec["name"], DATATYPES[spec["dtype"]], tuple(spec["shape"]),
                      'raw logits; with parameters {"classification": k}: BYTES [N, k] "score:index:label"')


def model_metadata(model: ModelInfo) -> dict[str, Any]:
    return {"name": model.name, "versions": [model.card.version], "platform": PLATFORM,
            "inputs": [tensor_input(model).to_dict(), bytes_input(model).to_dict()],
            "outputs": [logits_output(model).to_dict()]}


# ---- the request: JSON header + binary tensor data --------------------------------------------------------------


@dataclass
class RequestedOutput:
    binary: bool
    classification: int = 0  # 0: the logits themselves; k: the classification extension's top k


@dataclass
class InferRequest:
    """A parsed, validated infer request: exactly one input, either a UINT8 batch or a list of encoded images."""

    id: str | None
    input_name: str
    pixels: np.ndarray | None  # the model's own tensor, N x H x W x C uint8
    images: list[bytes] | None  # the BYTES input's elements
    outputs: dict[str, RequestedOutput]
    parameters: dict[str, Any] = field(default_factory=dict)  # the client's own, echoed in the response

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.images or ())


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip/deflate request body (tritonclient's request_compression_algorithm), never inflated past `limit`."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedEncoding(f"Content-Encoding {shown(encoding)} is not supported; send gzip, deflate or none",
                                  "gzip, deflate, identity")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidTensor(f"the {encoding} request body could not be decompressed: {e}") from None
    if len(out) > limit:
        raise BodyTooLarge(f"the decompressed request body exceeds the {limit:,}-byte limit")
    if not inflater.eof:
        raise InvalidTensor(f"the {encoding} request body is truncated")
    if inflater.unused_data:  # a second gzip member, or junk: never silently dropped (tritonclient sends one member)
        raise InvalidTensor(f"{len(inflater.unused_data):,} bytes follow the end of the {encoding} stream; send the "
                            "request compressed as one stream")
    return out


# A JSON array costs Python ~60 bytes however short its text: 20 MB of `[],` became 640 MB in a worker. Nested RGB
# pixels spend at least 8 bytes of JSON on each array ("[0,0,0],", ~7.98 counting the rows' arrays too); a digit's
# 1-pixel arrays ("[0],") take 4, but 64 nested digits are 68,000 arrays. So: 100,000 arrays free, then one per 7 bytes.
JSON_CONTAINERS_FREE = 100_000
JSON_BYTES_PER_CONTAINER = 7


def _one_header(request: Request, name: str) -> str | None:
    """A header that changes how the body is read: given twice, which one counts is ambiguous (a proxy may take the
    other), so that is a 400, as for two Authorization headers (serving/keys.py)."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise InvalidTensor(f"the {name} header is given {len(values)} times; give it once")
    return values[0] if values else None


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary tensor data after it (`Inference-Header-Content-Length`)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        length = plain_int(header_length)
        if length is None:
            raise InvalidTensor(f"{HEADER_LENGTH} must be an integer, not {shown(header_length)}")
        if not 0 <= length <= len(body):
            raise InvalidTensor(f"{HEADER_LENGTH} is {length:,} but the request body has {len(body):,} bytes")
        json_part, binary = body[:length], body[length:]
    containers = json_part.count(b"[") + json_part.count(b"{")  # C-speed scans: ~2 ms for 20 MB
    if containers > max(JSON_CONTAINERS_FREE, len(json_part) // JSON_BYTES_PER_CONTAINER):
        raise InvalidTensor(f"the inference request has {containers:,} JSON arrays and objects in {len(json_part):,} "
                            "bytes, more than tensor data needs; send 'data' flat (row-major), or as binary tensor "
                            "data")
    try:
        header = _header_with_flat_data(json_part) or loads_json(json_part)  # NaN, Infinity: a 400 NonFiniteNumber
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; RecursionError: [[[[…
        hint = "" if header_length is not None else f" (binary tensor data needs the {HEADER_LENGTH} header)"
        raise InvalidTensor(f"the inference request is not valid JSON: {str(e)[:200]}{hint}") from None
    if not isinstance(header, dict):
        raise InvalidTensor("the inference request must be a JSON object")
    return header, binary


# JSON tensor data read by numpy. A flat list of integers ("data": [0,12,255,...]) is how JSON clients send an image
# (KServe's SDK, curl), and json.loads makes a Python int and a list slot of every value: ~12 ms of the event loop
# for one AlexNet image, about its inference's time. So each long such list is cut out of the text and read by
# np.fromstring, and json.loads reads the rest: 4.7 ms for that image (compact; 1.6x cheaper with ", " separators).
# Only lists of digits, commas and spaces are cut; the values are kept only if numpy read one between each two
# commas, each written as plainly as JSON allows (no leading zero) and below 1000, and only if every list cut lands
# in an input's 'data'. Anything else is parsed the ordinary way, so both ways accept the same requests with the
# same values (tests/test_v2.py compares them).
_FLAT_DATA = re.compile(rb'(?<!\\)"data"[\x20\t\n\r]*:[\x20\t\n\r]*\[([0-9, ]{1000,})\]')
_CUT_TOKEN = f"cut-by-convnet-{secrets.token_hex(16)}-"  # unguessable: no client's own string can pass for one


def _header_with_flat_data(json_part: bytes) -> dict[str, Any] | None:
    """The inference header as loads_json reads it, its long flat integer 'data' lists as int64 arrays; None when
    there is no such list or anything about it is not plain (the caller then parses the ordinary way)."""
    cuts = list(_FLAT_DATA.finditer(json_part))
    if not cuts or json.detect_encoding(json_part) != "utf-8":
        return None
    pieces, arrays, at = [], {}, 0
    for i, cut in enumerate(cuts):
        values = _plain_ints(cut.group(1))
        if values is None:
            return None
        token = f"{_CUT_TOKEN}{i}"
        pieces += [json_part[at:cut.start(1) - 1], b'"', token.encode(), b'"']  # the [...] becomes "token"
        arrays[token] = values
        at = cut.end(1) + 1
    pieces.append(json_part[at:])
    try:
        header = loads_json(b"".join(pieces))
    except (ValueError, RecursionError):
        return None  # the ordinary parse names the mistake
    inputs = header.get("inputs") if isinstance(header, dict) else None
    for tensor in inputs if isinstance(inputs, list) else ():
        data = tensor.get("data") if isinstance(tensor, dict) else None
        if isinstance(data, str) and data in arrays:
            tensor["data"] = arrays.pop(data)
    return None if arrays else header  # a list cut elsewhere (in 'parameters', or a repeated key): parse it whole


def _plain_ints(text: bytes) -> np.ndarray | None:
    """The values of a JSON list's inside `text` (digits, commas, spaces), if every value is written plainly and is
    below 1000; else None."""
    spaces = text.count(b" ")
    compact = text.translate(None, b" ") if spaces else text
    if spaces and (compact[:1] == b"," or compact[-1:] == b"," or b",," in compact):
        return None  # an element of spaces only, which numpy reads as 0 (without spaces, numpy refuses ",,")
    try:
        values = np.fromstring(text, dtype=np.int64, sep=",")  # spaces around a comma are skipped, as in JSON
    except ValueError:  # "1 2", ",,", a leading comma: not one number between each two commas
        return None
    commas = compact.count(b",")
    if len(values) != commas + 1:  # a trailing comma
        return None
    # Each value's digits as written (one at least, as no element is empty), against the digits it has (1 to 3 below
    # 1000): equal only when no value has a leading zero and none is 1000 or more, since a value is never written in
    # fewer digits than it has.
    written = len(compact) - commas
    if written != len(values) + np.count_nonzero(values >= 10) + np.count_nonzero(values >= 100):
        return None
    return values


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidTensor(f"{what} must be a JSON object")
    return value


# Echoed parameters are re-encoded in the response: ~960 levels that json.loads took failed json.dumps there (a 500).
MAX_PARAMETER_DEPTH = 32


def _nested_at_most(value: Any, depth: int) -> bool:
    """Whether `value`'s lists and objects nest at most `depth` levels (recursing no deeper than that)."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if children is None:
        return True
    return depth > 0 and all(_nested_at_most(child, depth - 1) for child in children)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(params: dict[str, Any], name: str, default: bool, what: str) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise InvalidTensor(f"{what} parameter {name!r} must be true or false, not {shown(value)}")
    return value


def parse_bytes_tensor(raw: bytes, name: str, count: int) -> list[bytes]:
    """The binary BYTES serialization: each element a 4-byte little-endian length, then that many bytes. `count`
    elements are expected: the walk stops past that (20 MB of zero bytes is 5 million empty elements, ~2 s of the
    event loop to list)."""
    items, offset = [], 0
    while offset < len(raw):
        if len(items) == count:
            raise InvalidTensor(f"input {name!r}: its binary data holds more than the {count} elements its shape "
                                "needs")
        if offset + 4 > len(raw):
            raise InvalidTensor(f"input {name!r}: BYTES element {len(items)} has a truncated 4-byte length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidTensor(f"input {name!r}: BYTES element {len(items)} claims {size:,} bytes, only "
                                f"{len(raw) - offset:,} remain in its binary data")
        items.append(raw[offset:offset + size])
        offset += size
    return items


def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _check_shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidTensor(f"input {name!r}: 'shape' must be a list of non-negative integers, not {shown(shape)}")
    return tuple(shape)


def _uint8_from_json(data: Any, count: int, name: str) -> np.ndarray:
    """JSON `data` (flat or nested, row-major) → `count` uint8 values; anything but integers 0..255 is refused."""
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise InvalidTensor(f"input {name!r}: 'data' is not a rectangular list of numbers") from None
    if values.dtype.kind not in "iu":
        raise InvalidTensor(f"input {name!r}: UINT8 data must be integers from 0 to 255, got "
                            f"{'booleans' if values.dtype.kind == 'b' else 'non-integers'}")
    if values.size != count:
        raise InvalidTensor(f"input {name!r}: 'data' has {values.size:,} elements, its shape needs {count:,}")
    if values.min() < 0 or values.max() > 255:
        raise InvalidTensor(f"input {name!r}: UINT8 data must be from 0 to 255, got {values.min()}..{values.max()}")
    return values.astype(np.uint8).ravel()


def _images_from_json(data: Any, count: int, name: str) -> list[bytes]:
    """JSON can't carry raw bytes, so a BYTES image in JSON is a base64 string (KServe's "content_type": "base64")."""
    if not isinstance(data, list) or len(data) != count or not all(isinstance(s, str) for s in data):
        raise InvalidTensor(f"input {name!r}: JSON 'data' must be a list of {count} base64 strings (one per image)")
    images = []
    for i, s in enumerate(data):
        try:
            images.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidTensor(f"input {name!r}: element {i} is not base64; in JSON, send each image base64-encoded "
                                "(or send the raw bytes with the binary tensor data extension)") from None
    return images


def _requested_outputs(header: dict[str, Any], model: ModelInfo, binary_default: bool) -> dict[str, RequestedOutput]:
    output = logits_output(model)
    requested = header.get("outputs")
    if requested is None:
        return {output.name: RequestedOutput(binary_default)}
    if not isinstance(requested, list):
        raise InvalidTensor("'outputs' must be a list")
    outputs: dict[str, RequestedOutput] = {}
    for item in requested:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidTensor("each of 'outputs' must be an object with a 'name'")
        name = item["name"]
        if name != output.name:
            raise InvalidTensor(f"unknown output {shown(name)}; model {model.name!r} has {output.describe()}")
        if name in outputs:
            raise InvalidTensor(f"output {name!r} is requested twice")
        params = _object(item.get("parameters"), f"output {name!r}'s 'parameters'")
        k = params.get("classification", 0)
        if not _is_int(k) or k < 0:
            raise InvalidTensor(f"output {name!r}: 'classification' must be a positive integer, not {shown(k)}")
        outputs[name] = RequestedOutput(_flag(params, "binary_data", binary_default, f"output {name!r}"), k)
    return outputs or {output.name: RequestedOutput(binary_default)}


def parse_infer_request(header: dict[str, Any], binary: bytes, model: ModelInfo, max_images: int) -> InferRequest:
    """Validate an infer request against the model's inputs and outputs and cut its tensors out of the binary data."""
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidTensor(f"'id' must be a string, not {shown(request_id)}")
    params = _object(header.get("parameters"), "'parameters'")
    if params.get("sequence_id") not in (None, 0, ""):
        raise InvalidTensor("sequence batching is not supported: models here are stateless")
    binary_default = _flag(params, "binary_data_output", False, "request")
    passed_through = {k: v for k, v in params.items()
                      if k not in ("binary_data_output", *SCHEDULING_PARAMS, *SEQUENCE_PARAMS)}
    if not _nested_at_most(passed_through, MAX_PARAMETER_DEPTH):
        raise InvalidTensor(f"'parameters' are nested over {MAX_PARAMETER_DEPTH} levels deep; they are echoed back in "
                            "the response, and so must stay shallow")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidTensor("'inputs' must be a non-empty list of tensors")
    pixels_spec, bytes_spec = tensor_input(model), bytes_input(model)
    specs = {pixels_spec.name: pixels_spec, bytes_spec.name: bytes_spec}
    chosen: dict[str, Any] | None = None
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidTensor("each of 'inputs' must be an object with a 'name'")
        name = tensor["name"]
        if name not in specs:
            raise InvalidTensor(f"unknown input {shown(name)}; model {model.name!r} takes "
                                f"{pixels_spec.describe()} or {bytes_spec.describe()}")
        if chosen is not None:
            raise InvalidTensor(f"send one input, {pixels_spec.name!r} or {bytes_spec.name!r}; got "
                                f"{chosen['name']!r} and {name!r}")
        size = _object(tensor.get("parameters"), f"input {name!r}'s 'parameters'").get("binary_data_size")
        if size is not None:  # the binary tensor data extension: this tensor's bytes follow the previous ones'
            if not _is_int(size) or size < 0:
                raise InvalidTensor(f"input {name!r}: 'binary_data_size' must be a non-negative integer, not "
                                    f"{shown(size)}")
            if "data" in tensor:
                raise InvalidTensor(f"input {name!r} has both 'data' and 'binary_data_size'")
            if offset + size > len(binary):
                raise InvalidTensor(f"input {name!r}: 'binary_data_size' is {size:,} but only {len(binary) - offset:,} "
                                    f"bytes of binary data follow the JSON header")
            tensor = {**tensor, "raw": binary[offset:offset + size]}
            offset += size
        elif "data" not in tensor:
            raise InvalidTensor(f"input {name!r} has neither 'data' nor a 'binary_data_size'")
        chosen = tensor
    if offset != len(binary):
        raise InvalidTensor(f"{len(binary) - offset:,} bytes of binary data follow the JSON header that no input's "
                            "'binary_data_size' accounts for")
    assert chosen is not None
    spec = specs[chosen["name"]]
    datatype, shape = chosen.get("datatype"), _check_shape(chosen.get("shape"), spec.name)
    if datatype != spec.datatype:
        raise InvalidTensor(f"input {spec.name!r} has datatype {shown(datatype)}; the model takes {spec.describe()}")
    if len(shape) != len(spec.shape) or any(s != d for s, d in zip(shape[1:], spec.shape[1:], strict=True)):
        raise InvalidTensor(f"input {spec.name!r} has shape {shown(list(shape))}; the model takes {spec.describe()}")
    if not 1 <= shape[0] <= max_images:
        raise InvalidTensor(f"input {spec.name!r}: batch size {shown(shape[0])}, must be from 1 to {max_images}")
    outputs = _requested_outputs(header, model, binary_default)
    count = math.prod(shape)
    raw = chosen.get("raw")
    if spec is bytes_spec:
        images = parse_bytes_tensor(raw, spec.name, count) if raw is not None else None
        if images is not None and len(images) != count:
            raise InvalidTensor(f"input {spec.name!r}: its binary data holds {len(images)} elements, its shape "
                                f"{list(shape)} needs {count}")
        if images is None:
            images = _images_from_json(chosen["data"], count, spec.name)
        return InferRequest(request_id, spec.name, None, images, outputs, passed_through)
    if raw is not None:
        if len(raw) != count:
            raise InvalidTensor(f"input {spec.name!r}: 'binary_data_size' is {len(raw):,} bytes, its shape "
                                f"{list(shape)} needs {count:,} UINT8 bytes")
        flat = np.frombuffer(raw, dtype=np.uint8)
    else:
        flat = _uint8_from_json(chosen["data"], count, spec.name)
    return InferRequest(request_id, spec.name, flat.reshape(shape), None, outputs, passed_through)


# ---- the response -------------------------------------------------------------------------------------------------


def classification(logits: np.ndarray, k: int, labels: list[str]) -> list[list[str]]:
    """Triton's classification extension: per row the k best classes as "score:index:label", score = the output
    value itself (a logit here, as Triton reports it); the order is /classify's (runtime.top_k)."""
    rows = top_k(logits, k, labels)
    return [[f"{logits[r, p['index']]:f}:{p['index']}:{p['label']}" for p in row] for r, row in enumerate(rows)]


def infer_response(model: ModelInfo, request: InferRequest, logits: np.ndarray) -> Response:
    """JSON, or the JSON header + binary tensor data when any output asked for binary."""
    logits = np.asarray(logits, dtype=np.float32)
    outputs, blobs = [], []
    for name, wanted in request.outputs.items():
        if wanted.classification:
            strings = [s for row in classification(logits, wanted.classification, model.labels) for s in row]
            tensor = {"name": name, "datatype": "BYTES", "shape": [len(logits), len(strings) // len(logits)]}
            raw = serialize_bytes_tensor([s.encode() for s in strings]) if wanted.binary else None
            data: list[Any] = strings
        else:
            tensor = {"name": name, "datatype": "FP32", "shape": list(logits.shape)}
            raw = logits.astype("<f4").tobytes() if wanted.binary else None
            data = logits.ravel().tolist() if not wanted.binary else []
        if raw is not None:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = data
        outputs.append(tensor)
    body: dict[str, Any] = {"model_name": model.name, "model_version": model.card.version}
    if request.id is not None:
        body["id"] = request.id
    if request.parameters:
        body["parameters"] = request.parameters
    body["outputs"] = outputs
    # allow_nan=False: strict JSON has no NaN/Infinity (requests carrying them are refused at parsing, so only a model
    # producing them could reach here: a 500, not a 200 no strict client can read). Free: these non-default
    # separators already make json.dumps build an encoder per call, and the check runs only on a non-finite float.
    header = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(blobs), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


# ---- the endpoints ------------------------------------------------------------------------------------------------


class EveryMethod:
    """An endpoint as a plain ASGI app: Starlette's Route matches one for every method. A request function is
    matched for a list of methods only, and a method off the list (TRACE, PROPFIND) got Starlette's own 405 naming
    the list, on paths where each method in it is a 404."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope, receive, send) -> None:
        response = await self.endpoint(Request(scope, receive))
        await response(scope, receive, send)


class V2Protocol:
    """The protocol's routes over a ClassifierAPI: its models, decoding pool, limits, metrics and `infer`."""

    def __init__(self, api: ClassifierAPI) -> None:
        self.api = api
        self.served: list[Route] = []

    def routes(self) -> list[Route]:
        routes = [Route("/v2", self.server_metadata, methods=["GET"]),
                  Route("/v2/health/live", self.live, methods=["GET"]),
                  Route("/v2/health/ready", self.ready, methods=["GET"]),
                  Route("/v2/models/stats", self.model_statistics, methods=["GET"])]  # before /v2/models/{model}
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [Route(prefix, self.model_metadata, methods=["GET"]),
                       Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                       Route(prefix + "/config", self.model_configuration, methods=["GET"]),
                       Route(prefix + "/stats", self.model_statistics, methods=["GET"]),
                       Route(prefix + "/infer", self.infer, methods=["POST"])]
        self.served = routes
        # Any other /v2 path or method: a 405 for a served path, else a 404 that says what this server does not speak.
        return [*routes, Route("/v2/{rest:path}", EveryMethod(self.unsupported))]

    async def server_metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.api.infer is not None else 503)

    async def model_metadata(self, request: Request) -> Response:
        try:
            return JSONResponse(model_metadata(self._model(request)))
        except ClientError as exc:
            return self._error(request, "-", exc)

    async def model_ready(self, request: Request) -> Response:
        try:
            self._model(request)
        except ClientError as exc:
            return self._error(request, "-", exc)
        return Response(status_code=200 if self.api.infer is not None else 503)

    async def model_configuration(self, request: Request) -> Response:
        try:
            model = self._model(request)
        except ClientError as exc:
            return self._error(request, "-", exc)
        # The repository's config, but with the batch this server takes: a client sizes its requests by it.
        return JSONResponse(model_config(model.card, max_batch_size=self.api.cfg.max_batch_images))

    async def model_statistics(self, request: Request) -> Response:
        try:
            models = [self._model(request)] if "model" in request.path_params else \
                [self.api.models[name] for name in sorted(self.api.models)]
            if self.api.metrics is None:
                raise ServerBusy("the worker is still starting; retry shortly")
        except ClientError as exc:
            return self._error(request, "-", exc)
        answer = await asyncio.get_running_loop().run_in_executor(
            self.api.pool, self.api.metrics.statistics, [(m.name, m.card.version) for m in models])
        return JSONResponse(answer)

    async def infer(self, request: Request) -> Response:
        started = time.perf_counter()
        model_name = "-"
        try:
            model = self._model(request)
            model_name = model.name
            limit = self.api.cfg.max_body_bytes
            body = inflate(await read_body(request, limit), media_type(_one_header(request, "content-encoding")),
                           limit)
            header, binary = split_body(body, _one_header(request, HEADER_LENGTH))
            parsed = parse_infer_request(header, binary, model, self.api.cfg.max_batch_images)
            batch = parsed.pixels if parsed.pixels is not None else await self._decode(model, parsed.images or [])
            logits = await self.api.infer(model.name, batch)
            response = infer_response(model, parsed, logits)
        except Exception as exc:  # noqa: BLE001 (every failure becomes the protocol's error JSON)
            return self._error(request, model_name, exc, started)
        self.api._count("v2_infer", model.name, "ok", images=parsed.count, started=started)
        return response

    async def unsupported(self, request: Request) -> Response:
        # The catch-all matches every method, so Starlette's own 405 never happens below it: a served path asked
        # with the wrong method is found here, and answered like every other route's (405 with Allow).
        path = request.scope["path"]
        if path.endswith("/"):  # nor its redirect of a trailing slash, which /classify/ gets: the same 307 here
            bare = {**request.scope, "path": path.rstrip("/")}
            if any(route.matches(bare)[0] is not Match.NONE for route in self.served):
                query = request.scope.get("query_string", b"").decode("latin-1")
                return RedirectResponse(bare["path"] + ("?" + query if query else ""), status_code=307)
        allowed = sorted({method for route in self.served if route.matches(request.scope)[0] is Match.PARTIAL
                          for method in route.methods or ()})
        if allowed:
            return JSONResponse({"error": f"{request.method} {shown_path(request.url.path)}: method not allowed; "
                                          f"use {', '.join(allowed)}"},
                                status_code=405, headers={"Allow": ", ".join(allowed)})
        return JSONResponse({"error": f"{request.method} {shown_path(request.url.path)} is not served: {UNSUPPORTED}"},
                            status_code=404)

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _model(self, request: Request) -> ModelInfo:
        name, version = request.path_params["model"], request.path_params.get("version")
        model = self.api.models.get(name)
        if model is None:
            raise ModelNotFound(f"unknown model {shown(name)}; served models: {', '.join(sorted(self.api.models))}")
        if version is not None and version != model.card.version:
            raise ModelNotFound(f"model {name!r} has no version {shown(version)}; its only version is "
                                f"{model.card.version!r}")
        return model

    async def _decode(self, model: ModelInfo, images: list[bytes]) -> np.ndarray:
        """Every BYTES element through /classify's decoding (thread pool, pixel cap, metrics); the first failure is
        reported with its element index."""
        arrays = await self.api.preprocess_each(model, [Part(BYTES_INPUT, None, "", data) for data in images])
        for i, a in enumerate(arrays):
            if isinstance(a, ClientError):
                raise type(a)(f"input {BYTES_INPUT!r} element {i}: {a.detail}") from a
            if isinstance(a, BaseException):
                raise a
        return np.stack(arrays)

    def _error(self, request: Request, model: str, exc: BaseException, started: float | None = None) -> Response:
        status, body = v2_error_body(exc)
        if not isinstance(exc, ClientError):
            log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        code = exc.code if isinstance(exc, ClientError) else "internal_error"
        if request.url.path.endswith("/infer"):
            self.api._count("v2_infer", model, code, started=started)
        return JSONResponse(body, status_code=status, headers=self.api.error_headers(exc, status))



# ---- OpenAPI (merged into /docs.json by serving.api.openapi_paths) -------------------------------------------------

_TAG = ["Open Inference Protocol (KServe v2 / Triton)"]
_V2_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string", "example": "alexnet"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string", "example": "1"}}
_EMPTY = {"200": {"description": "yes (empty body)"}, "503": {"description": "not yet (empty body)"}}
_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string"}, "datatype": {"type": "string", "example": "UINT8"},
    "shape": {"type": "array", "items": {"type": "integer"}}, "parameters": {"type": "object"},
    "data": {"type": "array", "items": {}}}}
_INFER_BODY = {"type": "object", "required": ["inputs"], "properties": {
    "id": {"type": "string"}, "parameters": {"type": "object"}, "inputs": {"type": "array", "items": _TENSOR},
    "outputs": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "parameters": {"type": "object"}}}}}}


def _model_paths(prefix: str, params: list[dict]) -> dict[str, Any]:
    return {
        prefix: {"get": {"tags": _TAG, "summary": "Model metadata: platform, inputs and outputs (-1 = batch axis)",
                         "parameters": params, "responses": {"200": {"description": "model metadata"},
                                                             "404": {"description": "unknown model or version",
                                                                     **_V2_ERROR}}}},
        prefix + "/ready": {"get": {"tags": _TAG, "summary": "Is the model ready", "parameters": params,
                                    "responses": {**_EMPTY, "404": {"description": "unknown model", **_V2_ERROR}}}},
        prefix + "/config": {"get": {"tags": _TAG, "summary": "Model configuration (Triton's ModelConfig, as in "
                                     "config.pbtxt; max_batch_size is this server's)", "parameters": params,
                                     "responses": {"200": {"description": "the model's configuration"},
                                                   "404": {"description": "unknown model or version", **_V2_ERROR}}}},
        prefix + "/stats": {"get": {"tags": _TAG, "summary": "Statistics (Triton's): requests, images, onnxruntime "
                                    "calls, and their queue and compute time, since the server started",
                                    "parameters": params,
                                    "responses": {"200": {"description": "model_stats for this model"},
                                                  "404": {"description": "unknown model or version", **_V2_ERROR}}}},
        prefix + "/infer": {"post": {
            "tags": _TAG, "summary": f"Inference: the UINT8 image tensor or '{BYTES_INPUT}' (BYTES encoded images); "
            f"JSON, or JSON + binary tensor data with the {HEADER_LENGTH} header", "parameters": params,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _INFER_BODY},
                                                          "application/octet-stream": {"schema": {
                                                              "type": "string", "format": "binary"}}}},
            "responses": {"200": {"description": "outputs (JSON, or JSON header + binary data)"},
                          **{str(s): {"description": d, **_V2_ERROR} for s, d in (
                              (400, "bad tensor, framing or image"), (404, "unknown model or version"),
                              (413, "body or image over the limit"), (415, "a Content-Encoding but gzip or deflate"),
                              (503, "overloaded: retry"))}}}},
    }


V2_OPENAPI_PATHS: dict[str, Any] = {
    "/v2": {"get": {"tags": _TAG, "summary": "Server metadata: name, version, supported extensions",
                    "responses": {"200": {"description": "server metadata"}}}},
    "/v2/health/live": {"get": {"tags": _TAG, "summary": "Liveness (status code only)", "responses": _EMPTY}},
    "/v2/health/ready": {"get": {"tags": _TAG, "summary": "Readiness (status code only)", "responses": _EMPTY}},
    "/v2/models/stats": {"get": {"tags": _TAG, "summary": "Statistics of every model (see /v2/models/{model}/stats)",
                                 "responses": {"200": {"description": "model_stats for every model"}}}},
    **_model_paths("/v2/models/{model}", [_MODEL]),
    **_model_paths("/v2/models/{model}/versions/{version}", [_MODEL, _VERSION]),
}
