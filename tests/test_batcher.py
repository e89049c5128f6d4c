"""The front workers' micro-batcher (serving/batcher.py) with the real LeNet-5 session: what lands in one call.

The HTTP side of the same behaviour (a bad upload costs nobody else their answer, the 503 when shedding) is in
test_service.py; the throughput it buys is measured by `make bench`, never asserted here.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from serving.batcher import BatchTiming, Decoding, MicroBatcher
from serving.registry import DEFAULT_MODELS_DIR, load_model


@pytest.fixture(scope="module")
def lenet():
    return load_model(DEFAULT_MODELS_DIR / "lenet5", device="cpu", threads=1)


def digits(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)


def make(lenet, on_loop: bool, max_batch: int = 32, patience_s: float = 2.0,
         timings: list[BatchTiming] | None = None) -> tuple[MicroBatcher, Decoding, list[int]]:
    calls: list[int] = []  # the rows of each onnxruntime call
    decoding = Decoding()

    def on_batch(timing: BatchTiming) -> None:
        assert 0 < timing.infer_s < 10, timing  # the call's own time, reported after it
        assert timing.input_s >= 0 and timing.output_s >= 0 and timing.queued_s >= 0, timing
        calls.append(timing.rows)
        if timings is not None:
            timings.append(timing)

    batcher = MicroBatcher(lenet.logits, max_batch, 10.0, "lenet5", on_loop=on_loop, on_batch=on_batch,
                           decoding=decoding, min_patience_s=patience_s)
    return batcher, decoding, calls


async def decode_then_submit(batcher: MicroBatcher, decoding: Decoding, rows: np.ndarray, seconds: float,
                             fails: bool = False) -> np.ndarray | None:
    """What the API does for one upload: the decode runs under `decoding`, then the rows go to the batcher."""
    with decoding.upload():
        await asyncio.sleep(seconds)  # the decode, in a thread in real life
    if fails:
        return None  # a corrupt upload: answered 400 by the API, never reaches the batcher
    return await batcher(rows)


@pytest.mark.parametrize("on_loop", [True, False], ids=["on-loop", "infer-thread"])
def test_a_lone_request_runs_at_once_as_a_batch_of_one(lenet, on_loop: bool) -> None:
    batcher, _, calls = make(lenet, on_loop)
    x = digits(1)
    out = asyncio.run(batcher(x))
    assert calls == [1]
    np.testing.assert_array_equal(out, lenet.logits(x))


@pytest.mark.parametrize("on_loop", [True, False], ids=["on-loop", "infer-thread"])
def test_a_batch_waits_for_the_requests_still_decoding(lenet, on_loop: bool) -> None:
    timings: list[BatchTiming] = []
    batcher, decoding, calls = make(lenet, on_loop, timings=timings)
    first, slow = digits(1), digits(3)

    async def scenario():
        # `slow` starts decoding before `first` reaches the batcher, and takes 50 ms more.
        late = asyncio.create_task(decode_then_submit(batcher, decoding, slow, 0.05))
        await asyncio.sleep(0)
        return await asyncio.gather(batcher(first), late)

    a, b = asyncio.run(scenario())
    assert calls == [4], "the decoding request joined the first call"
    # What the statistics extension reports as queueing: `first` waited the ~50 ms of `slow`'s decode for its batch.
    assert timings[0].requests == 2 and 0.04 < timings[0].queued_s < 5, timings
    np.testing.assert_allclose(a, lenet.logits(first), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, lenet.logits(slow), rtol=1e-5, atol=1e-5)


def test_a_failed_decode_does_not_hold_the_batch(lenet) -> None:
    batcher, decoding, calls = make(lenet, on_loop=False)

    async def scenario():
        bad = asyncio.create_task(decode_then_submit(batcher, decoding, digits(1), 0.02, fails=True))
        await asyncio.sleep(0)
        out = await asyncio.wait_for(batcher(digits(2)), 5)
        return out, await bad

    out, bad = asyncio.run(scenario())
    assert bad is None and out.shape == (2, 10)
    assert calls == [2]
    assert not decoding.started


@pytest.mark.parametrize(("max_batch", "patience_s", "first_rows"), [(4, 2.0, 4), (32, 0.05, 1)],
                         ids=["full-batch", "past-patience"])
def test_a_batch_does_not_wait_for_a_slow_decode_when_full_or_past_its_patience(lenet, max_batch: int,
                                                                                patience_s: float,
                                                                                first_rows: int) -> None:
    # A slow decode (a 40 MP WebP takes 0.5 s, a crafted file more) must not hold every request for the model: the
    # batch waits for it at most `patience`, not at all once full, and the slow request joins a later batch.
    batcher, decoding, calls = make(lenet, on_loop=False, max_batch=max_batch, patience_s=patience_s)
    first, slow = digits(first_rows), digits(3)

    async def scenario():
        late = asyncio.create_task(decode_then_submit(batcher, decoding, slow, 1.0))
        await asyncio.sleep(0)
        early = asyncio.create_task(batcher(first))
        done, _ = await asyncio.wait({early}, timeout=0.6)
        assert early in done, "the batch waited for the whole slow decode"
        return early.result(), await late

    a, b = asyncio.run(scenario())
    assert calls == [first_rows, 3]
    np.testing.assert_allclose(a, lenet.logits(first), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, lenet.logits(slow), rtol=1e-5, atol=1e-5)


def test_a_batch_does_not_wait_for_decodes_that_begin_while_it_waits(lenet) -> None:
    """A request of many slow pictures decodes a few at a time (serving/api.py), so a new decode begins every few
    ms for as long as it lasts. Waiting for those too held a digit for the whole request (2.3 s on the real server,
    tests/test_abuse.py); the wait is bounded by the patience now."""
    batcher, decoding, calls = make(lenet, on_loop=True, patience_s=0.05)

    async def stream_of_decodes(seconds: float) -> None:  # one 60-ms decode beginning every 20 ms
        end = time.monotonic() + seconds
        pending = []
        while time.monotonic() < end:
            pending.append(asyncio.create_task(decode_then_submit(batcher, decoding, digits(1), 0.06, fails=True)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*pending)

    async def scenario() -> float:
        stream = asyncio.create_task(stream_of_decodes(1.5))
        await asyncio.sleep(0.1)  # the stream is under way
        t0 = time.monotonic()
        await batcher(digits(1))
        waited = time.monotonic() - t0
        await stream
        return waited

    waited = asyncio.run(scenario())
    assert waited < 0.5, f"the digit waited {waited:.2f} s, as long as the stream of decodes ran"
    assert calls == [1]
