"""Start server processes for tests and stop every one of them by PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited rc={proc.returncode}:\n{tail(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} not open after {timeout}s:\n{tail(log)}")


def wait_for_coordinator_ready(log: Path, proc: subprocess.Popen, timeout: float = 90.0) -> dict:
    """The ``coordinator.ready`` JSON record ``fedcommons coordinator start`` logs when up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if '"coordinator.ready"' in line:
                return json.loads(line)
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited rc={proc.returncode}:\n{tail(log)}")
        time.sleep(0.2)
    raise TimeoutError(f"coordinator.ready not in {log.name} after {timeout}s:\n{tail(log)}")


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    """Every descendant PID, found through /proc (Flower's superexec runs in its own session)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class ProcessGroup:
    """Processes a test started; :meth:`stop_all` ends each by PID (TERM, then KILL)."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.log_dir / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        pids = [pid for p in self.procs for pid in (*_descendants(p.pid), p.pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def alive(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]


def start_superlink(
    group: ProcessGroup, bin_dir: Path, database: Path | str, timeout: float = 60.0
) -> int:
    """A plain insecure ``flower-superlink`` on 127.0.0.1; returns its port once it is open.

    ``database``: a SQLite file, or ``":flwr-in-memory:"`` for Flower's in-memory state.
    """
    port = free_port()
    link, link_log = group.start(
        "superlink",
        [
            str(bin_dir / "flower-superlink"),
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(database),
            "--disable-runtime-dependency-installation",
        ],
    )
    wait_for_port(port, link, link_log, timeout=timeout)
    return port


def start_insecure_supernodes(
    group: ProcessGroup, bin_dir: Path, link_port: int, count: int
) -> list[subprocess.Popen]:
    """``count`` plain ``flower-supernode`` processes (insecure, partitions 0..count-1)."""
    nodes = []
    for pid in range(count):
        node_port = free_port()
        node, node_log = group.start(
            f"supernode{pid}",
            [
                str(bin_dir / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(node_port),
                "--node-config",
                f"partition-id={pid} num-partitions={count}",
            ],
        )
        wait_for_port(node_port, node, node_log)
        nodes.append(node)
    return nodes


def start_warm_nodes(
    group: ProcessGroup, bin_dir: Path, link_port: int, count: int
) -> list[subprocess.Popen]:
    """``count`` ``fedcommons client join`` institutions (warm worker, partitions 0..count-1).

    Faster than :func:`start_insecure_supernodes` (no fresh ClientApp process per message);
    use that one where Flower's own SuperNode is what is tested.
    """
    started = []
    for pid in range(count):
        node_port = free_port()
        argv = [str(bin_dir / "fedcommons"), "client", "join", "--insecure"]
        argv += ["--coordinator", f"127.0.0.1:{link_port}", "--port", str(node_port)]
        argv += ["-n", f"partition-id={pid}", "-n", f"num-partitions={count}"]
        started.append((node_port, *group.start(f"site{pid}", argv)))
    for node_port, node, node_log in started:  # started together: imports overlap
        wait_for_port(node_port, node, node_log, timeout=180)
    return [node for _, node, _ in started]


def schedule_run(
    bin_dir: Path, env: dict[str, str], registry: Path, *options: str, rounds: int
) -> None:
    """``fedcommons round schedule`` of run ``e2e`` (2 institutions, 1 local epoch).

    ``options``: more arguments of ``round schedule`` (``--deadline 90``, ``-c key=value``).
    """
    argv = [str(bin_dir / "fedcommons"), "round", "schedule", "--registry", str(registry)]
    argv += ["--name", "e2e", "--rounds", str(rounds), "--min-clients", "2"]
    argv += ["-c", "local-epochs=1", "-c", "task.num-partitions=2", *options]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def submit_run(
    bin_dir: Path, env: dict[str, str], link_port: int, settings: list[str], log_dir: Path
) -> dict:
    """``fedcommons coordinator submit`` on the SuperLink; the finished run's status JSON.

    Fails with every process log when the run does not finish.
    """
    argv = [str(bin_dir / "fedcommons"), "coordinator", "submit", "--insecure"]
    argv += ["--superlink", f"127.0.0.1:{link_port}", "--timeout", "400"]
    for item in settings:
        argv += ["-c", item]
    submit = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=480, check=False)
    logs = "\n".join(tail(p) for p in sorted(log_dir.glob("*.log")))
    assert submit.returncode == 0, f"{submit.stdout}\n{submit.stderr}\n{logs}"
    return json.loads(submit.stdout[submit.stdout.index("{") :])
