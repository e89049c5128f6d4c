"""Batch inference without a server: a folder (or listing) of images in, one prediction record per image out.

    python -m serving.batch INPUT... --model NAME [--top-k K] [--output FILE] [--format jsonl|csv]

The same model repository, preprocessing and onnxruntime session code as the service (`serving.registry`,
`serving.preprocess`, `serving.runtime`), so a record here and a response from the service agree.

Pipeline, every stage bounded so memory stays flat however many inputs there are:

    lazy listing ─▶ feeder thread ─▶ decode pool ─▶ bounded queue of futures, in input order
                                                  ─▶ main thread: batch ▶ onnxruntime ▶ records ▶ writer

Pillow and onnxruntime both release the GIL, so decoding the next batches overlaps the current inference. The decode
pool is threads on a CPU, where decoding and inference take turns, and processes on a GPU, where decoding is all the
CPUs do: the Python around Pillow's GIL-free stretches would serialise many threads in one process (docs/batch.md). The
writer appends whole lines with one write per batch, so a crash or Ctrl-C leaves only complete records and
`--resume` picks up where the run stopped.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import csv
import io
import json
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from serving.cgroups import usable_cpus
from serving.decode_procs import ProcessDecoder, preprocess_file
from serving.errors import ClientError, ModelRepositoryError, error_body
from serving.inputs import DEFAULT_MAX_BYTES, STDIN, InputSpecError, check_specs, iter_inputs, read_input
from serving.keys import CLIENT_KEY_ENV, client_headers
from serving.preprocess import DEFAULT_MAX_PIXELS, stack_batch
from serving.registry import (
    CARD_FILE,
    DEFAULT_MODELS_DIR,
    PRECISIONS,
    ServedModel,
    discover,
    load_model,
    read_card,
    read_labels,
)
from serving.runtime import DEVICES, DeviceUnavailable, configure_gpu
from serving.threads import DECODE_THREADS, name_os_thread

PROG = "convnet-classify"
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_OUTPUT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
FEEDER = "feeder"  # the thread that lists the inputs (and may sit in a read of stdin): main() looks for it by name
EVAL_K = 5  # --eval needs the top 5 whatever --top-k asks to print
# Decode threads run this much nicer than onnxruntime's (see _nice_current_thread); measured with
# loadtests/batch_bench.py, see docs/batch.md.
DEFAULT_DECODE_NICE = 0
DECODE_IN = ("auto", "threads", "processes")
FSYNC_INTERVAL_S = 1.0  # a power cut loses at most this much finished work; a killed process loses none
USAGE_EPILOG = """\
inputs: files, directories (walked recursively for image extensions), glob patterns ('**' recurses), @list.txt
(one path, folder or glob per line) and '-' (paths from stdin), in any mix. With --null, list files and stdin are
NUL-separated: `find photos -name '*.jpg' -print0 | convnet-classify --null - --model alexnet`.
exit status: 0 all inputs classified, 1 some inputs failed (recorded in the output), 2 usage error, 3 the output
could not be written (disk full, ...; it holds every record up to the last complete one), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM; stopped the same way: complete records, the summary; --resume goes on).
"""


class UsageError(Exception):
    """Bad arguments or an unusable environment: exit status 2 before any input is processed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `docker stop`, a scheduler preempting the job): stop as Ctrl-C does, with whole records and
    the summary, so `--resume` picks up where it ended; exit status 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


class OutputError(Exception):
    """The output (or --summary-json) could not be written, e.g. a full disk: exit status 3, not 1, so a script can't
    take a cut-short output for a finished one with a few failed images."""


class ServiceUnreachable(ClientError):
    """--url mode: the service could not be reached or answered something that isn't our JSON."""

    status = 502
    code = "service_unreachable"


# ---------------------------------------------------------------------------------------------------------------
# Settings


def _service_settings() -> tuple[int, int, Path]:
    """The service's body and pixel limits and model repository (serving.config: defaults, CONVNET_CONFIG file,
    CONVNET_* variables), so a file the service refuses is refused here with the same code. Its GPU settings
    (CONVNET_CUDA_WAIT, CONVNET_CUDNN_ALGO_SEARCH) are set for this process's sessions as the service sets them."""
    try:
        from serving.config import load_config

        cfg = load_config()
    except (ImportError, ValueError, OSError) as e:
        print(f"{PROG}: warning: service settings unusable ({e}); using built-in defaults", file=sys.stderr)
        return DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MODELS_DIR
    configure_gpu(cfg.cuda_wait, cfg.cudnn_algo_search)
    return cfg.max_body_bytes, cfg.max_pixels, Path(cfg.models_dir)


