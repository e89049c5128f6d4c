"""Checkpoint → ONNX model repository entry (`models/<name>/`), with proof that what we ship is what we trained.

    python -m training.export --checkpoint runs/lenet5/best.pt --mnist-dir ../shared/data/mnist
    python -m training.export --model alexnet --seed 0            # untrained demo weights, labelled as such
    python -m training.export --model alexnet --precision fp16    # and a checked float16 copy for GPUs (training.fp16)

The graph takes uint8 NHWC and carries the preprocessing tail (float, scale, mean/std, NCHW), so clients send compact
bytes and nothing can normalise twice. Export is always from `model.eval()`; the checks then prove that dropout is
gone (no Dropout node, repeatable outputs) while the same torch model in train mode is stochastic, and that
onnxruntime agrees with torch on random and real inputs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from serving.preprocess import Recipe, preprocess_bytes
from serving.registry import DEFAULT_MODELS_DIR, ModelCard, load_model, read_labels, sha256_file, write_card
from serving.runtime import OnnxModel
from serving.triton_config import config_pbtxt
from training.models import UInt8Input, build_model, count_parameters, recipe_for

log = logging.getLogger("convnet_serving.export")

OPSET = 18
PARITY_TOLERANCE = 1e-4
ARCHITECTURES = {
    "lenet5": "LeNet-5 (LeCun et al. 1998): C1 6@28², S2, C3 16@10², S4, C5 120, F6 84, 10 outputs",
    "alexnet": "AlexNet (Krizhevsky et al. 2012), torchvision's single-tower layout",
}


class ExportCheckFailed(RuntimeError):
    pass


@dataclass
class ExportReport:
    onnx_path: Path
    seconds: float
    max_abs_diff_random: float
    max_abs_diff_real: float
    dropout_nodes: int
    train_mode_stochastic: bool | None  # None when the model has no dropout to switch on

    def summary(self) -> str:
        stoch = {True: "stochastic", False: "DETERMINISTIC", None: "n/a (p=0)"}[self.train_mode_stochastic]
        return (f"exported {self.onnx_path} in {self.seconds:.1f}s: Dropout nodes {self.dropout_nodes}, "
                f"ORT vs torch max|Δlogit| random {self.max_abs_diff_random:.2e}, real {self.max_abs_diff_real:.2e}, "
                f"torch train mode {stoch}")


def deployable(net: nn.Module, recipe: Recipe) -> nn.Module:
    """The graph we ship: the uint8 input tail in front of the trained network."""
    return nn.Sequential(UInt8Input(recipe.mean, recipe.std), net)


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    args = ckpt.get("args", {})
    net = build_model(args["model"], args.get("num_classes"), args.get("activation", "relu"), args.get("dropout"))
    net.load_state_dict(ckpt["model"], strict=True)
    return net, ckpt


def export_onnx(model: nn.Module, recipe: Recipe, path: Path, opset: int = OPSET) -> None:
    model = model.eval()  # dropout off, for good: the exported graph must not contain it
    example = torch.zeros(2, recipe.size, recipe.size, recipe.channels, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), None, input_names=["image"], output_names=["logits"],
                                opset_version=opset, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One self-contained file (AlexNet's 233 MB is under protobuf's 2 GB limit), so Triton and users can copy it.
    onnx.save_model(program.model_proto, str(path), save_as_external_data=False)


def dropout_nodes(model_proto: onnx.ModelProto) -> int:
    graphs = [model_proto.graph, *(f for f in model_proto.functions)]
    return sum(1 for g in graphs for n in g.node if n.op_type == "Dropout")


def train_mode_is_stochastic(model: nn.Module, x: torch.Tensor) -> bool | None:
    """Dropout's other half: in train mode the same input gives different outputs (if there is any dropout)."""
    if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return None
    was_training = model.training
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
    model.train(was_training)
    return not torch.equal(a, b)


