"""What an int8 model would buy on this CPU: onnxruntime static quantization (QDQ, per-channel int8 weights, uint8
activations) of the served ONNX files, against the float32 ones, in the service's own session class (OnnxModel).

Nothing here is served: the int8 files go to a temporary folder. It measures, per model:
  * model-only images/s at batch 32 on one onnxruntime thread, float32 and int8 in alternating runs (pin it:
    `taskset -c 1`), which is what decides whether a cheaper model could move issue #10's AlexNet-vs-LitServe ratio;
  * how much the answers move: LeNet-5's accuracy on the committed MNIST test sample (it is trained), AlexNet's
    top-1 agreement and logit difference on photo-like JPEGs (its weights here are the untrained demo's, so that is
    not an accuracy).
Calibration data is separate from what is scored: MNIST's train sample for LeNet-5, other photo-like JPEGs for
AlexNet, both through serving.preprocess.

    taskset -c 1 .venv/bin/python scripts/measure_int8.py [--calibration 64] [--photos 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loadtests.bench import timed_rate  # noqa: E402
from loadtests.images import encode_png, photo_jpegs  # noqa: E402
from serving.preprocess import preprocess_bytes  # noqa: E402
from serving.registry import DEFAULT_MODELS_DIR, read_card, verified_onnx  # noqa: E402
from serving.runtime import OnnxModel  # noqa: E402
from training.mnist import load_mnist  # noqa: E402

BATCH = 32


class Batches(CalibrationDataReader):
    """One preprocessed image at a time, as onnxruntime's calibrator reads them."""

    def __init__(self, name: str, inputs: np.ndarray):
        self.items = iter([{name: inputs[i:i + 1]} for i in range(len(inputs))])

    def get_next(self) -> dict | None:
        return next(self.items, None)


def compare(name: str, calibration: np.ndarray, scored: np.ndarray, args: argparse.Namespace,
            out_dir: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    model_dir = args.models_dir / name
    card = read_card(model_dir)
    fp32_path = verified_onnx(model_dir, card.onnx)
    int8_path = out_dir / f"{name}.int8.onnx"
    t0 = time.perf_counter()
    quantize_static(str(fp32_path), str(int8_path), Batches(card.input["name"], calibration),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["Conv", "Gemm", "MatMul"])
    quantize_s = time.perf_counter() - t0
    fp32, int8 = OnnxModel(fp32_path, device="cpu", threads=1), OnnxModel(int8_path, device="cpu", threads=1)
    batch = np.resize(scored, (BATCH, *scored.shape[1:]))  # the scored images, repeated up to one full batch
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for k in range(args.repeats):  # alternating, so that a drift in the machine's speed hits both
        for label, model in (("fp32", fp32), ("int8", int8)) if k % 2 == 0 else (("int8", int8), ("fp32", fp32)):
            rates[label].append(timed_rate(lambda m=model: m.run(batch), len(batch), args.seconds)[0])
    a, b = fp32.run(scored), int8.run(scored)
    report = {"images_scored": len(scored), "calibration_images": len(calibration), "quantize_s": round(quantize_s, 1),
              "file_mb": {"fp32": round(fp32_path.stat().st_size / 1e6, 1),
                          "int8": round(int8_path.stat().st_size / 1e6, 1)},
              f"img_s_batch{BATCH}_1_thread": {k: round(statistics.median(v), 1) for k, v in rates.items()},
              "speedup": round(statistics.median(rates["int8"]) / statistics.median(rates["fp32"]), 2),
              "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
              "max_abs_logit_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(a).max()),
              "weights": card.weights}
    return report, a, b


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", type=int, default=64, help="images per model to calibrate on")
    p.add_argument("--photos", type=int, default=64, help="AlexNet: photo-like JPEGs scored")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per timed run")
    p.add_argument("--repeats", type=int, default=4, help="timed runs per precision")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--mnist", type=Path, default=REPO / "tests" / "data" / "mnist-sample")
    args = p.parse_args()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = read_card(args.models_dir / "lenet5").recipe
        train, _ = load_mnist(args.mnist, "train")
        test, labels = load_mnist(args.mnist, "test")
        digits = lambda images: np.stack([preprocess_bytes(encode_png(Image.fromarray(255 - a)), recipe)  # noqa: E731
                                          for a in images])
        r, a, b = compare("lenet5", digits(train[:args.calibration]), digits(test), args, Path(tmp))
        r["accuracy"] = {"fp32": float((a.argmax(1) == labels).mean()), "int8": float((b.argmax(1) == labels).mean())}
        report["lenet5"] = r

        recipe = read_card(args.models_dir / "alexnet").recipe
        rng = np.random.default_rng(0)
        calibration = np.stack([preprocess_bytes(p.data, recipe) for p in photo_jpegs(rng, args.calibration)])
        scored = np.stack([preprocess_bytes(p.data, recipe) for p in photo_jpegs(rng, args.photos)])
        report["alexnet"], _, _ = compare("alexnet", calibration, scored, args, Path(tmp))
    print(json.dumps(report, indent=2))
    for name, r in report.items():
        rates = r[f"img_s_batch{BATCH}_1_thread"]
        print(f"{name}: int8 {rates['int8']} vs fp32 {rates['fp32']} img/s ({r['speedup']}x), top-1 agreement "
              f"{r['top1_agreement']:.3f}" + (f", accuracy {r['accuracy']}" if "accuracy" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
