"""The float16 AlexNet for GPUs (training.fp16): the conversion of the shipped ONNX, its parity with float32 on real
photos, the card and Triton config that describe it, and the registry serving it on GPU providers only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from triton_pb2 import model_config_pb2

from serving.preprocess import IMAGENET
from serving.registry import DEFAULT_MODELS_DIR, PrecisionUnavailable, load_model, read_card, sha256_file
from serving.runtime import candidate_providers
from serving.triton_config import FP16_COMPUTE_CAPABILITIES, config_pbtxt
from training.export import dropout_nodes
from training.fp16 import (
    MAX_RELATIVE_ERROR,
    MIN_AGREEMENT,
    Fp16ConversionError,
    check_fp16,
    to_float16,
)

ALEXNET = DEFAULT_MODELS_DIR / "alexnet"
LENET = DEFAULT_MODELS_DIR / "lenet5"
ON_CPU_ONLY = candidate_providers("auto")[0] == "CPUExecutionProvider"


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The shipped float32 AlexNet converted afresh into a scratch folder."""
    dst = tmp_path_factory.mktemp("fp16") / "model.fp16.onnx"
    to_float16(ALEXNET / read_card(ALEXNET).onnx["path"], dst)
    return dst


def _model_config(path: Path):
    """config.pbtxt parsed with Triton's own ModelConfig message."""
    pb2 = model_config_pb2()
    return text_format.Parse(path.read_text(), pb2.ModelConfig()), pb2


def test_conversion_keeps_the_contract_and_leaves_no_float32_weights(converted: Path):
    fp32 = onnx.load(str(ALEXNET / "1" / "model.onnx"))
    half = onnx.load(str(converted))
    inp, out = half.graph.input[0], half.graph.output[0]
    assert (inp.name, inp.type.tensor_type.elem_type) == ("image", TensorProto.UINT8)  # clients still send bytes
    assert (out.name, out.type.tensor_type.elem_type) == ("logits", TensorProto.FLOAT)
    assert not [t.name for t in half.graph.initializer if t.data_type == TensorProto.FLOAT]
    n_float = sum(t.data_type == TensorProto.FLOAT for t in fp32.graph.initializer)
    assert sum(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer) == n_float == 18
    casts = [{a.name: helper.get_attribute_value(a) for a in n.attribute} for n in half.graph.node
             if n.op_type == "Cast"]
    assert [c["to"] for c in casts] == [TensorProto.FLOAT16, TensorProto.FLOAT]  # uint8 → float16, float16 → float32
    assert half.graph.node[-1].output[0] == "logits"  # the final Cast back to float32
    assert dropout_nodes(half) == 0
    assert converted.stat().st_size < 0.51 * (ALEXNET / "1" / "model.onnx").stat().st_size
    onnx.checker.check_model(str(converted), full_check=True)


def test_parity_with_float32_on_photos_within_the_thresholds(converted: Path):
    checks = check_fp16(ALEXNET / "1" / "model.onnx", converted, IMAGENET)
    assert checks["images"] == 65 and "grace_hopper.jpg" in checks["inputs"]
    assert checks["top1_agreement"] >= MIN_AGREEMENT
    assert checks["relative_error"] <= MAX_RELATIVE_ERROR
    assert checks["relative_error"] == pytest.approx(checks["max_abs_diff"] / checks["max_abs_logit"])
    assert checks["dropout_nodes"] == 0


