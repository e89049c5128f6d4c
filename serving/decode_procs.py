"""Decoding in worker processes, for the batch CLI on a GPU: the model then leaves every CPU to decoding, and one
process's decode threads can't use them (the Python between Pillow's GIL-free stretches serialises them).

Each worker writes its decoded image straight into a slot of one shared-memory block; only the slot number and an
error, if any, cross the pipe. Pickling the 150 KB array back instead cost the parent ~0.46 ms an image (2 CPUs),
and held an H200's 16 CPUs to ~1.4k img/s (docs/batch.md). Workers start fresh ("spawn"): never a fork of a process
holding onnxruntime's threads or a CUDA context.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from serving.errors import ClientError
from serving.inputs import read_input
from serving.preprocess import Recipe, decoder_surprise, preprocess_bytes

# A worker's state, set once at its start: the block (kept referenced, so it stays mapped), its view as
# (slots, size, size, channels) uint8, and the arguments of preprocess_file after the path.
_block: SharedMemory | None = None
_slots: np.ndarray | None = None
_recipe_and_limits: tuple[Recipe, int, int] | None = None


def _attach(name: str) -> SharedMemory:
    """Open the parent's block without adopting it: before Python 3.13 an attaching process also registers the block
    with the resource tracker, which would then unlink it when that worker exits."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda *_: None
    try:
        return SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _exit_with(parent: int) -> None:
    """A worker's watch: a parent killed outright (kill -9) leaves its workers waiting on a queue whose writing end
    they hold themselves, forever. Once they are gone, the resource tracker removes the shared block. `parent` is
    the pid the parent gave, not this process's parent now: a worker still starting when the parent was killed
    would otherwise watch its new parent (init) forever (seen in CI on a loaded machine)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_init(parent: int, name: str, shape: tuple[int, ...], nice: int,
                 recipe_and_limits: tuple[Recipe, int, int]) -> None:
    global _slots, _block, _recipe_and_limits
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()
    # Ctrl-C reaches the whole process group: the parent alone handles it (it stops the pool, writes what is done).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if nice:
        os.nice(nice)
    _block = _attach(name)
    _slots = np.ndarray(shape, np.uint8, buffer=_block.buf)
    _recipe_and_limits = recipe_and_limits


def preprocess_file(path: str, recipe: Recipe, max_bytes: int, max_pixels: int) -> np.ndarray:
    """A file → the model's uint8 input, with the service's own checks and code (in a decode thread or process)."""
    data = read_input(path, max_bytes)
    try:
        return preprocess_bytes(data, recipe, max_pixels)
    except ClientError:
        raise
    except Exception as e:  # a decoder surprise on hostile bytes is the bytes' fault, as the service says too
        raise decoder_surprise(e) from e


def _decode_chunk(items: list[tuple[str, int]]) -> list[Exception | None]:
    """In a worker: decode each (path, slot) into its slot; an input's error is its own (None where it decoded)."""
    errors: list[Exception | None] = []
    for path, slot in items:
        try:
            _slots[slot] = preprocess_file(path, *_recipe_and_limits)
            errors.append(None)
        except ClientError as e:
            errors.append(e)
        except Exception as e:  # noqa: BLE001 - the parent records it against this input, as threads would
            errors.append(RuntimeError(f"{type(e).__name__}: {e}"))
    return errors


class ProcessDecoder:
    """`submit(path)` → a Future of `wrap(array, release)`, like a thread pool's: `array` is a view of the image's slot
    in the shared block, valid until `release()` hands the slot to the next image (copying it out instead cost ~60 µs
    an image: a fresh 150 KB allocation, faulted in page by page). At most `capacity` images hold a slot: a submit
    beyond that waits for one (the batch CLI bounds what it holds, so it never waits).

    Paths go to the workers in chunks of up to `chunk`: one task per image cost the parent ~0.3 ms, eight ~0.04 ms
    (measured, docs/batch.md). No path waits while a worker is idle: a submit is sent at once when fewer chunks are
    out than workers, and whatever is waiting goes as soon as a chunk comes back, so a slow listing (stdin) never
    holds an image back.
    """

    def __init__(self, workers: int, capacity: int, recipe: Recipe, max_bytes: int, max_pixels: int,
                 nice: int, wrap: Callable[[np.ndarray, Callable[[], None]], Any], chunk: int = 8) -> None:
        shape = (capacity, recipe.size, recipe.size, recipe.channels)
        self.block = SharedMemory(create=True, size=int(np.prod(shape)))
        self.slots = np.ndarray(shape, np.uint8, buffer=self.block.buf)
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(capacity):
            self.free.put(slot)
        self.wrap, self.workers, self.chunk = wrap, workers, chunk
        self.lock = threading.RLock()  # a chunk that is done already runs its callback in the submitting thread
        self.closed = False
        self.waiting: list[tuple[str, int, Future]] = []  # submitted, not yet sent to a worker
        self.out = 0  # chunks sent and not back
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_worker_init,
                                        initargs=(os.getpid(), self.block.name, shape, nice,
                                                  (recipe, max_bytes, max_pixels)))

    def submit(self, path: str) -> Future:
        result: Future = Future()
        slot = self.free.get()
        with self.lock:
            self.waiting.append((path, slot, result))
            if len(self.waiting) >= self.chunk or self.out < self.workers:
                self._send()
        return result

    def _send(self) -> None:  # with the lock held
        items, self.waiting = self.waiting, []
        self.out += 1
        self.pool.submit(_decode_chunk, [(path, slot) for path, slot, _ in items]).add_done_callback(
            lambda done: self._finish(done, items))

    def _finish(self, done: Future, items: list[tuple[str, int, Future]]) -> None:
        try:
            errors = done.result()
        except BaseException as e:  # noqa: BLE001 - cancelled at shutdown, or a worker died: each input says so
            errors = [e] * len(items)
        for (_, slot, result), error in zip(items, errors, strict=True):
            if error is None:
                result.set_result(self.wrap(self.slots[slot], functools.partial(self.free.put, slot)))
                continue
            if isinstance(error, CancelledError):
                result.cancel()
            else:
                result.set_exception(error)
            self.free.put(slot)
        with self.lock:
            self.out -= 1
            if self.waiting and not self.closed:
                self._send()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self.lock:
            waiting, self.waiting, self.closed = self.waiting, [], True
        for _, _, result in waiting:
            result.cancel()
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
        self.block.unlink()  # the name goes now; the memory once no process maps it (this one: when it exits, as
        # views of it may still be in use)
