"""Real (short) training runs on the committed MNIST sample: learning, checkpoints, exact resume, dry runs, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from imagegen import photo

from training.data import mnist_dataset
from training.models import UInt8Input, build_model, recipe_for
from training.train import Dist, ShardSampler, batch_loader, evaluate, main, parse_args, train

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "tests" / "data" / "mnist-sample"
TIMING_KEYS = {"train_seconds", "epoch_seconds", "images_per_second"}


# One thread: these batches are tiny, and on a busy 2-core machine two OpenMP threads mostly wait for each other.
def lenet_args(out: Path, *extra: str) -> list[str]:
    return ["--model", "lenet5", "--data-dir", str(SAMPLE), "--output-dir", str(out), "--batch-size", "32",
            "--cache-dir", "", "--no-progress", "--threads", "1", "--val-holdout", "0", *extra]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """train() sets torch's thread count for the process; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    """Five epochs of LeNet-5 on the 500-digit sample (a few seconds)."""
    out = tmp_path_factory.mktemp("runs") / "lenet5"
    train(parse_args(lenet_args(out, "--epochs", "5", "--lr", "0.05")))
    return out


def test_short_run_learns(short_run):
    log = read_log(short_run)
    assert [m["epoch"] for m in log] == [1, 2, 3, 4, 5]
    assert log[-1]["train_loss"] < 0.6 * log[0]["train_loss"]
    assert log[-1]["val_top1"] > 70.0  # 10% is chance; 500 training digits, 5 epochs
    assert all(m["val_images"] == 300 and m["val_split"] == "test" for m in log)
    assert all(0 <= m["val_top1"] <= m["val_top5"] <= 100 for m in log)
    assert abs(log[-1]["val_error"] - (100 - log[-1]["val_top1"])) < 1e-3


