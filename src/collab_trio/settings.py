"""Settings of `collab-trio serve` from the command line, the environment and a TOML file.

Generic over an argparse parser: every option of the parser (but --help, the
hidden ones and the two below) can be set as

- a key of the `--config` file, named like the option without its dashes
  (`max-message-size = "2M"`; `max_message_size` is accepted too);
- an environment variable `COLLAB_TRIO_<OPTION>` (`COLLAB_TRIO_MAX_MESSAGE_SIZE=2M`);

with the precedence command line > environment > file > default. Values go
through the option's own `type=` converter and `choices`, so they are
checked exactly as on the command line. Flags (store_true) take TOML
booleans and 1/0, true/false, yes/no, on/off from the environment; repeatable
options (append) take a TOML list or a comma-separated variable.

Pure: no trio, no logging; problems come back as one line each.
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import tomli_w

ENV_PREFIX = "COLLAB_TRIO_"
# The option naming the file, and the one printing the result: they say where
# settings come from, not what they are.
CONFIG_OPTION = "config"
PRINT_OPTION = "print-config"
META_OPTIONS = (CONFIG_OPTION, PRINT_OPTION)
DEFAULT = "default"
COMMAND_LINE = "command line"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(Exception):
    """Settings that can't be used: `problems` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@attrs.frozen
class Settings:
    """The effective settings: `values` as argparse would give them, and each one's source."""

    values: argparse.Namespace
    # dest -> "default", "command line", "env NAME" or "file PATH".
    sources: dict[str, str]
    config_file: str | None = None


def option_name(action: argparse.Action) -> str:
    """The name of an option in a config file: its long form without the dashes."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0].lstrip("-")


def env_name(action: argparse.Action) -> str:
    """The environment variable that sets an option, e.g. COLLAB_TRIO_MAX_MESSAGE_SIZE."""
    return ENV_PREFIX + option_name(action).upper().replace("-", "_")


def configurable_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a file or the environment can set, in the parser's order."""
    return [
        action
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        and action.help is not argparse.SUPPRESS
        and option_name(action) not in META_OPTIONS
    ]


def explicit_values(parser: argparse.ArgumentParser, args: Sequence[str]) -> dict[str, Any]:
    """The options given in `args`, by dest, converted (argparse exits on bad ones).

    Changes `parser`: pass one built for this call.
    """
    for action in _all_actions(parser):
        if action.option_strings:
            action.default = argparse.SUPPRESS
    return vars(parser.parse_args(args))


def _all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions.extend(_all_actions(sub))
    return actions


def resolve(
    parser: argparse.ArgumentParser,
    explicit: Mapping[str, Any],
    environ: Mapping[str, str],
) -> Settings:
    """Layer defaults, the config file, the environment and `explicit` (the command line).

    `parser` is the one whose options are resolved (its defaults are the
    defaults); `explicit` holds the options given on the command line by dest
    (explicit_values()).

    Raises:
        SettingsError: unknown keys, bad values or an unreadable file; every
            problem is listed, each naming its file and key or its variable.
    """
    actions = configurable_actions(parser)
    problems: list[str] = []
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for action in parser._actions:
        if action.dest is argparse.SUPPRESS or not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        default = action.default
        if isinstance(default, str) and action.type is not None:
            default = _convert_text(parser, action, default)  # as argparse does
        values[action.dest] = default
        sources[action.dest] = DEFAULT

    config_file = _config_file(parser, explicit, environ)
    if config_file is not None:
        for dest, value in _read_file(parser, config_file, actions, problems).items():
            values[dest] = value
            sources[dest] = f"file {config_file}"
    for action in actions:
        name = env_name(action)
        text = environ.get(name, "")
        if not text.strip():  # unset and empty are alike: VAR= in a unit file clears it
            continue
        try:
            values[action.dest] = _from_env(parser, action, text)
        except _BadValue as exc:
            problems.append(f"{name}: {exc}")
            continue
        sources[action.dest] = f"env {name}"
    for dest, value in explicit.items():
        values[dest] = value
        sources[dest] = COMMAND_LINE
    if problems:
        raise SettingsError(problems)
    return Settings(argparse.Namespace(**values), sources, config_file)


def _config_file(
    parser: argparse.ArgumentParser, explicit: Mapping[str, Any], environ: Mapping[str, str]
) -> str | None:
    """The config file named on the command line, else by COLLAB_TRIO_CONFIG."""
    dest = next((a.dest for a in parser._actions if a.option_strings and option_name(a) == CONFIG_OPTION), None)
    if dest is None:
        return None
    path = explicit.get(dest)
    if path is None:
        path = environ.get(ENV_PREFIX + CONFIG_OPTION.upper(), "").strip() or None
    return path


