"""Fixtures: the whole server over in-memory streams, a real server process, a clean cwd.

The plumbing itself lives in collab_trio.testing, which tests import directly.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from collab_trio.testing import Harness, RunningServer, start_memory_server, start_server_output


# Slow tests that start first, so that under xdist the other worker runs the
# rest of the suite meanwhile.
SLOW_FIRST = ("tests/test_soak.py::",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(SLOW_FIRST))


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis keeps its caches in a temp dir, not in ./.hypothesis of the checkout.

    Here rather than in a fixture: it writes them while the first tests are collected.
    """
    from hypothesis import configuration

    home = tempfile.mkdtemp(prefix="collab-trio-hypothesis-")
    configuration.set_hypothesis_home_dir(home)
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test, and every process it starts, works in its own temp dir.

    The data directory comes from the environment, and the working directory
    is the temp dir too, so that a relative path (./collab-data, a report)
    can't land in the checkout.
    """
    path = tmp_path / "collab-data"
    monkeypatch.setenv("COLLAB_TRIO_DATA_DIR", str(path))
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def start_server(nursery: trio.Nursery) -> Callable[..., Any]:
    """`harness = await start_server(idle_timeout=5, ...)`: a server with these settings."""

    async def start(**settings: Any) -> Harness:
        """Settings are ServerConfig fields; `_store=` passes a store object."""
        return await start_memory_server(nursery, **settings)

    return start


@pytest.fixture
async def harness(start_server: Callable[..., Any]) -> Harness:
    """A server with default settings."""
    return await start_server()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    """A real server on a free port of 127.0.0.1, stopped (or killed) afterwards."""
    running = start_server_output()
    try:
        yield running
    finally:
        running.output.stop()
        # Shown by pytest only when the test failed.
        print(f"--- server output ---\n{running.output.text()}")
