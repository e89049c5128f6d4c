"""LeNet-5 and AlexNet, with the activation and dropout as arguments so their history can be tested.

AlexNet keeps torchvision's exact module names (features.0 … features.12, avgpool, classifier.0 … classifier.6), so
the official `alexnet-owt-7be5be79.pth` state dict loads with strict=True.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "sigmoid", "tanh")


def activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "sigmoid":  # saturates: gradients vanish through a deep stack of these
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, not {name!r}")


class LeNet5(nn.Module):
    """LeCun et al. 1998: 32×32 input, C1 6@28², S2, C3 16@10², S4, C5 120, F6 84, 10 outputs.

    Departures from the paper, all standard today: C3 connects to all six S2 maps (the paper's sparse table was a
    1998 compute saving), S2/S4 are max-pooling (`pool="avg"` gives the paper's averaging), and the output is a
    linear layer trained with cross-entropy instead of Euclidean RBF units.
    """

    def __init__(self, num_classes: int = 10, activation_name: str = "relu", dropout: float = 0.0,
                 pool: str = "max"):
        super().__init__()
        pool_layer = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, kernel_size=5),  # C1: 6@28×28
            activation(activation_name),
            pool_layer(2),  # S2: 6@14×14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: 16@10×10
            activation(activation_name),
            pool_layer(2),  # S4: 16@5×5
            nn.Conv2d(16, 120, kernel_size=5),  # C5: 120@1×1
            activation(activation_name),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(p=dropout),
            nn.Linear(120, 84),  # F6
            activation(activation_name),
            nn.Dropout(p=dropout),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AlexNet(nn.Module):
    """Krizhevsky et al. 2012, in torchvision's single-tower layout ("One weird trick", 2014)."""

    def __init__(self, num_classes: int = 1000, activation_name: str = "relu", dropout: float = 0.5):
        super().__init__()
        act = lambda: activation(activation_name)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), act(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), act(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), act(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), act(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), act(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096), act(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), act(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class UInt8Input(nn.Module):
    """uint8 NHWC → normalised float NCHW: the preprocessing tail, in the graph so clients send compact bytes.

    Training applies the very same module to its uint8 batches, so the exported graph is what was trained.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("inv_std", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2).float()
        return (x - self.mean) * self.inv_std


def build_model(name: str, num_classes: int | None = None, activation_name: str = "relu",
                dropout: float | None = None) -> nn.Module:
    if name == "lenet5":
        return LeNet5(num_classes or 10, activation_name, 0.0 if dropout is None else dropout)
    if name == "alexnet":
        return AlexNet(num_classes or 1000, activation_name, 0.5 if dropout is None else dropout)
    raise ValueError(f"unknown model {name!r}; choose lenet5 or alexnet")


def recipe_for(name: str):
    """The serving preprocessing recipe each architecture is trained and served with."""
    from serving.preprocess import DIGIT, IMAGENET

    return {"lenet5": DIGIT, "alexnet": IMAGENET}[name]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
