"""Crash recovery: SIGKILL the coordinator at each fault point, restart it, compare.

Each trial runs the coordinator (the in-process engine: the real ServerApp and
ClientApps in one child process) with ``FEDCOMMONS_FAULT=<point>:<round>:pause``, waits
until the child reports that it reached the point, reads what the registry has
committed, kills the child by PID with SIGKILL, starts it again under the same run-name
and lets it finish. A baseline run of the same configuration runs uninterrupted in the
same benchmark. Per trial it reports:

- committed rounds lost: rounds committed before the kill that the restart ran again
  (target 0), and whether the restart resumed exactly after the last committed round;
- whether the final release's weights SHA-256 equals the uninterrupted run's;
- the ledger: DP-FedAvg entries of the run, which must be exactly one per round.

The run is deterministic on purpose: top-k + int8 compression with error feedback (the
residuals in the clients' state directory replay the lost round), FedAvg with server
momentum (strategy state in the checkpoint), central DP-FedAvg with fixed-size sampling
and a fixed noise seed (only for the benchmark: production noise is secret).

    python -m benchmarks.recovery                   # 15 trials: 3 points x 5 rounds
    python -m benchmarks.recovery --points committed --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

POINTS = ("collecting", "aggregating", "committing")
RUN_NAME = "recovery"
CHILD_TIMEOUT_S = 300.0


def private_of(registry: Path) -> Path:
    """The trial's private coordinator state (audit log, round log), next to its registry."""
    return registry.parent / "private"


def run_config(registry: Path, rounds: int) -> dict[str, Any]:
    """The benchmark's flat run config (small, deterministic, every stateful part on)."""
    return {
        "rounds": rounds,
        "local-epochs": 1,
        "batch-size": 32,
        "registry": str(registry),
        # a DP line's audit log names nodes: it lives in the coordinator's private dir
        "private-dir": str(private_of(registry)),
        "run-name": RUN_NAME,
        "compression": "topk:0.1+int8",
        "error-feedback": True,
        "strategy": "fedavg",
        "strategy.server_momentum": 0.5,
        "task.hidden": "32",
        "dp.noise-multiplier": 0.5,
        "dp.clip-norm": 0.05,
        "dp.epsilon": 1000.0,
        "dp.delta": 1e-5,
        "dp.sampling": "fixed",
    }


def child(registry: Path, rounds: int, clients: int) -> None:
    """Run (or resume) the federation in this process; print the release as JSON."""
    import functools

    import torch

    torch.set_num_threads(1)
    from fedcommons.client_sdk.client_app import app
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process
    from fedcommons.logs import configure_logging
    from fedcommons.privacy.line import LinePrivacy

    configure_logging("WARNING")
    # Fixed DP noise, so that the killed-and-resumed run can be compared bit for bit.
    LinePrivacy.__init__ = functools.partialmethod(LinePrivacy.__init__, noise_seed=7)  # type: ignore[method-assign]
    config = RunConfig.from_flat(run_config(registry, rounds))
    result = run_in_process(config, [app] * clients)
    print(
        json.dumps(
            {
                "sha256": result.release.weights_sha256,
                "version": result.release.version,
                "epsilon": result.release.manifest().privacy.get("central", {}).get("epsilon"),
            }
        ),
        flush=True,
    )


def _child_argv(registry: Path, rounds: int, clients: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.recovery",
        "--child",
        "--registry",
        str(registry),
        "--rounds",
        str(rounds),
        "--clients",
        str(clients),
    ]