def check_export(model: nn.Module, recipe: Recipe, path: Path, real_inputs: np.ndarray) -> ExportReport:
    """onnx.checker, no Dropout node, repeatable ORT outputs, and ORT ≈ torch (≤ 1e-4) on random and real inputs."""
    t0 = time.perf_counter()
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    n_dropout = dropout_nodes(proto)
    if n_dropout:
        raise ExportCheckFailed(f"{path} contains {n_dropout} Dropout node(s): export must be from eval mode")
    session = OnnxModel(path, device="cpu")
    rng = np.random.default_rng(0)
    random_inputs = rng.integers(0, 256, size=(4, recipe.size, recipe.size, recipe.channels), dtype=np.uint8)
    model = model.eval()
    diffs = []
    for batch in (random_inputs, real_inputs):
        ours = session.run(batch)
        if not np.array_equal(ours, session.run(batch)):
            raise ExportCheckFailed("onnxruntime gave different outputs for the same input twice")
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        diffs.append(float(np.abs(ours - ref).max()))
    if max(diffs) > PARITY_TOLERANCE:
        raise ExportCheckFailed(f"onnxruntime differs from torch by {max(diffs):.2e} > {PARITY_TOLERANCE}")
    stochastic = train_mode_is_stochastic(model, torch.from_numpy(random_inputs))
    if stochastic is False:
        raise ExportCheckFailed("the torch model in train mode was deterministic although it has dropout")
    return ExportReport(path, time.perf_counter() - t0, diffs[0], diffs[1], n_dropout, stochastic)