def _int_at_least(minimum: int, maximum: int | None = None):
    """An argparse type: an integer no smaller than `minimum` (nor larger than `maximum`), with a message that says
    which rule it broke."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)
# A typo's extra zeros get a message, not hours: `--workers 100000` started as many threads or decode processes,
# `--batch-size 100000000` spent 27 s setting up its shared-memory block. 256 decoders feed any GPU we target (a
# 16-core machine decodes with 16); an AlexNet batch of 4,096 already holds ~3 GB of activations.
MAX_WORKERS, MAX_BATCH_SIZE = 256, 4096


def _positive_float(text: str) -> float:
    """An argparse type for seconds: -1 or nan used to reach the socket layer as a traceback on the first request."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    max_bytes, max_pixels, models_dir = _service_settings()
    p = argparse.ArgumentParser(prog=PROG, description="Classify many images with a model from the repository, "
                                "no server needed; one JSONL or CSV record per input, in input order.",
                                epilog=USAGE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="file, directory, glob, @list.txt or - (stdin)")
    # No "-0" alias: an option that looks like a negative number makes argparse read "--timeout -1" as two options.
    p.add_argument("--null", action="store_true",
                   help="@list files and stdin are NUL-separated (find -print0), so names may hold newlines")
    p.add_argument("--model", required=True, help="model name in the repository (e.g. lenet5, alexnet)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="predictions per image (default 5)")
    p.add_argument("--output", "-o", default="-", help="output file (default: stdout)")
    p.add_argument("--format", choices=("jsonl", "csv"), default=None,
                   help="output format (default: from the output's extension, else jsonl)")
    p.add_argument("--batch-size", type=_int_at_least(1, MAX_BATCH_SIZE), default=32,
                   help=f"images per inference call (default 32, at most {MAX_BATCH_SIZE})")
    p.add_argument("--workers", type=_int_at_least(1, MAX_WORKERS), default=min(usable_cpus(), MAX_WORKERS),
                   help=f"decoders (with --url: concurrent requests); default: the CPUs this process may use (a "
                   f"container's CPU quota counts), at most {MAX_WORKERS}")
    p.add_argument("--decode-in", choices=DECODE_IN, default="auto",
                   help="where images decode: auto = processes when a GPU runs the model (decoding then has every "
                   "CPU), threads on a CPU (decoding and inference take turns) and with --url")
    p.add_argument("--threads", type=_non_negative_int, default=0,
                   help="onnxruntime intra-op threads (default 0 = one per CPU this process may use, a container's CPU "
                   "quota counted)")
    p.add_argument("--decode-nice", type=int, choices=range(0, 20), default=DEFAULT_DECODE_NICE, metavar="0-19",
                   help="scheduling niceness added to decode threads so they yield the CPU to onnxruntime "
                   f"(default {DEFAULT_DECODE_NICE})")
    p.add_argument("--device", choices=DEVICES, default="auto", help="execution device (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="model file: auto = the float16 one on a GPU when the card has it, else float32; fp32; "
                   "fp16 (GPU only)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N inputs of the listing")
    p.add_argument("--resume", action="store_true",
                   help="append to --output, skipping inputs it already has a record for")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first input that fails")
    p.add_argument("--eval", action="store_true",
                   help="inputs are <class-dir>/<image>: report top-1/top-5 accuracy against the folder names")
    p.add_argument("--summary-json", default=None, help="also write the end-of-run summary to this JSON file")
    p.add_argument("--url", default=None, help="send images to a running service (http://host:port) instead")
    p.add_argument("--models-dir", default=str(models_dir),
                   help=f"model repository (default: the service's, $CONVNET_MODELS_DIR or {models_dir})")
    p.add_argument("--max-bytes", type=_positive_int, default=max_bytes,
                   help=f"refuse files larger than this (default {max_bytes}, the service's body limit)")
    p.add_argument("--max-pixels", type=_positive_int, default=max_pixels,
                   help=f"refuse images with more pixels than this (default {max_pixels})")
    p.add_argument("--timeout", type=_positive_float, default=60.0, help="--url: seconds per request (default 60)")
    p.add_argument("--api-key", default=os.environ.get(CLIENT_KEY_ENV) or None,
                   help=f"--url: the service's API key, sent as 'Authorization: Bearer' (default: ${CLIENT_KEY_ENV}; "
                   "prefer the variable: a command line is visible to other users)")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (default: when stderr is a terminal)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Backends: what runs in the decode pool (prepare) and what runs on the main thread per batch (infer)


@dataclass
class Prepared:
    """A decoded input ready for the model (local) or an answer already in hand (--url)."""

    array: np.ndarray | None = None
    predictions: list[dict] | None = None
    version: str | None = None
    release: Callable[[], None] | None = None  # hands `array`'s memory back once the batch holds a copy


class LocalBackend:
    """Read, preprocess and classify in this process with the service's own code."""

    def __init__(self, model: ServedModel, max_bytes: int, max_pixels: int):
        self.model = model
        self.name, self.version = model.card.name, model.card.version
        self.num_classes = model.card.num_classes
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.batch = np.empty(0, np.uint8)  # one batch buffer, reused (see infer)

    def prepare(self, path: str) -> Prepared:
        return Prepared(array=preprocess_file(path, self.model.recipe, self.max_bytes, self.max_pixels))

    def infer(self, prepared: list[Prepared], k: int) -> list[list[dict]]:
        # Stacked into the same buffer each time: a fresh one (38 MB for 256 photos) is faulted in page by page, about
        # half of the stacking's time, and stacking was a fifth of the main thread's on a GPU (docs/batch.md).
        shape = (len(prepared), *prepared[0].array.shape)
        if self.batch.shape[1:] != shape[1:] or len(self.batch) < shape[0]:
            self.batch = np.empty(shape, np.uint8)
        try:
            batch = stack_batch([p.array for p in prepared], out=self.batch[:shape[0]])
        finally:
            for p in prepared:
                if p.release is not None:
                    p.release()
        return self.model.classify(batch, k)

    def close(self) -> None:
        pass


class RemoteBackend:
    """POST each image's bytes to a running service; the service does the preprocessing and batching."""

    RETRIES = 4

    def __init__(self, url: str, model_name: str, k: int, max_bytes: int, timeout: float, concurrency: int,
                 api_key: str | None = None):
        import httpx  # only --url needs it (a bentoml dependency, so always installed)

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.name, self.version = model_name, None
        self.num_classes: int | None = None
        self.k, self.max_bytes = k, max_bytes
        self.client = httpx.Client(timeout=timeout, headers=client_headers(api_key),
                                   limits=httpx.Limits(max_connections=concurrency,
                                                       max_keepalive_connections=concurrency))
        self._probe_models()

    def _probe_models(self) -> None:
        """Learn the model's version and class count from /models if the service has it, and fail early (exit 2)
        on an unknown model or a URL where nothing answers."""
        httpx = self._httpx
        try:
            r = self.client.get(f"{self.url}/models")
        except httpx.HTTPError as e:
            raise UsageError(f"cannot reach the service at {self.url}: {e}") from None
        if r.status_code == 401:  # every image would fail the same way: stop before sending any
            sent = "authorization" in self.client.headers
            raise UsageError(f"the service at {self.url} answered 401: " + (
                "it refused the API key (unknown or revoked)" if sent else
                f"it needs an API key: pass --api-key or set ${CLIENT_KEY_ENV}"))
        if r.status_code != 200:
            return
        try:
            body = r.json()
        except ValueError:
            return
        cards = body.get("models", body) if isinstance(body, dict) else body
        if isinstance(cards, dict):
            cards = [{"name": n, **c} if isinstance(c, dict) else {"name": n} for n, c in cards.items()]
        if not isinstance(cards, list):
            return
        by_name = {c.get("name"): c for c in cards if isinstance(c, dict)}
        if by_name and self.name not in by_name:
            raise UsageError(f"the service at {self.url} does not serve {self.name!r} (it serves: "
                             f"{', '.join(sorted(str(n) for n in by_name))})")
        card = by_name.get(self.name, {})
        self.version = card.get("version") and str(card["version"])
        self.num_classes = card.get("num_classes")

    def prepare(self, path: str) -> Prepared:
        httpx = self._httpx
        data = read_input(path, self.max_bytes)
        delay = 0.2
        for attempt in range(self.RETRIES + 1):
            try:
                r = self.client.post(f"{self.url}/classify", params={"model": self.name, "top_k": self.k},
                                     content=data, headers={"Content-Type": "application/octet-stream"})
            except httpx.HTTPError as e:
                if attempt == self.RETRIES:
                    raise ServiceUnreachable(f"request to {self.url} failed: {e}") from None
                time.sleep(delay)
                delay *= 2
                continue
            if r.status_code == 503 and attempt < self.RETRIES:  # server_busy: back off, as it asks
                time.sleep(_retry_after(r, delay))
                delay *= 2
                continue
            return self._answer(r)
        raise AssertionError("unreachable")

    def _answer(self, r: Any) -> Prepared:
        try:
            body = r.json()
        except ValueError:
            body = None
        if r.status_code == 200 and isinstance(body, dict) and isinstance(body.get("predictions"), list):
            version = str(body["version"]) if body.get("version") is not None else self.version
            return Prepared(predictions=body["predictions"], version=version)
        if isinstance(body, dict) and "error" in body:
            raise RemoteError(str(body["error"]), str(body.get("detail", "")), r.status_code)
        raise ServiceUnreachable(f"the service answered HTTP {r.status_code} without a JSON error body")

    def infer(self, prepared: list[Prepared], k: int) -> list[list[dict]]:
        return [p.predictions for p in prepared]

    def close(self) -> None:
        self.client.close()


class RemoteError(ClientError):
    """An error body from the service, passed through with its own code."""

    def __init__(self, code: str, detail: str, status: int):
        super().__init__(detail)
        self.code, self.status = code, status


def _retry_after(r: Any, default: float) -> float:
    try:
        return min(10.0, max(0.0, float(r.headers.get("Retry-After", default))))
    except ValueError:
        return default


# ---------------------------------------------------------------------------------------------------------------
# Output


def record_ok(path: str, model: str, version: str | None, predictions: list[dict]) -> dict[str, Any]:
    return {"path": path, "model": model, "version": version, "predictions": predictions}


def record_error(path: str, model: str, version: str | None, exc: BaseException) -> dict[str, Any]:
    _, body = error_body(exc)
    return {"path": path, "model": model, "version": version, **body}


class RecordWriter(abc.ABC):
    """Appends whole records: each batch is encoded first and written with one write, then flushed."""

    def __init__(self, stream: IO[bytes], fsync: bool):
        self.stream = stream
        self.fsync = fsync
        self._last_sync = time.monotonic()

    @abc.abstractmethod
    def encode(self, records: list[dict[str, Any]]) -> bytes:
        """The records as bytes in the output format (JSONL lines, CSV rows)."""

    def write(self, records: list[dict[str, Any]]) -> None:
        if records:
            self._write_bytes(self.encode(records))

    def _write_bytes(self, payload: bytes) -> None:
        # On a regular file, where this write starts: if it fails half-way (ENOSPC after some of the bytes landed),
        # the piece is cut off again, so the file still ends with a complete record.
        start = os.fstat(self.stream.fileno()).st_size if self.fsync else None
        try:
            data = memoryview(payload)
            while data:  # a raw file may take a write in pieces; finish it before anything else happens
                n = self.stream.write(data)
                data = data[n if n is not None else len(data):]
            self.stream.flush()
            if self.fsync and time.monotonic() - self._last_sync >= FSYNC_INTERVAL_S:
                os.fsync(self.stream.fileno())
                self._last_sync = time.monotonic()
        except BrokenPipeError:
            raise  # the reader of our stdout went away: main() stops quietly
        except OSError as e:
            if start is not None:
                try:
                    os.ftruncate(self.stream.fileno(), start)
                except OSError:
                    pass  # --resume cuts a torn last line off anyway
            raise OutputError(f"writing the output failed: {e.strerror or e}") from None

    def close(self) -> None:
        if self.fsync:
            try:
                os.fsync(self.stream.fileno())
            except OSError as e:
                raise OutputError(f"flushing the output to disk failed: {e.strerror or e}") from None


class JsonlWriter(RecordWriter):
    def encode(self, records: list[dict[str, Any]]) -> bytes:
        # ASCII: a file name's undecodable bytes (surrogateescape) come out as "\udcXX" escapes, which json.loads
        # turns back into the same str (os.fsencode gives the original bytes).
        return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records).encode("ascii")


