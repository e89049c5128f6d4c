"""Triton's own ModelConfig message, to parse our config.pbtxt and /config answers with: a syntax or field-name
mistake fails there. tritonclient ships model_config_pb2, loaded here from its file, as tritonclient.grpc's package
needs grpc."""

from __future__ import annotations

import functools
import importlib.util
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
