"""`collab-trio sessions` on odd input, as real processes: one line and an exit
status, never a traceback, and nothing stored that the file did not say."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from collab_trio.testing import child_env


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collab_trio", *args],
        cwd=cwd, env={**child_env(), **(env or {})}, capture_output=True, text=True, timeout=60,
    )


def import_items(tmp_path: Path, data_dir: Path, session: str, text: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / f"{session}.json"
    state.write_text(text)
    return run("sessions", "import", str(state), "--as", session, "--yes", "--data-dir", str(data_dir), cwd=tmp_path)


@pytest.mark.parametrize("days", ["1e6", "1e9", "inf", "nan", "-1"])
def test_prune_refuses_a_number_of_days_out_of_range_in_one_line(tmp_path: Path, days: str) -> None:
    data = tmp_path / "data"
    assert import_items(tmp_path, data, "s1", '{"items": [{"uuid": "a"}]}').returncode == 0
    result = run("sessions", "prune", f"--older-than={days}", "--dry-run", "--data-dir", str(data), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert "--older-than" in result.stderr and "days" in result.stderr


def test_an_empty_data_dir_variable_counts_as_unset_as_for_serve(tmp_path: Path) -> None:
    assert import_items(tmp_path, tmp_path / "collab-data", "s1", '{"items": [{"uuid": "a"}]}').returncode == 0
    result = run("sessions", "list", cwd=tmp_path, env={"COLLAB_TRIO_DATA_DIR": ""})
    assert result.returncode == 0, result
    assert "s1" in result.stdout
    assert not (tmp_path / "collab.sqlite3").exists()


def test_import_refuses_items_with_the_same_uuid(tmp_path: Path) -> None:
    result = import_items(tmp_path, tmp_path / "data", "dup", '[{"uuid": "a", "n": 1}, {"uuid": "a", "n": 2}]')
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    assert "repeats uuid 'a'" in result.stderr


def test_import_refuses_nan_and_infinity(tmp_path: Path) -> None:
    result = import_items(tmp_path, tmp_path / "data", "n", '{"items": [{"uuid": "a", "x": NaN}]}')
    assert result.returncode == 1 and "NaN is not a JSON value" in result.stderr, result
    result = import_items(tmp_path, tmp_path / "data", "n", '{"items": [{"uuid": "a", "x": -Infinity}]}')
    assert result.returncode == 1 and "-Infinity is not a JSON value" in result.stderr, result


def test_import_replaces_a_session_whose_stored_rows_are_unreadable(tmp_path: Path) -> None:
    # What `sessions list` flags as unreadable is mended by importing an export.
    data = tmp_path / "data"
    assert import_items(tmp_path, data, "s1", '{"items": [{"uuid": "a"}]}').returncode == 0
    with sqlite3.connect(data / "collab.sqlite3") as conn:
        conn.execute("UPDATE snapshots SET items = '{bad' WHERE session_id = 's1'")
    result = import_items(tmp_path, data, "s1", '{"items": [{"uuid": "b"}]}')
    assert result.returncode == 0, result
    exported = json.loads(run("sessions", "export", "s1", "--data-dir", str(data), cwd=tmp_path).stdout)
    assert [item["uuid"] for item in exported["items"]] == ["b"]
