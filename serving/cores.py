"""Borrowing idle cores: a front worker that is the only one with requests in progress uses the whole server's CPUs.

On CPU, each front worker runs its models with CPUs / workers onnxruntime threads, which is what a loaded server
wants: a second thread in every worker would only fight the other workers for the cores (measured on 2 cores, 2
workers × 2 threads: 8-16% fewer AlexNet images a second at 4 and 32 connections). But under light load one request
at a time reaches one worker, and the other cores sit idle while it runs a batch of one on a single thread: on those
2 cores an AlexNet answer took 45 ms where 2 threads take 30.

So each worker may hold a second, "wide" session of a large model, with the threads of every worker (the CPUs the
server is set to use), and use it for a batch while no other worker of the server has a request in progress. Which
workers have some is a byte per worker in a file they all map (`WorkBoard`, one of the server's files named after
the arbiter's pid: serving/service.py `server_file`), set while the worker's count of requests in progress
(`Requests`, kept by serving/limits.py's `RequestLimits`) is above zero. A request, not an inference, because a
loaded worker between two batches is still decoding the next one: measured at 32 connections, borrowing whenever
the other worker was not inside an onnxruntime call cost 7% of the throughput. Under load every worker has
requests, so none borrows; a worker that gets a request while another runs wide keeps to its share, and shares the
cores with it for the rest of that one batch.

It costs a second session's memory per worker and model (AlexNet: ~280 MB), so it is off unless
CONVNET_BORROW_IDLE_CPUS=1 (docs/service.md, "Borrowing idle cores").
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np


class WorkBoard:
    """One byte per front worker in a small file every worker maps: 1 while that worker has a request in progress.
    Indexed by circus's worker id, which is 1 to twice the workers (a restarted worker takes the lowest one free)."""

    def __init__(self, path: Path, workers: int, index: int) -> None:
        slots = 2 * workers
        if not 1 <= index <= slots:
            raise ValueError(f"worker index {index} is not within 1..{slots}")
        self.path, self.index = path, index
        self.others = [i for i in range(1, slots + 1) if i != index]
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < slots + 1:
                os.ftruncate(fd, slots + 1)  # grows only: another worker may have made it already
            self.board = mmap.mmap(fd, slots + 1)
        finally:
            os.close(fd)
        self.mark(False)  # a predecessor killed with requests in progress left its byte set

    def mark(self, busy: bool) -> None:
        self.board[self.index] = busy

    def others_idle(self) -> bool:
        board = self.board
        return not any(board[i] for i in self.others)

    def close(self) -> None:
        """At a clean shutdown: the other workers keep their mapping; the next server makes a new file."""
        self.path.unlink(missing_ok=True)


class Requests:
    """This worker's requests in progress, published on a board (once there is one) when the count leaves or
    reaches zero. Counted by every RequestLimits of the worker (the front door's and BentoML's way share it)."""

    def __init__(self) -> None:
        self.in_progress = 0
        self.board: WorkBoard | None = None

    def started(self) -> None:
        self.in_progress += 1
        if self.in_progress == 1 and self.board is not None:
            self.board.mark(True)

    def ended(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0 and self.board is not None:
            self.board.mark(False)


def borrowing(narrow: Callable[[np.ndarray], np.ndarray], wide: Callable[[np.ndarray], np.ndarray],
              board: WorkBoard, on_wide: Callable[[], None]) -> Callable[[np.ndarray], np.ndarray]:
    """`narrow(batch)`, or `wide(batch)` while no other worker has a request in progress (`on_wide()` counts it)."""

    def logits(batch: np.ndarray) -> np.ndarray:
        if board.others_idle():
            on_wide()
            return wide(batch)
        return narrow(batch)

    return logits
