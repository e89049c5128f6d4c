"""The article's claims, measured on real MNIST with our own models: four figures and one results.json.

    python -m training.experiments --data-dir ../shared/data/mnist --out docs/experiments          # make experiments
    python -m training.experiments --data-dir ../shared/data/mnist --out /tmp/exp --quick          # CI, ~1 min

1. gradients.png  per-layer weight-gradient norm of a deep plain network (8 and 16 layers; sigmoid, tanh, ReLU) at
                  initialisation and after a few hundred SGD steps on MNIST; first-layer/last-layer ratio of each.
2. training.png   LeNet-5 and the 8-layer plain net, sigmoid vs tanh vs ReLU, same optimiser and step budget: training
                  loss and test error vs steps.
3. dropout.png    an over-parameterised net (AlexNet's wide fully-connected head, on the pixels) on a small MNIST
                  subset, dropout p=0 vs p=0.5, several seeds: train/test error curves and the final gap.
4. inference.png  the trained p=0.5 model's outputs: repeated train-mode runs scatter, eval() and the exported ONNX
                  (the exporter's own checks: training.export.check_export) give one value.

Everything is seeded; inputs go through the serving digit preprocessing and the `UInt8Input` tail like `make
train-lenet`'s, so the numbers describe the same pipeline the service runs. Flat on purpose: one file, read top down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from serving.preprocess import DIGIT
from serving.runtime import OnnxModel
from training.data import cached_digit_inputs, load_mnist
from training.export import check_export, deployable, export_onnx
from training.models import LeNet5, activation, count_parameters

ACTS = ("sigmoid", "tanh", "relu")
COLORS = {"sigmoid": "tab:red", "tanh": "tab:orange", "relu": "tab:blue", 0.0: "tab:red", 0.5: "tab:blue"}


@dataclass(frozen=True)
class Budget:
    """How much of each experiment to run. FULL is `make experiments`; QUICK is what CI runs and asserts on."""

    train_digits: int = 60_000  # the training pool batches are drawn from (experiments 1 and 2)
    test_digits: int = 10_000  # test digits every error is measured on
    batch_size: int = 64
    lr: float = 0.01  # SGD, momentum 0.9, no weight decay, for every model: the activation is the only change
    plain_width: int = 128
    grad_depths: tuple[int, ...] = (8, 16)
    grad_steps: int = 300
    speed_steps: int = 1000
    speed_acts: tuple[str, ...] = ACTS
    eval_every: int = 100
    overfit_digits: int = 1000  # the small subset experiment 3 trains on
    overfit_epochs: int = 50
    overfit_batch: int = 50
    overfit_lr: float = 0.02  # SGD, momentum 0.9, no weight decay, the same with and without dropout
    overfit_eval_every: int = 5  # epochs
    overfit_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    dropout_ps: tuple[float, ...] = (0.0, 0.5)
    head_width: int = 1024
    inference_digits: int = 8
    inference_runs: int = 50


FULL = Budget()
# The same models and optimiser, less of everything. Experiment 3 keeps its 1,000 digits (the committed sample has 500,
# and then uses them all) and stops at epoch 20, where dropout's advantage has already appeared in the full run.
QUICK = Budget(train_digits=5_000, test_digits=2_000, grad_steps=50, speed_steps=200, speed_acts=("sigmoid", "relu"),
               eval_every=50, overfit_epochs=20, overfit_seeds=(0, 1, 2),
               inference_runs=30)


# ---------------------------------------------------------------------------------------------------------------
# Data and models


@dataclass
class Digits:
    images: torch.Tensor  # uint8 (N, 32, 32, 1): what the service's digit preprocessing makes of each MNIST digit
    labels: torch.Tensor  # int64 (N,)


def load_digits(data_dir: Path, split: str, limit: int, cache_dir: Path | None) -> Digits:
    images, labels = load_mnist(data_dir, split)
    images, labels = images[:limit], labels[:limit]
    inputs = cached_digit_inputs(images, cache_dir)
    return Digits(torch.from_numpy(inputs), torch.from_numpy(labels.astype(np.int64)))


def plain_net(depth: int, act: str, width: int) -> nn.Module:
    """`depth` fully-connected layers, no normalisation, no shortcuts: the setting where activations decide.

    Each activation gets its own textbook initialisation (kaiming_normal_ with torch's gain for it: √2 ReLU, 5/3
    tanh, 1 sigmoid), so what vanishes is the activation's doing, not a bad scale chosen for it.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    features = DIGIT.size * DIGIT.size
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), activation(act)]
        features = width
    layers.append(nn.Linear(features, 10))
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity=act)
            nn.init.zeros_(m.bias)
    return deployable(nn.Sequential(*layers), DIGIT)