def test_shipped_card_and_triton_config_describe_the_fp16_file(converted: Path):
    card = read_card(ALEXNET)
    fp16 = card.onnx_fp16
    assert fp16 is not None, "models/alexnet has no float16 copy: run `make models`"
    assert fp16["path"] == "1/model.fp16.onnx"
    assert fp16["sha256"] == sha256_file(ALEXNET / fp16["path"]) == sha256_file(converted)  # reproducible
    assert fp16["size_bytes"] == (ALEXNET / fp16["path"]).stat().st_size
    assert fp16["from_sha256"] == card.onnx["sha256"] == sha256_file(ALEXNET / card.onnx["path"])
    checks = fp16["checks"]
    assert checks["top1_agreement"] >= MIN_AGREEMENT and checks["relative_error"] <= MAX_RELATIVE_ERROR
    assert "onnxruntime CPU" in checks["measured_on"] and "GPU providers only" in fp16["served_on"]

    pbtxt = ALEXNET / "config.pbtxt"
    assert pbtxt.read_text() == config_pbtxt(card)  # what training.fp16 / make models writes
    config, pb2 = _model_config(pbtxt)
    assert config.default_model_filename == "model.onnx"
    assert dict(config.cc_model_filenames) == {cc: "model.fp16.onnx" for cc in FP16_COMPUTE_CAPABILITIES}
    assert {"7.0", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"} <= set(config.cc_model_filenames)
    for name in (config.default_model_filename, *config.cc_model_filenames.values()):
        assert (ALEXNET / "1" / name).is_file()
    assert config.output[0].data_type == pb2.TYPE_FP32  # float32 logits from both files
    # A model without a float16 copy keeps Triton's defaults.
    lenet, _ = _model_config(LENET / "config.pbtxt")
    assert lenet.default_model_filename == "" and not lenet.cc_model_filenames


@pytest.mark.skipif(not ON_CPU_ONLY, reason="on a GPU machine auto serves float16 (scripts/gpu_check.py checks it)")
def test_registry_serves_float32_on_the_cpu_and_refuses_fp16_there():
    for device in ("cpu", "auto"):
        model = load_model(ALEXNET, device=device)
        runtime = model.describe()["runtime"]
        assert (runtime["device"], runtime["precision"], runtime["onnx"]) == ("cpu", "fp32", "1/model.onnx")
        assert model.session.path.name == "model.onnx"
    with pytest.raises(PrecisionUnavailable, match="GPU providers only"):
        load_model(ALEXNET, device="cpu", precision="fp16")
    with pytest.raises(PrecisionUnavailable, match="make models"):  # no float16 file for LeNet-5
        load_model(LENET, device="cpu", precision="fp16")
    assert load_model(LENET, device="cpu", precision="fp32").describe()["runtime"]["precision"] == "fp32"
    with pytest.raises(ValueError, match="precision"):
        load_model(LENET, device="cpu", precision="int8")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)  # what ORT reads
    onnx.save_model(model, str(path))
    return path


def test_a_graph_with_a_float_input_is_refused(tmp_path: Path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "float_in",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(Fp16ConversionError, match="graph input 'x' is float32"):
        to_float16(_save(graph, tmp_path / "float_in.onnx"), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def _uint8_graph(scale: np.ndarray) -> onnx.GraphProto:
    """uint8 → Cast(float) → Mul(initializer) → y, where y is also consumed inside the graph (→ Relu → z)."""
    return helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["xf", "scale"], ["y"]),
         helper.make_node("Relu", ["y"], ["z"])],
        "uint8_in",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(scale.astype(np.float32), "scale")])


def test_a_small_uint8_graph_converts_and_a_weight_beyond_float16_is_refused(tmp_path: Path):
    src = _save(_uint8_graph(np.array([0.5, -1.25, 3.0])), tmp_path / "small.onnx")
    dst = tmp_path / "small.fp16.onnx"
    to_float16(src, dst)
    x = np.array([[0, 7, 255], [1, 2, 3]], dtype=np.uint8)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    half = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(ref, half, strict=True):
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=1e-3)  # exact here: these values are representable in float16
    big = _save(_uint8_graph(np.array([1.0, 1e6, 2.0])), tmp_path / "big.onnx")
    with pytest.raises(Fp16ConversionError, match="beyond float16"):
        to_float16(big, tmp_path / "big.fp16.onnx")
