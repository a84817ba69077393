"""Fixtures: the whole server over in-memory streams, a real server process, a clean cwd.

The plumbing itself lives in collab_trio.testing, which tests import directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
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


# The throwaway Postgres cluster (tools/pg_cluster.sh; .ci/run starts one).
TEST_DATABASE_URL_ENV = "COLLAB_TRIO_TEST_DATABASE_URL"
STORES = ("sqlite", "postgres")


@pytest.fixture
def database_url() -> Iterator[str]:
    """A database URL of its own for this test: a fresh schema on the test
    cluster, dropped afterwards (safe beside other xdist workers).

    Without a cluster the test is skipped, except under CI (env CI set),
    where Postgres must be there: it fails.
    """
    base = os.environ.get(TEST_DATABASE_URL_ENV)
    if not base:
        why = f"no Postgres: ${TEST_DATABASE_URL_ENV} is not set (eval \"$(tools/pg_cluster.sh start DIR)\")"
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide Postgres; {why}")
        pytest.skip(why)
    import psycopg

    schema = f"test_{uuid.uuid4().hex[:20]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    # Every connection of the URL works in that schema (libpq's options).
    yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def store_settings(request: pytest.FixtureRequest, data_dir: Path) -> Callable[[str], dict[str, Any]]:
    """`start_server(**store_settings("postgres"))`: the settings of a store by name."""

    def settings(kind: str) -> dict[str, Any]:
        if kind == "postgres":
            return {"store": "postgres", "database_url": request.getfixturevalue("database_url")}
        return {"store": kind, "data_dir": str(data_dir)}

    return settings


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
