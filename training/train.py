"""Train LeNet-5 (MNIST) or AlexNet (ImageNet-layout folders); one script for CPU, one GPU and torchrun.

    python -m training.train --model lenet5 --data-dir ../shared/data/mnist --epochs 15 ...
    torchrun --nproc_per_node=8 -m training.train --model alexnet --data-dir /data/imagenet ...

The network is fed uint8 NHWC batches through `UInt8Input` (the in-graph preprocessing the exporter puts in front of
the ONNX model), so training, evaluation and serving see the same numbers. Each epoch writes `checkpoint.pt` (and
`best.pt` when validation top-1 improves) holding only tensors and plain types, loadable with weights_only=True,
and appends one JSON line to `metrics.jsonl`. `--resume` continues exactly: same weights, optimizer, schedule, data
order, augmentation and dropout draws as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler, Sampler
from tqdm import tqdm

import serving  # noqa: F401  (sets the no-telemetry environment before anything else is imported)
from training.data import ArrayDataset, DatasetError, ImageFolderDataset, batch_loader, mnist_dataset
from training.models import ACTIVATIONS, UInt8Input, build_model, count_parameters, recipe_for
from training.transforms import random_affine_uint8

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS_LOG = "metrics.jsonl"

# Defaults per model. AlexNet: torchvision's references/classification recipe for alexnet. LeNet-5: tuned here to
# reach <= 0.8% MNIST test error (through the serving digit preprocessing) in well under 15 minutes on 2 CPU cores.
# LeNet-5 runs on one CPU thread: its ops are so small that a second OpenMP thread adds little on an idle machine and,
# on a busy one, makes each op wait for a descheduled partner (measured: 250 img/s with 2 threads vs ~4,000 with 1).
RECIPES: dict[str, dict[str, Any]] = {
    "alexnet": dict(epochs=90, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4, lr_scheduler="step",
                    lr_step_size=30, lr_gamma=0.1, dropout=0.5, workers=-1, distort=False, threads=0,
                    val_holdout=0),
    "lenet5": dict(epochs=20, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4, lr_scheduler="onecycle",
                   lr_step_size=5, lr_gamma=0.1, dropout=0.0, workers=0, distort=True, threads=1,
                   val_holdout=5000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(RECIPES), required=True)
    p.add_argument("--data-dir", default=None,
                   help="lenet5: folder with the MNIST IDX files (default data/mnist); "
                        "alexnet: folder with train/<wnid>/ and val/<wnid>/ (default data/imagenet)")
    p.add_argument("--output-dir", default=None, help="default runs/<model>")
    p.add_argument("--epochs", type=int, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default 2 × batch size")
    p.add_argument("--lr", type=float, help="peak learning rate (OneCycle) or initial (step, cosine)")
    p.add_argument("--momentum", type=float)
    p.add_argument("--nesterov", action="store_true")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr-scheduler", choices=("step", "cosine", "onecycle"))
    p.add_argument("--lr-step-size", type=int, help="step: epochs between decays")
    p.add_argument("--lr-gamma", type=float, help="step: decay factor")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    p.add_argument("--dropout", type=float)
    p.add_argument("--distort", action=argparse.BooleanOptionalAction, default=None,
                   help="lenet5: random affine distortions of training digits (±10°, ±10%% scale, ±2 px)")
    p.add_argument("--val-holdout", type=int, metavar="N",
                   help="lenet5: validate (and pick best.pt) on the last N training digits, never trained on, so the "
                        "test set stays unseen until the exporter measures it; 0 validates on the test split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision (float16 autocast + GradScaler); used on CUDA only")
    p.add_argument("--workers", type=int, help="data loader processes per rank; -1: auto")
    p.add_argument("--threads", type=int, help="torch CPU threads per process; 0: cores / processes")
    p.add_argument("--cache-dir", default="runs/cache",
                   help="lenet5: where the preprocessed digits are cached ('' to disable)")
    p.add_argument("--resume", default=None, help="checkpoint to continue from (e.g. runs/lenet5/checkpoint.pt)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this invocation after N epochs, as if interrupted (time-sliced jobs; --resume goes on)")
    p.add_argument("--dry-run", action="store_true",
                   help="build everything, train 2 batches and evaluate 1, print the plan; writes nothing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (log lines per epoch only)")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data_dir = args.data_dir or ("data/mnist" if args.model == "lenet5" else "data/imagenet")
    args.output_dir = args.output_dir or f"runs/{args.model}"
    args.eval_batch_size = args.eval_batch_size or 2 * args.batch_size
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--epochs, --batch-size and --lr must be positive")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    device = torch.device("cuda", d.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if d.enabled:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return d, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG, as tensors and lists (no numpy objects) so weights_only=True can load it."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [py_state[0], list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Data


class ShardSampler(Sampler[int]):
    """Evaluation shard: every rank takes every world-th index, no padding, so the counts sum to the dataset."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_datasets(args: argparse.Namespace, d: Dist) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    data_dir = Path(args.data_dir)
    if args.model == "lenet5":
        # Dry runs preprocess a few batches only and never write the cache.
        limit = 2 * max(args.batch_size, args.eval_batch_size) if args.dry_run else None
        cache = None if args.dry_run or not args.cache_dir else args.cache_dir
        if d.enabled and cache:  # rank 0 fills the cache once, the others then read it
            if d.main:
                mnist_dataset(data_dir, "train", cache, progress=True)
                mnist_dataset(data_dir, "test", cache, progress=True)
            dist.barrier()
        train = mnist_dataset(data_dir, "train", cache, progress=d.main, limit=limit)
        holdout = min(args.val_holdout, len(train) // 2)
        if holdout:  # MNIST has no validation split: hold out the end of the training set
            val = ArrayDataset(train.images[-holdout:].numpy(), train.labels[-holdout:].numpy(), train.classes)
            train = ArrayDataset(train.images[:-holdout].numpy(), train.labels[:-holdout].numpy(), train.classes)
            return train, val
        val = mnist_dataset(data_dir, "test", cache, progress=d.main, limit=limit)
        return train, val
    train = ImageFolderDataset(data_dir / "train", train=True, recipe=recipe_for(args.model), seed=args.seed)
    val = ImageFolderDataset(data_dir / "val", train=False, recipe=recipe_for(args.model), classes=train.classes)
    return train, val


def val_split_name(args: argparse.Namespace) -> str:
    if args.model != "lenet5":
        return "val"
    return f"train holdout (last {args.val_holdout})" if args.val_holdout else "test"


def epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A seed of its own for each (run seed, epoch, rank, random stream): an epoch draws the same numbers whether the
    run was interrupted before it or not, and ranks never share a stream."""
    return int(np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1)[0])


def augmenter(args: argparse.Namespace, epoch: int, rank: int):
    """The batch distortion for LeNet-5 (None when off), with its own per-epoch generator."""
    if not args.distort:
        return None
    g = torch.Generator().manual_seed(epoch_seed(args.seed, epoch, rank, 1))
    return lambda x: random_affine_uint8(x, g)


# ---------------------------------------------------------------------------------------------------------------
# Optimisation


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch; the step schedule counts whole epochs of batches, so it equals torchvision's."""
    total = args.epochs * steps_per_epoch
    if args.lr_scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step_size * steps_per_epoch, args.lr_gamma)
    if args.lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=0.2,
                                               cycle_momentum=False, div_factor=25.0, final_div_factor=1e3)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    k_max = min(max(ks), logits.shape[1])
    pred = logits.topk(k_max, dim=1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, :min(k, k_max)].any(dim=1).sum()) for k in ks]


