"""The collab-trio command line: options, errors, and the smoke subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def test_smoke_without_pyqt6_says_how_to_install() -> None:
    # Make `import PyQt6` fail the way it does where the qt extra is missing.
    code = (
        "import sys; sys.modules['PyQt6'] = None; "
        "from collab_trio.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = run_cli("smoke", "ws://127.0.0.1:9", code=code)
    assert result.returncode == 2
    assert "pip install 'collab-trio[qt]'" in result.stderr
    assert "Traceback" not in result.stderr


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
