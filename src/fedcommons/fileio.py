"""Durable file primitives shared by the registry, the client state and the ledger.

- :func:`atomic_write`: write bytes to a temporary file beside the target, fsync, rename
  (readers see the old file or the new one, never half of either), then fsync the
  directory so the rename itself survives a crash.
- :func:`default_state_root`: where a site keeps its client state by default.
- :func:`config_dir`: where a user keeps fedcommons' private settings (signing key,
  trusted signers).
- :func:`exclusive_lock`: an advisory POSIX ``flock`` on an open file with a bounded wait,
  so two processes never interleave writes and none waits forever.
- :func:`write_safetensors`: the same bytes ``safetensors.torch.save`` makes, streamed
  tensor by tensor into an atomically written file (the library builds the whole file in
  memory first: two extra copies of a 440 MB model at every checkpoint and release).
- :func:`append_json_line`, :func:`read_json_lines`: private append-only JSON-lines logs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

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
    atomic_write_parts(path, [data], mode=mode)


def atomic_write_parts(
    path: Path | Callable[[str], Path],
    parts: Iterable[bytes | memoryview],
    *,
    mode: int | None = None,
    tmp_dir: Path | None = None,
) -> tuple[Path, str, int]:
    """Write ``parts`` one after the other to a file atomically, as :func:`atomic_write`.

    Nothing is joined in memory. ``path`` may be a function of the content's SHA-256
    (content-addressed files: the name is known once the last part is written; the
    temporary file goes to ``tmp_dir``, on the same file system); an existing file
    there is left as it is. Returns (path, SHA-256 hex, size).
    """
    if not isinstance(path, Path) and tmp_dir is None:
        raise ValueError("a content-addressed path needs tmp_dir")
    folder = path.parent if isinstance(path, Path) else tmp_dir
    assert folder is not None
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    digest, size = hashlib.sha256(), 0
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            for part in parts:
                fh.write(part)
                digest.update(part)
                size += len(part)
            fh.flush()
            os.fsync(fh.fileno())
        target = path if isinstance(path, Path) else Path(path(digest.hexdigest()))
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(path, Path) or not target.exists():
            os.replace(tmp, target)
        else:
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)
    return target, digest.hexdigest(), size


def safetensors_parts(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Iterator[bytes | memoryview]:
    """The bytes of ``safetensors.torch.save(tensors, metadata)``, tensor by tensor.

    Same layout as the library (checked byte for byte by the tests): tensors ordered by
    dtype as the library orders them, then by name; a compact JSON header, ``__metadata__``
    first, padded with spaces to 8 bytes. Metadata keys are sorted (the library writes
    several in its hash map's order, which varies from process to process). Each tensor
    is yielded as a view of its own memory (CPU, contiguous): nothing model-sized is
    allocated.
    """
    import torch  # only writers of tensors pay for it

    rank = _safetensors_dtype_order()
    names = sorted(tensors, key=lambda k: (rank[tensors[k].dtype], k))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in names:
        tensor = tensors[name]
        end = offset + tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    yield struct.pack("<Q", len(text)) + text
    for name in names:
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.numel():
            yield memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(
    path: Path | Callable[[str], Path],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    mode: int | None = None,
    tmp_dir: Path | None = None,
) -> tuple[Path, str, int]:
    """Write ``tensors`` as safetensors atomically, streamed (see :func:`safetensors_parts`).

    Returns (path, SHA-256 hex of the file, size); ``path`` may depend on the SHA-256
    (then ``tmp_dir`` is required, see :func:`atomic_write_parts`).
    """
    parts = safetensors_parts(tensors, metadata)
    return atomic_write_parts(path, parts, mode=mode, tmp_dir=tmp_dir)


_SAFETENSORS_DTYPES: dict[Any, str] = {}


@cache
def _safetensors_dtype_order() -> dict[Any, int]:
    """The library's order of dtypes in a file, read from what it writes (one per dtype)."""
    import torch
    from safetensors.torch import save

    names = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    _SAFETENSORS_DTYPES.update(names)
    probe = save({code: torch.zeros(1, dtype=dtype) for dtype, code in names.items()})
    (length,) = struct.unpack("<Q", probe[:8])
    order = list(json.loads(probe[8 : 8 + length]))
    return {dtype: order.index(code) for dtype, code in names.items()}


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