def _env(workdir: Path, fault: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["FEDCOMMONS_STATE_DIR"] = str(workdir / "client-state")
    env["FEDCOMMONS_CLIENT_THREADS"] = "1"
    env.pop("FEDCOMMONS_FAULT", None)
    env.pop("FEDCOMMONS_FAULT_MARKER", None)
    if fault:
        env["FEDCOMMONS_FAULT"] = fault
        env["FEDCOMMONS_FAULT_MARKER"] = str(workdir / "fault-reached")
        env["FEDCOMMONS_FAULT_PAUSE_S"] = str(int(CHILD_TIMEOUT_S))
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def run_to_end(workdir: Path, rounds: int, clients: int) -> dict[str, Any]:
    """Run the child without a fault until it finishes; return its JSON line."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "child.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            _child_argv(workdir / "registry", rounds, clients),
            stdout=subprocess.PIPE,
            stderr=out,
            env=_env(workdir, None),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=CHILD_TIMEOUT_S)
        finally:
            _stop(proc)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"coordinator exited rc={proc.returncode}:\n{tail}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    from fedcommons.observability.audit_log import read

    records = list(read(private_of(workdir / "registry") / "audit.jsonl"))
    commits = [r["details"]["seconds"] for r in records if r["action"] == "round.commit"]
    rounds = [r["details"]["seconds"] for r in records if r["action"] == "round.finish"]
    result["commit_ms"] = 1000 * sum(commits) / max(len(commits), 1)
    result["commit_share"] = sum(commits) / max(sum(rounds) + sum(commits), 1e-9)
    return result


@dataclass
class Trial:
    """The outcome of one kill-and-restart trial."""

    point: str
    round: int
    committed_at_kill: int
    expected_committed: int
    resumed_after: int
    committed_lost: int
    rounds_committed: list[int]
    ledger_rounds: list[int]
    same_hash: bool
    seconds: float

    @property
    def ok(self) -> bool:
        """Every check of the trial passed."""
        return (
            self.committed_lost == 0
            and self.committed_at_kill == self.expected_committed
            and self.resumed_after == self.committed_at_kill
            and self.same_hash
            and self.ledger_rounds == self.rounds_committed
        )


def kill_and_restart(
    workdir: Path, point: str, round_no: int, rounds: int, clients: int, baseline: str
) -> Trial:
    """One trial: pause at ``point`` of ``round_no``, SIGKILL by PID, restart, compare."""
    from fedcommons.coordinator.runs import RunStore
    from fedcommons.observability.audit_log import read
    from fedcommons.privacy.ledger import PrivacyLedger, ledger_path

    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    registry = workdir / "registry"
    marker = workdir / "fault-reached"
    with (workdir / "child.log").open("ab") as out:
        proc = subprocess.Popen(
            _child_argv(registry, rounds, clients),
            stdout=subprocess.DEVNULL,
            stderr=out,
            env=_env(workdir, f"{point}:{round_no}:pause"),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + CHILD_TIMEOUT_S
            while not marker.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"coordinator exited rc={proc.returncode} before {point}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fault point {point}:{round_no} not reached")
                time.sleep(0.05)
            store = RunStore.existing(registry)
            record = store.find(RUN_NAME) if store else None
            committed_at_kill = record.committed_round if record else 0
            os.kill(proc.pid, signal.SIGKILL)  # by PID, mid-round
            proc.wait(timeout=30)
        finally:
            _stop(proc)
    result = run_to_end(workdir, rounds, clients)
    store = RunStore(registry)
    commits = store.rounds(RUN_NAME)
    resumes = [
        r["details"]["resume_after_round"]
        for r in read(private_of(registry) / "audit.jsonl")
        if r["action"] == "run.resume"
    ]
    ledger = PrivacyLedger(ledger_path(registry, "digits")).entries()
    expected = round_no if point == "committed" else round_no - 1
    resumed_after = resumes[-1] if resumes else 0
    return Trial(
        point=point,
        round=round_no,
        committed_at_kill=committed_at_kill,
        expected_committed=expected,
        resumed_after=resumed_after,
        committed_lost=max(0, committed_at_kill - resumed_after),
        rounds_committed=[c.round for c in commits],
        ledger_rounds=[int(e["round"]) for e in ledger if e.get("mechanism") == "dp-fedavg"],
        same_hash=result["sha256"] == baseline,
        seconds=time.monotonic() - started,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the trials and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--registry", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--clients", type=int, default=3, help="institutions (default 3)")
    parser.add_argument("--points", default=",".join(POINTS), help="comma-separated fault points")
    parser.add_argument("--kill-rounds", default="", help="rounds to kill in (default 1..R)")
    parser.add_argument("--json", type=Path, help="also write the trials as JSON")
    args = parser.parse_args(argv)
    if args.child:
        child(args.registry, args.rounds, args.clients)
        return 0
    points = [p for p in args.points.split(",") if p]
    kill_rounds = (
        [int(r) for r in args.kill_rounds.split(",")]
        if args.kill_rounds
        else list(range(1, args.rounds + 1))
    )
    with tempfile.TemporaryDirectory(prefix="fc-recovery-") as tmp:
        t0 = time.monotonic()
        baseline = run_to_end(Path(tmp) / "baseline", args.rounds, args.clients)
        baseline_s = time.monotonic() - t0
        trials = [
            kill_and_restart(
                Path(tmp) / f"{point}-{r}", point, r, args.rounds, args.clients, baseline["sha256"]
            )
            for point in points
            for r in kill_rounds
        ]
    header = (
        f"{'point':<12} {'round':>5} {'committed@kill':>14} {'resumed after':>13} "
        f"{'lost':>4} {'same hash':>9} {'ledger rounds':<16} {'time (x base)':>13}"
    )
    print(
        f"baseline (uninterrupted): {args.rounds} rounds, {args.clients} clients, "
        f"{baseline_s:.1f}s, sha256 {baseline['sha256'][:16]}…, ε={baseline['epsilon']:.4g}; "
        f"commit {baseline['commit_ms']:.1f} ms per round = {baseline['commit_share']:.1%} "
        "of the round's wall time"
    )
    print(header)
    print("-" * len(header))
    for t in trials:
        print(
            f"{t.point:<12} {t.round:>5} {t.committed_at_kill:>14} {t.resumed_after:>13} "
            f"{t.committed_lost:>4} {'yes' if t.same_hash else 'NO':>9} "
            f"{','.join(map(str, t.ledger_rounds)):<16} {t.seconds / baseline_s:>13.2f}"
        )
    lost = sum(t.committed_lost for t in trials)
    same = sum(t.same_hash for t in trials)
    ok = sum(t.ok for t in trials)
    print("-" * len(header))
    print(
        f"{len(trials)} trials: committed rounds lost {lost}; same release hash {same}/"
        f"{len(trials)}; ledger one entry per round and every check passed {ok}/{len(trials)}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"baseline": baseline, "trials": [asdict(t) | {"ok": t.ok} for t in trials]},
                indent=1,
            )
        )
    return 0 if ok == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
