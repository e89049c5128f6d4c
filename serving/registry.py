"""The model repository on disk (Triton-style) and the models loaded from it.

    models/<name>/model.json      the card: metadata, input contract, preprocessing recipe, metrics, ONNX sha256
    models/<name>/labels.txt      one class name per line, in output-index order
    models/<name>/<version>/model.onnx
    models/<name>/<version>/model.fp16.onnx   optional, for GPUs (training.fp16; card field onnx_fp16)
    models/<name>/config.pbtxt    for Triton's onnxruntime backend (serving.triton_config, written by training.export)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.errors import ModelRepositoryError, UnknownModel
from serving.preprocess import Recipe
from serving.runtime import OnnxModel, candidate_providers, top_k

log = logging.getLogger("convnet_serving")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS_DIR = REPO_ROOT / "models"
CARD_FILE = "model.json"
# auto: the float16 file (card field onnx_fp16) on a GPU provider, else float32; fp32: always; fp16: GPU only.
PRECISIONS = ("auto", "fp32", "fp16")


class PrecisionUnavailable(ModelRepositoryError):
    """precision "fp16" asked for where it can't be served: no GPU provider, or no float16 file."""


@dataclass
class ModelCard:
    name: str
    version: str
    task: str
    architecture: str
    weights: str  # "trained", "imagenet1k-official" or "untrained-demo"
    trained: bool
    input: dict[str, Any]
    output: dict[str, Any]
    preprocessing: dict[str, Any]
    labels_file: str
    num_classes: int
    onnx: dict[str, Any]  # {"path", "sha256", "opset", "size_bytes"}
    parameters: int
    metrics: dict[str, Any] = field(default_factory=dict)
    source_checkpoint: str = ""
    description: str = ""
    created: str = ""
    # The float16 copy for GPUs (training.fp16): {"path", "sha256", "size_bytes", "from_sha256", "checks",
    # "served_on"}; None when there is none.
    onnx_fp16: dict[str, Any] | None = None

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.preprocessing)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise ModelRepositoryError(f"model card is missing fields: {e}") from None


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        return ModelCard.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelRepositoryError(f"cannot read model card {path}: {e}") from None


def write_card(card: ModelCard, model_dir: Path) -> Path:
    path = Path(model_dir) / CARD_FILE
    path.write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return path


def read_labels(model_dir: Path, card: ModelCard) -> list[str]:
    path = Path(model_dir) / card.labels_file
    labels = path.read_text().splitlines()
    if len(labels) != card.num_classes:
        raise ModelRepositoryError(f"{path} has {len(labels)} labels, the card says {card.num_classes} classes")
    return labels


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def discover(models_dir: Path = DEFAULT_MODELS_DIR) -> list[Path]:
    """Model folders that have a card, sorted by name."""
    return sorted(p.parent for p in Path(models_dir).glob(f"*/{CARD_FILE}"))


@dataclass
class ServedModel:
    """A card, its labels and a live onnxruntime session: everything needed to answer for one model."""

    card: ModelCard
    labels: list[str]
    recipe: Recipe
    session: OnnxModel
    load_seconds: float = 0.0
    precision: str = "fp32"  # of the file served: "fp32" or "fp16"
    onnx_file: str = ""  # the file served, relative to the model folder (the card's onnx or onnx_fp16 path)

    @property
    def name(self) -> str:
        return self.card.name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(batch)

    def classify(self, batch: np.ndarray, k: int) -> list[list[dict]]:
        return top_k(self.logits(batch), k, self.labels)

    def describe(self) -> dict[str, Any]:
        """The card as the service's /models shows it, plus how it is running."""
        return {**self.card.to_dict(), "runtime": {"device": self.session.device,
                                                   "providers": self.session.providers,
                                                   "precision": self.precision, "onnx": self.onnx_file,
                                                   "load_seconds": round(self.load_seconds, 3)}}

    def warm_up(self, batch: int = 1) -> None:
        """One real inference, so the first client doesn't pay for lazy allocation (and readiness means it works).
        At the largest batch the caller will run, onnxruntime's memory arena reaches its working size here, so the
        process's memory is flat from then on instead of growing whenever a larger batch first comes along."""
        r = self.recipe
        self.logits(np.zeros((batch, r.size, r.size, r.channels), dtype=np.uint8))