def wide_head_net(p: float, width: int) -> nn.Module:
    """AlexNet's classifier head, scaled to MNIST: Dropout, FC, ReLU, Dropout, FC, ReLU, FC, straight on the 32×32
    pixels. With width 1024 that is 2.1 M weights for 1,000 training digits: built to over-fit.

    No conv trunk on purpose: a first full run with LeNet-5's conv trunk under this head (1.2 M parameters) measured
    the same test error with and without dropout (5.56% vs 5.55%, 5 seeds): the trunk's weight sharing already
    regularises, and AlexNet's dropout sat in the head, where its parameters were (58 M of 61 M).
    """
    head = nn.Sequential(
        nn.Flatten(),
        nn.Dropout(p), nn.Linear(DIGIT.size * DIGIT.size, width), nn.ReLU(inplace=True),
        nn.Dropout(p), nn.Linear(width, width), nn.ReLU(inplace=True),
        nn.Linear(width, 10),
    )
    return deployable(head, DIGIT)


def lenet(act: str) -> nn.Module:
    return deployable(LeNet5(activation_name=act), DIGIT)


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# ---------------------------------------------------------------------------------------------------------------
# Training and measuring


def batch_indices(n: int, batch_size: int, seed: int):
    """Endless seeded reshuffles of range(n), cut into full batches."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, data: Digits, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, top-1 error) in eval mode (dropout off), then back to train mode."""
    model.eval()
    loss, wrong = 0.0, 0
    for i in range(0, len(data.labels), batch_size):
        logits = model(data.images[i:i + batch_size])
        y = data.labels[i:i + batch_size]
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        wrong += int((logits.argmax(1) != y).sum())
    model.train()
    n = len(data.labels)
    return loss / n, wrong / n


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, data: Digits, batches, steps: int) -> list[float]:
    """`steps` SGD steps; → the training loss of each step."""
    model.train()
    losses = []
    for _ in range(steps):
        idx = next(batches)
        loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def layer_grad_norms(model: nn.Module, probe: Digits) -> list[float]:
    """‖∂loss/∂W‖ of every fully-connected layer, first to last, on one fixed batch of real digits."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(probe.images), probe.labels).backward()
    norms = [m.weight.grad.norm().item() for m in linear_layers(model)]
    model.zero_grad(set_to_none=True)
    return norms


def spread(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


# ---------------------------------------------------------------------------------------------------------------
# 1. Vanishing gradients


def exp_gradients(b: Budget, train: Digits, test: Digits, log) -> dict:
    probe = Digits(train.images[:256], train.labels[:256])
    out: dict = {"probe_batch": 256, "steps": b.grad_steps, "width": b.plain_width, "by_depth": {}}
    for depth in b.grad_depths:
        per_act = {}
        for act in ACTS:
            torch.manual_seed(0)
            model = plain_net(depth, act, b.plain_width)
            at_init = layer_grad_norms(model, probe)
            train_steps(model, sgd(model, b.lr), train, batch_indices(len(train.labels), b.batch_size, 0),
                        b.grad_steps)
            trained = layer_grad_norms(model, probe)
            _, err = evaluate(model, test)
            per_act[act] = {"init": at_init, "trained": trained,
                            "first_over_last_init": at_init[0] / at_init[-1],
                            "first_over_last_trained": trained[0] / trained[-1],
                            "test_error_after": err}
            log(f"  gradients depth {depth:2d} {act:7s}: first/last at init {at_init[0] / at_init[-1]:.2e}, "
                f"after {b.grad_steps} steps {trained[0] / trained[-1]:.2e}, test error {err:.1%}")
        for act in ACTS:  # the claim: sigmoid's first layer gets a tiny share of the gradient ReLU's first layer gets
            per_act[act]["first_over_last_init_vs_relu"] = (per_act[act]["first_over_last_init"]
                                                            / per_act["relu"]["first_over_last_init"])
        out["by_depth"][str(depth)] = per_act
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Training speed


def exp_training(b: Budget, train: Digits, test: Digits, log) -> dict:
    depth = min(b.grad_depths)
    makers = {"lenet5": lenet, f"plain{depth}": lambda act: plain_net(depth, act, b.plain_width)}
    out: dict = {"steps": b.speed_steps, "batch_size": b.batch_size, "lr": b.lr, "models": {}}
    for name, make in makers.items():
        out["models"][name] = {}
        for act in b.speed_acts:
            torch.manual_seed(0)
            model = make(act)
            opt = sgd(model, b.lr)
            batches = batch_indices(len(train.labels), b.batch_size, 0)
            steps, train_loss, test_loss, test_error = [0], [], [], []
            tl, te = evaluate(model, test)
            test_loss.append(tl)
            test_error.append(te)
            train_loss.append(tl)  # step 0: nothing trained yet; the test loss stands for both
            while steps[-1] < b.speed_steps:
                losses = train_steps(model, opt, train, batches, b.eval_every)
                steps.append(steps[-1] + b.eval_every)
                train_loss.append(float(np.mean(losses)))  # mean over the last eval_every steps
                tl, te = evaluate(model, test)
                test_loss.append(tl)
                test_error.append(te)
            out["models"][name][act] = {"steps": steps, "train_loss": train_loss, "test_loss": test_loss,
                                        "test_error": test_error, "final_test_error": test_error[-1],
                                        "parameters": count_parameters(model)}
            log(f"  training {name:8s} {act:7s}: test error after {b.speed_steps} steps {test_error[-1]:.2%}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 3. Over-fitting and dropout


def exp_dropout(b: Budget, train: Digits, test: Digits, log) -> tuple[dict, nn.Module]:
    small = Digits(train.images[:b.overfit_digits], train.labels[:b.overfit_digits])
    steps_per_epoch = b.overfit_digits // b.overfit_batch
    out: dict = {"train_digits": b.overfit_digits, "epochs": b.overfit_epochs, "batch_size": b.overfit_batch,
                 "lr": b.overfit_lr, "head_width": b.head_width, "seeds": list(b.overfit_seeds),
                 "parameters": count_parameters(wide_head_net(0.0, b.head_width)), "by_p": {}}
    keep = None
    for p in b.dropout_ps:
        runs = []
        for seed in b.overfit_seeds:
            torch.manual_seed(seed)
            model = wide_head_net(p, b.head_width)
            opt = sgd(model, b.overfit_lr)
            batches = batch_indices(len(small.labels), b.overfit_batch, seed)
            run = {"seed": seed, "epochs": [], "train_error": [], "test_error": [], "train_loss": [], "test_loss": []}
            for epoch in range(b.overfit_eval_every, b.overfit_epochs + 1, b.overfit_eval_every):
                train_steps(model, opt, small, batches, steps_per_epoch * b.overfit_eval_every)
                trl, tre = evaluate(model, small)
                tel, tee = evaluate(model, test)
                for k, v in (("epochs", epoch), ("train_error", tre), ("test_error", tee), ("train_loss", trl),
                             ("test_loss", tel)):
                    run[k].append(v)
            run["gap"] = run["test_error"][-1] - run["train_error"][-1]
            runs.append(run)
            log(f"  dropout p={p} seed {seed}: train error {run['train_error'][-1]:.2%}, "
                f"test error {run['test_error'][-1]:.2%}, test loss {run['test_loss'][-1]:.3f}")
            if p == max(b.dropout_ps) and keep is None:
                keep = model
        out["by_p"][str(p)] = {
            "runs": runs,
            "final_train_error": spread([r["train_error"][-1] for r in runs]),
            "final_test_error": spread([r["test_error"][-1] for r in runs]),
            "final_gap": spread([r["gap"] for r in runs]),
            "final_test_loss": spread([r["test_loss"][-1] for r in runs]),
            "final_loss_gap": spread([r["test_loss"][-1] - r["train_loss"][-1] for r in runs]),
        }
    return out, keep


# ---------------------------------------------------------------------------------------------------------------
# 4. Dropout is off at inference


def exp_inference(b: Budget, model: nn.Module, test: Digits, workdir: Path, log) -> dict:
    """The exporter's own checks on the trained dropout model, plus the spread they guard against, made visible."""
    onnx_path = workdir / "dropout-model.onnx"
    export_onnx(model, DIGIT, onnx_path)
    report = check_export(model, DIGIT, onnx_path, test.images[:64].numpy())
    x = test.images[:b.inference_digits]
    y = test.labels[:b.inference_digits]

    def true_class_prob(logits: torch.Tensor) -> np.ndarray:
        return torch.softmax(logits, 1)[torch.arange(len(y)), y].numpy()

    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        train_runs = np.stack([true_class_prob(model(x)) for _ in range(b.inference_runs)])
        model.eval()
        eval_runs = np.stack([true_class_prob(model(x)) for _ in range(b.inference_runs)])
        eval_logits = model(x).numpy()
    session = OnnxModel(onnx_path, device="cpu")
    onnx_logits = [session.run(x.numpy()) for _ in range(b.inference_runs)]
    onnx_runs = np.stack([true_class_prob(torch.from_numpy(lg)) for lg in onnx_logits])
    out = {
        "digits": b.inference_digits, "runs": b.inference_runs, "labels": y.tolist(),
        "train_mode_prob": train_runs.T.tolist(), "eval_prob": eval_runs[0].tolist(),
        "onnx_prob": onnx_runs[0].tolist(),
        "train_mode_std_max": float(train_runs.std(0).max()),
        "train_mode_range_max": float((train_runs.max(0) - train_runs.min(0)).max()),
        "eval_repeats_identical": bool((eval_runs == eval_runs[0]).all()),
        "onnx_repeats_identical": bool(all(np.array_equal(lg, onnx_logits[0]) for lg in onnx_logits)),
        "onnx_vs_eval_max_abs_logit_diff": float(np.abs(onnx_logits[0] - eval_logits).max()),
        "export_check": {"dropout_nodes": report.dropout_nodes,
                         "train_mode_stochastic": report.train_mode_stochastic,
                         "max_abs_diff_random": report.max_abs_diff_random,
                         "max_abs_diff_real": report.max_abs_diff_real},
    }
    log(f"  inference: train-mode true-class probability varies by up to {out['train_mode_range_max']:.3f}; "
        f"eval repeats identical {out['eval_repeats_identical']}, ONNX repeats identical "
        f"{out['onnx_repeats_identical']}, ONNX vs eval max|Δlogit| {out['onnx_vs_eval_max_abs_logit_diff']:.1e}, "
        f"Dropout nodes in the graph {report.dropout_nodes}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Figures


def footer(fig, command: str) -> None:
    fig.text(0.01, 0.005, f"$ {command}", fontsize=7, family="monospace", color="0.35", ha="left", va="bottom")


def plot_gradients(res: dict, path: Path, command: str) -> None:
    import matplotlib.pyplot as plt

    depths = list(res["by_depth"])
    fig, axes = plt.subplots(len(depths), 2, figsize=(10, 3.6 * len(depths)), sharey="row", squeeze=False)
    for row, depth in enumerate(depths):
        for col, when in enumerate(("init", "trained")):
            ax = axes[row][col]
            for act, r in res["by_depth"][depth].items():
                norms = r[when]
                ratio = r[f"first_over_last_{'init' if when == 'init' else 'trained'}"]
                ax.semilogy(range(1, len(norms) + 1), norms, "o-", ms=3, color=COLORS[act],
                            label=f"{act}: first/last = {ratio:.1e}")
            title = "at initialisation" if when == "init" else f"after {res['steps']} SGD steps"
            ax.set_title(f"{depth}-layer plain net, {title}", fontsize=10)
            ax.set_xlabel("layer (1 = next to the input)")
            if col == 0:
                ax.set_ylabel("‖∂loss/∂W‖ (log scale)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Vanishing gradients: per-layer gradient norm on a batch of 256 real MNIST digits", fontsize=11)
    footer(fig, command)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training(res: dict, path: Path, command: str) -> None:
    import matplotlib.pyplot as plt

    models = list(res["models"])
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.5 * len(models)), squeeze=False)
    for row, name in enumerate(models):
        label = "LeNet-5" if name == "lenet5" else f"{name.removeprefix('plain')}-layer plain net"
        for act, r in res["models"][name].items():
            axes[row][0].plot(r["steps"], r["train_loss"], "-", color=COLORS[act], label=act)
            axes[row][1].semilogy(r["steps"], [max(e, 1e-3) for e in r["test_error"]], "o-", ms=3, color=COLORS[act],
                                  label=f"{act}: {r['final_test_error']:.1%}")
        axes[row][0].set_title(f"{label}: training loss (mean of each {res['steps'] // (len(r['steps']) - 1)} steps)",
                               fontsize=10)
        axes[row][0].set_ylabel("cross-entropy")
        axes[row][1].set_title(f"{label}: test error", fontsize=10)
        axes[row][1].set_ylabel("top-1 error (log scale)")
        axes[row][1].set_yticks([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0], ["1%", "2%", "5%", "10%", "20%", "50%", "100%"])
        axes[row][1].minorticks_off()
        axes[row][1].axhline(0.9, color="0.6", ls=":", lw=1)
        for ax in axes[row]:
            ax.set_xlabel(f"SGD step (batch {res['batch_size']}, lr {res['lr']}, momentum 0.9)")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("Same model, same optimiser, same budget: only the activation differs (dotted: chance, 90%)",
                 fontsize=11)
    footer(fig, command)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_dropout(res: dict, path: Path, command: str) -> None:
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    for p, r in res["by_p"].items():
        color = COLORS[float(p)]
        epochs = r["runs"][0]["epochs"]
        for key, style in (("train_error", "--"), ("test_error", "-")):
            curves = np.array([run[key] for run in r["runs"]]) * 100
            ax.plot(epochs, curves.mean(0), style, color=color,
                    label=f"p={p} {key.replace('_error', '')} (mean of {len(r['runs'])} seeds)")
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=color, alpha=0.2, lw=0)
    ax.set_xlabel(f"epoch over {res['train_digits']} training digits")
    ax.set_ylabel("top-1 error, % (band: min–max over seeds)")
    ax.set_title("Train (dashed) and test (solid) error", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    labels = []
    for i, (p, r) in enumerate(res["by_p"].items()):
        color = COLORS[float(p)]
        for j, key in enumerate(("final_train_error", "final_test_error", "final_gap")):
            values = np.array(r[key]["values"]) * 100
            x = j * 3 + i
            bx.bar(x, values.mean(), color=color, alpha=0.35, width=0.8)
            bx.plot(np.full(len(values), x), values, "o", color=color, ms=4)
            bx.text(x, values.max(), f"{values.mean():.2f}", ha="center", va="bottom", fontsize=8)
        labels.append(f"p={p}")
    bx.set_xticks([0.5, 3.5, 6.5], ["train error", "test error", "gap (test − train)"])
    bx.set_ylabel("%, at the last epoch (dots: seeds)")
    bx.set_title("Final errors: " + " vs ".join(f"{lb} ({c.removeprefix('tab:')})" for lb, c in
                                                 zip(labels, ("tab:red", "tab:blue"), strict=False)), fontsize=10)
    bx.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Over-fitting: {res['parameters'] / 1e6:.1f} M parameters, {res['train_digits']} MNIST digits, "
                 "dropout off vs on", fontsize=11)
    footer(fig, command)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_inference(res: dict, path: Path, command: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    rng = np.random.default_rng(0)
    for i, probs in enumerate(res["train_mode_prob"]):
        ax.plot(i + rng.uniform(-0.15, 0.15, len(probs)), probs, ".", color="tab:red", alpha=0.5, ms=5,
                label=f"train mode, {res['runs']} runs" if i == 0 else None)
    n = len(res["labels"])
    ax.plot(range(n), res["eval_prob"], "_", color="black", ms=22, mew=2,
            label=f"eval(), {res['runs']} runs (identical: {res['eval_repeats_identical']})")
    ax.plot(range(n), res["onnx_prob"], "x", color="tab:blue", ms=8, mew=2,
            label=f"exported ONNX, {res['runs']} runs (identical: {res['onnx_repeats_identical']})")
    ax.set_xticks(range(n), [f"#{i}: '{d}'" for i, d in enumerate(res["labels"])], fontsize=8)
    ax.set_xlabel("MNIST test digit (true class)")
    ax.set_ylabel("probability of the true class")
    ax.set_title(f"Dropout p=0.5 is on in training, off at inference: ONNX vs eval() max|Δlogit| "
                 f"{res['onnx_vs_eval_max_abs_logit_diff']:.0e}, Dropout nodes {res['export_check']['dropout_nodes']}",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    footer(fig, command)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_all(results: dict, out: Path) -> None:
    """Every figure from results.json alone, footed with the command that measured it."""
    for name, plot in (("gradients", plot_gradients), ("training", plot_training), ("dropout", plot_dropout),
                       ("inference", plot_inference)):
        plot(results[name], out / f"{name}.png", results["command"])


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data/mnist"),
                   help="MNIST IDX files (tests/data/mnist-sample works too: 500 train, 300 test digits)")
    p.add_argument("--out", type=Path, default=Path("docs/experiments"), help="where the PNGs and results.json go")
    p.add_argument("--quick", action="store_true", help="the CI budget (~1 min on 2 cores) instead of the full run")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the figures from OUT/results.json without training anything")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 by default: on a shared 2-core machine two threads ran 20x slower")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"),
                   help="preprocessed digits are cached here ('' disables)")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    if args.plot_only:
        plot_all(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # saturated sigmoid nets make denormal gradients, which are slow on x86
    budget = QUICK if args.quick else FULL
    cache_dir = args.cache_dir if str(args.cache_dir) else None
    command = "python -m training.experiments " + shlex.join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    train = load_digits(args.data_dir, "train", budget.train_digits, cache_dir)
    test = load_digits(args.data_dir, "test", budget.test_digits, cache_dir)
    log(f"data: {len(train.labels)} training and {len(test.labels)} test digits from {args.data_dir}")
    if len(train.labels) < budget.overfit_digits:
        budget = Budget(**{**asdict(budget), "overfit_digits": len(train.labels) // budget.overfit_batch
                           * budget.overfit_batch})
    results: dict = {
        "command": command, "quick": args.quick, "budget": asdict(budget),
        "data": {"dir": str(args.data_dir), "train_digits": len(train.labels), "test_digits": len(test.labels),
                 "preprocessing": "serving.preprocess DIGIT (crop to ink, fit 20x20, centre of mass, pad to 32x32)"},
        "machine": {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
                    "python": platform.python_version()},
        "wall_s": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    results["gradients"] = exp_gradients(budget, train, test, log)
    results["wall_s"]["gradients"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    results["training"] = exp_training(budget, train, test, log)
    results["wall_s"]["training"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    results["dropout"], dropout_model = exp_dropout(budget, train, test, log)
    results["wall_s"]["dropout"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results["inference"] = exp_inference(budget, dropout_model, test, Path(tmp), log)
    results["wall_s"]["inference"] = round(time.perf_counter() - t, 1)
    results["wall_s"]["total"] = round(time.perf_counter() - t_start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_all(results, args.out)
    log(f"wrote {args.out}/{{gradients,training,dropout,inference}}.png and results.json "
        f"in {results['wall_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
