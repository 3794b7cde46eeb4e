"""Durable file primitives shared by the registry, the client state and the ledger.

- :func:`atomic_write`: write bytes to a temporary file beside the target, fsync, rename
  (readers see the old file or the new one, never half of either), then fsync the
  directory so the rename itself survives a crash.
- :func:`default_state_root`: where a site keeps its client state by default.
- :func:`config_dir`: where a user keeps fedcommons' private settings (signing key,
  trusted signers).
- :func:`exclusive_lock`: an advisory POSIX ``flock`` on an open file with a bounded wait,
  so two processes never interleave writes and none waits forever.
- :func:`append_json_line`, :func:`read_json_lines`: private append-only JSON-lines logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

#: Environment variable naming the directory where a site keeps its client state.
STATE_DIR_ENV = "FEDCOMMONS_STATE_DIR"


def default_state_root() -> Path:
    """A site's state root: ``$FEDCOMMONS_STATE_DIR``, else ``$XDG_STATE_HOME/fedcommons``.

    Error-feedback residuals, FISH masks and the DP-SGD accountant live below it unless
    the node config names a ``state-dir``.
    """
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg).expanduser() / "fedcommons"


#: Environment variable naming the user's fedcommons configuration directory.
CONFIG_DIR_ENV = "FEDCOMMONS_CONFIG_DIR"


def config_dir() -> Path:
    """``$FEDCOMMONS_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/fedcommons`` (``~/.config``).

    Private to the user (created 0700 by the code that writes in it): the default
    signing key and the trust file (pinned signers, last accepted registry heads).
    """
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg).expanduser() / "fedcommons"


def fsync_dir(path: Path) -> None:
    """Fsync a directory so renames and new entries in it are durable.

    Best effort: some file systems cannot fsync a directory.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync dir).

    ``mode`` sets the file's permissions (``tempfile.mkstemp`` creates 0600 files).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def exclusive_lock(
    fh: IO[Any], timeout: float, on_timeout: Callable[[], Exception], poll: float = 0.05
) -> Iterator[None]:
    """Hold ``flock(LOCK_EX)`` on ``fh``; raise ``on_timeout()`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise on_timeout() from None
            time.sleep(poll)
    try:
        yield
    finally:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def append_json_line(
    path: Path, record: Mapping[str, Any], on_timeout: Callable[[], Exception]
) -> None:
    """Append one JSON object as a line: file mode 0600, exclusive lock, fsync."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    line = json.dumps(dict(record), sort_keys=True, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh, exclusive_lock(fh, 30.0, on_timeout):
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_json_lines(
    path: Path, on_bad_line: Callable[[int], Exception]
) -> Iterator[dict[str, Any]]:
    """Every JSON object of a JSON-lines file, oldest first (none when it does not exist)."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError:
                    raise on_bad_line(number) from None
