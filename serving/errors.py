"""Every error a client can cause, and the one table that maps it to an HTTP status.

The service, the batch CLI and the load tests all speak these codes, so a record in a batch output file and an
HTTP error body mean the same thing.
"""

from __future__ import annotations

import reprlib


class ClientError(Exception):
    """Something wrong with what the caller sent. `code` is stable and machine-readable; the message is for people."""

    status = 400
    code = "bad_request"
    headers: dict[str, str] | None = None  # response headers the status calls for (e.g. a 415's Accept-Encoding)

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail

    def to_dict(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


class NotAnImage(ClientError):
    code = "not_an_image"


class UnsupportedFormat(ClientError):
    code = "unsupported_format"


class CorruptImage(ClientError):
    code = "corrupt_image"


class UnsupportedMode(ClientError):
    code = "unsupported_mode"


class ExtremeAspectRatio(ClientError):
    """One side over MAX_ASPECT_RATIO times the other (serving/preprocess.py): no photo or digit is shaped so, and a
    picture 1 pixel wide costs Pillow and the digit recipe tens of bytes a pixel, several times a square one's."""

    code = "extreme_aspect_ratio"


class ImageTooLarge(ClientError):
    status = 413
    code = "image_too_large"


class BodyTooLarge(ClientError):
    status = 413
    code = "body_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class UnsupportedEncoding(UnsupportedMediaType):
    """A Content-Encoding the endpoint does not inflate. RFC 9110 §12.5.3: the 415 lists in Accept-Encoding the
    codings it does take, so a client can retry without guessing."""

    def __init__(self, detail: str, accepted: str):
        super().__init__(detail)
        self.headers = {"Accept-Encoding": accepted}


class BadParameter(ClientError):
    status = 422
    code = "bad_parameter"


class UnknownModel(BadParameter):
    code = "unknown_model"


class MissingImage(BadParameter):
    code = "missing_image"


class ModelNotFound(UnknownModel):
    """A model or version named in a URL path (the Open Inference Protocol's /v2/models/...): not found, a 404."""

    status = 404


class InvalidTensor(ClientError):
    """An Open Inference Protocol request that breaks the protocol or the model's tensor contract: bad JSON or
    binary framing, wrong datatype, shape or element count, a missing input, an unknown output."""

    code = "invalid_tensor"


class NonFiniteNumber(ClientError):
    """A JSON body with NaN, Infinity or -Infinity (Python's json reads them; RFC 8259 has no such tokens), or a
    number too large for a float (1e400 reads as inf): refused, so no answer can repeat one as invalid JSON."""

    code = "non_finite_number"


class UnreadableInput(ClientError):
    """A batch input that could not be read as a file (missing, a directory, no permission). Batch CLI only."""

    code = "unreadable_input"


class ClientTooSlow(ClientError):
    """The request's headers or body came in too slowly; the connection is closed after the answer."""

    status = 408
    code = "request_timeout"


class HeadersTooLarge(ClientError):
    """The request line and headers are longer than the server reads (CONVNET_MAX_HEADER_BYTES); closed after."""

    status = 431
    code = "headers_too_large"


class Unauthorized(ClientError):
    """No API key, or one that is not (or no longer) in the key file, while API keys are on (serving/keys.py)."""

    status = 401
    code = "unauthorized"


class ServerBusy(ClientError):
    status = 503
    code = "server_busy"


class RequestTimeout(ClientError):
    """Not answered within the service's timeout (CONVNET_TIMEOUT_S)."""

    status = 504
    code = "timeout"


class ModelRepositoryError(Exception):
    """The model repository on disk is wrong (missing file, hash mismatch). An operator's problem, not a client's."""


# ---- showing a client's value in an error detail -------------------------------------------------------------------

SHOWN_CHARS = 100  # the most characters of a client's value an error detail repeats (about; plus quotes and a note)


def _clipped(text: str | bytes, limit: int) -> str:
    """repr(text), of at most about `limit` characters: a prefix, then '...' and the original length."""
    n = min(len(text), limit)
    shown_repr = repr(text[:n])
    while len(shown_repr) > limit + 3 and n > 1:  # escapes ('\x01', '\U0001f600') make a repr longer than its text
        n = max(1, n * limit // len(shown_repr))
        shown_repr = repr(text[:n])
    if n < len(text):
        shown_repr += f"... ({len(text):,} {'characters' if isinstance(text, str) else 'bytes'})"
    return shown_repr


class _ShownRepr(reprlib.Repr):
    """reprlib's bounded repr (a few items per container, a few levels), its strings clipped like `shown`'s."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring = 3, 40
        self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = self.maxdict = 5
        self.maxlong = self.maxother = SHOWN_CHARS

    def repr_str(self, x: str, level: int) -> str:
        return _clipped(x, self.maxstring)

    def repr_bytes(self, x: bytes, level: int) -> str:
        return _clipped(x, self.maxstring)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 10_000:  # repr() refuses ints over 4,300 digits (sys.get_int_max_str_digits)
            return f"<an integer of {x.bit_length():,} bits>"
        return super().repr_int(x, level)


_SHOWN_REPR = _ShownRepr()


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client's value as an error detail repeats it: its repr, cut to about `limit` characters (with '...' and the
    original length), so a 19 MB form field or JSON name gives a detail of a few hundred bytes, not a 5x larger
    repr (a 100 MB answer built and held in the worker). Short values read exactly as `{value!r}` would. Use it for
    every value a client sent (parameters, field and tensor names, headers, path segments, JSON values)."""
    if isinstance(value, str | bytes):
        return _clipped(value, limit)
    text = _SHOWN_REPR.repr(value)  # bounded work and size, however big or deep the value
    if isinstance(value, list | tuple | dict) and len(value) > _SHOWN_REPR.maxlist:
        text += f" ({len(value):,} items)"
    return text


def shown_path(path: str) -> str:
    """A request path in an error detail: as it is when short ("GET /classify: ..."), else `shown` (a URL has no
    length limit in uvicorn: only the header timeout bounds it)."""
    return path if len(path) <= SHOWN_CHARS else shown(path)


def routing_error_body(status: int, method: str, path: str, reason: str) -> dict[str, str]:
    """The JSON body for a router's refusal (no such path, a wrong method), whether the router is ours
    (serving/api.py) or BentoML's (serving/service.py)."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
    return {"error": code, "detail": f"{method} {shown_path(path)}: {reason}"}


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    """(HTTP status, JSON body) for any exception; unknown ones become a 500 that leaks no internals."""
    if isinstance(exc, ClientError):
        return exc.status, exc.to_dict()
    return 500, {"error": "internal_error", "detail": "the server failed to process this request; it was logged"}


def v2_error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    """The same status as `error_body`, in the Open Inference Protocol's shape: `{"error": "<message>"}` (what
    tritonclient raises as InferenceServerException's message)."""
    status, body = error_body(exc)
    return status, {"error": body["detail"]}
