"""`serve` settings from --config (TOML), COLLAB_TRIO_* variables and the command line.

Pure: settings.resolve() and cli.serve_settings() take the environment as a
mapping, so nothing here touches os.environ or starts a server.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

import attrs
import hypothesis.strategies as st
import pytest
import tomli_w
from hypothesis import HealthCheck, given
from hypothesis import settings as settings_profile

from collab_trio import settings
from collab_trio.cli import CLI_ONLY_OPTIONS, CONFIG_FIELD_OF, config_from, main, serve_parser, serve_settings
from collab_trio.config import MIB, ServerConfig
from collab_trio.settings import SettingsError, env_name, option_name

# A valid value for each option, as text, and what it parses to. Options not
# listed here use their default's text (the source then shows who set it);
# options without one (None, "", a list) must be listed.
SAMPLES: dict[str, tuple[str, Any]] = {
    "host": ("127.0.0.1", "127.0.0.1"),
    "port": ("4321", 4321),
    "max-message-size": ("2M", 2 * MIB),
    "idle-timeout": ("12.5", 12.5),
    "data-dir": ("elsewhere", "elsewhere"),
    "database-url": ("postgresql://db.example/collab", "postgresql://db.example/collab"),
    "node-id": ("node-b", "node-b"),
    "retention": ("77", 77),
    "tokens": ("tokens.toml", "tokens.toml"),
    "allowed-origin": ("https://lab.example", ["https://lab.example"]),
    "certfile": ("cert.pem", "cert.pem"),
    "keyfile": ("key.pem", "key.pem"),
    "rate-limit": ("12.5", 12.5),
    "max-queue-bytes": ("512K", 512 * 1024),
    # Options of the other parts of issue #11, for when they are merged.
    "metrics-address": ("127.0.0.1:9100", "127.0.0.1:9100"),
    "base-path": ("/collab", "/collab"),
    "trusted-proxy": ("10.0.0.0/8", ["10.0.0.0/8"]),
}


def serve_options() -> list[argparse.Action]:
    """Every option of `collab-trio serve` but --help, the hidden ones and --config/--print-config."""
    return [
        action
        for action in serve_parser()._actions
        if action.option_strings
        and action.dest not in ("help", "config", "print_config")
        and action.help is not argparse.SUPPRESS
    ]


def sample(action: argparse.Action) -> tuple[Any, str, list[str], Any]:
    """(TOML value, environment text, command-line words, parsed value) for a non-default setting."""
    option = action.option_strings[-1]
    name = option_name(action)
    if action.nargs == 0:  # a flag
        return True, "yes", [option], action.const
    if action.choices is not None and name not in SAMPLES:
        choice = next(c for c in action.choices if c != action.default)
        return choice, choice, [option, choice], choice
    if name in SAMPLES:
        text, parsed = SAMPLES[name]
    else:
        usable = action.default not in (None, "") and not isinstance(action.default, (list, tuple))
        assert usable, f"add a sample value for {option} to SAMPLES in {__file__}"
        text, parsed = str(action.default), action.default
    if isinstance(action, argparse._AppendAction):
        return [text], text, [option, text], parsed
    return text, text, [option, text], parsed


def write_config(tmp_path: Path, text: str, name: str = "collab.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def toml_line(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{key} = {'true' if value else 'false'}\n"
    if isinstance(value, list):
        return f"{key} = [{', '.join(repr(item) for item in value)}]\n".replace("'", '"')
    return f'{key} = "{value}"\n'


def test_every_option_is_covered() -> None:
    names = [option_name(action) for action in serve_options()]
    # The options this module was written against, at least; new ones join the parametrization below.
    assert {"host", "port", "tokens", "allowed-origin", "debug", "log-level", "log-format", "fsync"} <= set(names)
    assert names == [option_name(a) for a in settings.configurable_actions(serve_parser())]


@pytest.mark.parametrize("action", serve_options(), ids=option_name)
def test_every_option_from_file_and_env_with_precedence(action: argparse.Action, tmp_path: Path) -> None:
    toml_value, env_text, words, parsed = sample(action)
    path = write_config(tmp_path, toml_line(option_name(action), toml_value))
    variable = env_name(action)
    assert variable == "COLLAB_TRIO_" + option_name(action).upper().replace("-", "_")

    from_file = serve_settings(["serve", "--config", path], {})
    assert getattr(from_file.values, action.dest) == parsed
    assert from_file.sources[action.dest] == f"file {path}"

    from_env = serve_settings(["serve"], {variable: env_text})
    assert getattr(from_env.values, action.dest) == parsed
    assert from_env.sources[action.dest] == f"env {variable}"

    # Environment over file, command line over both.
    both = serve_settings(["serve", "--config", path], {variable: env_text})
    assert both.sources[action.dest] == f"env {variable}"
    everything = serve_settings(["serve", "--config", path, *words], {variable: env_text})
    assert getattr(everything.values, action.dest) == parsed
    assert everything.sources[action.dest] == "command line"

    neither = serve_settings(["serve"], {})
    assert neither.sources[action.dest] == "default"


def test_precedence_picks_each_layers_value(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'port = 1111\nhost = "10.0.0.1"\nstore = "memory"\nretention = 5\n')
    environ = {"COLLAB_TRIO_PORT": "2222", "COLLAB_TRIO_HOST": "10.0.0.2", "COLLAB_TRIO_CONFIG": path}
    resolved = serve_settings(["serve", "--port", "3333"], environ)
    values = resolved.values
    assert (values.port, values.host, values.store, values.retention, values.fsync) == (
        3333, "10.0.0.2", "memory", 5, "normal"
    )
    assert resolved.sources["port"] == "command line"
    assert resolved.sources["host"] == "env COLLAB_TRIO_HOST"
    assert resolved.sources["store"] == f"file {path}"
    assert resolved.sources["fsync"] == "default"
    # --config on the command line wins over $COLLAB_TRIO_CONFIG.
    other = write_config(tmp_path, "retention = 9\n", "other.toml")
    assert serve_settings(["serve", "--config", other], environ).values.retention == 9


def test_toml_types_and_spellings(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "port = 8000\nidle_timeout = 2.5\nmax-message-size = 2097152\ndebug = false\n"
        'allowed-origin = ["https://a.example", "https://b.example"]\n',
    )
    values = serve_settings(["serve", "--config", path], {}).values
    assert (values.port, values.idle_timeout, values.max_message_size, values.debug) == (8000, 2.5, 2 * MIB, False)
    assert values.allowed_origin == ["https://a.example", "https://b.example"]


def test_env_lists_flags_and_empty_values() -> None:
    environ = {
        "COLLAB_TRIO_ALLOWED_ORIGIN": "https://a.example, https://b.example",
        "COLLAB_TRIO_DEBUG": "0",
        "COLLAB_TRIO_PORT": "",  # empty is unset
        "COLLAB_TRIO_CRASH_ROUNDS": "5",  # not an option: another tool's variable, ignored
    }
    resolved = serve_settings(["serve"], environ)
    assert resolved.values.allowed_origin == ["https://a.example", "https://b.example"]
    assert resolved.values.debug is False and resolved.sources["debug"] == "env COLLAB_TRIO_DEBUG"
    assert resolved.values.port == 8765 and resolved.sources["port"] == "default"
    assert serve_settings(["serve"], {"COLLAB_TRIO_DEBUG": "TRUE"}).values.debug is True


def test_the_command_line_replaces_a_list_from_elsewhere() -> None:
    environ = {"COLLAB_TRIO_ALLOWED_ORIGIN": "https://a.example"}
    resolved = serve_settings(["serve", "--allowed-origin", "https://c.example"], environ)
    assert resolved.values.allowed_origin == ["https://c.example"]


def test_every_problem_is_one_line_naming_its_source(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'prot = 80\nidle-timeout = -1\nstore = "disk"\ndebug = "yes"\nhost = 5\nprint-config = true\n'
        "port = 1\nport_ = 2\nmax_sessions = 3\nmax-sessions = 4\n",
    )
    environ = {"COLLAB_TRIO_MAX_MESSAGE_SIZE": "lots", "COLLAB_TRIO_DEBUG": "maybe", "COLLAB_TRIO_RATE_LIMIT": "0"}
    with pytest.raises(SettingsError) as info:
        serve_settings(["serve", "--config", path], environ)
    assert info.value.problems == [
        f"{path}: unknown key 'prot' (did you mean 'port'?)",
        f"{path}: idle-timeout: seconds must be positive",
        f"{path}: store: invalid choice: 'disk' (choose from 'sqlite', 'memory', 'postgres')",
        f"{path}: debug: expected true or false, got a string ('yes')",
        f"{path}: host: expected a string, got an integer (5)",
        f"{path}: 'print-config' can't be set in a config file",
        f"{path}: unknown key 'port_' (did you mean 'port'?)",
        f"{path}: 'max-sessions' repeats 'max_sessions'",
        "COLLAB_TRIO_DEBUG: expected 1/0, true/false, yes/no or on/off, got 'maybe'",
        "COLLAB_TRIO_MAX_MESSAGE_SIZE: not a size: 'lots' (try 1048576, 512K or 1M)",
        "COLLAB_TRIO_RATE_LIMIT: messages per second must be positive",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("port = ", "is not valid TOML"),
        (None, "cannot read config file"),
        ("# Zug\u00e4nge (saved in Latin-1)\nport = 0\n".encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_unusable_file(tmp_path: Path, text: str | bytes | None, problem: str) -> None:
    if isinstance(text, bytes):
        (tmp_path / "latin-1.toml").write_bytes(text)
        path = str(tmp_path / "latin-1.toml")
    else:
        path = write_config(tmp_path, text) if text is not None else str(tmp_path / "missing.toml")
    with pytest.raises(SettingsError) as info:
        serve_settings(["serve", "--config", path], {})
    [line] = info.value.problems
    assert problem in line and path in line


def test_main_lists_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "prot = 1\nretention = 0\n")
    assert main(["serve", "--config", path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"collab-trio serve: error: {path}: unknown key 'prot' (did you mean 'port'?)",
        f"collab-trio serve: error: {path}: retention: must be at least 1",
    ]


def test_print_config_shows_sources_and_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, 'store = "memory"\nallowed-origin = ["https://a.example"]\n')
    monkeypatch.setenv("COLLAB_TRIO_MAX_MESSAGE_SIZE", "2M")
    assert main(["serve", "--config", path, "--port", "0", "--print-config"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert 'store = "memory"  # file ' + path in lines
    assert "max-message-size = 2097152  # env COLLAB_TRIO_MAX_MESSAGE_SIZE" in lines
    assert "port = 0  # command line" in lines
    assert "fsync = \"normal\"  # default" in lines
    assert "# tokens: not set (default)" in lines
    # Fed back as a config file (with nothing else set), it gives the same settings.
    printed = tmp_path / "printed.toml"
    printed.write_text(out, encoding="utf-8")
    assert set(tomllib.loads(out)) <= {option_name(a) for a in serve_options()}
    first = serve_settings(["serve", "--config", path, "--port", "0"], os.environ)
    again = serve_settings(["serve", "--config", str(printed)], {})
    for action in serve_options():
        assert getattr(again.values, action.dest) == getattr(first.values, action.dest), action.dest


def test_every_option_reaches_server_config() -> None:
    fields = {field.name for field in attrs.fields(ServerConfig)}
    for action in serve_parser()._actions:
        assert action.dest in CLI_ONLY_OPTIONS or CONFIG_FIELD_OF.get(action.dest, action.dest) in fields, (
            f"{action.option_strings}: no ServerConfig field {action.dest!r}; add one, or list it in"
            " CLI_ONLY_OPTIONS / CONFIG_FIELD_OF"
        )


def test_server_config_from_file_and_env(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'max-message-size = "2M"\ntokens = "t.toml"\nallowed-origin = ["https://a.example"]\n')
    resolved = serve_settings(["serve", "--config", path], {"COLLAB_TRIO_LOG_LEVEL": "debug"})
    config = config_from(resolved.values)
    assert config.max_message_size == 2 * MIB
    assert config.tokens_file == "t.toml"
    assert config.allowed_origins == ("https://a.example",)
    assert config.debug is True  # --log-level debug is --debug
    assert config_from(serve_settings(["serve"], {}).values) == ServerConfig(data_dir="collab-data")


def test_the_documented_example_sets_every_option(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "CONFIGURATION.md").read_text(encoding="utf-8")
    example = doc.split("<!-- config-example -->\n```toml\n", 1)[1].split("```", 1)[0]
    assert set(tomllib.loads(example)) == {option_name(action) for action in serve_options()}
    path = write_config(tmp_path, example)
    resolved = serve_settings(["serve", "--config", path], {})
    assert all(resolved.sources[action.dest] == f"file {path}" for action in serve_options())
    assert resolved.values.data_dir == "/var/lib/collab-trio"


TOML_VALUES = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=5,
)
KEYS = st.sampled_from([option_name(action) for action in serve_options()] + ["config", "prot", "max_sessions"]) | st.text(
    max_size=10
)


@settings_profile(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.dictionaries(KEYS, TOML_VALUES, max_size=6), environ=st.dictionaries(
    st.sampled_from([env_name(action) for action in serve_options()]), st.text(max_size=12), max_size=4
))
def test_any_file_and_environment_give_settings_or_one_line_problems(
    tmp_path: Path, data: dict[str, Any], environ: dict[str, str]
) -> None:
    path = write_config(tmp_path, tomli_w.dumps(data))
    try:
        resolved = serve_settings(["serve", "--config", path], environ)
    except SettingsError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert "\n" not in problem
            assert problem.startswith(f"{path}: ") or problem.split(":")[0] in environ, problem
    else:
        assert all(not source.startswith("env ") or source[4:] in environ for source in resolved.sources.values())


def test_print_config_hides_the_database_password(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://collab:s3cret@db.example/collab?sslmode=require"
    assert main(["serve", "--store", "postgres", "--database-url", url, "--port", "0", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert (
        'database-url = "postgresql://collab:***@db.example/collab?sslmode=require"'
        "  # command line; password hidden" in out.splitlines()
    )
