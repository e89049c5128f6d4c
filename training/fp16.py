"""A float16 copy of a model's ONNX for GPUs, checked against the float32 original, and recorded in its card.

    python -m training.fp16 models/alexnet        # writes 1/model.fp16.onnx, the card's onnx_fp16, config.pbtxt

Why: on a GPU, float16 halves the weights' memory and bandwidth (AlexNet: 233 → 117 MB) and runs on the tensor cores,
while on a CPU onnxruntime has few float16 kernels and only inserts casts around float32 ones, so there the float32
file stays the one to serve. The contract doesn't change: the input is still uint8 NHWC (the graph's own Cast now
casts to float16) and the output is still float32 logits (a final Cast), so clients, the service and Triton's config
see the same tensors.

The conversion is done on the ONNX graph itself (no extra dependency): every float32 initializer becomes float16,
every Cast to float32 becomes a Cast to float16, the value_info types follow, and each float32 graph output gets a
Cast back to float32. That is the whole job for graphs like ours, whose floats come from Cast and initializers only;
a graph with floats from elsewhere (a float input, a Constant or random op, a subgraph, a local function, a weight
beyond float16's range) is refused with `Fp16ConversionError` rather than half-converted.

The parity check runs both files on onnxruntime's CPU provider over a real photo and photo-like JPEGs, through
serving.preprocess (the service's own path): top-1 agreement, max |Δlogit| and the relative error max|Δ| / max|logit|
(the untrained demo's logits are tiny and nearly tied, so the absolute number alone says little). On the CPU,
onnxruntime upcasts the float16 ops, so this measures the weights' rounding; float16 arithmetic itself is checked on a
GPU by scripts/gpu_check.py. The service serves the float16 file only on a GPU provider (serving.registry,
precision "auto").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

from serving.errors import ModelRepositoryError
from serving.preprocess import Recipe, preprocess_bytes
from serving.registry import REPO_ROOT, ModelCard, read_card, sha256_file, verified_onnx, write_card
from serving.runtime import OnnxModel
from serving.triton_config import config_pbtxt
from training.export import dropout_nodes, sample_photos

FP16_FILE = "model.fp16.onnx"
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: a weight beyond it would become inf
MIN_AGREEMENT = 0.99  # top-1 agreement with float32, at least
MAX_RELATIVE_ERROR = 1e-2  # max |Δlogit| / max |logit|, at most
REAL_PHOTO = REPO_ROOT / "examples" / "grace_hopper.jpg"
PHOTO_LIKE = 64  # photo-like JPEGs from training.export.sample_photos (seed 0) besides the real photo
MEASURED_ON = ("onnxruntime CPU (upcasts float16 ops; fp16 arithmetic itself is checked on a GPU by "
               "scripts/gpu_check.py)")
SERVED_ON = "GPU providers only (CUDA, TensorRT)"
# Ops that make floats out of nothing, typed by a `dtype` attribute: a float32 one would stay float32 in a float16
# graph, so such a graph is refused.
_DTYPE_SOURCES = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike", "Multinomial",
                  "Bernoulli"}


class Fp16ConversionError(ValueError):
    """The graph has float32 that this conversion can't turn into float16 (it converts Cast and initializers)."""


class Fp16CheckFailed(RuntimeError):
    """The float16 file disagrees with the float32 one beyond the thresholds."""


