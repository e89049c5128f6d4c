"""A model's Triton configuration, built once from its card and written two ways: as `config.pbtxt` in the model
repository (training.export and training.fp16 write it, so `tritonserver --model-repository models/` serves the same
models) and as JSON from `GET /v2/models/{model}/config`, the protocol's model configuration extension
(`tritonclient`'s `get_model_config`). One dict, two renderings, so the two can't disagree.

The dict uses the field names of Triton's ModelConfig message (model_config.proto), which are also the JSON keys
Triton's own /config answers with; enum values are strings in JSON and bare words in text format.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

from serving.config import ServiceConfig
from serving.registry import ModelCard

# What the shipped config.pbtxt declares: the images the service takes in one request by default. A running service
# declares its own CONVNET_MAX_BATCH_IMAGES.
MAX_BATCH_SIZE = ServiceConfig.max_batch_images
# CUDA compute capabilities (major.minor, as Triton formats them) of the GPUs that get the float16 file: Volta and
# later, which have float16 tensor cores. Triton matches a GPU's capability exactly; any other GPU, and every CPU
# instance, loads default_model_filename.
FP16_COMPUTE_CAPABILITIES = ("7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0", "10.0", "12.0")
ENUM_FIELDS = ("data_type", "format", "kind")  # text format writes their values unquoted
MAP_FIELDS = ("cc_model_filenames",)  # map<string, string>: an object in JSON, key/value entries in text format


def model_config(card: ModelCard, max_batch_size: int = MAX_BATCH_SIZE) -> dict[str, Any]:
    """The ModelConfig of a card's model for Triton's onnxruntime backend: uint8 NHWC images in, float32 logits out,
    dynamic batching on. With a float16 file in the card (training.fp16), GPU instances load it and CPU instances
    the float32 one."""
    config: dict[str, Any] = {
        "name": card.name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": max_batch_size,
        "input": [{"name": card.input["name"], "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC",
                   "dims": list(card.input["shape"][1:])}],
        "output": [{"name": card.output["name"], "data_type": "TYPE_FP32", "dims": [card.num_classes],
                    "label_filename": card.labels_file}],
        "dynamic_batching": {"max_queue_delay_microseconds": 5000},
        "instance_group": [{"kind": "KIND_AUTO"}],
        "version_policy": {"latest": {"num_versions": 1}},
    }
    if card.onnx_fp16:
        fp16 = PurePosixPath(card.onnx_fp16["path"]).name
        config["default_model_filename"] = PurePosixPath(card.onnx["path"]).name
        config["cc_model_filenames"] = {cc: fp16 for cc in FP16_COMPUTE_CAPABILITIES}
    return config


def config_pbtxt(card: ModelCard) -> str:
    """config.pbtxt: `model_config(card)` in protobuf text format, under a comment saying where it comes from."""
    reads = card.onnx["path"] + (f" (GPUs: {card.onnx_fp16['path']})" if card.onnx_fp16 else "")
    header = [f"# Generated from model.json by serving.triton_config; Triton's onnxruntime backend reads {reads}."]
    if card.onnx_fp16:
        header += ["# float16 on GPUs, float32 on CPUs: a GPU instance loads cc_model_filenames[its compute",
                   "# capability], a CPU instance default_model_filename (onnxruntime's CPU provider only upcasts",
                   "# float16). Both take uint8 images and give float32 logits; training.fp16 measured their",
                   "# agreement (model.json, onnx_fp16.checks)."]
    return "\n".join([*header, *_text_format(model_config(card), "")]) + "\n"


def _text_format(message: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for name, value in message.items():
        if name in MAP_FIELDS:
            entries = [f"{indent}  {{ key: {_scalar(k)} value: {_scalar(v)} }}" for k, v in value.items()]
            lines += [f"{indent}{name} [", ",\n".join(entries), f"{indent}]"]
        elif isinstance(value, dict):
            lines += [f"{indent}{name} {{", *_text_format(value, indent + "  "), f"{indent}}}"]
        elif isinstance(value, list) and value and isinstance(value[0], dict):  # repeated messages
            blocks = ["\n".join([f"{indent}  {{", *_text_format(item, indent + "    "), f"{indent}  }}"])
                      for item in value]
            lines += [f"{indent}{name} [", ",\n".join(blocks), f"{indent}]"]
        elif isinstance(value, list):
            lines.append(f"{indent}{name}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{indent}{name}: {value if name in ENUM_FIELDS else _scalar(value)}")
    return lines


def _scalar(value: Any) -> str:
    # json.dumps quotes and escapes a str the way text format reads it (names here are ASCII); an int is itself.
    return json.dumps(value)
