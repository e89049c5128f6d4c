"""Bounded memory: a corpus of large and hostile images (tests/memload.py) sent 10 times to a real server, every
worker's RSS read during and after each pass; plus the pieces that bound it (decode budget, shrink, 16-bit path)
and the allocator settings every deployment must carry."""

from __future__ import annotations

import re
import threading
import time

import memload
import numpy as np
import pytest
import yaml
from PIL import Image
from serverproc import ALLOCATOR_ENV, REPO_ROOT

from serving.preprocess import DIGIT, IMAGENET, PixelBudget, _shrink, decode, to_8bit

pytestmark = pytest.mark.serial  # workers' RSS under large uploads: `make test` runs it alone

MIB = 1 << 20
PEAK_BOUND_MIB = 768  # per worker, any moment of any pass (docs/hardening.md: measured ~0.45 GB front, ~0.4 GB models)
# A leak climbs pass after pass: from the first pass to the last, RSS may not grow by more than this beyond its two
# largest single rises (catches ≥ 2.3 MiB a pass). A one-time step is not a leak: since each front worker listens on
# its own socket, both get the large uploads, and a worker may step by 57-69 MiB and then hold flat, at any pass (seen
# at passes 2, 4 and 6: 426 → 492 in CI; 442 → 500 and 436 → 505 here; no garbage cycle behind it, gc.DEBUG_SAVEALL;
# with the glibc settings of before and after the 8 MiB trim threshold), and once twice in a run (437 → 497 → 560).
GROWTH_SLACK_MIB = 16
STEPS_ALLOWED = 2


@pytest.mark.slow
def test_ten_passes_of_large_images_keep_every_worker_bounded_and_flat():
    h = memload.measure(passes=10, concurrency=4)
    for statuses in h["statuses"]:
        assert not [s for s in statuses if s.startswith("5")], statuses
        assert statuses.get("413 image_too_large") == 2, statuses  # the bomb, refused from its header, per model
        assert statuses.get("400 extreme_aspect_ratio") == 2, statuses  # the 1-pixel line, likewise
    report = []
    for name in h["warm"]:
        after = [p[name] / MIB for p in h["passes"]]
        peaks = [p[name] / MIB for p in h["peaks"]]
        report.append(f"{name}: warm {h['warm'][name] / MIB:.0f}, after passes {after[0]:.0f}..{max(after):.0f}, "
                      f"peak {max(peaks):.0f} MiB")
        assert max(peaks) <= PEAK_BOUND_MIB, report
        steps = sorted((max(b - a, 0.0) for a, b in zip(after, after[1:], strict=False)), reverse=True)
        assert after[-1] - after[0] - sum(steps[:STEPS_ALLOWED]) <= GROWTH_SLACK_MIB, (name, after)
    print("\n" + "; ".join(report))


def test_allocator_settings_are_set_wherever_the_server_starts():
    makefile = (REPO_ROOT / "Makefile").read_text()
    serve_env = dict(kv.split("=") for kv in re.search(r"^ALLOCATOR_ENV := (.*)$", makefile, re.M).group(1).split())
    assert serve_env == ALLOCATOR_ENV
    assert "$(ALLOCATOR_ENV) $(VENV)/bin/bentoml serve" in makefile
    for path in ["bentofile.yaml", "bentofile.gpu.yaml", "deploy/bentocloud.yaml"]:
        envs = {e["name"]: e["value"] for e in yaml.safe_load((REPO_ROOT / path).read_text())["envs"]}
        assert ALLOCATOR_ENV.items() <= envs.items(), path
    for path in sorted((REPO_ROOT / "deploy" / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    env = {e["name"]: e.get("value") for e in c.get("env", [])}
                    assert ALLOCATOR_ENV.items() <= env.items(), (path, c["name"])


def test_pixel_budget_never_lets_decodes_exceed_it():
    budget = PixelBudget(100)
    inside, peak, lock = [0], [0], threading.Lock()

    def decode_like(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                inside[0] += min(pixels, 100)
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= min(pixels, 100)

    threads = [threading.Thread(target=decode_like, args=(p,)) for p in [60, 60, 30, 500, 10, 90] * 5]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert peak[0] <= 100 and budget.free == 100  # an image over the whole budget waited for all of it, then ran


@pytest.mark.parametrize(("size", "recipe", "expected"), [
    ((6000, 4000), IMAGENET, (750, 500)),  # /8 is the most; shorter side still >= 256
    ((1200, 800), IMAGENET, (600, 400)),  # /2 keeps >= 256, /4 would not
    ((500, 375), IMAGENET, (500, 375)),  # small pictures are untouched: bit-exact with torchvision's path
    ((1000, 1000), DIGIT, (125, 125)),  # digits need 80 px (the box of 20, four times over)
])
def test_shrink_reduces_like_jpeg_draft(size, recipe, expected):
    assert _shrink(Image.new("RGB", size), recipe).size == expected


def test_sixteen_bit_lookup_equals_the_float_formula():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(to_8bit(Image.fromarray(values)))
    want = np.clip(np.rint(values.astype(np.float64) * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    assert np.array_equal(got, want)


def test_large_rgba_png_decodes_reduced_and_composited():
    big = memload.corpus()[1][1]  # 6000x6000 RGBA PNG
    im = decode(big, IMAGENET)
    assert im.mode == "RGB" and im.size == (750, 750)
