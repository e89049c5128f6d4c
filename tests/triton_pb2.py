"""Triton's own messages, to parse our config.pbtxt and /v2 answers with: a syntax or field-name mistake fails there.
tritonclient ships model_config_pb2 and service_pb2 (ModelStatisticsResponse, ...), loaded here from their files, as
tritonclient.grpc's package needs grpc."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import tritonclient


@functools.cache
def model_config_pb2() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "triton_model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    return pb2


@functools.cache
def service_pb2() -> ModuleType:
    """grpc_service.proto's messages. Its `from tritonclient.grpc import model_config_pb2` is given the module above
    by a stand-in package, for the time of the import only."""
    package = ModuleType("tritonclient.grpc")
    package.model_config_pb2 = model_config_pb2()  # type: ignore[attr-defined]
    spec = importlib.util.spec_from_file_location(
        "triton_service_pb2", Path(tritonclient.__file__).parent / "grpc" / "service_pb2.py")
    pb2 = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("tritonclient.grpc")
    sys.modules["tritonclient.grpc"] = package
    try:
        spec.loader.exec_module(pb2)
    finally:
        if saved is None:
            del sys.modules["tritonclient.grpc"]
        else:
            sys.modules["tritonclient.grpc"] = saved
    return pb2
