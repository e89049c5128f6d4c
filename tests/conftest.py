"""Shared fixtures: one real `bentoml serve` of the default models for the whole test session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import free_port, start_server, stop_server, wait_ready  # noqa: E402


@pytest.fixture(scope="session")
def server_proc() -> Iterator[subprocess.Popen]:
    """The `bentoml serve` process behind `server` (its log: serverproc.server_log); `base_url` is its address."""
    port = free_port()
    proc = start_server(port)
    try:
        proc.base_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        wait_ready(proc.base_url, proc)  # type: ignore[attr-defined]
        yield proc
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def server(server_proc: subprocess.Popen) -> str:
    """Base URL (http://127.0.0.1:<port>) of a ready service serving every model in models/."""
    return server_proc.base_url  # type: ignore[attr-defined]
