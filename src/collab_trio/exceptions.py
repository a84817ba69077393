"""Helpers for exception groups (trio raises them from every nursery). Pure."""

from __future__ import annotations


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside `exc` and any groups nested in it, in order."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