def _refuse_what_cannot_be_converted(model: onnx.ModelProto, src: Path) -> None:
    g = model.graph
    initialized = {t.name for t in g.initializer}
    if model.functions:
        raise Fp16ConversionError(f"{src}: has {len(model.functions)} local function(s); only flat graphs are "
                                  "converted (export with the functions inlined)")
    for inp in g.input:
        if inp.name not in initialized and inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            raise Fp16ConversionError(
                f"{src}: graph input {inp.name!r} is float32; only graphs whose floats come from a Cast of a "
                "non-float input and from initializers are converted (ours take uint8 images)")
    if any(t.values.data_type == TensorProto.FLOAT for t in g.sparse_initializer):
        raise Fp16ConversionError(f"{src}: has float32 sparse initializers, which this conversion doesn't handle")
    for node in g.node:
        where = f"{src}: node {node.name or node.op_type!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise Fp16ConversionError(f"{where} is from domain {node.domain!r}; only standard ONNX ops are converted")
        for attr in node.attribute:
            if attr.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS):
                raise Fp16ConversionError(f"{where} has a subgraph; only flat graphs are converted")
            if node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                raise Fp16ConversionError(f"{where} makes a float32 {attr.name}; only tensor constants are converted")
            if node.op_type in _DTYPE_SOURCES and attr.name == "dtype" and attr.i == TensorProto.FLOAT:
                raise Fp16ConversionError(f"{where} makes float32 from its dtype attribute")
        if node.op_type in _DTYPE_SOURCES and not any(a.name == "dtype" for a in node.attribute):
            raise Fp16ConversionError(f"{where} makes float32 by default; only Cast and initializers are converted")


def _to_fp16_tensor(t: TensorProto, where: str) -> TensorProto:
    a = numpy_helper.to_array(t)
    if a.size and float(np.abs(a).max()) > FP16_MAX:
        raise Fp16ConversionError(f"{where}: {t.name!r} holds values up to {float(np.abs(a).max()):.3g}, beyond "
                                  f"float16's {FP16_MAX:g}")
    return numpy_helper.from_array(a.astype(np.float16), t.name)


def to_float16(src: Path, dst: Path) -> None:
    """Write a float16 copy of the ONNX at `src` to `dst`: same inputs (uint8 stays uint8), float32 outputs.

    Raises Fp16ConversionError for a graph with float32 that doesn't come from a Cast or an initializer, and when the
    result fails onnx.checker's full check (strict type and shape inference)."""
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    _refuse_what_cannot_be_converted(model, src)
    g = model.graph
    for i, init in enumerate(g.initializer):
        if init.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(_to_fp16_tensor(init, str(src)))
    for node in g.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
            elif (node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value"
                  and attr.t.data_type == TensorProto.FLOAT):
                attr.t.CopyFrom(_to_fp16_tensor(attr.t, f"{src}: node {node.name or node.op_type!r}"))
    for vi in g.value_info:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    # Every float32 graph output is now computed in float16: rename it inside the graph and cast it back at the end.
    taken = {name for n in g.node for name in (*n.input, *n.output)} | {t.name for t in g.initializer}
    for out in g.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if not any(out.name in n.output for n in g.node):
            raise Fp16ConversionError(f"{src}: graph output {out.name!r} is not computed by a node")
        inner = out.name + "_fp16"
        while inner in taken:
            inner += "_"
        taken.add(inner)
        for node in g.node:
            for seq in (node.input, node.output):
                for j, name in enumerate(seq):
                    if name == out.name:
                        seq[j] = inner
        for vi in g.value_info:
            if vi.name == out.name:
                vi.name = inner
        g.node.append(onnx.helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_to_float32",
                                            to=TensorProto.FLOAT))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise Fp16ConversionError(f"{src}: the float16 graph is not valid ONNX: {e}") from None
    # Written beside the target and renamed, so a failed run never leaves a partial file that looks up to date.
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    os.replace(tmp, dst)


def parity_photos() -> tuple[list[bytes], str]:
    """The real photo in examples/ and seeded photo-like JPEGs, with a description for the card."""
    if not REAL_PHOTO.is_file():
        raise FileNotFoundError(f"{REAL_PHOTO} (the real photo of the fp16 parity check) is missing: restore it "
                                "with git checkout")
    photos = [REAL_PHOTO.read_bytes(), *sample_photos(PHOTO_LIKE, seed=0)]
    desc = (f"{len(photos)} JPEGs through serving.preprocess: examples/{REAL_PHOTO.name} (a real photo) and "
            f"{PHOTO_LIKE} photo-like JPEGs (training.export.sample_photos, seed 0)")
    return photos, desc


