"""Access control: the tokens file, roles, and the Origin allow-list. No I/O but reading the file.

A tokens file maps each token to a role and, optionally, to the sessions it
may join. TOML:

    [tokens."s3cret-editor-token"]
    role = "editor"
    sessions = ["lab-1", "lab-2"]    # optional; any session when absent

    [tokens."read-only-token"]
    role = "viewer"

or JSON: {"tokens": {"s3cret-editor-token": {"role": "editor", "sessions": [...]}}}
(a plain role string, {"tok": "viewer"}, is accepted too).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import attrs

from .protocol import TOKEN_SEGMENT

EDITOR = "editor"
VIEWER = "viewer"
ROLES = (EDITOR, VIEWER)
# Messages a viewer may not send: they would change the session.
WRITE_TYPES = frozenset({"command", "sync:update", "sync:full_state"})


class TokensFileError(Exception):
    """The tokens file can't be used; the message says where and why."""


@attrs.frozen
class Grant:
    """What a token allows."""

    role: str
    sessions: frozenset[str] | None = None  # None: every session

    def allows(self, session_id: str) -> bool:
        """May this token join `session_id`?"""
        return self.sessions is None or session_id in self.sessions

    @property
    def can_write(self) -> bool:
        """Editors change documents; viewers only watch."""
        return self.role == EDITOR


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then leaks neither content nor length.
    return hashlib.sha256(token.encode("utf-8")).digest()


@attrs.frozen
class TokenTable:
    """Tokens (kept only as SHA-256 digests) and their grants."""

    entries: tuple[tuple[bytes, Grant], ...]

    @classmethod
    def from_mapping(cls, tokens: dict[str, Any], *, source: str = "tokens") -> TokenTable:
        """Build from {token: role} or {token: {"role": ..., "sessions": [...]}}.

        Raises:
            TokensFileError: a malformed entry (the token itself is never shown).
        """
        if not isinstance(tokens, dict) or not tokens:
            raise TokensFileError(f"{source}: no tokens defined")
        entries = []
        for number, (token, spec) in enumerate(tokens.items(), start=1):
            where = f"{source}: token #{number}"
            if not isinstance(token, str) or len(token) < 8:
                raise TokensFileError(f"{where} is shorter than 8 characters")
            try:
                token.encode("utf-8")
            except UnicodeEncodeError:  # a JSON "\ud800" escape: no client could send it
                raise TokensFileError(f"{where} is not valid Unicode text (a lone surrogate)") from None
            if isinstance(spec, str):
                spec = {"role": spec}
            if not isinstance(spec, dict):
                raise TokensFileError(f"{where} must map to a role or a table with a role")
            role = spec.get("role")
            if role not in ROLES:
                raise TokensFileError(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
            sessions = spec.get("sessions")
            if sessions is not None:
                if not isinstance(sessions, list) or not all(isinstance(s, str) and s for s in sessions):
                    raise TokensFileError(f"{where}: sessions must be a list of session ids")
                sessions = frozenset(sessions)
            unknown = set(spec) - {"role", "sessions"}
            if unknown:
                raise TokensFileError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
            entries.append((_digest(token), Grant(role, sessions)))
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Read a TOML (.toml) or JSON (.json) tokens file.

        Raises:
            TokensFileError: unreadable or malformed.
        """
        path = Path(path)
        if path.suffix.lower() not in (".toml", ".json"):
            raise TokensFileError(
                f"tokens file {path}: name it .toml or .json (the two accepted formats: TOML or JSON)"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            # Not said where: the bytes around it may be a token.
            raise TokensFileError(f"tokens file {path} is not UTF-8 text") from None
        try:
            if path.suffix.lower() == ".toml":
                data: Any = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise TokensFileError(f"tokens file {path} is not valid {path.suffix}: {exc}") from None
        except RecursionError:  # nesting deeper than the parsers go (not a ValueError)
            raise TokensFileError(f"tokens file {path} is not valid {path.suffix}: nested too deeply") from None
        if isinstance(data, dict) and "tokens" in data:
            data = data["tokens"]
        return cls.from_mapping(data, source=str(path))

    def lookup(self, token: str | None) -> Grant | None:
        """The grant of `token`, comparing in constant time against every entry."""
        if not token:
            return None
        digest = _digest(token)
        found = None
        for secret, grant in self.entries:  # no early exit: timing says nothing
            if hmac.compare_digest(secret, digest):
                found = grant
        return found

    def __len__(self) -> int:
        return len(self.entries)


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    return None


def header(headers: Iterable[tuple[bytes, bytes]], wanted: bytes) -> str | None:
    """The first value of a header, decoded, or None."""
    for name, value in headers:
        if name.lower() == wanted:
            return value.decode("latin-1").strip()
    return None


def redact(path: str) -> str:
    """A request path safe to log: tokens, in the query or as a path segment, are masked.

    The segment after a "t" segment is masked, but in the endpoint's own
    "ws/{session}/{user}" (the last three segments): `protocol.parse_target`
    takes the token from no other place, whatever the base path (which may
    itself have a "ws" segment: --base-path /ws).
    """
    base, sep, query = path.partition("?")
    segments = base.split("/")
    endpoint = len(segments) >= 4 and segments[-3] == "ws"
    end = len(segments) - 3 if endpoint else len(segments)
    masked = {i + 1 for i in range(min(end, len(segments) - 1)) if segments[i] == TOKEN_SEGMENT}
    base = "/".join("***" if i in masked and part else part for i, part in enumerate(segments))
    if not sep:
        return base
    parts = []
    for part in query.split("&"):
        key, eq, _ = part.partition("=")
        # Compare the key as the query parser will read it (tok%65n is token).
        is_token = unquote_plus(key, errors="replace") == "token"
        parts.append(f"{key}=***" if eq and is_token else part)
    return f"{base}?{'&'.join(parts)}"
