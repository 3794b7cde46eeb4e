"""Names that become paths: release lines, versions, aliases, run names, task names.

Every name that fedcommons turns into a file-system path is checked here first, with one
strict pattern, before anything is created, read or renamed. A name is 1-100 characters
of ASCII letters, digits, ``.``, ``_`` and ``-``, starts with a letter or digit and never
holds ``..``: it cannot hold a path separator, name a parent directory, start a hidden
file or be empty. ``release-name = ../../x`` is refused here instead of writing a
manifest outside the registry.
"""

from __future__ import annotations

import re
from enum import StrEnum

from fedcommons.errors import InvalidNameError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_VERSION = re.compile(r"(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})")


class NameKind(StrEnum):
    """What a name names (used in the error message and to pick the pattern)."""

    line = "release line"
    version = "version"
    alias = "alias"
    run = "run name"
    task = "task name"
    key = "key name"


def check_name(value: object, kind: NameKind = NameKind.line) -> str:
    """Return ``value`` if it is a safe name of ``kind``; raise :class:`InvalidNameError`.

    Lines, run names, task names and key names: 1-100 of ``A-Z a-z 0-9 . _ -``, starting
    with a letter or digit, without ``..``. Versions: ``MAJOR.MINOR.PATCH`` (no leading
    zeros). Aliases: a letter, then up to 63 letters, digits, ``_`` or ``-``.
    """
    if not isinstance(value, str):
        raise InvalidNameError(f"{kind.value} must be a string, got {type(value).__name__}")
    if kind is NameKind.version:
        ok = _VERSION.fullmatch(value) is not None
        rule = "MAJOR.MINOR.PATCH (digits, no leading zeros)"
    elif kind is NameKind.alias:
        ok = _ALIAS.fullmatch(value) is not None
        rule = "a letter, then up to 63 letters, digits, '_' or '-'"
    else:
        ok = _NAME.fullmatch(value) is not None and ".." not in value
        rule = (
            "1-100 letters, digits, '.', '_' or '-', starting with a letter or digit, without '..'"
        )
    if not ok:
        raise InvalidNameError(f"{kind.value} {value!r} is not allowed: it must be {rule}")
    return value


def is_name(value: object, kind: NameKind = NameKind.line) -> bool:
    """Whether :func:`check_name` accepts ``value``."""
    try:
        check_name(value, kind)
    except InvalidNameError:
        return False
    return True