def all_sum(values: list[float], device: torch.device, d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(net: nn.Module, tail: nn.Module, loader, device: torch.device, d: Dist, use_amp: bool,
             max_batches: int | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over the whole validation set, summed across ranks."""
    net.eval()
    loss_sum = c1 = c5 = n = 0.0
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = net(tail(images))
        loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        a1, a5 = topk_correct(logits, labels)
        c1, c5, n = c1 + a1, c5 + a5, n + len(labels)
    loss_sum, c1, c5, n = all_sum([loss_sum, c1, c5, n], device, d)
    n = max(n, 1)
    return {"val_loss": round(loss_sum / n, 6), "val_top1": round(100 * c1 / n, 4), "val_top5": round(100 * c5 / n, 4),
            "val_error": round(100 * (1 - c1 / n), 4), "val_images": int(n)}


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def trim_metrics_log(path: Path, keep_epochs: int) -> None:
    """Keep only the log lines of epochs the run starts from: a fresh run starts an empty log, a resume drops the
    lines of epochs it is about to redo."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("epoch", 0) <= keep_epochs]
    path.write_text("".join(line + "\n" for line in kept))


def plain_args(args: argparse.Namespace, num_classes: int) -> dict[str, Any]:
    """vars(args) as plain types, with what the exporter needs to rebuild the network."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out["num_classes"] = num_classes
    return out


# ---------------------------------------------------------------------------------------------------------------
# The run


def train(args: argparse.Namespace) -> dict[str, Any]:
    d, device = init_distributed(args.device)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // d.world))
    use_amp = args.amp and device.type == "cuda"
    seed_everything(args.seed)
    log = print if d.main else (lambda *a, **k: None)

    train_set, val_set = build_datasets(args, d)
    num_classes = len(train_set.classes)
    recipe = recipe_for(args.model)
    workers = args.workers if args.workers >= 0 else min(8, max(1, (os.cpu_count() or 1) // d.world))
    if isinstance(train_set, ArrayDataset):
        workers = 0  # in memory: a batch is one fancy-index, worker processes would only add copies
    train_sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed)
    train_loader = batch_loader(train_set, train_sampler, args.batch_size, workers, pin_memory=device.type == "cuda")
    val_loader = batch_loader(val_set, ShardSampler(len(val_set), d.rank, d.world), args.eval_batch_size, workers,
                              pin_memory=device.type == "cuda")

    # Same initial weights on every rank (DDP also broadcasts rank 0's anyway).
    net = build_model(args.model, num_classes, args.activation, args.dropout).to(device)
    tail = UInt8Input(recipe.mean, recipe.std).to(device)
    model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
        if d.enabled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov)
    steps_per_epoch = len(train_loader)
    scheduler = build_scheduler(args, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    start_epoch, best = 0, {"best_val_top1": -1.0, "best_epoch": 0}
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        saved = ckpt["args"]
        for key in ("model", "activation", "num_classes"):
            if saved.get(key) != (num_classes if key == "num_classes" else getattr(args, key)):
                raise SystemExit(f"error: {args.resume} was trained with {key}={saved.get(key)!r}; "
                                 f"this run has {getattr(args, key, num_classes)!r}")
        if args.lr_scheduler != "step" and saved.get("epochs") != args.epochs:
            # OneCycle and cosine are laid out over the whole run; the saved schedule would end at the old length.
            raise SystemExit(f"error: {args.resume}'s {args.lr_scheduler} schedule spans {saved.get('epochs')} epochs; "
                             f"resume with --epochs {saved.get('epochs')} (or start a new run)")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if use_amp and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch = int(ckpt["epoch"])
        best = {k: ckpt["metrics"].get(k, v) for k, v in best.items()}
        set_rng_state(ckpt["rng"])
        log(f"resumed from {args.resume} after epoch {start_epoch} (best top-1 {best['best_val_top1']:.2f}%)")

    out_dir = Path(args.output_dir)
    where = "nothing (dry run)" if args.dry_run else str(out_dir)
    log(f"{args.model}: {count_parameters(net):,} parameters, {num_classes} classes, {len(train_set):,} train / "
        f"{len(val_set):,} val images from {args.data_dir}; device {device}"
        f"{' (AMP)' if use_amp else ''}, {d.world} process(es) × {torch.get_num_threads()} threads, "
        f"{workers} loader workers")
    log(f"plan: epochs {start_epoch + 1}-{args.epochs}, batch {args.batch_size}×{d.world}, {steps_per_epoch} steps/"
        f"epoch, SGD lr {args.lr} momentum {args.momentum} wd {args.weight_decay}, {args.lr_scheduler} schedule"
        f"{f' (step {args.lr_step_size} × {args.lr_gamma})' if args.lr_scheduler == 'step' else ''}, activation "
        f"{args.activation}, dropout {args.dropout}, distort {bool(args.distort)}; writing {where}")
    if not args.dry_run and d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        trim_metrics_log(out_dir / METRICS_LOG, start_epoch)
    if start_epoch >= args.epochs and not args.dry_run:
        log(f"already trained for {start_epoch} epochs (--epochs {args.epochs}): nothing to do")

    metrics: dict[str, Any] = {}
    t_run = time.perf_counter()
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        train_sampler.set_epoch(epoch)
        # Dropout (and anything else on the global generator) reseeded per epoch and rank: exact resumes, and each
        # rank draws its own masks.
        torch.manual_seed(epoch_seed(args.seed, epoch, d.rank, 0))
        if isinstance(train_set, ImageFolderDataset):
            train_set.epoch = epoch
        distort = augmenter(args, epoch, d.rank)
        model.train()
        # Running sums stay on the device: no host sync per step on a GPU.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(train_loader, total=2 if args.dry_run else steps_per_epoch, disable=not d.main or args.no_progress,
                   desc=f"epoch {epoch + 1}/{args.epochs}", unit="batch", mininterval=1.0 if sys.stderr.isatty()
                   else 30.0, dynamic_ncols=True, leave=False)
        for step, (images, labels) in enumerate(bar):
            if args.dry_run and step == 2:
                break
            if distort is not None:
                images = distort(images)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(tail(images))
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().double() * len(labels)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(labels)
            if step % 20 == 0:
                running = loss_sum.item() / seen
                if not math.isfinite(running):
                    raise SystemExit(f"error: the loss is {running} at epoch {epoch + 1} step {step}; lower --lr")
                rate = seen * d.world / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{running:.4f}", img_s=f"{rate:.0f}", refresh=False)  # shown at the bar's pace
        bar.close()
        train_seconds = time.perf_counter() - t0
        loss_sum, correct, seen = all_sum([loss_sum.item(), float(correct.item()), seen], device, d)
        val = evaluate(net, tail, val_loader, device, d, use_amp, max_batches=1 if args.dry_run else None)
        metrics = {"epoch": epoch + 1, "train_loss": round(loss_sum / seen, 6),
                   "train_top1": round(100 * correct / seen, 4), **val,
                   "lr": optimizer.param_groups[0]["lr"], "train_seconds": round(train_seconds, 2),
                   "epoch_seconds": round(time.perf_counter() - t0, 2),
                   "images_per_second": round(seen / train_seconds, 1), "val_split": val_split_name(args),
                   "weights": "trained"}
        if val["val_top1"] > best["best_val_top1"]:
            best = {"best_val_top1": val["val_top1"], "best_epoch": epoch + 1}
            is_best = True
        else:
            is_best = False
        metrics.update(best)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {metrics['train_loss']:.4f} "
            f"top-1 {metrics['train_top1']:.2f}% | val loss {val['val_loss']:.4f} top-1 {val['val_top1']:.2f}% "
            f"top-5 {val['val_top5']:.2f}% "
            f"(error {val['val_error']:.2f}%) | lr {metrics['lr']:.2e} | {metrics['epoch_seconds']:.0f} s, "
            f"{metrics['images_per_second']:.0f} img/s{' *best*' if is_best else ''}", flush=True)
        if args.dry_run:
            break
        if d.main:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                     "args": plain_args(args, num_classes), "metrics": metrics, "rng": rng_state()}
            if use_amp:
                state["scaler"] = scaler.state_dict()
            save_checkpoint(state, out_dir / CHECKPOINT)
            if is_best:
                shutil.copyfile(out_dir / CHECKPOINT, out_dir / BEST)
            with open(out_dir / METRICS_LOG, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    if metrics and not args.dry_run:
        log(f"done: {args.model} {metrics['epoch']} epochs in {time.perf_counter() - t_run:.0f} s; last top-1 "
            f"{metrics['val_top1']:.2f}% (error {metrics['val_error']:.2f}%), best {best['best_val_top1']:.2f}% at "
            f"epoch {best['best_epoch']}; {out_dir / BEST}")
        if metrics["epoch"] < args.epochs:
            log(f"stopped after epoch {metrics['epoch']} of {args.epochs}: continue with "
                f"--resume {out_dir / CHECKPOINT}")
    elif args.dry_run:
        log(f"dry run OK: {args.model} would train {args.epochs - start_epoch} epochs × {steps_per_epoch} steps and "
            f"write {out_dir / CHECKPOINT}, {out_dir / BEST}, {out_dir / METRICS_LOG}")
    if d.enabled:
        # Every rank reaches teardown together: a rank that tore gloo down while rank 0 was still writing the
        # checkpoint once aborted on exit ("terminate called without an active exception", SIGABRT) in CI.
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
