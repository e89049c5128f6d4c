"""Borrowing idle cores (serving/cores.py, CONVNET_BORROW_IDLE_CPUS=1): a front worker that is the only one with
requests in progress uses every CPU for them, through a second session; while another has some, it keeps to its share.

The board is a real file mapped by two boards here as two workers map it; the server test runs the real service
with two front workers and reads which session answered from /metrics.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.cores import Requests, WorkBoard
from serving.preprocess import preprocess_bytes
from serving.registry import DEFAULT_MODELS_DIR, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

import imagegen  # noqa: E402
from serverproc import started_server  # noqa: E402


def test_a_worker_is_alone_only_while_no_other_has_a_request(tmp_path):
    path = tmp_path / "board"
    first, second = WorkBoard(path, 2, 1), WorkBoard(path, 2, 2)
    mine, theirs = Requests(), Requests()
    mine.board, theirs.board = first, second
    assert first.others_idle() and second.others_idle()
    mine.started()
    assert second.others_idle() is False and first.others_idle()
    mine.started()
    mine.ended()  # one of its two requests answered: still busy
    assert not second.others_idle()
    theirs.started()  # both have requests: neither borrows
    assert not first.others_idle() and not second.others_idle()
    mine.ended()
    assert second.others_idle() and not first.others_idle()
    theirs.ended()
    assert first.others_idle() and mine.in_progress == theirs.in_progress == 0


def test_a_restarted_worker_clears_the_byte_its_killed_predecessor_left(tmp_path):
    path = tmp_path / "board"
    other = WorkBoard(path, 2, 2)
    WorkBoard(path, 2, 1).mark(True)  # killed with requests in progress
    assert not other.others_idle()
    WorkBoard(path, 2, 1)  # its successor, same worker id
    assert other.others_idle()


def test_the_board_has_a_slot_for_every_worker_id_circus_can_give(tmp_path):
    path = tmp_path / "board"
    restarted = WorkBoard(path, 2, 4)  # circus numbers workers 1..2 × workers: a restart may take 3 or 4
    assert path.stat().st_size == 5
    WorkBoard(path, 1, 1)  # a board never shrinks under workers that map it
    assert path.stat().st_size == 5
    restarted.mark(True)
    assert not WorkBoard(path, 2, 1).others_idle()
    with pytest.raises(ValueError, match="not within 1..4"):
        WorkBoard(path, 2, 5)
    restarted.close()
    assert not path.exists()


def wide_batches(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    found = re.search(r'^convnet_wide_batches_total\{model="alexnet"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def assert_same_answers(got: list, expected: list) -> None:
    """The same classes in the same order, scores equal to float32 rounding (how many threads, and which rows
    share a batch, can change the last bits of a sum)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert isinstance(g, dict), g
        assert [p["index"] for p in g["predictions"]] == [p["index"] for p in e["predictions"]]
        np.testing.assert_allclose([p["score"] for p in g["predictions"]], [p["score"] for p in e["predictions"]],
                                   rtol=1e-4, atol=1e-6)


def board_of(proc) -> Path:
    return Path(tempfile.gettempdir()) / f"convnet-{proc.pid}-convnet-work"


def test_an_idle_server_answers_on_every_cpu_and_a_busy_one_keeps_to_its_share():
    assert len(os.sched_getaffinity(0)) >= 2, "borrowing needs a second CPU to borrow (this project's machine has 2)"
    photos = [imagegen.photo(640, 480, seed=s) for s in range(4)]
    reference = load_model(DEFAULT_MODELS_DIR / "alexnet", device="cpu", threads=1)
    env = {"CONVNET_BORROW_IDLE_CPUS": "1", "CONVNET_API_WORKERS": "2", "CONVNET_ORT_THREADS": "1"}
    with started_server(env=env, models=["alexnet"]) as (base, proc), httpx.Client(timeout=60) as client:
        board = board_of(proc)
        assert board.is_file(), "the front workers share no board"
        [card] = client.get(f"{base}/models").json()["models"]
        assert card["runtime"]["idle_cpu_threads"] == 2  # two workers' one thread each

        def classify(photo: bytes) -> dict:
            r = client.post(f"{base}/classify", params={"model": "alexnet", "top_k": 5}, content=photo,
                            headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200, r.text
            return r.json()

        # One request at a time: the other worker has none, so every batch borrows its core.
        before = wide_batches(base)
        answers = [classify(p) for p in photos]
        assert wide_batches(base) - before == len(photos)
        # The wide session answers what the worker's own one-thread session would have.
        assert_same_answers(answers, [{"predictions": reference.classify(preprocess_bytes(p, reference.recipe)[None],
                                                                         5)[0]} for p in photos])

        # A request in progress marks its worker busy on the board, from its headers until it is answered: here, one
        # whose body is still coming.
        photo = photos[0]
        with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=60) as slow:
            slow.sendall(b"POST /classify?model=alexnet HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(photo) + photo[:100])
            deadline = time.monotonic() + 10
            while board.read_bytes().count(1) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert board.read_bytes().count(1) == 1, board.read_bytes()
            slow.sendall(photo[100:])
            assert slow.recv(65536).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 10
        while board.read_bytes().count(1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert board.read_bytes().count(1) == 0, board.read_bytes()

        # Another worker with requests in progress (its byte set, as its requests set it): this one keeps to its
        # own thread.
        with open(board, "r+b") as f:
            f.write(b"\x00" + b"\x01" * 4)
        try:
            before = wide_batches(base)
            assert_same_answers([classify(p) for p in photos], answers)
            assert wide_batches(base) == before
        finally:
            with open(board, "r+b") as f:
                f.write(b"\x00" * 5)

        # Concurrent streams on connections of their own, which the kernel spreads over both workers: whichever
        # session each batch ran on, every answer is the same.
        results: list[list[dict]] = []

        def stream() -> None:
            with httpx.Client(timeout=60) as own:
                got = [own.post(f"{base}/classify", params={"model": "alexnet", "top_k": 5}, content=p,
                                headers={"Content-Type": "image/jpeg"}) for p in photos]
                results.append([r.json() if r.status_code == 200 else r.text for r in got])

        threads = [threading.Thread(target=stream) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 8
        for got in results:
            assert_same_answers(got, answers)
    assert not board.exists(), "a clean shutdown leaves the board behind"
