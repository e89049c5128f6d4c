"""Export to the model repository: dropout gone, ONNX ≈ torch, card and Triton config, and the shipped models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import json_format, text_format
from triton_pb2 import model_config_pb2

from serving.preprocess import IMAGENET
from serving.registry import DEFAULT_MODELS_DIR, load_model, read_card, sha256_file
from serving.triton_config import model_config
from training.export import (
    OPSET,
    ExportCheckFailed,
    check_export,
    deployable,
    dropout_nodes,
    evaluate_digits,
    export_to_repository,
    load_checkpoint,
)
from training.models import LeNet5, UInt8Input, build_model

MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A seeded LeNet-5 with dropout, exported into a scratch repository."""
    models_dir = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    net = build_model("lenet5", dropout=0.3)
    card, report = export_to_repository(net, "lenet5", "trained", models_dir, metrics={"note": "seeded"})
    shipped_labels = (DEFAULT_MODELS_DIR / "lenet5" / "labels.txt").read_text()
    assert (models_dir / "lenet5" / "labels.txt").read_text() == shipped_labels  # copied into the fresh repository
    return models_dir / "lenet5", net, card, report


def test_exported_graph_has_no_dropout_and_matches_torch(exported):
    model_dir, _, card, report = exported
    proto = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert dropout_nodes(proto) == 0
    assert report.train_mode_stochastic is True  # the same torch model in train mode is not repeatable
    assert report.max_abs_diff_random <= 1e-4 and report.max_abs_diff_real <= 1e-4
    assert card.onnx["checks"]["dropout_nodes"] == 0
    assert proto.opset_import[0].version == OPSET == card.onnx["opset"] == 18  # the opset training.export pins


def test_exported_graph_takes_uint8_nhwc_with_dynamic_batch(exported):
    model_dir, net, _, _ = exported
    proto = onnx.load(str(model_dir / "1" / "model.onnx"))
    inp = proto.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 1]
    model = load_model(model_dir, device="cpu")
    for n in (1, 7):
        x = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)
        assert model.logits(x).shape == (n, 10)
        a, b = model.logits(x), model.logits(x)
        assert np.array_equal(a, b)  # inference is deterministic: no dropout left anywhere


def test_check_refuses_a_graph_with_dropout(tmp_path):
    """The assertion has teeth: a train-mode export keeps its Dropout nodes and is refused."""
    from serving.preprocess import DIGIT

    net = deployable(LeNet5(dropout=0.5), DIGIT).train()
    path = tmp_path / "train_mode.onnx"
    program = torch.onnx.export(net, (torch.zeros(2, 32, 32, 1, dtype=torch.uint8),), None, dynamo=True,
                                opset_version=18)
    onnx.save_model(program.model_proto, str(path))
    assert dropout_nodes(onnx.load(str(path))) > 0
    with pytest.raises(ExportCheckFailed, match="Dropout"):
        check_export(net, DIGIT, path, np.zeros((1, 32, 32, 1), dtype=np.uint8))


def test_card_round_trip_and_triton_config(exported):
    model_dir, _, card, _ = exported
    on_disk = json.loads((model_dir / "model.json").read_text())
    assert read_card(model_dir).to_dict() == on_disk == card.to_dict()
    assert on_disk["onnx"]["sha256"] == sha256_file(model_dir / "1" / "model.onnx")
    assert on_disk["parameters"] == 61_706 and on_disk["num_classes"] == 10
    assert on_disk["preprocessing"]["kind"] == "digit" and on_disk["input"]["dtype"] == "uint8"
    pbtxt = (model_dir / "config.pbtxt").read_text()
    for needle in ('name: "lenet5"', 'platform: "onnxruntime_onnx"', "TYPE_UINT8", "dims: [ 32, 32, 1 ]",
                   "TYPE_FP32", "dims: [ 10 ]", 'label_filename: "labels.txt"', "dynamic_batching"):
        assert needle in pbtxt
    pb2 = model_config_pb2()  # Triton's own message reads it, and it is the dict /v2/models/{m}/config serves
    assert text_format.Parse(pbtxt, pb2.ModelConfig()) == json_format.ParseDict(model_config(card), pb2.ModelConfig())