def sample_photos(n: int = 4, seed: int = 0) -> list[bytes]:
    """A few photo-like JPEGs (gradients, shapes, noise) for parity checks when no dataset is at hand."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = int(rng.integers(300, 640)), int(rng.integers(240, 480))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, (xx + yy) % 256], axis=-1).astype(np.float32)
        base += rng.normal(0, 12, base.shape)
        im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            draw.ellipse((x0, y0, x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))),
                         fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(70, 95)))
        out.append(buf.getvalue())
    return out


def real_inputs_for(recipe: Recipe, mnist_dir: Path | None) -> tuple[np.ndarray, str]:
    """Real images through the serving preprocessing: MNIST test digits for LeNet, photo JPEGs for AlexNet."""
    if recipe.kind == "digit" and mnist_dir is not None:
        from training.data import digit_inputs, load_mnist

        return digit_inputs(load_mnist(mnist_dir, "test")[0][:64]), "64 MNIST test digits"
    return np.stack([preprocess_bytes(b, recipe) for b in sample_photos()]), "4 photo-like JPEGs"


def evaluate_digits(model_dir: Path, mnist_dir: Path, batch_size: int = 500) -> dict:
    """Top-1 error of the exported ONNX, fed through the same preprocessing the service uses."""
    from training.data import digit_inputs, load_mnist

    images, labels = load_mnist(mnist_dir, "test")
    inputs = digit_inputs(images)
    model = load_model(model_dir, device="cpu", verify_hash=False)
    wrong = 0
    for i in range(0, len(inputs), batch_size):
        wrong += int((model.logits(inputs[i:i + batch_size]).argmax(axis=1) != labels[i:i + batch_size]).sum())
    return {"top1_error": wrong / len(images), "errors": wrong, "dataset": f"MNIST test set ({len(images)} images)",
            "measured_on": "the exported ONNX through serving.preprocess (the service's own path)"}


def export_to_repository(net: nn.Module, name: str, weights: str, models_dir: Path = DEFAULT_MODELS_DIR,
                         version: str = "1", metrics: dict | None = None, source: str = "",
                         mnist_dir: Path | None = None, opset: int = OPSET) -> tuple[ModelCard, ExportReport]:
    """Export, check, and write `models/<name>/` (ONNX, card, Triton config). Labels must already be there."""
    recipe = recipe_for(name)
    model_dir = Path(models_dir) / name
    onnx_rel = f"{version}/model.onnx"
    onnx_path = model_dir / onnx_rel
    model = deployable(net, recipe).eval()
    t0 = time.perf_counter()
    export_onnx(model, recipe, onnx_path, opset)
    real, real_desc = real_inputs_for(recipe, mnist_dir)
    report = check_export(model, recipe, onnx_path, real)
    report.seconds = time.perf_counter() - t0
    num_classes = net.classifier[-1].out_features
    card = ModelCard(
        name=name, version=version, task="image-classification", architecture=ARCHITECTURES[name],
        weights=weights, trained=weights != "untrained-demo",
        input={"name": "image", "dtype": "uint8", "layout": "NHWC",
               "shape": [-1, recipe.size, recipe.size, recipe.channels],
               "note": "preprocess with the recipe below; the graph does float, /255, mean/std and NCHW itself"},
        output={"name": "logits", "dtype": "float32", "shape": [-1, num_classes],
                "note": "raw logits; the service reports softmax scores"},
        preprocessing=recipe.to_dict(), labels_file="labels.txt", num_classes=num_classes,
        onnx={"path": onnx_rel, "sha256": sha256_file(onnx_path), "opset": opset,
              "size_bytes": onnx_path.stat().st_size,
              "checks": {"dropout_nodes": report.dropout_nodes,
                         "max_abs_diff_vs_torch_random": report.max_abs_diff_random,
                         "max_abs_diff_vs_torch_real": report.max_abs_diff_real,
                         "real_inputs": real_desc}},
        parameters=count_parameters(net), metrics=dict(metrics or {}), source_checkpoint=source,
        description=("UNTRAINED demo weights from a seeded initialisation: predictions are meaningless; import the "
                     "official weights (see README) for a real classifier." if weights == "untrained-demo" else ""),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    for name_file in ("labels.txt", "wnids.txt"):  # a fresh repository gets the project's class lists
        shipped = DEFAULT_MODELS_DIR / name / name_file
        if not (model_dir / name_file).exists() and shipped.exists() and model_dir.resolve() != shipped.parent:
            shutil.copyfile(shipped, model_dir / name_file)
    read_labels(model_dir, card)  # fail now, not at serving time, if labels and classes disagree
    write_card(card, model_dir)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(card))
    if mnist_dir is not None and recipe.kind == "digit":
        card.metrics.update(evaluate_digits(model_dir, mnist_dir))
        write_card(card, model_dir)
    return card, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="training checkpoint (training.train or training.import_weights)")
    src.add_argument("--model", choices=["lenet5", "alexnet"], help="export a seeded initialisation (demo only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo initialisation")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--version", default="1")
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--mnist-dir", type=Path, help="LeNet: measure the exported model's test error on this MNIST")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: also write <version>/model.fp16.onnx for GPUs, checked against float32 "
                   "(python -m training.fp16 MODEL_DIR does it for an exported model)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the ONNX optimiser's INFO chatter stays out

    if args.checkpoint:
        net, ckpt = load_checkpoint(args.checkpoint)
        name = ckpt["args"]["model"]
        weights = ckpt["args"].get("weights", "trained")
        metrics = dict(ckpt.get("metrics", {}))
        if "dataset" not in metrics:  # a training log, not a measurement of the model: keep it apart
            metrics = {"training": metrics}
        source = f"{args.checkpoint} (sha256 {sha256_file(args.checkpoint)[:16]}…, epoch {ckpt.get('epoch')})"
    else:
        torch.manual_seed(args.seed)
        name, weights, metrics = args.model, "untrained-demo", {}
        net = build_model(name)
        source = f"seeded initialisation (torch.manual_seed({args.seed}))"
    card, report = export_to_repository(net, name, weights, args.models_dir, args.version, metrics, source,
                                        args.mnist_dir, args.opset)
    print(report.summary())
    if args.precision == "fp16":
        from training.fp16 import add_fp16, summary  # it imports this module

        t0 = time.perf_counter()
        card = add_fp16(Path(args.models_dir) / card.name)
        print(summary(card, time.perf_counter() - t0))
    err = card.metrics.get("top1_error")
    print(f"{card.name} v{card.version}: {card.parameters:,} parameters, weights={card.weights}"
          + (f", top-1 error {err:.2%} on {card.metrics['dataset']}" if err is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
