"""benchmarks/fanout.py --short, run as CI runs it: it runs, prints every table, and the reference relay loses nothing.

Nothing about speed is asserted. The script bounds every wait itself; the
timeout here only stops a hung run, and kills its whole process group
(the servers and the generator processes too).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from collab_trio.testing import child_env, run_script

REPO = Path(__file__).resolve().parents[1]
FANOUT = REPO / "benchmarks" / "fanout.py"
TIMEOUT = 120
SERVERS = ("reference", "collab-trio")


def run_short() -> tuple[int, str, str]:
    result = run_script("fanout.py --short", [sys.executable, str(FANOUT), "--short"], TIMEOUT, cwd=REPO, env=child_env())
    return result.returncode, result.stdout, result.stderr


def tables(stdout: str) -> dict[str, dict[str, dict[str, str]]]:
    """{scenario title: {row label: {column: cell}}} of every `== title` table."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    lines = stdout.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("== "):
            continue
        columns = re.split(r"\s{2,}", lines[index + 1].strip())
        rows: dict[str, dict[str, str]] = {}
        for row in lines[index + 3:]:  # the header, then a line of dashes
            if not row.startswith("  ") or row.startswith("  note") or ": could not run" in row:
                break
            label, *cells = re.split(r"\s{2,}", row.strip())
            rows[label] = dict(zip(columns, cells))
        out[line[3:]] = rows
    return out


def test_short_run_prints_every_table() -> None:
    returncode, stdout, stderr = run_short()
    output = f"{stdout}\n--- stderr ---\n{stderr}"
    assert returncode == 0, output
    assert stdout.startswith("command: ") and "fanout.py --short" in stdout.splitlines()[0], output
    assert re.search(r"^all 6 runs ran$", stdout, re.M), output

    found = tables(stdout)
    by_kind = {title.split(",")[0]: rows for title, rows in found.items()}
    assert set(by_kind) == {"saturated", "fixed rate", "lab"}, output
    for rows in by_kind.values():
        for row in rows.values():
            assert set(SERVERS) <= set(row), (row, output)
            assert "could not run" not in row.values(), output

    saturated, fixed, lab = by_kind["saturated"], by_kind["fixed rate"], by_kind["lab"]
    for label in ("deliveries/s", "server CPU us/delivery", "every receiver got every command", "disconnects (close codes)"):
        assert label in saturated, (label, output)
    for label in ("latency p50 ms", "latency p99 ms", "server CPU us/delivery"):
        assert label in fixed, (label, output)
    for label in ("command latency p50 ms", "command latency p99 ms", "server CPU us/delivery (cmd+cursor)", "converged"):
        assert label in lab, (label, output)
    # Numbers, not dashes, for both servers.
    for rows, label in ((saturated, "deliveries/s"), (fixed, "latency p99 ms"), (lab, "command latency p99 ms")):
        for server in SERVERS:
            assert re.fullmatch(r"[\d,]+(\.\d+)?", rows[label][server]), (label, server, output)

    # The reference relay has no limits and no coalescing: every command reaches every receiver.
    assert saturated["every receiver got every command"]["reference"] == "yes", output
    assert fixed["every receiver got every command"]["reference"] == "yes", output
    assert saturated["disconnects (close codes)"]["reference"] == "0", output
    assert lab["missed commands (not moves)"]["reference"] == "0", output
    assert lab["moves coalesced by the server"]["reference"] == "0", output
    assert lab["disconnects (close codes)"]["reference"] == "0", output
    assert re.fullmatch(r"yes \((\d+) of \1\)", lab["converged"]["reference"]), output


def test_a_variant_of_collab_trio_runs_beside_it_with_its_own_ratio_column() -> None:
    command = [sys.executable, str(FANOUT), "--short", "--scenarios", "fixed", "--servers", "collab-trio,variant",
               "--variant-args", "--pending-delay 0.5"]
    result = run_script("fanout.py variant", command, TIMEOUT, cwd=REPO, env=child_env())
    output = f"{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, output
    assert "variant: collab-trio as above, plus --pending-delay 0.5;" in result.stdout, output
    (fixed,) = tables(result.stdout).values()
    assert set(fixed["latency p99 ms"]) == {"collab-trio", "variant", "variant/collab"}, output
    for server in ("collab-trio", "variant"):
        assert re.fullmatch(r"\d+\.\d+", fixed["latency p99 ms"][server]), output
        assert fixed["every receiver got every command"][server] == "yes", output
    assert re.fullmatch(r"\d+\.\d+", fixed["latency p99 ms"]["variant/collab"]), output


def test_the_variant_gets_its_options_environment_and_checkout(tmp_path: Path) -> None:
    """A checkout whose collab_trio only says what it was given, then fails
    to start: the variant "could not run", and its output shows all three."""
    package = tmp_path / "collab_trio"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import os, sys\n"
        "print('other checkout:', sys.argv[1:], os.environ.get('FANOUT_VARIANT_PROBE'), flush=True)\n"
        "sys.exit(3)\n"
    )
    command = [sys.executable, str(FANOUT), "--short", "--scenarios", "fixed", "--servers", "collab-trio,variant",
               "--variant-args", "--pending-delay 0.5", "--variant-env", "FANOUT_VARIANT_PROBE=seen",
               "--variant-pythonpath", str(tmp_path)]
    result = run_script("fanout.py variant", command, TIMEOUT, cwd=REPO, env=child_env())
    output = f"{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 2, output  # a run could not run
    assert re.search(r"other checkout: \[.*'--pending-delay', '0\.5'\] seen", output), output
    (fixed,) = tables(result.stdout).values()
    assert fixed["latency p99 ms"]["variant"] == "could not run", output
    assert re.fullmatch(r"\d+\.\d+", fixed["latency p99 ms"]["collab-trio"]), output


def test_the_variant_options_are_checked_and_its_checkout_path_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import fanout
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    (tmp_path / "src" / "collab_trio").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args = fanout.parse_args(["--servers", "collab-trio,variant", "--variant-pythonpath", "src",
                              "--variant-args=--debug", "--variant-env", "A_B=1=2"])
    # The server runs elsewhere: a relative path would silently run this checkout.
    assert args.variant_pythonpath == str(tmp_path / "src")
    assert args.variant_args == ["--debug"] and args.variant_env == {"A_B": "1=2"}
    for argv, message in (
        (["--variant-args", "--pending-delay 1"], "need `variant` in --servers"),
        (["--servers", "variant", "--variant-env", "1A=1"], "not NAME=VALUE"),
        (["--servers", "variant", "--variant-env", "PYTHONPATH=/x"], "say --variant-pythonpath"),
        (["--servers", "variant", "--variant-pythonpath", "elsewhere"], "no collab_trio package in"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            fanout.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
