"""torchvision's official AlexNet weights → our checkpoint, which `training.export` turns into the served model.

    python -m training.import_weights data/alexnet-owt-7be5be79.pth            # a file you already have
    python -m training.import_weights --download data/alexnet-owt-7be5be79.pth # fetch it (needs a network)

The file is read with `torch.load(weights_only=True)`: a state dict is tensors, and nothing in it may run code.
It must match our AlexNet exactly (strict=True); a mismatch names the missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

from serving.registry import sha256_file
from training.models import AlexNet

OFFICIAL_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
# torchvision names its files by the first 8 hex digits of the file's sha256 and checks them on download.
OFFICIAL_SHA256_PREFIX = "7be5be79"
# As published with the weights (torchvision's AlexNet_Weights.IMAGENET1K_V1); not measured here (no ImageNet).
OFFICIAL_METRICS = {"top1_accuracy": 0.56522, "top5_accuracy": 0.79066, "top1_error": 0.43478,
                    "dataset": "ImageNet-1k validation (50,000 images)", "source": "reported by torchvision"}
DEFAULT_OUTPUT = Path("runs/alexnet/imported.pt")


class WeightsMismatch(ValueError):
    pass


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types here; all mean "not a safe state dict"
        raise WeightsMismatch(f"{path} is not a loadable weights-only state dict: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatch(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def to_alexnet(state: dict[str, torch.Tensor], num_classes: int = 1000) -> AlexNet:
    """Load a torchvision-layout state dict into our AlexNet, strictly, with an error that says what differs."""
    net = AlexNet(num_classes=num_classes)
    ours = net.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
              for k in sorted(set(ours) & set(state)) if state[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches {shapes}" if shapes else ""]
        raise WeightsMismatch("state dict does not match torchvision's AlexNet: " + "; ".join(p for p in parts if p))
    net.load_state_dict(state, strict=True)
    return net


def download_official(dest: Path, url: str = OFFICIAL_URL) -> Path:
    """Fetch the official file and verify its hash before it replaces anything (users with a network only)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - fixed https URL, opt-in
            shutil.copyfileobj(r, tmp)
    digest = sha256_file(Path(tmp.name))
    if not digest.startswith(OFFICIAL_SHA256_PREFIX):
        Path(tmp.name).unlink()
        raise WeightsMismatch(f"downloaded file sha256 {digest[:16]}… does not start with {OFFICIAL_SHA256_PREFIX}")
    Path(tmp.name).replace(dest)
    return dest


def import_weights(path: Path, output: Path = DEFAULT_OUTPUT) -> Path:
    state = read_state_dict(path)
    net = to_alexnet(state)
    digest = sha256_file(path)
    official = digest.startswith(OFFICIAL_SHA256_PREFIX)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": net.state_dict(), "epoch": 0,
                "args": {"model": "alexnet", "activation": "relu", "dropout": 0.5, "num_classes": 1000,
                         "weights": "imagenet1k-official" if official else "imported",
                         "source": f"{path} (sha256 {digest[:16]}…)"},
                "metrics": OFFICIAL_METRICS if official else {}}, output)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=Path, help="torchvision AlexNet state dict (.pth)")
    p.add_argument("--download", action="store_true", help=f"fetch {OFFICIAL_URL} to WEIGHTS first (needs network)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="checkpoint for training.export")
    args = p.parse_args(argv)
    try:
        if args.download:
            download_official(args.weights)
        out = import_weights(args.weights, args.output)
    except (WeightsMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}; next: python -m training.export --checkpoint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
