"""Micro-batching inside one worker: requests for a model that arrive while its previous onnxruntime call runs are
merged into the next call.

There is no batching window. Under light load a request runs at once, as a batch of one, with no added latency.
Under load the batches grow on their own to whatever arrived during one inference, up to `max_batch` rows, and a
batch about to start first waits for the requests for its model that are still being decoded (`Decoding`): they are
already here and cost only their decode, so one call takes them all. On a core that both decodes and infers, that is
the in-process limit's own pattern (decode a batch, then run it) instead of two half batches time-slicing each
other. It waits for a decode only so long (twice an inference), so a slow one does not hold everyone else's answer.
Batching is what makes AlexNet on a CPU ~2× faster than one call per image: its fully-connected weights are read
once per batch, not once per image. One inference thread per model keeps the event loop and the decoding threads
free while onnxruntime runs (it releases the GIL). A small model (LeNet-5: ~0.1 ms a batch) runs on the event loop
itself (`on_loop`): the hop to a thread and back would cost more than the inference. A request's rows are never
split, and a request older than `max_wait_s` when its turn comes is shed with 503 `server_busy`, not served late.
Each call that answered is reported to `on_batch` with its `BatchTiming`: what the statistics extension (serving/
statistics.py) and /metrics show of queueing and compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.errors import ServerBusy
from serving.threads import INFER_THREADS, name_os_thread

log = logging.getLogger("convnet_serving")

# The least time a batch waits for a decode in flight (`_gather`), for when the last inference was very short: a
# photo decodes in ~3 ms, a digit too small for the event loop in less.
MIN_PATIENCE_S = 0.010


class Decoding:
    """The requests for one model being decoded right now, and since when, for the batcher to wait for. Used on the
    event loop only: `with decoding.upload():` around the decode of one upload."""

    def __init__(self) -> None:
        self.started: dict[object, float] = {}
        self.changed: asyncio.Event | None = None

    @contextlib.contextmanager
    def upload(self) -> Iterator[None]:
        token = object()
        self.started[token] = time.monotonic()
        try:
            yield
        finally:
            del self.started[token]
            if self.changed is not None:
                self.changed.set()

    def oldest_since(self, t: float) -> float | None:
        """When the oldest decode that started after `t` started; None if there is none."""
        return min((s for s in self.started.values() if s > t), default=None)

    async def wait_change(self, timeout_s: float) -> None:
        if self.changed is None:
            self.changed = asyncio.Event()
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout_s)


@dataclass(frozen=True)
class BatchTiming:
    """One onnxruntime call that answered: how many requests and rows it took, how long its requests had waited for
    it (summed over them), and its three phases: joining their rows into one input, the inference, and splitting
    the output into their answers."""

    requests: int
    rows: int
    queued_s: float
    input_s: float
    infer_s: float
    output_s: float


@dataclass
class _Waiting:
    rows: np.ndarray
    result: asyncio.Future
    since: float


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float, name: str,
                 on_loop: bool = False, on_batch: Callable[[BatchTiming], None] | None = None,
                 decoding: Decoding | None = None, min_patience_s: float = MIN_PATIENCE_S) -> None:
        self.run, self.max_batch, self.max_wait_s, self.on_batch = run, max_batch, max_wait_s, on_batch
        self.name, self.decoding, self.min_patience_s = name, decoding, min_patience_s
        self.thread = None if on_loop else ThreadPoolExecutor(max_workers=1, thread_name_prefix=INFER_THREADS + name,
                                                              initializer=name_os_thread)
        self.waiting: deque[_Waiting] = deque()
        self.draining = False
        self.last_run_s = 0.0  # the last batch's inference, for `_gather`'s patience

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Logits for `rows` (uint8 NHWC), computed in whichever batch they land in."""
        loop = asyncio.get_running_loop()
        item = _Waiting(rows, loop.create_future(), time.monotonic())
        self.waiting.append(item)
        if not self.draining:
            self.draining = True
            loop.create_task(self._drain())
        return await item.result

    def _next_batch(self) -> list[_Waiting]:
        """Up to max_batch rows of the oldest live requests (at least one request, whatever its size)."""
        now = time.monotonic()
        batch: list[_Waiting] = []
        rows = 0
        while self.waiting:
            item = self.waiting[0]
            if item.result.done():  # its client went away (the handler was cancelled): nothing to compute
                self.waiting.popleft()
                continue
            if now - item.since > self.max_wait_s:
                self.waiting.popleft()
                item.result.set_exception(ServerBusy(
                    f"the server is overloaded: the request waited over {self.max_wait_s * 1000:.0f} ms for "
                    "inference; retry shortly"))
                continue
            if batch and rows + len(item.rows) > self.max_batch:
                break
            batch.append(self.waiting.popleft())
            rows += len(item.rows)
        return batch

    async def _gather(self) -> None:
        """Before a batch starts: wait while requests for this model are still decoding and the batch has room, but
        not for a decode that has run longer than `patience`: twice the last batch's inference, `min_patience_s` at
        least. A normal decode ends well within one inference; a slow one (a 40 MP WebP takes 0.5 s) would otherwise
        hold every request for the model until it ends. Its own request joins a later batch.

        The whole wait is bounded by `patience` too. Decodes that begin while it lasts are waited for (at full load
        they are the rest of the batch, arriving), but without that bound a stream of them never let it end: a
        /classify_batch of 60 slow pictures, decoded three at a time, began a new one every ~20 ms, and held a digit
        for the whole 2.3 s of that request; a stream of uploads that fail to decode would hold the model for good."""
        if self.decoding is None:
            return
        patience = max(self.min_patience_s, 2 * self.last_run_s)
        deadline = time.monotonic() + patience
        while sum(len(item.rows) for item in self.waiting) < self.max_batch:
            now = time.monotonic()
            oldest = self.decoding.oldest_since(now - patience)
            if oldest is None or now >= deadline:
                return
            await self.decoding.wait_change(min(oldest + patience, deadline) - now)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._gather()
                batch = self._next_batch()
                if not batch:
                    break
                formed = time.monotonic()
                x = batch[0].rows if len(batch) == 1 else np.concatenate([item.rows for item in batch])
                joined = time.monotonic()
                try:
                    if self.thread is None:
                        await asyncio.sleep(0)  # let the requests that are ready join this batch first
                        t0 = time.monotonic()
                        logits = self.run(x)
                    else:
                        t0 = time.monotonic()
                        logits = await loop.run_in_executor(self.thread, self.run, x)
                    t1 = time.monotonic()
                except Exception as exc:  # noqa: BLE001 (each waiting request gets the failure as its own answer)
                    for item in batch:
                        if not item.result.done():
                            item.result.set_exception(exc)
                    continue
                self.last_run_s = t1 - t0
                start = 0
                for item in batch:
                    end = start + len(item.rows)
                    if not item.result.done():
                        item.result.set_result(logits[start:end])
                    start = end
                if self.on_batch is not None:
                    try:
                        self.on_batch(BatchTiming(len(batch), len(x), sum(formed - item.since for item in batch),
                                                  joined - formed, self.last_run_s, time.monotonic() - t1))
                    except Exception:  # noqa: BLE001 (a metrics bug must not stop the batches still waiting)
                        log.exception("reporting a batch of %s failed", self.name)
        finally:
            self.draining = False