def verified_onnx(model_dir: Path, entry: dict[str, Any], verify_hash: bool = True) -> Path:
    """The ONNX file a card entry (`onnx` or `onnx_fp16`) names, checked to exist and, with `verify_hash`, to match
    the sha256 the card recorded."""
    path = model_dir / entry["path"]
    if not path.is_file():
        raise ModelRepositoryError(f"{path} is missing: run `make models`")
    if verify_hash and entry.get("sha256"):
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise ModelRepositoryError(f"{path} sha256 {actual[:12]}… does not match its card "
                                       f"({entry['sha256'][:12]}…): rebuild with `make models`")
    return path


def _wants_fp16(model_dir: Path, card: ModelCard, device: str, precision: str) -> bool:
    """Whether to serve the float16 file: only on a GPU provider (on a CPU onnxruntime just upcasts it)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32":
        return False
    has_file = card.onnx_fp16 is not None and (model_dir / card.onnx_fp16["path"]).is_file()
    if precision == "auto":
        return has_file and candidate_providers(device)[0] != "CPUExecutionProvider"
    if not has_file:
        where = model_dir / card.onnx_fp16["path"] if card.onnx_fp16 else "no onnx_fp16 in its card"
        raise PrecisionUnavailable(f"{card.name}: precision fp16 asked for, but there is no float16 ONNX ({where}): "
                                   f"build it with `make models` (python -m training.fp16 {model_dir})")
    if candidate_providers(device)[0] == "CPUExecutionProvider":
        raise PrecisionUnavailable(f"{card.name}: precision fp16 is served on GPU providers only (CUDA, TensorRT), "
                                   f"and device {device!r} runs on the CPU here: run it on a machine with a GPU, or "
                                   "use precision auto or fp32")
    return True


def load_model(model_dir: Path, device: str = "auto", threads: int = 0, verify_hash: bool = True,
               session_config: dict[str, str] | None = None, precision: str = "auto") -> ServedModel:
    """A ServedModel for the card in `model_dir`. `precision` picks the file (PRECISIONS): "auto" serves the card's
    float16 file when `device` gives a GPU provider and the file is there, else the float32 one."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    fp16 = _wants_fp16(model_dir, card, device, precision)
    entry = card.onnx_fp16 if fp16 and card.onnx_fp16 else card.onnx
    session = OnnxModel(verified_onnx(model_dir, entry, verify_hash), device=device, threads=threads,
                        trt_cache_dir=model_dir / "trt_cache", session_config=session_config)
    if fp16 and session.device == "cpu":  # device auto, and the GPU provider failed to start: no float16 on a CPU
        if precision == "fp16":
            raise PrecisionUnavailable(f"{card.name}: precision fp16 needs a GPU provider, but onnxruntime started "
                                       f"{session.providers[0]}")
        log.warning("%s: the GPU provider did not start; serving the float32 file on the CPU", card.name)
        fp16, entry = False, card.onnx
        session = OnnxModel(verified_onnx(model_dir, entry, verify_hash), device=device, threads=threads,
                            trt_cache_dir=model_dir / "trt_cache", session_config=session_config)
    model = ServedModel(card, read_labels(model_dir, card), card.recipe, session,
                        precision="fp16" if fp16 else "fp32", onnx_file=entry["path"])
    model.load_seconds = time.perf_counter() - t0
    log.info("loaded model %s v%s (%s weights, %s) on %s in %.2fs", card.name, card.version, card.weights,
             model.precision, session.device, model.load_seconds)
    return model


def load_repository(models_dir: Path = DEFAULT_MODELS_DIR, names: list[str] | None = None, device: str = "auto",
                    threads: int = 0, verify_hash: bool = True,
                    session_config: dict[str, str] | None = None,
                    precision: str = "auto") -> dict[str, ServedModel]:
    """Load the named models (default: every model with a card) from a repository folder."""
    dirs = {p.name: p for p in discover(models_dir)}
    if names:
        unknown = [n for n in names if n not in dirs]
        if unknown:
            raise ModelRepositoryError(f"no card for {unknown} under {models_dir} (have: {sorted(dirs)})")
        dirs = {n: dirs[n] for n in names}
    if not dirs:
        raise ModelRepositoryError(f"no models under {models_dir}: run `make models`")
    return {name: load_model(d, device, threads, verify_hash, session_config, precision) for name, d in dirs.items()}


def get_model(models: dict[str, ServedModel], name: str) -> ServedModel:
    try:
        return models[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; served models: {', '.join(sorted(models))}") from None
