"""The collab-trio command line: options, errors, and the smoke subcommand."""

from __future__ import annotations

import os
import re
import shutil
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import collab_trio
from collab_trio import __version__
from collab_trio.cli import build_parser, main
from collab_trio.testing import ProcessOutput, RunningServer, child_env


def run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "collab_trio"]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"collab-trio {__version__}"


CHECKOUT = Path(__file__).resolve().parents[1]


def test_changelog_has_a_section_for_the_version() -> None:
    headings = [line for line in (CHECKOUT / "CHANGELOG.md").read_text(encoding="utf-8").splitlines()
                if line.startswith("## ")]
    assert headings[0] == "## [Unreleased]"
    assert re.fullmatch(rf"## \[{re.escape(__version__)}\] - \d{{4}}-\d\d-\d\d", headings[1]), headings


def test_license_matches_pyproject() -> None:
    project = tomllib.loads((CHECKOUT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (CHECKOUT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n\nCopyright (c) ")
    assert "collab-trio contributors" in text.splitlines()[2]
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_serve_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.max_message_size) == ("0.0.0.0", 8765, 1024 * 1024)
    assert (args.idle_timeout, args.shutdown_timeout, args.debug) == (90.0, 1.5, False)


@pytest.mark.parametrize(
    ("option", "value", "accepted"),
    [
        ("--max-message-size", "512K", 512 * 1024),
        ("--max-message-size", "2M", 2 * 1024 * 1024),
        ("--max-message-size", "1000", 1000),
        ("--idle-timeout", "0.5", 0.5),
        ("--port", "0", 0),
    ],
)
def test_serve_option_values(option: str, value: str, accepted: float) -> None:
    args = build_parser().parse_args(["serve", option, value])
    assert getattr(args, option.lstrip("-").replace("-", "_")) == accepted


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "70000", "port must be between 0 and 65535"),
        ("--port", "http", "not a port number"),
        ("--max-message-size", "lots", "not a size"),
        ("--max-message-size", "0", "size must be positive"),
        ("--idle-timeout", "-1", "seconds must be positive"),
        ("--shutdown-timeout", "soon", "not a number of seconds"),
        ("--rate-limit", "0", "messages per second must be positive"),
        ("--rate-limit", "-5", "messages per second must be positive"),
        ("--rate-limit", "fast", "not a number of messages per second"),
    ],
)
def test_serve_rejects_bad_values(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", option, value])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_reverse_proxy_options(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["serve", "--base-path", "collab/", "--trusted-proxy", "127.0.0.1", "--trusted-proxy", "10.0.0.0/8"]
    )
    assert (args.base_path, args.trusted_proxy) == ("/collab", ["127.0.0.1/32", "10.0.0.0/8"])
    for option, value, message in [
        ("--base-path", "/a b", "base path '/a b' may contain only letters"),
        ("--trusted-proxy", "proxy.lan", "not an IP address or network: 'proxy.lan'"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["serve", option, value])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument {option}: {message}" in err and err.count("error:") == 1


# Make `import PyQt6` fail the way it does where the qt extra is missing.
WITHOUT_PYQT6 = (
    "import sys; sys.modules['PyQt6'] = None; "
    "from collab_trio.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_smoke_without_pyqt6_says_how_to_install_from_the_checkout() -> None:
    result = run_cli("smoke", "ws://127.0.0.1:9", code=WITHOUT_PYQT6)
    assert result.returncode == 2
    checkout = Path(collab_trio.__file__).resolve().parents[2]
    assert f"install it with: pip install -e '{checkout}[qt]'\n" in result.stderr
    assert "Traceback" not in result.stderr
    # The command works from anywhere: that directory is a project with a qt extra of PyQt6.
    project = tomllib.loads((checkout / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "collab-trio"
    assert any(requirement.startswith("PyQt6") for requirement in project["optional-dependencies"]["qt"])


def test_smoke_without_pyqt6_outside_a_checkout_names_the_requirement(tmp_path: Path) -> None:
    # collab_trio as a wheel installs it: no pyproject.toml two levels up.
    site = tmp_path / "site-packages"
    shutil.copytree(Path(collab_trio.__file__).parent, site / "collab_trio")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYQT6, "smoke", "ws://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, "PYTHONPATH": str(site)},
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "install it with: pip install 'PyQt6>=6.5'\n" in result.stderr, result.stderr


def test_smoke_help_is_the_clients() -> None:
    result = run_cli("smoke", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: collab-trio smoke")
    assert "--duration" in result.stdout


def test_smoke_command_passes_against_a_real_server(server: RunningServer) -> None:
    client = ProcessOutput(
        "collab-trio smoke",
        [sys.executable, "-m", "collab_trio", "smoke", server.url, "--interval", "0.5", "--duration", "1"],
        child_env(),
    )
    try:
        returncode = client.wait(60)
    finally:
        client.stop()
    assert returncode == 0, client.text()
    assert client.lines[-1] == "PASS", client.text()


@pytest.mark.parametrize("value", ["inf", "1e12", "86401"])
def test_restore_timeout_is_at_most_a_day(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A request the server has not taken is dropped after a day; beyond that
    # the wait (and the request's expiry date) made no sense, and inf or 1e12
    # ended in an OverflowError.
    with pytest.raises(SystemExit) as info:
        main(["sessions", "restore", "s", "--version", "1", "--timeout", value])
    assert info.value.code == 2
    assert "argument --timeout: at most 86400 seconds (a day)" in capsys.readouterr().err


MALLOC_PROBE = """
import sys
from collab_trio.cli import give_big_buffers_back

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024

fixed = sys.argv[1] == "fixed" and give_big_buffers_back()
big = b"x" * (24 * 1024 * 1024)  # freed: glibc's own threshold would rise past 8 MiB
del big
before = rss()
kept = []
for _ in range(4):
    buffer = b"x" * (8 * 1024 * 1024)  # a big frame, written, then gone
    kept.append(len(buffer))
    del buffer
print(fixed, rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt and its threshold are glibc's")
def test_serve_gives_freed_big_buffers_back_to_the_os() -> None:
    """With glibc's mmap threshold fixed at 1 MiB (what `serve` does first),
    a freed 8 MiB buffer leaves the process; with glibc's own rising
    threshold it stays in the heap."""
    growth = {}
    for mode in ("fixed", "glibc"):
        done = subprocess.run(
            [sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True, text=True, timeout=60, check=True,
            env=child_env(),
        )
        fixed, grown = done.stdout.split()
        assert fixed == str(mode == "fixed")
        growth[mode] = int(grown)
    assert growth["fixed"] < 2 * 1024 * 1024 <= 6 * 1024 * 1024 <= growth["glibc"], growth


def test_give_big_buffers_back_where_ctypes_cannot_open_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows, ctypes.CDLL(None) raises TypeError (ctypes/__init__.py:
    `if '/' in name`, cpython#83424): `serve` must go on without mallopt, not crash."""
    import collab_trio.cli as cli

    def windows_cdll(name: str | None, *args: object, **kwargs: object) -> object:
        if "/" in name or "\\" in name:  # type: ignore[operator]  # CPython's CDLL.__init__ on Windows
            raise AssertionError("not reached for name=None")
        raise AssertionError("only CDLL(None) is expected")

    monkeypatch.setattr(cli.ctypes, "CDLL", windows_cdll)
    assert cli.give_big_buffers_back() is False
