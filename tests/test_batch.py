"""The batch CLI on real files with the real LeNet-5 (and once AlexNet): listing, errors, resume, CSV, eval, and
agreement with the running service."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import imagegen
import numpy as np
import psutil
import pytest

from loadtests.images import mnist_sample, photo_jpegs
from serving import batch
from serving.inputs import iglob_sorted, iter_inputs, read_input
from serving.registry import DEFAULT_MODELS_DIR, read_card

REPO_ROOT = Path(__file__).resolve().parent.parent
LENET = "lenet5"


# ---------------------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """The committed MNIST test sample as image files in digit folders: <root>/<digit>/<n>.png (some as JPEG, some
    dark ink on light paper, some enlarged), the layout --eval reads."""
    root = tmp_path_factory.mktemp("digits")
    images, labels = mnist_sample()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(exist_ok=True)
        fmt = "JPEG" if i % 5 == 4 else "PNG"
        data = imagegen.digit_png(image, dark_on_light=i % 3 == 1, scale=2 if i % 4 == 0 else 1, fmt=fmt)
        (folder / f"{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(data)
    return root


def cli(*args: str, stdin: str | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m serving.batch ...` as a real subprocess."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.run([sys.executable, "-m", "serving.batch", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd or REPO_ROOT, env=env, timeout=timeout)


def test_null_separated_lists_take_names_with_newlines_whole(tmp_path: Path):
    """--null: stdin and @list files as `find -print0` writes them. A name may hold a newline or bytes that are
    not UTF-8; it is one path, read as the bytes arrive, and reported as it was given."""
    seven = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
    names = [b"seven\nlines.png", b"plain.png", b"latin-1 \xe9.png"]
    for name in names:
        (tmp_path.joinpath(os.fsdecode(name))).write_bytes(seven)
    listing = tmp_path / "list0"
    listing.write_bytes(b"\0".join([*names[:2], b"", b"gone.png"]))  # an empty record is skipped
    # run from tmp_path, so that the names are given as they are (relative, as find prints them)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-m", "serving.batch", "-", f"@{listing}", "--null", "--model", LENET,
                        "--top-k", "1", "--models-dir", str(REPO_ROOT / "models")],
                       input=b"\0".join(names) + b"\0", capture_output=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 1, r.stderr  # the missing file fails; every other one is classified
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [os.fsencode(rec["path"]) for rec in records] == [*names, *names[:2], b"gone.png"]
    assert [rec["predictions"][0]["label"] for rec in records[:5]] == ["7"] * 5
    assert records[5]["error"] == "unreadable_input"
    # A newline-separated list given with --null is one long "path" (a clear unreadable_input); one over 1 MiB with no
    # NUL is refused as a usage error instead of being held in memory.
    r = subprocess.run([sys.executable, "-m", "serving.batch", "--null", "-", "--model", LENET, "--models-dir",
                        str(REPO_ROOT / "models")], input=b"a" * (2 << 20), capture_output=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and b"without a NUL separator" in r.stderr, r.stderr


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n"), "the output must end with a complete line"
    return [json.loads(line) for line in text.splitlines()]


def assert_same_predictions(a: list[dict], b: list[dict], rel: float = 1e-5) -> None:
    """Same classes in the same order, scores equal up to float noise from different batch compositions."""
    assert [(p["index"], p["label"]) for p in a] == [(p["index"], p["label"]) for p in b]
    for pa, pb in zip(a, b, strict=True):
        assert pa["score"] == pytest.approx(pb["score"], rel=rel, abs=1e-7)


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys(), (ra, rb)
        if "predictions" in ra:
            assert_same_predictions(ra["predictions"], rb["predictions"])
        else:
            assert (ra["error"], ra["detail"]) == (rb["error"], rb["detail"])


def assert_same_csv_rows(a: Path, b: Path) -> None:
    """Every column of every row equal (scores up to float noise from different batch compositions)."""
    with open(a, newline="") as fa, open(b, newline="") as fb:
        rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for col in ra:
            if col.startswith("score_") and ra[col]:
                assert float(ra[col]) == pytest.approx(float(rb[col]), rel=1e-5, abs=1e-7), (col, ra, rb)
            else:
                assert ra[col] == rb[col], (col, ra, rb)


def digit_files(root: Path, digit: int) -> list[str]:
    return sorted(str(p) for p in (root / str(digit)).iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Input listing


def test_listing_is_sorted_recursive_and_skips_hidden_and_non_images(tmp_path: Path):
    for rel in ("b/2.png", "b/1.JPG", "a/x/3.webp", "a/.hidden.png", ".cache/4.png", "a/notes.txt", "c.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    root = str(tmp_path)
    assert list(iter_inputs([root])) == [f"{root}/a/x/3.webp", f"{root}/b/1.JPG", f"{root}/b/2.png", f"{root}/c.jpeg"]
    assert list(iglob_sorted(f"{root}/**/*.png")) == [f"{root}/b/2.png"]
    assert list(iglob_sorted(f"{root}/*/*")) == [f"{root}/a/notes.txt", f"{root}/a/x", f"{root}/b/1.JPG",
                                                 f"{root}/b/2.png"]
    # A final "**" means every image below; a named file is taken whatever its extension; a missing one is kept
    # (it becomes an error record, not a silent omission).
    assert list(iter_inputs([f"{root}/b/**", f"{root}/a/notes.txt", f"{root}/nope.png"])) == [
        f"{root}/b/1.JPG", f"{root}/b/2.png", f"{root}/a/notes.txt", f"{root}/nope.png"]


def test_read_input_refuses_what_is_not_a_small_regular_file(tmp_path: Path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * 2048)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert read_input(str(big), max_bytes=2048) == b"\xff" * 2048
    cases = {str(big): (1024, "body_too_large"), str(fifo): (1 << 20, "unreadable_input"),
             str(tmp_path / "missing.png"): (1 << 20, "unreadable_input"), str(tmp_path): (1 << 20, "unreadable_input")}
    for path, (limit, code) in cases.items():
        with pytest.raises(batch.ClientError) as info:
            read_input(path, max_bytes=limit)
        assert info.value.code == code, path


# ---------------------------------------------------------------------------------------------------------------
# The CLI end to end


def shared_blocks() -> set[str]:
    """The POSIX shared-memory blocks Python made (a decode-process run must leave none behind)."""
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


@pytest.mark.parametrize("decode_in", ["threads", "processes"])
def test_mixed_inputs_good_and_broken_files_in_one_run(digits: Path, tmp_path: Path, decode_in: str):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "random.jpg").write_bytes(imagegen.random_bytes(3000))
    (broken / "truncated.jpg").write_bytes(imagegen.truncated_jpeg())
    (broken / "empty.png").write_bytes(b"")
    (broken / "page.html").write_bytes(imagegen.HTML)
    (broken / "huge.png").write_bytes(imagegen.huge_dimension_png())
    (broken / "targa.png").write_bytes(imagegen.off_allowlist_image())
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment, then a folder and a missing file\n{digits / '3'}\n\n{tmp_path / 'gone.png'}\n")
    out = tmp_path / "out.jsonl"
    stdin_paths = digit_files(digits, 7)[:2]
    blocks_before = shared_blocks()
    r = cli(str(digits / "0"), str(digits / "1" / "*.png"), f"@{listing}", "-", str(broken / "*"),
            "--model", LENET, "--top-k", "3", "--batch-size", "8", "--output", str(out), "--decode-in", decode_in,
            stdin="\n".join(stdin_paths) + "\n")
    assert shared_blocks() == blocks_before
    assert r.returncode == 1, r.stderr  # some inputs failed, the rest were classified
    records = read_jsonl(out)
    expected_paths = (digit_files(digits, 0) + sorted(p for p in digit_files(digits, 1) if p.endswith(".png"))
                      + digit_files(digits, 3) + [str(tmp_path / "gone.png")] + stdin_paths
                      + sorted(str(p) for p in broken.iterdir()))
    assert [rec["path"] for rec in records] == expected_paths  # input order, every input exactly once
    errors = {Path(rec["path"]).name: rec["error"] for rec in records if "error" in rec}
    assert errors == {"gone.png": "unreadable_input", "random.jpg": "not_an_image", "truncated.jpg": "corrupt_image",
                      "empty.png": "not_an_image", "page.html": "not_an_image", "huge.png": "image_too_large",
                      "targa.png": "unsupported_format"}
    card = read_card(DEFAULT_MODELS_DIR / LENET)
    good = [rec for rec in records if "predictions" in rec]
    assert len(good) == len(records) - len(errors)
    for rec in records:
        assert (rec["model"], rec["version"]) == (LENET, card.version)
        if "error" in rec:
            assert rec["detail"] and "predictions" not in rec
    for rec in good:
        assert len(rec["predictions"]) == 3
        scores = [p["score"] for p in rec["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-9
    # The model reads the digits: most good records are classified as their folder's digit.
    correct = sum(rec["predictions"][0]["label"] == Path(rec["path"]).parent.name for rec in good)
    assert correct >= 0.8 * len(good)
    summary = r.stderr.strip().splitlines()[-1]
    assert f"{len(records)} processed, {len(errors)} failed" in summary and "img/s" in summary


def test_fail_fast_stops_at_the_first_failure(digits: Path, tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(imagegen.TEXT)
    out = tmp_path / "out.jsonl"
    r = cli(digit_files(digits, 2)[0], str(bad), str(digits / "5"), "--model", LENET, "--fail-fast", "-o", str(out))
    assert r.returncode == 1
    records = read_jsonl(out)
    assert [rec.get("error") for rec in records] == [None, "not_an_image"]
    assert "stopped at the first failure" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", LENET, "--resume"], "--resume needs --output"),
    (["--model", LENET, "@/no/such/list.txt"], "list file"),
    (["--model", LENET, "--top-k", "0"], "must be at least 1"),
    (["--model", LENET, "--top-k", "11"], "more than lenet5's 10 classes"),
    (["--model", LENET, "--device", "gpu"], "invalid choice"),
    (["--model", LENET, "--url", "http://127.0.0.1:9"], "cannot reach the service"),
    (["--model", LENET, "--url", "http://127.0.0.1:9", "--decode-in", "processes"],
     "--decode-in processes decodes for a local model"),
    # Found before the run, not as a traceback after it (the summary of a long run was lost).
    (["--model", LENET, "--summary-json", "/proc/no/such/dir/summary.json"], "cannot write /proc/no/such/dir"),
    (["--model", LENET, "--timeout", "-1"], "must be a positive number of seconds"),
    (["--model", LENET, "--timeout", "nan"], "must be a positive number of seconds"),
    (["--model", LENET, "--workers", "100000"], "must be at most 256"),  # a typo's zeros: not 100,000 threads
    (["--model", LENET, "--batch-size", "100000000"], "must be at most 4096"),
])
def test_usage_errors_exit_2(args: list[str], message: str, digits: Path):
    r = cli(str(digits / "0"), *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert r.stdout == ""


def test_stdout_jsonl_and_csv_file_hold_the_same_results(digits: Path, tmp_path: Path):
    inputs = [str(digits / "4"), str(tmp_path / "missing.png")]
    r = cli(*inputs, "--model", LENET, "--top-k", "2")
    assert r.returncode == 1
    from_stdout = [json.loads(line) for line in r.stdout.splitlines()]
    csv_path = tmp_path / "out.csv"
    assert batch.main([*inputs, "--model", LENET, "--top-k", "2", "--output", str(csv_path), "--progress", "off"]) == 1

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == batch.csv_header(2)
    assert [row["path"] for row in rows] == [rec["path"] for rec in from_stdout]
    for row, rec in zip(rows, from_stdout, strict=True):
        if "error" in rec:
            assert (row["error"], row["detail"], row["label_1"]) == (rec["error"], rec["detail"], "")
            continue
        as_preds = [{"index": int(row[f"index_{i}"]), "label": row[f"label_{i}"], "score": float(row[f"score_{i}"])}
                    for i in (1, 2)]
        assert_same_predictions(as_preds, rec["predictions"])
        assert row["error"] == ""


def test_an_output_that_would_destroy_an_input_is_refused(tmp_path: Path):
    """`-o photo.jpg` used to empty the photo before reading it (and record it as an empty file); `@list -o list`
    emptied the list. Nothing may be truncated: exit 2, every file as it was."""
    digit = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
    photo, other = tmp_path / "photo.png", tmp_path / "other.png"
    photo.write_bytes(digit)
    other.write_bytes(digit)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photo}\n")
    cases = [([str(photo), "-o", str(photo)], "is the input"),
             ([str(photo), "-o", f"{tmp_path}/./photo.png", "--resume", "--format", "csv"], "is the input"),
             ([f"@{listing}", "-o", str(listing)], "is the input"),
             ([str(tmp_path / "*.png"), "-o", str(other)], "is an image (PNG)"),  # a glob's input, or a slip
             ([str(photo), "-o", str(tmp_path / "out.jsonl"), "--summary-json", str(other)], "is an image (PNG)")]
    for args, message in cases:
        r = cli(*args, "--model", LENET)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert photo.read_bytes() == digit and other.read_bytes() == digit
        assert listing.read_text() == f"{photo}\n"
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_an_output_inside_the_listed_folder_is_not_read_as_an_input(tmp_path: Path, resume: bool):
    """`'photos/*' -o photos/out.jsonl` listed the output too and recorded it as not_an_image: a clean run exited 1."""
    digit = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(digit)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    args = ["--model", LENET, "-o", str(out), "--summary-json", str(summary), "--progress", "off"]
    for spec in (str(tmp_path / "*"), str(tmp_path)):  # a glob, a folder walk
        assert batch.main([spec, *args, *(["--resume"] if resume else [])]) == 0
        records = read_jsonl(out)
        assert [Path(rec["path"]).name for rec in records] == ["a.png", "b.png"]
        assert all("predictions" in rec for rec in records)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_output_that_cannot_be_written_exits_3_and_keeps_whole_records(digits: Path, tmp_path: Path, fmt: str):
    """A full disk (simulated with RLIMIT_FSIZE: writes past the limit fail half-way, as ENOSPC does) used to end in a
    traceback with exit 1, "some images failed", and half a record at the end. Now: exit 3, the torn piece cut off,
    and --resume completes the file."""
    import resource

    inputs = [str(digits / str(d)) for d in range(3)]
    full, cut = tmp_path / f"full.{fmt}", tmp_path / f"cut.{fmt}"
    assert cli(*inputs, "--model", LENET, "--batch-size", "4", "-o", str(full)).returncode == 0
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a signal, like ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    r = subprocess.run([sys.executable, "-m", "serving.batch", *inputs, "--model", LENET, "--batch-size", "4",
                        "-o", str(cut)], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120,
                       preexec_fn=small_disk)
    assert r.returncode == 3, r.stderr
    assert "writing the output failed" in r.stderr and "(output failed)" in r.stderr
    data = cut.read_bytes()
    assert 0 < len(data) <= 3000 and data.endswith(b"\n")
    assert full.read_bytes().startswith(data)  # whole records (and batches) only
    r = cli(*inputs, "--model", LENET, "--batch-size", "4", "-o", str(cut), "--resume")
    assert r.returncode == 0, r.stderr
    assert cut.read_bytes().count(b"\n") == full.read_bytes().count(b"\n")
    if fmt == "jsonl":
        assert_same_records(read_jsonl(cut), read_jsonl(full))
    else:
        assert_same_csv_rows(cut, full)
    r = cli(inputs[0], "--model", LENET, "-o", "/dev/full")
    assert r.returncode == 3 and "No space left on device" in r.stderr


def test_hostile_file_names_csv_is_utf8_text_and_resumes_jsonl_round_trips(tmp_path: Path):
    """File names are anyone's: CSV cells that start like a formula get a "'" (a spreadsheet would run
    "=HYPERLINK(...)"), undecodable bytes are written as visible "\\xff" (raw, they made the whole CSV unreadable as
    UTF-8), and a quoted newline no longer breaks --resume. JSONL keeps the exact name ("\\udcff" escapes)."""
    digit = (REPO_ROOT / "examples" / "digit-7.png").read_bytes()
    names = [b"+1.png", b"-x.png", b"=HYPERLINK(1).png", b"@SUM.png", b"bad\xff.png", b"new\nline.png",
             b'q"uote,comma.png', b"plain.png"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        (folder / os.fsdecode(name)).write_bytes(digit)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:  # in the folder, so the paths are the bare names
        return subprocess.run([sys.executable, "-m", "serving.batch", "*", "--model", LENET, "--top-k", "1", *args],
                              capture_output=True, cwd=folder, env=env, timeout=120)

    assert run("-o", "../out.csv").returncode == 0
    text = (tmp_path / "out.csv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == ["'+1.png", "'-x.png", "'=HYPERLINK(1).png", "'@SUM.png",
                                             "bad\\xff.png", "new\nline.png", "plain.png", 'q"uote,comma.png']
    assert all(row["label_1"] == "7" for row in rows)
    r = run("-o", "../out.csv", "--resume")
    assert r.returncode == 0 and "0 processed, 0 failed, 8 skipped" in r.stderr.decode(), r.stderr
    assert (tmp_path / "out.csv").read_bytes().decode("utf-8") == text
    assert run("-o", "../out.jsonl").returncode == 0
    records = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(os.fsencode(rec["path"]) for rec in records) == sorted(names)


def test_progress_bar_counts_failures_as_a_plain_number(tmp_path: Path):
    for i in range(10_000):  # tqdm shows a round number this large as "1e+4" unless given text
        (tmp_path / f"{i:05d}.png").touch()
    r = cli(str(tmp_path), "--model", LENET, "--progress", "on", "-o", str(tmp_path / "out.jsonl"))
    assert r.returncode == 1
    assert "failed=10000" in r.stderr and "e+4" not in r.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_a_killed_run_gives_the_uninterrupted_output(digits: Path, tmp_path: Path, fmt: str):
    paths = [str(p) for d in range(10) for p in sorted((digits / str(d)).iterdir())][:120]
    paths.insert(17, str(tmp_path / "missing.png"))  # error records before and after the kill
    paths.insert(80, str(tmp_path / "also-missing.png"))
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    full, partial = tmp_path / f"full.{fmt}", tmp_path / f"partial.{fmt}"
    assert cli(f"@{listing}", "--model", LENET, "--batch-size", "8", "-o", str(full)).returncode == 1

    # A real run killed mid-way: it reads paths from a pipe we feed half of, so it is certainly still running
    # (waiting for more) when SIGKILL arrives after its first 40 records are on disk.
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.batch", "-", "--model", LENET, "--batch-size", "8",
                             "-o", str(partial)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT, env=env)
    try:
        proc.stdin.write("\n".join(paths[:44]) + "\n")
        proc.stdin.flush()
        want_lines = 40 + (fmt == "csv")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if partial.exists() and partial.read_bytes().count(b"\n") >= want_lines:
                break
            assert proc.poll() is None, "the run ended before it was killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert partial.read_bytes().count(b"\n") == want_lines
    # A power cut mid-write would leave half a line: resume must cut it off, not keep or choke on it.
    with open(partial, "ab") as f:
        f.write(b'{"path": "/half/writ' if fmt == "jsonl" else b"/half/written.png,lenet5,1,3,3,0.9")

    r = cli(f"@{listing}", "--model", LENET, "--batch-size", "8", "-o", str(partial), "--resume")
    assert r.returncode == 1  # this run's inputs include a missing file
    assert "40 skipped" in r.stderr.splitlines()[-1]
    if fmt == "jsonl":
        assert_same_records(read_jsonl(partial), read_jsonl(full))
    else:
        assert partial.read_text().splitlines()[0] == full.read_text().splitlines()[0]  # one header
        assert_same_csv_rows(partial, full)
    # Resuming a finished output does nothing and changes nothing.
    before = partial.read_bytes()
    r = cli(f"@{listing}", "--model", LENET, "-o", str(partial), "--resume")
    assert r.returncode == 0 and partial.read_bytes() == before
    assert f"0 processed, 0 failed, {len(paths)} skipped" in r.stderr


@pytest.mark.parametrize(("signum", "status", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                        (signal.SIGTERM, 143, "terminated: SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("decode_in", ["threads", "processes"])
def test_ctrl_c_or_sigterm_stops_cleanly_with_complete_lines_and_the_summary(digits: Path, tmp_path: Path,
                                                                             decode_in: str, signum: int, status: int,
                                                                             word: str):
    """Also: decode processes never hold an image back for a fuller chunk while the listing (stdin) waits. SIGTERM
    (docker stop, a scheduler's preemption) used to end the run at once, with no summary."""
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "ORT_DISABLE_TELEMETRY": "1"}
    # A shell's background job (`make test &`, nohup) starts with SIGINT ignored, and a child inherits that: Python
    # then installs no Ctrl-C handler at all. The CLI is right to keep an ignored SIGINT ignored; the test wants the
    # interactive case, so it gives the child SIGINT's default whatever ran pytest.
    proc = subprocess.Popen([sys.executable, "-m", "serving.batch", "-", "--model", LENET, "--batch-size", "4",
                             "-o", str(out), "--decode-in", decode_in, "--summary-json", str(summary)],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("\n".join(digit_files(digits, 6)[:10]) + "\n")  # two full batches and a half
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 8) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signum)  # while it waits on stdin for the rest of the third batch
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status, stderr
    assert "8 processed, 0 failed" in stderr and f"({word})" in stderr, stderr
    assert [rec["path"] for rec in read_jsonl(out)] == digit_files(digits, 6)[:8]
    written = json.loads(summary.read_text())
    assert written["processed"] == 8 and written["interrupted"] and written["terminated"] == (signum == signal.SIGTERM)


