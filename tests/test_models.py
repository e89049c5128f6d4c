"""Both architectures, the story behind them (ReLU keeps gradients alive, dropout is for training only), and the
import of torchvision-layout weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.import_weights import WeightsMismatch, import_weights, read_state_dict, to_alexnet
from training.models import AlexNet, LeNet5, UInt8Input, build_model, count_parameters

# torchvision.models.alexnet().state_dict(): names and shapes, written out so the test needs no torchvision.
TORCHVISION_ALEXNET = {
    "features.0.weight": (64, 3, 11, 11), "features.0.bias": (64,),
    "features.3.weight": (192, 64, 5, 5), "features.3.bias": (192,),
    "features.6.weight": (384, 192, 3, 3), "features.6.bias": (384,),
    "features.8.weight": (256, 384, 3, 3), "features.8.bias": (256,),
    "features.10.weight": (256, 256, 3, 3), "features.10.bias": (256,),
    "classifier.1.weight": (4096, 9216), "classifier.1.bias": (4096,),
    "classifier.4.weight": (4096, 4096), "classifier.4.bias": (4096,),
    "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}


def synthetic_torchvision_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.01 for k, shape in TORCHVISION_ALEXNET.items()}


def test_lenet5_shapes_follow_the_paper():
    m = LeNet5()
    x = torch.zeros(3, 1, 32, 32)
    shapes = []
    for layer in m.features:
        x = layer(x)
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.MaxPool2d)):
            shapes.append(tuple(x.shape[1:]))
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5), (120, 1, 1)]  # C1 S2 C3 S4 C5
    assert m.classifier[2].out_features == 84  # F6
    assert m(torch.zeros(3, 1, 32, 32)).shape == (3, 10)
    assert count_parameters(m) == 61_706


def test_alexnet_layout_and_parameter_count():
    m = AlexNet()
    assert count_parameters(m) == 61_100_840
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == TORCHVISION_ALEXNET
    assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh"])
def test_activation_is_configurable(name):
    kind = {"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid, "tanh": torch.nn.Tanh}[name]
    for m in (LeNet5(activation_name=name), AlexNet(activation_name=name)):
        assert sum(isinstance(x, kind) for x in m.modules()) >= 4
    with pytest.raises(ValueError):
        LeNet5(activation_name="gelu")


def test_relu_keeps_gradients_alive_where_sigmoid_lets_them_vanish():
    """Why AlexNet used ReLU: through eight sigmoid layers the first conv gets almost no gradient."""
    torch.set_num_threads(2)
    ratios = {}
    for act in ("relu", "sigmoid"):
        torch.manual_seed(0)
        m = AlexNet(num_classes=10, activation_name=act, dropout=0.0)
        F.cross_entropy(m(torch.randn(4, 3, 224, 224)), torch.tensor([0, 1, 2, 3])).backward()
        ratios[act] = (m.features[0].weight.grad.norm() / m.classifier[-1].weight.grad.norm()).item()
    assert ratios["sigmoid"] < ratios["relu"] * 1e-3, ratios


@pytest.mark.parametrize("model", [LeNet5(dropout=0.5), AlexNet(num_classes=10, dropout=0.5)])
def test_dropout_is_stochastic_in_training_and_gone_in_eval(model):
    x = torch.randn(2, *((1, 32, 32) if isinstance(model, LeNet5) else (3, 224, 224)))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_uint8_input_is_the_normalisation_tail():
    adapter = UInt8Input((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = torch.full((1, 2, 2, 3), 255, dtype=torch.uint8)
    out = adapter(x)
    assert out.shape == (1, 3, 2, 2)  # NHWC → NCHW
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))  # (1 - mean) / std


def test_strict_import_of_torchvision_layout_weights(tmp_path):
    state = synthetic_torchvision_state()
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    ckpt_path = import_weights(path, tmp_path / "imported.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["args"]["model"] == "alexnet" and ckpt["args"]["weights"] == "imported"
    net = build_model("alexnet")
    net.load_state_dict(ckpt["model"], strict=True)
    assert torch.equal(net.classifier[6].weight, state["classifier.6.weight"])


def test_import_names_what_does_not_match():
    state = synthetic_torchvision_state()
    del state["features.0.bias"]
    state["features.99.weight"] = torch.zeros(1)
    state["classifier.6.weight"] = torch.zeros(10, 4096)
    with pytest.raises(WeightsMismatch) as info:
        to_alexnet(state)
    msg = str(info.value)
    assert "features.0.bias" in msg and "features.99.weight" in msg and "classifier.6.weight" in msg


class _Payload:  # an arbitrary object: unpickling it would mean running code from the file
    def __reduce__(self):
        return (print, ("pwned",))


def test_import_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": _Payload()}, path)
    with pytest.raises(WeightsMismatch, match="weights-only"):
        read_state_dict(path)
