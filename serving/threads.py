"""Our threads carry their names into the operating system, so that `top -H`, `ps -L`, py-spy and /proc tell a
worker's decoding threads, its inference thread and its event loop apart. `make bench` reads from /proc where each
image's CPU goes (docs/loadtests.md)."""

from __future__ import annotations

import ctypes
import sys
import threading

# The names' prefixes, in one place: the pools below name their threads `<prefix>_<index>`, and `make bench` sorts
# a worker's CPU by them (loadtests/bench.py, `cpu_split`).
DECODE_THREADS = "decode"  # Pillow and the preprocessing (the service's and the batch CLI's decode pools)
LARGE_DECODE_THREAD = DECODE_THREADS + "-large"  # the service's pictures over LARGE_PICTURE_PIXELS, one at a time
INFER_THREADS = "infer-"  # + the model's name: MicroBatcher's onnxruntime thread

_PR_SET_NAME = 15  # prctl(2): names the calling thread; Linux keeps the first 15 bytes
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def name_os_thread() -> None:
    """Give the calling thread's Python name (e.g. `decode_0`) to the OS: a thread pool's `initializer`.
    Elsewhere than on Linux it does nothing. It never raises: an initializer that raises breaks its whole pool."""
    if _LIBC is None:
        return
    try:
        _LIBC.prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)  # -1 on failure, ignored
    except (AttributeError, OSError, ctypes.ArgumentError):  # a libc without prctl
        pass
