"""Shared fixtures: one real `bentoml serve` of the default models for the whole test session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import free_port, start_server, stop_server, wait_ready  # noqa: E402


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    """Base URL (http://127.0.0.1:<port>) of a ready service serving every model in models/."""
    port = free_port()
    proc = start_server(port)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc)
        yield base
    finally:
        stop_server(proc)