def test_checkpoints_load_with_weights_only_and_rebuild_the_net(short_run):
    log = read_log(short_run)
    ckpt = torch.load(short_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    best = torch.load(short_run / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 5 and ckpt["metrics"] == log[-1]
    best_epoch = max(log, key=lambda m: m["val_top1"])["epoch"]  # first epoch with the highest top-1
    assert best["epoch"] == best_epoch and best["metrics"]["val_top1"] == ckpt["metrics"]["best_val_top1"]
    for key in ("model", "optimizer", "scheduler", "epoch", "args", "metrics", "rng"):
        assert key in ckpt
    assert {"torch", "numpy", "python"} <= set(ckpt["rng"])
    a = ckpt["args"]
    assert (a["model"], a["activation"], a["dropout"], a["num_classes"]) == ("lenet5", "relu", 0.0, 10)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    net = build_model(a["model"], a["num_classes"], a["activation"], a["dropout"])
    net.load_state_dict(best["model"], strict=True)
    # The reloaded net scores exactly what the run logged for that epoch, through the same uint8 input tail.
    val = mnist_dataset(SAMPLE, "test")
    loader = batch_loader(val, ShardSampler(len(val), 0, 1), 100)
    tail = UInt8Input(recipe_for("lenet5").mean, recipe_for("lenet5").std)
    scores = evaluate(net, tail, loader, torch.device("cpu"), Dist(), use_amp=False)
    assert scores["val_top1"] == best["metrics"]["val_top1"]


def test_exporter_reads_the_checkpoint(short_run):
    from training.export import load_checkpoint

    net, ckpt = load_checkpoint(short_run / "best.pt")
    assert ckpt["args"]["model"] == "lenet5" and sum(p.numel() for p in net.parameters()) == 61706


def test_resume_is_exact(tmp_path):
    """2 epochs straight == 1 epoch, stop, resume for 1 more: bit-identical weights, optimizer and log."""
    extra = ("--epochs", "2", "--dropout", "0.3", "--lr", "0.05", "--seed", "7")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(parse_args(lenet_args(straight, *extra)))
    train(parse_args(lenet_args(resumed, *extra, "--stop-after", "1")))
    assert read_log(resumed)[-1]["epoch"] == 1
    train(parse_args(lenet_args(resumed, *extra, "--resume", str(resumed / "checkpoint.pt"))))
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    strip = lambda log: [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in log]  # noqa: E731
    assert strip(read_log(straight)) == strip(read_log(resumed))
    # A different seed is a different run (so the equality above is not vacuous).
    other = tmp_path / "other"
    train(parse_args(lenet_args(other, "--epochs", "1", "--dropout", "0.3", "--lr", "0.05", "--seed", "8")))
    c = torch.load(other / "checkpoint.pt", weights_only=True)
    assert not torch.equal(c["model"]["features.0.weight"], a["model"]["features.0.weight"])


def test_resume_refuses_another_architecture_or_schedule(short_run, tmp_path):
    args = parse_args(lenet_args(tmp_path / "x", "--epochs", "6", "--activation", "tanh",
                                 "--resume", str(short_run / "checkpoint.pt")))
    with pytest.raises(SystemExit, match="activation='relu'"):
        train(args)
    longer = parse_args(lenet_args(tmp_path / "y", "--epochs", "8", "--resume", str(short_run / "checkpoint.pt")))
    with pytest.raises(SystemExit, match="onecycle schedule spans 5 epochs; resume with --epochs 5"):
        train(longer)


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(lenet_args(out, "--dry-run")) == 0
    printed = capsys.readouterr().out
    assert "plan: epochs 1-20" in printed and "onecycle" in printed and "writing nothing (dry run)" in printed
    assert "dry run OK: lenet5 would train 20 epochs" in printed
    assert not out.exists()


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", "lenet5", "--data-dir", str(tmp_path), "--dry-run", "--no-progress"]) == 2
    assert "no train-images-idx3-ubyte[.gz]" in capsys.readouterr().err


def test_alexnet_dry_run_on_an_image_folder(tmp_path):
    """The ImageNet path end to end: folder scan, random-resized-crop batches, serving val preprocessing, AlexNet."""
    for split, n in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(("n01440764", "n01443537")):
            (tmp_path / split / wnid).mkdir(parents=True)
            for k in range(n):
                (tmp_path / split / wnid / f"{k}.JPEG").write_bytes(photo(300 + 40 * k, 260, seed=10 * c + k))
    metrics = train(parse_args(["--model", "alexnet", "--data-dir", str(tmp_path), "--batch-size", "2",
                                "--workers", "0", "--dry-run", "--no-progress", "--output-dir", str(tmp_path / "o")]))
    assert metrics["val_images"] == 4 and np.isfinite(metrics["train_loss"])
    assert not (tmp_path / "o").exists()


def test_torchrun_two_processes_on_cpu(tmp_path):
    """DDP with gloo, 2 ranks: one checkpoint without "module.", validation counted once across the shards."""
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "training.train",
                           *lenet_args(out, "--epochs", "1", "--cache-dir", str(tmp_path / "c"))],
                          cwd=REPO, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and proc.stdout.count("epoch 1/1:") == 1  # only rank 0 reports
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    log = read_log(out)
    assert len(log) == 1 and log[0]["val_images"] == 300
    # The all-reduced top-1 equals a single-process evaluation of the saved weights.
    net = build_model("lenet5", 10)
    net.load_state_dict(ckpt["model"])
    val = mnist_dataset(SAMPLE, "test")
    tail = UInt8Input(recipe_for("lenet5").mean, recipe_for("lenet5").std)
    scores = evaluate(net, tail, batch_loader(val, ShardSampler(300, 0, 1), 64), torch.device("cpu"), Dist(), False)
    assert abs(scores["val_top1"] - log[0]["val_top1"]) < 1e-9


def test_validation_holds_out_training_digits_and_leaves_the_test_set_unseen(tmp_path):
    """best.pt is chosen on digits held out of the training set, so the test error the card reports is unbiased.

    Proven by what training could see: two seeded runs on data that differ ONLY in the last 100 training digits
    (replaced by other digits with other labels) and in the whole test split must end with bit-identical weights
    when those 100 are held out, and must not when they are not."""
    from training.mnist import MNIST_SPLITS, find_idx_file, load_mnist, write_idx

    train_images, train_labels = load_mnist(SAMPLE, "train")
    test_images, test_labels = load_mnist(SAMPLE, "test")
    altered = tmp_path / "altered"
    altered.mkdir()
    swapped_images, swapped_labels = train_images.copy(), train_labels.copy()
    swapped_images[-100:] = test_images[:100]
    swapped_labels[-100:] = (train_labels[-100:] + 1) % 10
    new_test_images = np.ascontiguousarray(test_images[::-1])
    for split, images, labels in (("train", swapped_images, swapped_labels), ("test", new_test_images,
                                                                                test_labels[::-1])):
        images_stem, labels_stem = MNIST_SPLITS[split]
        write_idx(altered / find_idx_file(SAMPLE, images_stem).name, images, 2051)
        write_idx(altered / find_idx_file(SAMPLE, labels_stem).name, labels, 2049)

    def weights(data_dir: Path, name: str, holdout: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        args = lenet_args(out, "--epochs", "1", "--lr", "0.05", "--val-holdout", holdout, "--seed", "0")
        args[args.index("--data-dir") + 1] = str(data_dir)
        train(parse_args(args))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        if holdout != "0":
            assert metrics[-1]["val_split"] == f"train holdout (last {holdout})" and metrics[-1]["val_images"] == 100
        return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]

    held = weights(SAMPLE, "held", "100"), weights(altered, "held-altered", "100")
    assert all(torch.equal(held[0][k], held[1][k]) for k in held[0]), "held-out or test digits reached training"
    used = weights(SAMPLE, "used", "0"), weights(altered, "used-altered", "0")
    assert not all(torch.equal(used[0][k], used[1][k]) for k in used[0])  # the altered digits do matter when used