def test_registry_refuses_a_tampered_onnx(exported, tmp_path):
    from serving.errors import ModelRepositoryError

    model_dir = tmp_path / "lenet5"
    shutil.copytree(exported[0], model_dir)
    with open(model_dir / "1" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelRepositoryError, match="sha256"):
        load_model(model_dir, device="cpu")


def test_checkpoint_to_repository_round_trip(tmp_path, exported):
    _, net, _, _ = exported
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": net.state_dict(), "epoch": 3, "metrics": {"val_top1": 0.5},
                "args": {"model": "lenet5", "activation": "relu", "dropout": 0.3, "num_classes": 10}}, ckpt)
    loaded, meta = load_checkpoint(ckpt)
    assert meta["epoch"] == 3
    for a, b in zip(loaded.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_shipped_alexnet_card_is_honest_about_its_weights():
    card = read_card(DEFAULT_MODELS_DIR / "alexnet")
    assert card.parameters == 61_100_840 and card.num_classes == 1000
    assert card.onnx["checks"]["dropout_nodes"] == 0
    if card.weights == "untrained-demo":
        assert card.trained is False and "UNTRAINED" in card.description
    else:
        assert card.weights == "imagenet1k-official" and card.trained


def test_shipped_lenet_scores_on_full_mnist_through_the_service_preprocessing():
    """The committed LeNet-5 ONNX, evaluated on all 10,000 MNIST test digits via serving.preprocess."""
    model_dir = DEFAULT_MODELS_DIR / "lenet5"
    card = read_card(model_dir)
    metrics = evaluate_digits(model_dir, MNIST_DIR)
    assert metrics["top1_error"] <= 0.008, metrics
    assert card.metrics["top1_error"] == metrics["top1_error"]  # the card states what the shipped file does
    assert card.trained and card.weights == "trained"


@pytest.mark.slow
def test_make_models_builds_alexnet_from_the_weights_file_in_data(tmp_path):
    """`make models` with data/alexnet-owt-7be5be79.pth present and no AlexNet ONNX imports that file: the built
    model computes what those weights compute, and its card says "imported" (the file is not torchvision's, so
    not "imagenet1k-official"), and its float16 copy is built from it. Run in a scratch copy of the repository, so
    the real models/ is left alone."""
    repo = DEFAULT_MODELS_DIR.parent
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy2(repo / name, root / name)
    for name in ("serving", "training", "examples"):  # examples/: the real photo of the float16 parity check
        shutil.copytree(repo / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "models", root / "models",
                    ignore=shutil.ignore_patterns("model.onnx", "model.fp16.onnx", "trt_cache"))
    shutil.copy2(repo / "models" / "lenet5" / "1" / "model.onnx", root / "models" / "lenet5" / "1" / "model.onnx")
    for name in (".venv", ".tools"):
        (root / name).symlink_to(repo / name)
    torch.manual_seed(1234)
    net = build_model("alexnet", 1000).eval()
    (root / "data").mkdir()
    torch.save(net.state_dict(), root / "data" / "alexnet-owt-7be5be79.pth")

    # -o: the shared .venv counts as set up (never re-synced from here); everything else is the real target.
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}
    r = subprocess.run(["make", "-o", ".venv/.installed", "models"], cwd=root, capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "UNTRAINED" not in r.stdout
    card = read_card(root / "models" / "alexnet")
    assert card.weights == "imported" and card.trained
    assert card.onnx_fp16["from_sha256"] == card.onnx["sha256"]  # the float16 copy of this very file
    assert card.onnx_fp16["sha256"] == sha256_file(root / "models" / "alexnet" / card.onnx_fp16["path"])
    built = load_model(root / "models" / "alexnet", device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    tail = UInt8Input(IMAGENET.mean, IMAGENET.std)
    with torch.no_grad():
        expected = net(tail(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(built.logits(x), expected, rtol=1e-3, atol=1e-3)
