"""Every error a client can cause, and the one table that maps it to an HTTP status.

The service, the batch CLI and the load tests all speak these codes, so a record in a batch output file and an
HTTP error body mean the same thing.
"""

from __future__ import annotations


class ClientError(Exception):
    """Something wrong with what the caller sent. `code` is stable and machine-readable; the message is for people."""

    status = 400
    code = "bad_request"

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


class UnreadableInput(ClientError):
    """A batch input that could not be read as a file (missing, a directory, no permission). Batch CLI only."""

    code = "unreadable_input"


class ClientTooSlow(ClientError):
    """The request's headers or body came in too slowly; the connection is closed after the answer."""

    status = 408
    code = "request_timeout"


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
