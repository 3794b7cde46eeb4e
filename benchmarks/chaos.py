"""Chaos soak on Flower's deployment engine: nodes, the SuperLink and the ServerApp killed.

Run as ``python -m benchmarks.chaos [--quick] [--json PATH]``. On loopback it starts the
coordinator service (``fedcommons coordinator start --insecure --database ... --registry
...``: Flower's SuperLink behind fedcommons' listeners, the SuperExec it supervises, the run
scheduler) and ``--nodes`` institutions
(``fedcommons client join --insecure``: a ``flower-supernode`` plus its warm ClientApp
worker), schedules one run on a central-DP line (``fedcommons round schedule``) and
lets the scheduler submit it. While it runs:

- in every round, a random ``--kill-fraction`` of the institutions is SIGKILLed (every
  process of the institution, by PID) a random moment after the previous round was
  committed, and started again at once (a restarted SuperNode registers as a new node);
- once (round ``R/3``) the SuperLink process (``python -m fedcommons.engines.listeners``,
  which runs Flower's SuperLink app) is SIGKILLed; the coordinator service around it exits
  and is started again with the same ``--database``; the SuperExec and ServerApp are left
  to notice on their own (Flower's parent monitor stops them; survivors are reported);
- once (round ``2R/3``) the ServerApp process (``flwr-serverapp``) is SIGKILLed; the
  scheduler notices that the run's Flower run ended while the registry still says
  ``running`` and submits the run again, which resumes after its last committed round.

It then reads the registry and reports: rounds committed (and whether they are exactly
1..R, each once), committed rounds lost (rounds committed before a ServerApp died that
the next one played again), rounds retried (round attempts that failed and were
re-sampled: none on a DP line, which refuses retries), ServerApp starts, replies lost
(sampled nodes whose update was not aggregated: killed, timed out or rejected), whether
the release was published and verifies, whether the privacy ledger holds exactly one
DP-FedAvg entry per round, and the resident memory of the coordinator's processes
(ServerApp, SuperLink) at the start and at the end of the run. Every process the
benchmark starts is stopped by its PID (``tests/processes.py``); the whole run is
bounded by ``--timeout``.

The DP line's round policy (``docs/privacy.md``): a declared ``population`` (the number of
institutions), every node asked each round (``clients-per-round = 0``: q = 1),
``min-clients = 1`` and ``on-round-failure = abort`` (a DP line releases every sampled
round; a retry would condition the release on who replied).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

from tests.processes import ProcessGroup, _descendants, free_port, tail, wait_for_port

BIN = Path(sys.executable).parent
RUN_NAME = "chaos"
LINE = "digits"


def _rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks (0 when gone): tells a reused PID apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _program(pid: int) -> str:
    """The program a process runs (the script's name for ``python3 /path/flwr-serverapp``)."""
    words = _cmdline(pid).split(" ")
    if words and "python" in words[0].rsplit("/", 1)[-1] and len(words) > 1:
        return words[1].rsplit("/", 1)[-1]
    return words[0].rsplit("/", 1)[-1] if words else "?"


def _kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL ``proc`` and every descendant, by PID; reap ``proc``; return the PIDs."""
    pids = [*_descendants(proc.pid), proc.pid]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    return pids


@dataclass
class Fault:
    """One injected fault."""

    round: int
    what: str  # node | superlink | serverapp
    target: str
    committed_before: int
    at_s: float


@dataclass
class Soak:
    """Everything the benchmark measured."""

    rounds: int
    nodes: int
    kill_fraction: float
    seed: int
    state: str = ""
    error: str = ""
    wall_s: float = 0.0
    rounds_committed: list[int] = field(default_factory=list)
    committed_lost: int = 0
    round_attempts_retried: int = 0
    serverapp_starts: int = 0
    resumed_after: list[int] = field(default_factory=list)
    replies_sampled: int = 0
    replies_aggregated: int = 0
    replies_timed_out: int = 0
    replies_rejected: int = 0
    node_kills: int = 0
    superlink_kills: int = 0
    serverapp_kills: int = 0
    coordinator_exit_after_superlink_kill: int | None = None
    left_running_after_superlink_kill: list[str] = field(default_factory=list)
    release: str = ""
    release_verified: bool = False
    test_accuracy: float = float("nan")
    ledger_rounds: list[int] = field(default_factory=list)
    ledger_ok: bool = False
    epsilon: float = float("nan")
    serverapp_rss_start_mib: float = 0.0
    serverapp_rss_end_mib: float = 0.0
    superlink_rss_start_mib: float = 0.0
    superlink_rss_end_mib: float = 0.0
    rss_by_round: dict[str, dict[str, float]] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)

    @property
    def rounds_lost(self) -> int:
        """Committed rounds lost (resumes behind the last commit, plus any missing round)."""
        missing = len(set(range(1, self.rounds + 1)) - set(self.rounds_committed))
        return self.committed_lost + (missing if self.state == "finished" else 0)

    @property
    def ok(self) -> bool:
        """The targets: every round committed once, none lost, a verified release."""
        return (
            self.state == "finished"
            and self.rounds_committed == list(range(1, self.rounds + 1))
            and self.committed_lost == 0
            and self.release_verified
            and self.ledger_ok
        )


class Cluster:
    """The coordinator service and the institutions, each restartable, stopped by PID."""

    def __init__(self, work: Path, env: dict[str, str], nodes: int) -> None:
        self.work, self.env, self.nodes = work, env, nodes
        self.group = ProcessGroup(work, env)
        self.port = free_port()  # the Fleet API (what SuperNodes dial)
        self.control_port = free_port()  # Control and runtime APIs (scheduler, ServerApps)
        self.coordinator: subprocess.Popen | None = None
        self.node_procs: dict[int, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def _start(self, name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        n = self.starts[name] = self.starts.get(name, 0) + 1
        return self.group.start(f"{name}-{n}", argv)

    def _forget(self, proc: subprocess.Popen) -> None:
        """Drop a reaped process from the group (its PID may be reused later)."""
        if proc in self.group.procs:
            self.group.procs.remove(proc)

    def start_coordinator(self) -> None:
        """``fedcommons coordinator start`` on the same port and database every time."""
        proc, log = self._start(
            "coordinator",
            [
                str(BIN / "fedcommons"),
                "coordinator",
                "start",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--control-port",
                str(self.control_port),
                "--database",
                str(self.work / "superlink.db"),
                "--registry",
                str(self.work / "registry"),
            ],
        )
        self.coordinator = proc
        wait_for_port(self.port, proc, log, timeout=120)

    def start_nodes(self, ids: list[int]) -> None:
        """Start institutions ``ids`` at once; return when each SuperNode's port is open."""
        started = [(self._start_node(i)) for i in ids]
        for port, proc, log in started:
            wait_for_port(port, proc, log, timeout=180)

    def _start_node(self, i: int) -> tuple[int, subprocess.Popen, Path]:
        """Institution ``i``: ``fedcommons client join`` with partition ``i``."""
        port = free_port()
        proc, log = self._start(
            f"node{i}",
            [
                str(BIN / "fedcommons"),
                "client",
                "join",
                "--insecure",
                "--coordinator",
                f"127.0.0.1:{self.port}",
                "--port",
                str(port),
                "-n",
                f"partition-id={i}",
                "-n",
                f"num-partitions={self.nodes}",
            ],
        )
        self.node_procs[i] = proc
        return port, proc, log

    def kill_node(self, i: int) -> None:
        """SIGKILL every process of institution ``i`` (wrapper, SuperNode, worker)."""
        proc = self.node_procs.pop(i)
        _kill_tree(proc)
        self._forget(proc)

    def _coordinator_pids(self, needle: str) -> list[int]:
        if self.coordinator is None:
            return []
        return [p for p in _descendants(self.coordinator.pid) if needle in _cmdline(p)]

    def superlink_pid(self) -> int | None:
        """PID of the SuperLink process (Flower's app behind fedcommons' listeners)."""
        found = self._coordinator_pids("fedcommons.engines.listeners")
        return found[0] if found else None

    def serverapp_pids(self) -> list[int]:
        """PIDs of running ``flwr-serverapp`` processes (children of the SuperLink's)."""
        return self._coordinator_pids("flwr-serverapp")

    def kill_superlink(self) -> tuple[int | None, list[str]]:
        """SIGKILL the SuperLink process alone, as a crash would.

        Its children (SuperExec, the ServerApp) are left to notice on their own; returns
        the coordinator service's exit code and the processes still alive 30 s later
        (then stopped by PID).
        """
        pid = self.superlink_pid()
        if pid is None or self.coordinator is None:
            raise RuntimeError("no SuperLink process to kill")
        tree = {p: _start_time(p) for p in _descendants(self.coordinator.pid)}
        os.kill(pid, signal.SIGKILL)
        code = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = self.coordinator.wait(timeout=60)
        deadline = time.monotonic() + 30
        alive = tree
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = {p: t for p, t in alive.items() if t and _start_time(p) == t}
        leftovers = [_program(p) for p in alive]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        _kill_tree(self.coordinator)  # the wrapper itself, if it is still there
        self._forget(self.coordinator)
        return code, leftovers

    def kill_serverapp(self) -> bool:
        """SIGKILL the ServerApp process(es); False when none was running."""
        pids = self.serverapp_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return bool(pids)

    def exited(self) -> list[str]:
        """Processes of the cluster that ended without a fault of ours (e.g. killed outside)."""
        procs = {f"node{i}": p for i, p in self.node_procs.items()}
        if self.coordinator is not None:
            procs["coordinator"] = self.coordinator
        return [
            f"{name} (exit code {p.returncode})"
            for name, p in procs.items()
            if p.poll() is not None
        ]

    def stop_all(self) -> None:
        """Every process still running, by PID."""
        self.group.stop_all()


def _schedule(work: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    argv = [
        str(BIN / "fedcommons"),
        "round",
        "schedule",
        "--registry",
        str(work / "registry"),
        "--name",
        RUN_NAME,
        "--rounds",
        str(args.rounds),
        "--min-clients",
        "1",  # a DP line releases every sampled round (no retry, no min-clients > 1)
        "--deadline",
        str(args.deadline),
        "--on-round-failure",
        "abort",
        "-c",
        f"local-epochs={args.local_epochs}",
        "-c",
        f"task.num-partitions={args.nodes}",
        "-c",
        f"population={args.nodes}",
        "-c",
        "node-wait-timeout=30",
        "--dp",
        "noise-multiplier=0.5",
        "--dp",
        "clip-norm=1.0",
        "--dp",
        "epsilon=1000",
        "--dp",
        "delta=1e-5",
        "--dp",
        "sampling=poisson",  # q = clients-per-round / population = 1: every node asked
    ]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"round schedule failed: {done.stdout[-1500:]} {done.stderr[-1500:]}")


def _plan(args: argparse.Namespace) -> tuple[dict[int, list[int]], int, int]:
    """Which institutions die in which round; the SuperLink's and the ServerApp's round."""
    rng = random.Random(args.seed)
    per_round = max(1, round(args.kill_fraction * args.nodes))
    kills = {r: sorted(rng.sample(range(args.nodes), per_round)) for r in range(1, args.rounds + 1)}
    superlink_round = max(2, args.rounds // 3)
    serverapp_round = max(superlink_round + 1, (2 * args.rounds) // 3)
    return kills, superlink_round, serverapp_round


def soak(args: argparse.Namespace, work: Path) -> Soak:
    """Run the soak in ``work``; return what it measured."""
    from fedcommons.coordinator.runs import RunStore

    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(work / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FEDCOMMONS_SCHEDULE_POLL": "1",
            "FEDCOMMONS_METRICS_PORT": "0",
            "FEDCOMMONS_STATE_DIR": str(work / "client-state"),
            "FEDCOMMONS_CLIENT_THREADS": "1",
            # the signing key and trust store of this soak, not the user's
            "FEDCOMMONS_CONFIG_DIR": str(work / "user-config"),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.pop("FEDCOMMONS_FAULT", None)
    result = Soak(args.rounds, args.nodes, args.kill_fraction, args.seed)
    kills, superlink_round, serverapp_round = _plan(args)
    rng = random.Random(args.seed + 1)
    _schedule(work, env, args)
    cluster = Cluster(work, env, args.nodes)
    started = time.monotonic()
    deadline = started + args.timeout
    registry = work / "registry"
    try:
        cluster.start_coordinator()
        cluster.start_nodes(list(range(args.nodes)))
        faulted: set[int] = set()
        rss: dict[int, dict[str, float]] = {}
        while time.monotonic() < deadline:
            record = RunStore(registry).get(RUN_NAME)
            if record.state not in ("scheduled", "running"):
                break
            gone = cluster.exited()
            if gone:  # not a fault the soak injected: its figures would mean nothing
                result.error = f"ended outside the benchmark's faults: {', '.join(gone)}"
                break
            current = record.committed_round + 1  # the round being played
            sa = cluster.serverapp_pids()
            link = cluster.superlink_pid()
            if sa and record.state == "running":
                row = rss.setdefault(current, {"serverapp": 0.0, "superlink": 0.0})
                row["serverapp"] = max(row["serverapp"], sum(_rss_mib(p) for p in sa))
                row["superlink"] = max(row["superlink"], _rss_mib(link) if link else 0.0)
            if current not in faulted and current <= args.rounds and sa:
                faulted.add(current)
                time.sleep(rng.uniform(0.5, args.max_kill_delay))  # into the round
                now = time.monotonic() - started
                committed = RunStore(registry).get(RUN_NAME).committed_round
                for i in kills[current]:
                    cluster.kill_node(i)
                    result.faults.append(Fault(current, "node", f"node{i}", committed, now))
                    result.node_kills += 1
                if current == superlink_round:
                    code, leftovers = cluster.kill_superlink()
                    result.coordinator_exit_after_superlink_kill = code
                    result.left_running_after_superlink_kill = leftovers
                    result.faults.append(Fault(current, "superlink", "superlink", committed, now))
                    result.superlink_kills += 1
                if current == serverapp_round and cluster.kill_serverapp():
                    result.faults.append(
                        Fault(current, "serverapp", "flwr-serverapp", committed, now)
                    )
                    result.serverapp_kills += 1
                if current == superlink_round:
                    cluster.start_coordinator()
                cluster.start_nodes(kills[current])
            time.sleep(0.5)
        else:
            result.error = f"timed out after {args.timeout:.0f}s"
        result.wall_s = time.monotonic() - started
        result.rss_by_round = {str(k): v for k, v in sorted(rss.items())}
    finally:
        cluster.stop_all()
        result.wall_s = result.wall_s or time.monotonic() - started
    # read as the coordinator did: its signing key / trust store and its private directory
    keys = ("FEDCOMMONS_CONFIG_DIR", "FEDCOMMONS_STATE_DIR")
    with mock.patch.dict(os.environ, {k: env[k] for k in keys}):
        _read_outcome(result, registry, work)
    return result


def _read_outcome(result: Soak, registry: Path, work: Path) -> None:
    """Fill ``result`` from the registry: commits, resumes, release, ledger."""
    from fedcommons.coordinator.runs import RunStore
    from fedcommons.observability.audit_log import read
    from fedcommons.privacy.disclosure import PrivateRoundLog, private_dir
    from fedcommons.privacy.ledger import PrivacyLedger, ledger_path
    from fedcommons.releases.registry import Registry
    from fedcommons.releases.verification import verify_release

    store = RunStore(registry)
    record = store.get(RUN_NAME)
    result.state = record.state
    if record.error and not result.error:
        result.error = record.error
    result.serverapp_starts = record.starts
    commits = store.rounds(RUN_NAME)
    result.rounds_committed = [c.round for c in commits]
    result.round_attempts_retried = sum(c.attempts - 1 for c in commits)
    # a DP line keeps its per-round counts and its audit log (they name nodes) in the
    # coordinator's private directory, not in the registry it serves
    private = private_dir(registry)
    reports = {int(r["round"]): r["report"] for r in PrivateRoundLog(private).records()}
    for c in commits:
        report = reports.get(c.round, c.report)
        result.replies_sampled += int(report["sampled"])
        result.replies_aggregated += int(report["accepted"])
        result.replies_timed_out += int(report["timed_out"])
        result.replies_rejected += sum(int(v) for v in report["rejected"].values())
    audit = sorted(
        (r for path in (registry, private) for r in _audit(path / "audit.jsonl", read)),
        key=lambda r: r["timestamp"],
    )
    result.resumed_after = [
        int(r["details"]["resume_after_round"]) for r in audit if r["action"] == "run.resume"
    ]
    # a resume behind the last commit it follows would play committed rounds again
    committed = lost = 0
    for r in audit:
        if r["action"] == "round.commit" and r.get("round") is not None:
            committed = max(committed, int(r["round"]))
        elif r["action"] == "run.resume":
            lost += max(0, committed - int(r["details"]["resume_after_round"]))
    result.committed_lost = lost
    ledger = PrivacyLedger(ledger_path(registry, LINE))
    entries = ledger.entries()
    result.ledger_rounds = [int(e["round"]) for e in entries if e.get("mechanism") == "dp-fedavg"]
    with contextlib.suppress(Exception):
        ledger.verify()
        result.ledger_ok = result.ledger_rounds == list(range(1, result.rounds + 1))
    releases = Registry(registry, create=False).releases(LINE)
    if releases:
        release = releases[-1]
        manifest = release.manifest()
        result.release = f"{release.name} {release.version} sha256 {release.weights_sha256[:16]}"
        result.release_verified = bool(verify_release(Registry(registry), release).ok)
        result.test_accuracy = float(manifest.metrics.get("test_accuracy", float("nan")))
        result.epsilon = float(manifest.privacy.get("central", {}).get("epsilon", float("nan")))
    rows = [v for _, v in sorted(result.rss_by_round.items(), key=lambda kv: int(kv[0]))]
    if rows:
        head, last = rows[:2], rows[-2:]
        result.serverapp_rss_start_mib = max(r["serverapp"] for r in head)
        result.serverapp_rss_end_mib = max(r["serverapp"] for r in last)
        result.superlink_rss_start_mib = max(r["superlink"] for r in head)
        result.superlink_rss_end_mib = max(r["superlink"] for r in last)
    if result.state != "finished":
        logs = "\n".join(tail(p, 15) for p in sorted(work.glob("*.log")))
        result.error = (result.error + "\n" + logs)[-6000:]


def _audit(path: Path, read: object) -> list[dict]:
    return list(read(path)) if path.exists() else []  # type: ignore[operator]


def report(r: Soak) -> str:
    """The printed table."""
    lines = [
        f"chaos soak: {r.nodes} institutions, {r.rounds} rounds, {r.kill_fraction:.0%} of the "
        f"institutions SIGKILLed and restarted per round, seed {r.seed}, {r.wall_s:.0f}s",
        f"faults injected: {r.node_kills} institution kills, {r.superlink_kills} SuperLink "
        f"kill(s) (coordinator service exit code {r.coordinator_exit_after_superlink_kill}; "
        f"its children still running 30 s later: {r.left_running_after_superlink_kill or 'none'}), "
        f"{r.serverapp_kills} ServerApp kill(s)",
    ]
    in_order = r.rounds_committed == list(range(1, r.rounds + 1))
    verified = "yes" if r.release_verified else "NO"
    ledger = f"{'yes' if r.ledger_ok else 'NO'} ({len(r.ledger_rounds)}: {r.ledger_rounds})"
    rows = [
        ("run state", r.state),
        (
            "rounds committed",
            f"{len(r.rounds_committed)} of {r.rounds} "
            f"({'1..R, each once' if in_order else r.rounds_committed})",
        ),
        ("committed rounds lost", str(r.rounds_lost)),
        ("round attempts retried (short of min-clients)", str(r.round_attempts_retried)),
        ("ServerApp starts (resumed after round)", f"{r.serverapp_starts} ({r.resumed_after})"),
        (
            "replies lost in committed rounds (sampled, not aggregated)",
            f"{r.replies_sampled - r.replies_aggregated} of {r.replies_sampled} "
            f"(no reply by the deadline {r.replies_timed_out}, rejected {r.replies_rejected})",
        ),
        ("release published / verified", f"{r.release or 'none'} / {verified}"),
        ("release test accuracy, ε", f"{r.test_accuracy:.4f}, {r.epsilon:.4g}"),
        ("DP ledger entries = rounds", ledger),
        (
            "ServerApp RSS MiB, rounds 1-2 vs last 2",
            f"{r.serverapp_rss_start_mib:.0f} -> {r.serverapp_rss_end_mib:.0f}",
        ),
        (
            "SuperLink RSS MiB, rounds 1-2 vs last 2",
            f"{r.superlink_rss_start_mib:.0f} -> {r.superlink_rss_end_mib:.0f}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    if r.error:
        lines.append("error: " + r.error)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print the table (and write --json); exit 1 if a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 rounds instead of 30")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 30; quick 8)")
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--kill-fraction", type=float, default=0.3)
    parser.add_argument("--deadline", type=float, default=45.0, help="round-timeout, seconds")
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--max-kill-delay", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0, help="bound on the whole soak, s")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (8 if args.quick else 30)
    args.timeout = args.timeout or 600 + args.rounds * 4 * args.deadline
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        args.keep.mkdir(parents=True)
        result = soak(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="fc-chaos-") as tmp:
            result = soak(args, Path(tmp))
    print(report(result))
    if args.json:
        data = asdict(result) | {"rounds_lost": result.rounds_lost, "ok": result.ok}
        args.json.write_text(json.dumps(data, indent=1, default=str))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