def check_fp16(fp32_path: Path, fp16_path: Path, recipe: Recipe, photos: list[bytes] | None = None,
               batch_size: int = 16) -> dict[str, Any]:
    """Both files on onnxruntime's CPU provider over the same preprocessed photos: top-1 agreement, max |Δlogit|,
    max |logit| and their ratio. Raises Fp16CheckFailed below MIN_AGREEMENT or above MAX_RELATIVE_ERROR."""
    desc = f"{len(photos)} given images through serving.preprocess" if photos is not None else None
    if photos is None:
        photos, desc = parity_photos()
    x = np.stack([preprocess_bytes(b, recipe) for b in photos])
    ref_model, half_model = OnnxModel(fp32_path, device="cpu"), OnnxModel(fp16_path, device="cpu")
    ref = np.concatenate([ref_model.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    half = np.concatenate([half_model.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    if half.dtype != np.float32 or half.shape != ref.shape:
        raise Fp16CheckFailed(f"{fp16_path} gives {half.dtype}{list(half.shape)}, float32{list(ref.shape)} expected")
    top2 = np.sort(ref, axis=1)[:, -2:]
    max_diff, max_logit = float(np.abs(half - ref).max()), float(np.abs(ref).max())
    checks = {
        "images": len(x),
        "top1_agreement": float((half.argmax(axis=1) == ref.argmax(axis=1)).mean()),
        "max_abs_diff": max_diff,
        "max_abs_logit": max_logit,
        "relative_error": max_diff / max_logit if max_logit > 0 else float("inf") if max_diff > 0 else 0.0,
        "min_top1_gap_fp32": float((top2[:, 1] - top2[:, 0]).min()),  # how near the float32 top-1 ties were
        "dropout_nodes": dropout_nodes(onnx.load(str(fp16_path), load_external_data=False)),
        "inputs": desc,
        "measured_on": MEASURED_ON,
    }
    if checks["top1_agreement"] < MIN_AGREEMENT or checks["relative_error"] > MAX_RELATIVE_ERROR:
        raise Fp16CheckFailed(f"{fp16_path} vs {fp32_path}: top-1 agreement {checks['top1_agreement']:.2%} (at least "
                              f"{MIN_AGREEMENT:.0%}), relative error {checks['relative_error']:.2e} (at most "
                              f"{MAX_RELATIVE_ERROR:.0e}), max|Δlogit| {max_diff:.2e}")
    if checks["dropout_nodes"]:
        raise Fp16CheckFailed(f"{fp16_path} contains Dropout nodes")
    return checks


def add_fp16(model_dir: Path, photos: list[bytes] | None = None) -> ModelCard:
    """Write `<version>/model.fp16.onnx` beside the card's float32 file, check it, record it in the card
    (`onnx_fp16`) and regenerate config.pbtxt (Triton then loads it on GPU instances). Returns the new card."""
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    src = verified_onnx(model_dir, card.onnx)
    src_sha = card.onnx.get("sha256") or sha256_file(src)
    rel = str(PurePosixPath(card.onnx["path"]).with_name(FP16_FILE))
    dst = model_dir / rel
    to_float16(src, dst)
    checks = check_fp16(src, dst, card.recipe, photos)
    card.onnx_fp16 = {"path": rel, "sha256": sha256_file(dst), "size_bytes": dst.stat().st_size,
                      "from_sha256": src_sha, "checks": checks, "served_on": SERVED_ON}
    write_card(card, model_dir)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(card))
    return card


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 10 * 2**20 else f"{n / 2**10:.0f} kB"  # binary units, as the docs use


def summary(card: ModelCard, seconds: float) -> str:
    f, c = card.onnx_fp16, card.onnx_fp16["checks"]
    return (f"{card.name} v{card.version}: wrote {f['path']} ({_size(f['size_bytes'])}, float32 "
            f"{_size(card.onnx['size_bytes'])}) in {seconds:.1f}s; CPU parity on {c['images']} photos: top-1 "
            f"agreement {c['top1_agreement']:.1%}, max|Δlogit| {c['max_abs_diff']:.1e} (relative "
            f"{c['relative_error']:.1e}); card and config.pbtxt updated")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="a model folder with a card, e.g. models/alexnet")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        card = add_fp16(args.model_dir)
    except (Fp16ConversionError, Fp16CheckFailed, ModelRepositoryError, FileNotFoundError) as e:
        print(f"training.fp16: error: {e}", file=sys.stderr)
        return 1
    print(summary(card, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