def csv_header(k: int) -> list[str]:
    ranks = [f"{col}_{i}" for i in range(1, k + 1) for col in ("label", "index", "score")]
    return ["path", "model", "version", *ranks, "error", "detail"]


# A spreadsheet reads a cell that starts with one of these as a formula (OWASP's CSV injection list): a file named
# "=HYPERLINK(...).png" must show as text, not run.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """A text cell as written to CSV: valid UTF-8 whatever the file name's bytes (an undecodable byte becomes a
    visible "\\xff", where raw bytes would make the whole file unreadable to a strict UTF-8 reader such as pandas),
    and never a formula (a leading "'", as spreadsheets themselves mark text). --resume compares paths in this form."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: keep what can be shown
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "'" + text if text.startswith(FORMULA_START) else text


class CsvWriter(RecordWriter):
    """One row per input: the top-k as label_i/index_i/score_i columns, or error/detail."""

    def __init__(self, stream: IO[bytes], fsync: bool, k: int, write_header: bool):
        super().__init__(stream, fsync)
        self.k = k
        if write_header:
            self._write_bytes(self._rows([csv_header(k)]))

    @staticmethod
    def _rows(rows: list[list[Any]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        return buf.getvalue().encode("utf-8")

    def encode(self, records: list[dict[str, Any]]) -> bytes:
        rows = []
        for r in records:
            ranks: list[Any] = []
            for p in (r.get("predictions") or [])[:self.k]:
                ranks += [csv_cell(str(p["label"])), p["index"], repr(float(p["score"]))]
            ranks += [""] * (3 * self.k - len(ranks))
            rows.append([csv_cell(r["path"]), csv_cell(r["model"]), csv_cell(r["version"] or ""), *ranks,
                         csv_cell(r.get("error", "")), csv_cell(r.get("detail", ""))])
        return self._rows(rows)


@dataclass
class ExistingOutput:
    done: set[str] = field(default_factory=set)
    has_header: bool = False
    fmt: str = "jsonl"

    def has(self, path: str) -> bool:
        """Whether an input already has a record. A CSV holds paths as csv_cell wrote them; the raw form too
        matches, for a CSV written before csv_cell existed."""
        return path in self.done or (self.fmt == "csv" and csv_cell(path) in self.done)


def read_existing(path: str, fmt: str, model: str, k: int) -> ExistingOutput:
    """For --resume: the paths an earlier run already recorded. A torn last line (a power cut mid-write) is cut off,
    so the file is appendable again; a file written for another model or format is a usage error."""
    out = ExistingOutput(fmt=fmt)
    try:
        f = open(path, "r+b")  # noqa: SIM115 (closed below; truncation needs the same handle)
    except FileNotFoundError:
        return out
    except OSError as e:
        raise UsageError(f"cannot open {path} to resume: {e}") from None
    with f:
        good_end = 0
        if fmt == "csv":
            header = f.readline()
            if header.endswith(b"\n"):
                cols = next(csv.reader([header.decode("utf-8", "surrogateescape")]))
                if cols != csv_header(k):
                    raise UsageError(f"{path} has CSV columns for another --top-k or not from {PROG}; "
                                     f"resume with the same options or pick a new --output")
                out.has_header = True
                good_end = f.tell()
        record = b""
        for lineno, line in enumerate(iter(f.readline, b""), start=2 if fmt == "csv" else 1):
            if not line.endswith(b"\n"):
                break
            record += line
            # A CSV cell with a newline in it (a file name may have one) is quoted, so the record goes on to the next
            # line while its quotes are unbalanced ("" inside a cell counts twice).
            if fmt == "csv" and record.count(b'"') % 2:
                continue
            text, record = record.decode("utf-8", "surrogateescape"), b""
            try:
                if fmt == "csv":
                    row = next(csv.reader([text]))
                    rec_path, rec_model = row[0], row[1]
                    if rec_model == csv_cell(model):
                        rec_model = model
                else:
                    rec = json.loads(text)
                    rec_path, rec_model = rec["path"], rec["model"]
            except (ValueError, KeyError, IndexError, TypeError, StopIteration):
                raise UsageError(f"{path}:{lineno} is not a {fmt} record from {PROG}; cannot resume") from None
            if rec_model != model:
                raise UsageError(f"{path} holds records of model {rec_model!r}, not {model!r}; cannot resume")
            out.done.add(rec_path)
            good_end = f.tell()
        f.seek(0, os.SEEK_END)
        if f.tell() != good_end:
            f.truncate(good_end)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Top-1/top-5 against the class folder each image sits in (digit folders 0-9, ImageNet wnids or label names)."""

    def __init__(self, class_index: dict[str, int]):
        self.class_index = class_index
        self.n = self.top1 = self.top5 = self.unlabelled = 0

    @classmethod
    def for_model(cls, model_dir: Path | None) -> Evaluator:
        index: dict[str, int] = {}
        if model_dir is not None:
            labels = read_labels(model_dir, read_card(model_dir))
            index.update({label: i for i, label in enumerate(labels)})
            wnids = model_dir / "wnids.txt"
            if wnids.is_file():
                index.update({w.strip(): i for i, w in enumerate(wnids.read_text().splitlines()) if w.strip()})
        return cls(index)

    def add(self, path: str, predictions: list[dict]) -> None:
        folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
        truth = self.class_index.get(folder)
        if truth is None and not self.class_index:  # no local labels (--url): compare by label name
            ranked = [p["label"] for p in predictions[:EVAL_K]]
            hit1, hit5 = ranked[:1] == [folder], folder in ranked
        elif truth is None:
            self.unlabelled += 1
            return
        else:
            ranked_idx = [p["index"] for p in predictions[:EVAL_K]]
            hit1, hit5 = ranked_idx[:1] == [truth], truth in ranked_idx
        self.n += 1
        self.top1 += hit1
        self.top5 += hit5

    def summary(self) -> dict[str, Any]:
        return {"evaluated": self.n, "unlabelled": self.unlabelled,
                "top1": self.top1 / self.n if self.n else None, "top5": self.top5 / self.n if self.n else None}


# ---------------------------------------------------------------------------------------------------------------
# The pipeline

_END = object()


@dataclass
class RunStats:
    processed: int = 0
    failed: int = 0
    skipped: int = 0
    started: float = field(default_factory=time.perf_counter)
    pipeline_start: float = 0.0
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    pipeline_end: float = 0.0
    interrupted: bool = False
    terminated: bool = False  # the interruption was SIGTERM
    stopped_early: bool = False
    output_error: str | None = None


def feed(paths: Iterator[str], submit: Callable[[str], Future], out: queue.Queue, stop: threading.Event,
         slots: threading.Semaphore) -> None:
    """Feeder thread: list lazily, hand each path to the pool once a slot is free, queue the future in input order.
    The slots bound memory, and decide when decoding may run (see run_pipeline)."""
    try:
        for path in paths:
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            out.put((path, submit(path)))
        out.put((None, _END))
    except BaseException as e:  # noqa: BLE001 (handed to the main thread, which reports it)
        out.put((None, e))


def _own_files(args: argparse.Namespace) -> dict[str, os.stat_result]:
    """The regular files this run writes (--output, --summary-json), by name, once they are open."""
    own = {}
    for target in (args.output, args.summary_json):
        if target and target != "-":
            with contextlib.suppress(OSError):
                st = os.stat(target)
                if stat.S_ISREG(st.st_mode):
                    own[os.path.basename(target)] = st
    return own


def _filtered(paths: Iterator[str], done: ExistingOutput, limit: int | None, stats: RunStats,
              own: dict[str, os.stat_result]) -> Iterator[str]:
    for i, path in enumerate(paths):
        if limit is not None and i >= limit:
            return
        # `'photos/*' -o photos/out.jsonl` lists the output too: recording it as "not an image" made a clean run
        # exit 1. A name match first, so an ordinary input costs no stat.
        mine = own.get(os.path.basename(path))
        if mine is not None and _same_file(path, mine):
            continue
        if done.has(path):
            stats.skipped += 1
            continue
        yield path


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(path), st)
    except OSError:
        return False


def _start_decode_thread(increment: int) -> None:
    """Named for the OS (serving/threads.py); with an `increment`, decode threads yield the CPU to onnxruntime's
    threads: inference runs at full speed and decoding fills the gaps (Linux schedules threads individually, so the
    thread id works as a process id here)."""
    name_os_thread()
    if not increment:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + increment)
    except (AttributeError, OSError):
        pass


def decode_pool(backend: LocalBackend | RemoteBackend, workers: int, capacity: int, decode_in: str,
                decode_nice: int) -> tuple[Callable[[str], Future], ThreadPoolExecutor | ProcessDecoder]:
    """(submit(path) → Future[Prepared], the pool to shut down): decode threads, or processes (serving/decode_procs.py)
    for a local model."""
    if decode_in == "processes" and isinstance(backend, LocalBackend):
        decoder = ProcessDecoder(workers, capacity, backend.model.recipe, backend.max_bytes, backend.max_pixels,
                                 decode_nice, wrap=lambda array, release: Prepared(array=array, release=release))
        return decoder.submit, decoder
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=DECODE_THREADS,
                              initializer=_start_decode_thread, initargs=(decode_nice,))
    return (lambda path: pool.submit(backend.prepare, path)), pool


def run_pipeline(paths: Iterator[str], backend: LocalBackend | RemoteBackend, writer: RecordWriter, *, k: int,
                 batch_size: int, workers: int, fail_fast: bool, evaluator: Evaluator | None, stats: RunStats,
                 progress: Any = None, decode_nice: int = 0, decode_in: str = "threads") -> None:
    infer_k = max(k, EVAL_K) if evaluator is not None else k
    if backend.num_classes:
        infer_k = min(infer_k, backend.num_classes)
    # On a CPU, decoding and inference take turns: the pool decodes one batch, then onnxruntime runs it on every core
    # with no decode competing, which is the in-process limit's own pattern (time-slicing the two cost ~10 % on one
    # core, measured in docs/batch.md). On a GPU or with a remote service, inference leaves the CPUs free, so the
    # next batch decodes while this one runs: enough in flight to fill it, and no more.
    take_turns = isinstance(backend, LocalBackend) and backend.model.session.device == "cpu"
    in_flight = batch_size if take_turns else batch_size * 2 + workers
    slots = threading.Semaphore(in_flight)
    pending: queue.Queue = queue.Queue()
    stop = threading.Event()
    # A decode process's image holds its slot from the feeder's submit until its batch is stacked: what the feeder
    # has in flight, plus the batch the main thread has taken.
    submit, pool = decode_pool(backend, workers, in_flight + batch_size, decode_in, decode_nice)
    feeder = threading.Thread(target=feed, args=(paths, submit, pending, stop, slots), name=FEEDER, daemon=True)
    stats.pipeline_start, stats.cpu_start = time.perf_counter(), time.process_time()
    feeder.start()
    finished = False
    try:
        while not finished:
            chunk: list[tuple[str, Future]] = []
            while len(chunk) < batch_size:
                path, fut = pending.get()
                if fut is _END:
                    finished = True
                    break
                if isinstance(fut, BaseException):  # listing failed mid-run (a list file vanished, stdin broke)
                    raise InputSpecError(f"listing the inputs failed: {type(fut).__name__}: {fut}") from fut
                chunk.append((path, fut))
                if not take_turns:
                    slots.release()
            if not chunk:
                break
            records, failed = _process_chunk(chunk, backend, infer_k, k, evaluator)
            if take_turns:
                slots.release(len(chunk))  # this batch has run: the next one may decode
            if fail_fast and failed:
                first_bad = next(i for i, r in enumerate(records) if "error" in r)
                records = records[:first_bad + 1]
                finished = stats.stopped_early = True
                failed = 1
            writer.write(records)
            stats.processed += len(records)
            stats.failed += failed
            if progress is not None:
                progress.update(len(records))
                if stats.failed:  # as text: tqdm shows a large number as "2e+5"
                    progress.set_postfix(failed=str(stats.failed), refresh=False)
    except KeyboardInterrupt as e:
        stats.interrupted, stats.terminated = True, isinstance(e, Terminated)
    except OutputError as e:  # stop: every record from here on would be lost too
        stats.output_error = str(e)
    finally:
        stats.pipeline_end, stats.cpu_end = time.perf_counter(), time.process_time()
        stop.set()
        pool.shutdown(wait=not stats.interrupted, cancel_futures=True)
        # Drain so a feeder blocked on a full queue sees the stop flag and exits. One blocked reading stdin can't be
        # woken; it is a daemon thread, so after a moment we leave it behind.
        deadline = time.monotonic() + 2.0
        while feeder.is_alive() and time.monotonic() < deadline:
            try:
                pending.get(timeout=0.05)
            except queue.Empty:
                pass


def _process_chunk(chunk: list[tuple[str, Future]], backend: LocalBackend | RemoteBackend, infer_k: int, k: int,
                   evaluator: Evaluator | None) -> tuple[list[dict[str, Any]], int]:
    results: list[Prepared | BaseException] = []
    for _, fut in chunk:
        try:
            results.append(fut.result())
        except ClientError as e:
            results.append(e)
        except Exception as e:  # noqa: BLE001 (a bug or a Pillow surprise: this input fails, the run goes on)
            print(f"{PROG}: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
            results.append(e)
    ok = [r for r in results if isinstance(r, Prepared)]
    predictions: Iterator[list[dict]] = iter(())
    if ok:
        try:
            predictions = iter(backend.infer(ok, infer_k))
        except Exception as e:  # noqa: BLE001 (inference failing is not the inputs' fault: record it, keep going)
            print(f"{PROG}: inference failed: {type(e).__name__}: {e}", file=sys.stderr)
            results = [e if isinstance(r, Prepared) else r for r in results]
    records, failed = [], 0
    for (path, _), r in zip(chunk, results, strict=True):
        if isinstance(r, Prepared):
            preds = next(predictions)
            version = r.version or backend.version
            if backend.version is None and r.version:
                backend.version = r.version
            if evaluator is not None:
                evaluator.add(path, preds)
            records.append(record_ok(path, backend.name, version, preds[:k]))
        else:
            records.append(record_error(path, backend.name, backend.version, r))
            failed += 1
    return records, failed


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _output_format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    return "csv" if str(args.output).lower().endswith(".csv") else "jsonl"


def _open_output(args: argparse.Namespace, fmt: str, k: int) -> tuple[RecordWriter, ExistingOutput, IO[bytes] | None]:
    if args.output == "-":
        if args.resume:
            raise UsageError("--resume needs --output FILE (it reads what an earlier run wrote there)")
        stream = sys.stdout.buffer
        writer: RecordWriter = (CsvWriter(stream, False, k, True) if fmt == "csv" else JsonlWriter(stream, False))
        return writer, ExistingOutput(fmt=fmt), None
    refuse_clobbering(args.output, args.inputs, "--output")
    existing = read_existing(args.output, fmt, args.model, k) if args.resume else ExistingOutput(fmt=fmt)
    try:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        f = open(args.output, "ab" if args.resume else "wb", buffering=0)  # noqa: SIM115 (closed by main)
    except OSError as e:
        raise UsageError(f"cannot write {args.output}: {e}") from None
    durable = stat.S_ISREG(os.fstat(f.fileno()).st_mode)  # fsync means nothing (or fails) on /dev/null, pipes
    if fmt == "csv":
        writer = CsvWriter(f, durable, k, write_header=not existing.has_header)
    else:
        writer = JsonlWriter(f, durable)
    return writer, existing, f


def refuse_clobbering(target: str, inputs: list[str], option: str) -> None:
    """Refuse, before anything is truncated, an output that would destroy an input: `-o photo.jpg` (a slip, or an
    input named twice) used to empty the photo and then record it as an empty file; `@list.txt -o list.txt` emptied
    the list before it was read. An existing file that is an image is refused whichever input listed it (a glob, a
    folder, stdin): records are never meant to replace a picture."""
    try:
        st = os.stat(target)
    except OSError:
        return  # not there yet, or unreachable: opening it says why
    if not stat.S_ISREG(st.st_mode):
        return  # /dev/null, a pipe, a terminal
    for spec in inputs:
        named = spec[1:] if spec.startswith("@") and spec != "@" else spec
        if spec != STDIN and _same_file(named, st):
            raise UsageError(f"{option} {target} is the input {spec}: writing it would destroy it")
    if st.st_size:
        try:
            with Image.open(target) as im:  # reads the header only
                fmt = im.format
        except Exception:  # noqa: BLE001 (anything Pillow can't open is not an image to protect)
            return
        raise UsageError(f"{option} {target} is an image ({fmt}), not an earlier output: refusing to overwrite it")


def _open_summary(args: argparse.Namespace) -> IO[str] | None:
    """--summary-json, opened before the run: a path that can't be written is a usage error now, not a traceback
    after hours of work."""
    if not args.summary_json:
        return None
    refuse_clobbering(args.summary_json, args.inputs, "--summary-json")
    try:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        return open(args.summary_json, "w")  # noqa: SIM115 (closed by run)
    except OSError as e:
        raise UsageError(f"cannot write {args.summary_json}: {e}") from None


def _load_local(args: argparse.Namespace) -> tuple[LocalBackend, Path]:
    model_dir = Path(args.models_dir) / args.model
    if not (model_dir / CARD_FILE).is_file():
        have = [d.name for d in discover(Path(args.models_dir))]
        raise UsageError(f"unknown model {args.model!r}; the repository {args.models_dir} has: "
                         f"{', '.join(have) or 'nothing (run `make models`)'}")
    args.threads = args.threads or usable_cpus()
    try:
        model = load_model(model_dir, device=args.device, threads=args.threads, precision=args.precision)
    except (ModelRepositoryError, DeviceUnavailable) as e:
        raise UsageError(str(e)) from None
    if args.top_k > model.card.num_classes:
        raise UsageError(f"--top-k {args.top_k} is more than {args.model}'s {model.card.num_classes} classes")
    return LocalBackend(model, args.max_bytes, args.max_pixels), model_dir


def _progress_bar(args: argparse.Namespace, done: ExistingOutput) -> Any:
    enabled = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    if not enabled:
        return None
    from tqdm import tqdm

    bar = tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    if STDIN not in args.inputs:
        # A second, cheap listing pass in the background gives the bar its total (and so an ETA) without holding
        # the list: it only counts.
        def count() -> None:
            n = 0
            for i, path in enumerate(iter_inputs(args.inputs, null=args.null)):
                if args.limit is not None and i >= args.limit:
                    break
                n += not done.has(path)
            bar.total = n
            bar.refresh()

        threading.Thread(target=count, name="counter", daemon=True).start()
    return bar


def summary_line(summary: dict[str, Any]) -> str:
    parts = [f"{summary['processed']} processed", f"{summary['failed']} failed"]
    if summary["skipped"]:
        parts.append(f"{summary['skipped']} skipped (already in the output)")
    parts += [f"{summary['images_per_s']:.1f} img/s", f"{summary['wall_s']:.2f} s wall"]
    ev = summary.get("eval")
    if ev:
        if ev["evaluated"]:
            parts.append(f"top-1 {ev['top1']:.2%} top-5 {ev['top5']:.2%} over {ev['evaluated']} labelled")
        else:
            parts.append("no image sat in a known class folder")
        if ev["unlabelled"]:
            parts.append(f"{ev['unlabelled']} in unknown class folders")
    state = (" (terminated: SIGTERM)" if summary.get("terminated") else " (interrupted)" if summary["interrupted"]
             else " (output failed)" if summary.get("output_error")
             else " (stopped at the first failure)" if summary["stopped_early"] else "")
    precision = f" ({summary['precision']})" if summary.get("precision") else ""
    return (f"{PROG}: {', '.join(parts)}; model {summary['model']} v{summary['version']} on {summary['device']}"
            f"{precision}{state}")


def run(args: argparse.Namespace, stdin: IO[str] | None = None) -> int:
    stats = RunStats()
    check_specs(args.inputs)
    fmt = _output_format(args)
    if args.url and args.decode_in == "processes":
        raise UsageError("--decode-in processes decodes for a local model; with --url the service decodes")
    if args.url:
        backend: LocalBackend | RemoteBackend = RemoteBackend(
            args.url, args.model, max(args.top_k, EVAL_K) if args.eval else args.top_k, args.max_bytes,
            args.timeout, args.workers, args.api_key)
        local_dir = Path(args.models_dir) / args.model
        model_dir = local_dir if (local_dir / CARD_FILE).is_file() else None
        device, precision = args.url, None  # the service decides
    else:
        backend, model_dir = _load_local(args)
        device, precision = backend.model.session.device, backend.model.precision
    decode_in = args.decode_in
    if decode_in == "auto":
        decode_in = "processes" if not args.url and device != "cpu" else "threads"
    evaluator = Evaluator.for_model(model_dir) if args.eval else None
    summary_file = _open_summary(args)
    writer, done, out_file = _open_output(args, fmt, args.top_k)
    bar = _progress_bar(args, done)
    try:
        paths = _filtered(iter_inputs(args.inputs, stdin, args.null), done, args.limit, stats, _own_files(args))
        run_pipeline(paths, backend, writer, k=args.top_k, batch_size=args.batch_size,
                     workers=args.workers, fail_fast=args.fail_fast, evaluator=evaluator, stats=stats,
                     progress=bar, decode_nice=0 if args.url else args.decode_nice, decode_in=decode_in)
    finally:
        if bar is not None:
            bar.close()
        try:
            writer.close()
        except OutputError as e:
            stats.output_error = stats.output_error or str(e)
        if out_file is not None:
            out_file.close()
        backend.close()
    pipeline_s = max(stats.pipeline_end - stats.pipeline_start, 1e-9)
    summary = {
        "processed": stats.processed, "failed": stats.failed, "skipped": stats.skipped,
        "images_per_s": stats.processed / pipeline_s, "pipeline_s": pipeline_s,
        "pipeline_cpu_s": stats.cpu_end - stats.cpu_start,
        "wall_s": time.perf_counter() - stats.started, "model": backend.name, "version": backend.version,
        "device": device, "precision": precision, "batch_size": args.batch_size, "workers": args.workers,
        "threads": args.threads, "decode_nice": args.decode_nice, "decode_in": decode_in,
        "output": args.output, "format": fmt, "interrupted": stats.interrupted,
        "terminated": stats.terminated, "stopped_early": stats.stopped_early,
        "output_error": stats.output_error,
    }
    if evaluator is not None:
        summary["eval"] = evaluator.summary()
    if summary_file is not None:
        try:
            with summary_file:
                summary_file.write(json.dumps(summary, indent=2) + "\n")
        except OSError as e:
            print(f"{PROG}: error: writing {args.summary_json} failed: {e.strerror or e}", file=sys.stderr)
            stats.output_error = stats.output_error or f"writing {args.summary_json} failed"
    print(summary_line(summary), file=sys.stderr)
    if stats.output_error:
        print(f"{PROG}: error: {stats.output_error}; the output ends at the last complete record "
              f"(free some space and run again with --resume)", file=sys.stderr)
    if stats.interrupted:
        return EXIT_TERMINATED if stats.terminated else EXIT_INTERRUPTED
    if stats.output_error:
        return EXIT_OUTPUT_FAILED
    return EXIT_SOME_FAILED if stats.failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    # SIGTERM's default ended the run at once: complete batches, but no summary and no word of why.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        code = _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if any(t.name == FEEDER and t.is_alive() for t in threading.enumerate()):
        # Stopped (Ctrl-C) while the feeder waits on a stdin that is still open: no thread can wake it, and
        # interpreter shutdown would then abort on stdin's lock ("Fatal Python error: _enter_buffered_busy", exit
        # -6 instead of 130). Everything is written by now, so leave without that shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # inputs may come before, between and after options
    try:
        return run(args)
    except (UsageError, InputSpecError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OutputError as e:  # before the first record: the CSV header didn't fit
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_OUTPUT_FAILED
    except KeyboardInterrupt as e:  # before or after the pipeline (loading the model, say)
        print(f"{PROG}: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except BrokenPipeError:
        # Whoever read our stdout went away (`| head`): stop quietly, like other Unix tools.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return EXIT_SOME_FAILED


if __name__ == "__main__":
    sys.exit(main())