def _read_file(
    parser: argparse.ArgumentParser, path: str, actions: list[argparse.Action], problems: list[str]
) -> dict[str, Any]:
    """The values a TOML config file sets, by dest; problems are appended to `problems`."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        problems.append(f"cannot read config file {path}: {exc.strerror or exc}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path} is not valid TOML: {exc}")
        return {}
    except RecursionError:  # nesting deeper than tomllib goes (not a TOMLDecodeError)
        problems.append(f"config file {path} is not valid TOML: nested too deeply")
        return {}
    except UnicodeDecodeError:  # tomllib decodes the bytes as UTF-8 itself
        problems.append(f"config file {path} is not UTF-8 text")
        return {}
    by_name = {option_name(action): action for action in actions}
    values: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, raw in data.items():
        name = key.replace("_", "-")
        action = by_name.get(name)
        if action is None:
            if name in META_OPTIONS:
                problems.append(f"{path}: {key!r} can't be set in a config file")
                continue
            hint = difflib.get_close_matches(name, by_name, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}: unknown key {key!r}{suggestion}")
            continue
        if name in seen:
            problems.append(f"{path}: {key!r} repeats {seen[name]!r}")
            continue
        seen[name] = key
        try:
            values[action.dest] = _from_toml(parser, action, raw)
        except _BadValue as exc:
            problems.append(f"{path}: {key}: {exc}")
    return values


class _BadValue(Exception):
    """A value an option does not take; the message says why."""


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+")


def _from_toml(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any) -> Any:
    if _is_flag(action):
        if not isinstance(raw, bool):
            raise _BadValue(f"expected true or false, got {_describe(raw)}")
        return action.const if raw else action.default
    if _is_list(action):
        items = raw if isinstance(raw, list) else [raw]
        return [_from_scalar(parser, action, item) for item in items]
    return _from_scalar(parser, action, raw)


def _from_env(parser: argparse.ArgumentParser, action: argparse.Action, text: str) -> Any:
    if _is_flag(action):
        word = text.strip().lower()
        if word not in _TRUE + _FALSE:
            raise _BadValue(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")
        return action.const if word in _TRUE else action.default
    if _is_list(action):
        return [_convert_text(parser, action, item.strip()) for item in text.split(",") if item.strip()]
    return _convert_text(parser, action, text.strip())


def _from_scalar(parser: argparse.ArgumentParser, action: argparse.Action, raw: Any) -> Any:
    # Numbers are taken as the text a command line would give: `port = 8765`
    # and `port = "8765"` both go through the option's own converter.
    if isinstance(raw, str):
        return _convert_text(parser, action, raw)
    if isinstance(raw, (int, float)) and not isinstance(raw, bool) and action.type is not None:
        return _convert_text(parser, action, str(raw))
    wanted = "a string" if action.type is None else "a string or a number"
    raise _BadValue(f"expected {wanted}, got {_describe(raw)}")


def _convert_text(parser: argparse.ArgumentParser, action: argparse.Action, text: str) -> Any:
    """`text` through the option's type and choices, with argparse's own messages."""
    convert = parser._registry_get("type", action.type, action.type)
    if convert is None:
        value: Any = text
    else:
        try:
            value = convert(text)
        except argparse.ArgumentTypeError as exc:
            raise _BadValue(str(exc)) from None
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", repr(convert))
            raise _BadValue(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices)
        raise _BadValue(f"invalid choice: {text!r} (choose from {choices})")
    return value


def _describe(raw: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    kind = next((text for cls, text in kinds.items() if isinstance(raw, cls)), type(raw).__name__)
    return f"{kind} ({raw!r})" if not isinstance(raw, (list, dict)) else kind


def format_settings(parser: argparse.ArgumentParser, settings: Settings, *, title: str) -> str:
    """The effective settings as a TOML config file, each line with its source as a comment.

    Unset options (None) are shown commented out; the output, given to
    --config, sets the same values (but a database URL's password, hidden).
    """
    lines = [
        f"# {title}",
        "# Precedence: command line > environment (COLLAB_TRIO_*) > config file > default.",
    ]
    if settings.config_file is not None:
        lines.append(f"# Config file: {settings.config_file}")
    for action in configurable_actions(parser):
        value = getattr(settings.values, action.dest, None)
        source = settings.sources.get(action.dest, DEFAULT)
        name = option_name(action)
        if value is None:
            lines.append(f"# {name}: not set ({source})")
            continue
        if action.dest == "database_url":
            # Printed settings end up in tickets and chat: never the password
            # (libpq also reads it from PGPASSWORD or ~/.pgpass).
            from .store.postgres import redact_url

            hidden = redact_url(value)
            if hidden != value:
                value, source = hidden, f"{source}; password hidden"
        text = tomli_w.dumps({name: _toml_value(value)}).rstrip("\n")
        lines.append(f"{text}  # {source}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> Any:
    """A value TOML can write that the option's converter reads back the same."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_toml_value(item) for item in value]
    return str(value)  # e.g. an ip_network: its text is what the converter read
