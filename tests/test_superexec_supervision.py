"""The coordinator service keeps one SuperExec running next to its SuperLink.

Stand-in processes (Python one-liners) play the SuperLink and the SuperExec, so the
supervision logic runs against real processes in seconds; the real Flower processes run
in tests/test_superlink_restart.py and tests/test_scheduled_deployment.py (slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcommons.engines.submission import DeploymentError
from fedcommons.engines.superexec import superexec_argv, supervise


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_superexec_that_exits_is_started_again_until_the_superlink_ends(
    tmp_path: Path,
) -> None:
    """Input: a SuperExec that records its start and exits with 1 after 0.3 s."""
    starts = tmp_path / "starts"
    link = subprocess.Popen(_python("import time; time.sleep(4); raise SystemExit(3)"))
    exe = _python(
        f"import sys, time; open({str(starts)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n');"
        "time.sleep(0.3); raise SystemExit(1)"
    )
    try:
        code = supervise(link, exe, dict(os.environ), poll=0.1)
    finally:
        link.kill()
        link.wait()
    assert code == 3  # the SuperLink's own exit code
    lines = starts.read_text().splitlines()
    assert len(lines) >= 3
    assert all(line == f"--parent-pid {link.pid}" for line in lines)


def test_a_superexec_that_keeps_dying_stops_the_service_with_an_error(tmp_path: Path) -> None:
    """Input: a SuperExec that exits at once, max 2 restarts per minute."""
    link = subprocess.Popen(_python("import time; time.sleep(60)"))
    try:
        with pytest.raises(DeploymentError, match="cannot start ServerApps"):
            supervise(
                link,
                _python("raise SystemExit(2)"),
                dict(os.environ),
                poll=0.05,
                max_restarts=2,
                window=60,
            )
    finally:
        link.kill()
        link.wait()


def test_the_superexec_is_stopped_by_pid_when_the_superlink_ends(tmp_path: Path) -> None:
    """Input: a SuperExec that would run for 2 minutes; the SuperLink ends after 1.5 s."""
    pid_file = tmp_path / "superexec.pid"
    link = subprocess.Popen(_python("import time; time.sleep(1.5)"))
    exe = _python(
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    try:
        assert supervise(link, exe, dict(os.environ), poll=0.1) == 0
    finally:
        link.wait()
    assert not _alive(int(pid_file.read_text()))


def test_superexec_command_never_installs_dependencies_and_follows_tls() -> None:
    insecure = superexec_argv("127.0.0.1:9091", insecure=True, root_cert=None)
    assert insecure[1:] == ["--runtime-api-address", "127.0.0.1:9091", "--insecure"]
    tls = superexec_argv("127.0.0.1:9091", insecure=False, root_cert="/pki/ca.pem")
    assert tls[-2:] == ["--root-certificates", "/pki/ca.pem"]
    assert not any("dependency" in a for a in insecure + tls)