def test_a_killed_run_leaves_no_decode_process_and_no_shared_memory(digits: Path, tmp_path: Path):
    """kill -9 of the CLI: its decode processes notice within a second and exit, and the resource tracker then removes
    the shared block (before, the processes waited forever on a queue whose writing end they held themselves)."""
    out = tmp_path / "out.jsonl"
    blocks_before = shared_blocks()
    proc = subprocess.Popen([sys.executable, "-m", "serving.batch", "-", "--model", LENET, "--batch-size", "4",
                             "--decode-in", "processes", "-o", str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    try:
        proc.stdin.write("\n".join(digit_files(digits, 4)[:8]) + "\n")  # then stdin stays open: the run goes on
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_bytes().count(b"\n") >= 8) and time.monotonic() < deadline:
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the decode processes and the resource tracker
        assert shared_blocks() - blocks_before  # the run's block exists
        proc.kill()
        proc.wait(timeout=10)
        # A decode process still starting (imports, at the decode niceness) when the CLI dies starts its watch late:
        # it used to watch its new parent, init, and never exit (seen in CI, with other tests running alongside).
        # It is told the CLI's pid now; the minute is for a slow start on a loaded machine.
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
        assert shared_blocks() == blocks_before
    finally:
        proc.kill()


def test_a_run_killed_while_its_decode_processes_start_leaves_none(digits: Path, tmp_path: Path):
    """kill -9 of the CLI the moment its first decode process exists, before it has started its watch: the process
    learns the CLI's pid from the CLI, so it sees at once that its parent is gone (it used to read its parent's pid
    itself, got init's, and waited forever: one left behind in each of 3 tries)."""
    starting: list[psutil.Process] = []
    proc = subprocess.Popen([sys.executable, "-m", "serving.batch", "-", "--model", LENET, "--decode-in", "processes",
                             "--workers", "2", "-o", str(tmp_path / "out.jsonl")], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
    try:
        proc.stdin.write(digit_files(digits, 4)[0] + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not starting and time.monotonic() < deadline:
            starting = [p for p in psutil.Process(proc.pid).children(recursive=True)
                        if "spawn_main" in " ".join(p.cmdline())]
            time.sleep(0.01)
        assert starting, "no decode process started"
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(starting, timeout=60)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        proc.kill()
        for p in starting:  # what the old code left behind, so that a failure leaves nothing running
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_limit_takes_the_first_n_inputs_of_the_listing(digits: Path, tmp_path: Path):
    out = tmp_path / "limited.jsonl"
    r = cli(str(digits / "3"), str(digits / "5"), "--model", LENET, "--limit", "7", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert [rec["path"] for rec in read_jsonl(out)] == digit_files(digits, 3)[:7]
    assert "7 processed" in r.stderr
    r = cli(str(digits / "3"), "--model", LENET, "--limit", "0", "-o", str(out))
    assert r.returncode == 2 and "--limit" in r.stderr


def test_precision_reaches_the_summary_and_fp16_is_refused_without_a_gpu(tmp_path: Path):
    """--precision picks the model file; the summary (line and JSON) says which one ran. On this CPU-only machine
    fp16 stops with the reason and the fix, before any input is read."""
    digit = str(REPO_ROOT / "examples" / "digit-7.png")
    summary_path = tmp_path / "summary.json"
    r = cli(digit, "--model", LENET, "--precision", "fp32", "--summary-json", str(summary_path),
            "-o", str(tmp_path / "out.jsonl"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(summary_path.read_text())
    assert (summary["precision"], summary["device"], summary["processed"]) == ("fp32", "cpu", 1)
    assert summary["decode_in"] == "threads"  # auto: on a CPU decoding and inference take turns in one process
    assert r.stderr.strip().splitlines()[-1].endswith("model lenet5 v1 on cpu (fp32)")
    r = cli(digit, "--model", LENET, "--precision", "fp16", "-o", str(tmp_path / "fp16.jsonl"))
    assert r.returncode == 2 and "no float16 ONNX" in r.stderr and "make models" in r.stderr, r.stderr
    r = cli(digit, "--model", "alexnet", "--precision", "fp16", "-o", str(tmp_path / "fp16.jsonl"))
    assert r.returncode == 2 and "GPU providers only" in r.stderr, r.stderr
    r = cli(digit, "--model", LENET, "--precision", "int8")
    assert r.returncode == 2 and "--precision" in r.stderr


def test_resume_refuses_an_output_from_another_model(digits: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"path": "x.png", "model": "alexnet", "version": "1", "predictions": []}) + "\n")
    r = cli(str(digits / "0"), "--model", LENET, "-o", str(out), "--resume")
    assert r.returncode == 2 and "model 'alexnet'" in r.stderr


def _card_top1(model_dir: Path) -> float:
    metrics = read_card(model_dir).metrics
    for key in ("top1_accuracy", "top1", "accuracy"):
        if key in metrics:
            return float(metrics[key])
    assert "top1_error" in metrics, f"the model card states no top-1 accuracy: {metrics}"
    return 1.0 - float(metrics["top1_error"])


def test_eval_on_real_mnist_digits_matches_the_model_card(digits: Path, tmp_path: Path):
    summary_path = tmp_path / "summary.json"
    r = cli(str(digits), "--model", LENET, "--eval", "-o", str(tmp_path / "out.jsonl"), "--top-k", "1",
            "--summary-json", str(summary_path))
    assert r.returncode == 0, r.stderr
    ev = json.loads(summary_path.read_text())["eval"]
    n = len(list(digits.rglob("*.*")))
    assert ev["evaluated"] == n and ev["unlabelled"] == 0
    claimed = _card_top1(DEFAULT_MODELS_DIR / LENET)
    # The sample is drawn from the test set the card was measured on: 3 standard errors of a proportion, plus a
    # little for the rendering (PNG/JPEG, inverted, enlarged) the card's own measurement didn't go through.
    tolerance = 3 * math.sqrt(max(claimed * (1 - claimed), 0.01 * 0.99) / n) + 0.01
    assert abs(ev["top1"] - claimed) <= tolerance, (ev, claimed)
    assert ev["top5"] >= ev["top1"]
    assert f"top-1 {ev['top1']:.2%}" in r.stderr
    # --top-k 1 keeps the records to one prediction even though eval ranks five.
    assert all(len(rec["predictions"]) == 1 for rec in read_jsonl(tmp_path / "out.jsonl"))


def test_eval_reads_imagenet_wnid_folders(tmp_path: Path):
    """AlexNet's wnids.txt maps ImageNet val folders (n01440764/...) to class indices."""
    wnids = (DEFAULT_MODELS_DIR / "alexnet" / "wnids.txt").read_text().split()
    evaluator = batch.Evaluator.for_model(DEFAULT_MODELS_DIR / "alexnet")
    evaluator.add(f"/val/{wnids[1]}/a.JPEG", [{"index": 1}, {"index": 7}])
    evaluator.add(f"/val/{wnids[2]}/b.JPEG", [{"index": 9}, {"index": 2}])
    evaluator.add("/val/not-a-class/c.JPEG", [{"index": 2}])
    assert evaluator.summary() == {"evaluated": 2, "unlabelled": 1, "top1": 0.5, "top5": 1.0}


def test_decode_processes_give_alexnet_the_same_records_as_threads(tmp_path: Path):
    """The decode processes' shared-memory slots hold AlexNet's 224×224×3 inputs exactly: a real photo and generated
    ones, in chunks and alone (batch sizes that don't divide the count), equal the threads' records."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "00-grace_hopper.jpg").write_bytes((REPO_ROOT / "examples" / "grace_hopper.jpg").read_bytes())
    for i, photo in enumerate(photo_jpegs(np.random.default_rng(5), 20, 300, 700)):
        (photos / f"{i + 1:02d}.jpg").write_bytes(photo.data)
    records = {}
    for decode_in in ("threads", "processes"):
        out = tmp_path / f"{decode_in}.jsonl"
        r = cli(str(photos), "--model", "alexnet", "--batch-size", "6", "--workers", "3", "--decode-in", decode_in,
                "-o", str(out), "--summary-json", str(tmp_path / f"{decode_in}.json"))
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / f"{decode_in}.json").read_text())["decode_in"] == decode_in
        records[decode_in] = read_jsonl(out)
    assert len(records["threads"]) == 21
    assert_same_records(records["threads"], records["processes"])


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the service


def test_records_equal_the_service_answers_locally_and_with_url(server: str, digits: Path, tmp_path: Path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(3):
        (photos / f"photo-{seed}.jpg").write_bytes(imagegen.photo(500, 375, seed=seed))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(imagegen.truncated_jpeg())
    cases = {LENET: [*digit_files(digits, 8)[:6], str(bad)], "alexnet": [str(photos), str(bad)]}
    for model, inputs in cases.items():
        local, remote = tmp_path / f"{model}-local.jsonl", tmp_path / f"{model}-url.jsonl"
        assert cli(*inputs, "--model", model, "--top-k", "5", "-o", str(local)).returncode == 1
        r = cli(*inputs, "--model", model, "--top-k", "5", "-o", str(remote), "--url", server)
        assert r.returncode == 1, r.stderr
        local_records = read_jsonl(local)
        assert_same_records(read_jsonl(remote), local_records)
        for rec in local_records:
            data = Path(rec["path"]).read_bytes()
            answer = httpx.post(f"{server}/classify", params={"model": model, "top_k": 5}, content=data,
                                headers={"Content-Type": "application/octet-stream"}, timeout=60)
            body = answer.json()
            if "error" in rec:
                assert answer.status_code == 400 and body == {"error": rec["error"], "detail": rec["detail"]}
            else:
                assert answer.status_code == 200 and (body["model"], body["version"]) == (model, rec["version"])
                assert_same_predictions(body["predictions"], rec["predictions"])
    r = cli(str(bad), "--model", "no-such-model", "--url", server)
    assert r.returncode == 2 and "does not serve 'no-such-model'" in r.stderr
