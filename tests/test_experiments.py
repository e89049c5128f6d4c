"""`make experiments`' story, asserted on a fresh `--quick` run: if a change breaks a claim, the build fails.

The run uses full MNIST when it is there (MNIST_DIR, else ../shared/data/mnist next to the repository, as CI has it)
and the committed 500/300-digit sample otherwise; the thresholds hold on both, with margin (docs/experiments.md lists
what the runs measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "mnist-sample"
FIGURES = ("gradients", "training", "dropout", "inference")
RUN_TIMEOUT_S = 1200  # ~1 min on an idle 2-core machine; CI's machine is shared, so the bound is generous


def mnist_dir() -> Path:
    candidates = [Path(os.environ["MNIST_DIR"])] if os.environ.get("MNIST_DIR") else []
    candidates.append(REPO.parent / "shared" / "data" / "mnist")
    for path in candidates:
        if (path / "t10k-labels-idx1-ubyte.gz").is_file() or (path / "t10k-labels-idx1-ubyte").is_file():
            return path
    return SAMPLE


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("experiments")
    data_dir = mnist_dir()
    cmd = [sys.executable, "-m", "training.experiments", "--quick", "--data-dir", str(data_dir), "--out", str(out),
           "--cache-dir", str(out / "cache")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    print(f"experiments --quick on {data_dir} ({results['data']['train_digits']} train, "
          f"{results['data']['test_digits']} test digits) in {results['wall_s']['total']} s")
    return out, results


def test_every_figure_is_written_with_its_command(quick):
    out, results = quick
    for name in FIGURES:
        path = out / f"{name}.png"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width >= 600 and im.height >= 250, (name, im.size)
        assert path.stat().st_size < 300_000, (name, path.stat().st_size)
    assert results["quick"] is True and "--quick" in results["command"]
    assert set(results["wall_s"]) == {*FIGURES, "total"}


def test_sigmoid_gradients_vanish_where_relu_keeps_them(quick):
    """Claim 1: in a deep plain net, sigmoid's first layer gets ≥100× less of the gradient (relative to the last
    layer) than ReLU's. --quick measured 1.5e-4 (8 layers) and 2.4e-9 (16 layers) against ReLU's 1.5 and 1.8."""
    by_depth = quick[1]["gradients"]["by_depth"]
    assert set(by_depth) == {"8", "16"}
    for depth, acts in by_depth.items():
        relu, sigmoid = acts["relu"], acts["sigmoid"]
        assert len(relu["init"]) == int(depth)  # one norm per fully-connected layer
        for when in ("init", "trained"):
            ratio = f"first_over_last_{when}"
            assert 0.05 < relu[ratio] < 20, (depth, when, relu[ratio])  # alive: within ~an order of magnitude
            assert sigmoid[ratio] < relu[ratio] / 100, (depth, when, sigmoid[ratio], relu[ratio])
    # and it compounds with depth: the 16-layer sigmoid net is far worse off than the 8-layer one
    assert by_depth["16"]["sigmoid"]["first_over_last_init"] < by_depth["8"]["sigmoid"]["first_over_last_init"] / 1e3


def test_relu_trains_where_sigmoid_stalls(quick):
    """Claim 2: same model, optimiser and steps; the 8-layer sigmoid net stays at chance, ReLU learns; LeNet-5 with
    ReLU is ahead of sigmoid after the same budget."""
    models = quick[1]["training"]["models"]
    plain = models["plain8"]
    assert plain["sigmoid"]["final_test_error"] > 0.8  # chance is 0.9
    assert plain["relu"]["final_test_error"] < 0.3
    lenet = models["lenet5"]
    assert lenet["relu"]["final_test_error"] < 0.3
    assert lenet["relu"]["final_test_error"] < lenet["sigmoid"]["final_test_error"] - 0.3
    for runs in models.values():
        for run in runs.values():
            assert len(run["steps"]) == len(run["train_loss"]) == len(run["test_error"])


def test_dropout_lowers_test_error_and_narrows_the_gap(quick):
    """Claim 3: the over-parameterised head memorises its 1,000 digits; dropout lowers the mean test error, the test
    loss and the train/test gap. Modest, not the issue's "gap halved": --quick measured test error 15.2% → 13.5%,
    test loss ×0.80, gap ×0.86 (3 seeds); the thresholds sit about halfway to no effect. The 500-digit sample is too
    small and noisy for the error claims (500 digits, 300 test digits; measured there: test error 15.0% vs 15.1%, no
    effect, gap ×0.99), so on it only the test loss, the steadiest of the three (×0.92 there), is asserted."""
    results = quick[1]
    by_p = results["dropout"]["by_p"]
    off, on = by_p["0.0"], by_p["0.5"]
    assert off["final_train_error"]["max"] < 0.02  # p=0 memorises its training digits
    if results["dropout"]["train_digits"] < 1000:  # the committed sample: see the docstring
        assert on["final_test_loss"]["mean"] < 0.97 * off["final_test_loss"]["mean"]
        return
    assert on["final_test_error"]["mean"] < off["final_test_error"]["mean"] - 0.008
    assert on["final_test_loss"]["mean"] < 0.90 * off["final_test_loss"]["mean"]
    assert on["final_gap"]["mean"] < 0.93 * off["final_gap"]["mean"]


def test_dropout_is_off_at_inference(quick):
    """Claim 4: train mode scatters, eval() and the exported ONNX repeat exactly and agree (the exporter's checks)."""
    inf = quick[1]["inference"]
    assert inf["train_mode_range_max"] > 0.01
    assert inf["eval_repeats_identical"] and inf["onnx_repeats_identical"]
    assert inf["onnx_vs_eval_max_abs_logit_diff"] <= 1e-4
    check = inf["export_check"]
    assert check["dropout_nodes"] == 0 and check["train_mode_stochastic"] is True
    assert max(check["max_abs_diff_random"], check["max_abs_diff_real"]) <= 1e-4
