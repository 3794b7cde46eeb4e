"""The SuperExec that starts the coordinator's ServerApps, kept running next to the SuperLink.

With ``--isolation subprocess`` (Flower's default) ``flower-superlink`` starts one
``flower-superexec`` itself, once. When that process exits, no ServerApp can start until
the SuperLink restarts: a run the scheduler submits (or resubmits after its ServerApp
died) stays ``starting`` for ever. It does exit: Flower 1.41's SuperExec ends on the first
HTTP 500 from the SuperLink's Runtime API, which a SuperLink with a ``--database`` under
load answers ("database is locked"; found by ``benchmarks/chaos.py``).

So the coordinator service runs the SuperLink with ``--isolation process`` (Flower's mode
for an externally managed SuperExec) and :func:`supervise` keeps one SuperExec running:
started once the SuperLink's port is open, started again when it exits (at most
``max_restarts`` times per ``window`` seconds, then the service stops with
:class:`~fedcommons.engines.submission.DeploymentError` so that its supervisor restarts
it), stopped by PID when the SuperLink ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedcommons.engines.submission import DeploymentError, flower_exe
from fedcommons.logs import get_logger

log = get_logger("fedcommons.coordinator.superexec")


def superexec_argv(runtime_address: str, *, insecure: bool, root_cert: str | None) -> list[str]:
    """The ``flower-superexec`` command serving ServerApps for the SuperLink at the address.

    Runtime dependencies are never installed (the SuperLink runs with
    ``--disable-runtime-dependency-installation``: nothing is fetched from the network).
    """
    argv = [flower_exe("flower-superexec"), "--runtime-api-address", runtime_address]
    if insecure:
        return [*argv, "--insecure"]
    return [*argv, "--root-certificates", str(root_cert)] if root_cert else argv


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """TERM, then KILL; always reaps (by PID)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout)


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (Linux ``/proc``; none elsewhere)."""
    found = []
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _stop_pids(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM each PID, then SIGKILL those still there after ``timeout``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def supervise(
    link: subprocess.Popen[bytes],
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    poll: float = 0.5,
    max_restarts: int = 20,
    window: float = 600.0,
) -> int:
    """Wait for the SuperLink ``link`` while keeping one SuperExec (``argv``) running.

    Returns the SuperLink's exit code. The SuperExec gets ``--parent-pid`` of the
    SuperLink, so it also stops if this process is killed.
    """
    command = [*argv, "--parent-pid", str(link.pid)]

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=dict(env), stdin=subprocess.DEVNULL)

    exe = start()
    restarts: list[float] = []
    try:
        while link.poll() is None:
            if exe.poll() is not None:
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < window] + [now]
                if len(restarts) > max_restarts:
                    raise DeploymentError(
                        f"flower-superexec exited {len(restarts)} times in {window:.0f}s (last "
                        f"code {exe.returncode}): the SuperLink cannot start ServerApps"
                    )
                log.warning(
                    "coordinator.superexec-restart", code=exe.returncode, restarts=len(restarts)
                )
                exe = start()
            time.sleep(poll)
        return int(link.returncode)
    finally:
        # the ServerApps it started cannot go on without the SuperLink: stop them too,
        # by PID (they record the run as interrupted; the scheduler resubmits it)
        servers = _children(exe.pid)
        _stop(exe)
        _stop_pids(servers)
