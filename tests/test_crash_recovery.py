"""The coordinator SIGKILLed by PID at each fault point and restarted (real processes).

Each trial runs the coordinator in a child process (in-process engine: the real
ServerApp and ClientApps), pauses it at ``collecting``, ``aggregating`` or ``committing``
of a round, kills it with SIGKILL by PID, starts it again under the same run-name and
compares the final release with an uninterrupted run (see benchmarks/recovery.py, which
runs 15 such trials).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.recovery import kill_and_restart, run_to_end

ROUNDS = 3


@pytest.mark.slow
def test_sigkill_at_each_point_loses_no_committed_round_and_ends_with_the_same_hash(
    tmp_path: Path,
) -> None:
    baseline = run_to_end(tmp_path / "baseline", ROUNDS, clients=3)
    for point, round_no in [("collecting", 1), ("aggregating", 2), ("committing", 3)]:
        trial = kill_and_restart(tmp_path / point, point, round_no, ROUNDS, 3, baseline["sha256"])
        assert trial.committed_at_kill == round_no - 1, trial
        assert trial.committed_lost == 0 and trial.resumed_after == round_no - 1, trial
        assert trial.rounds_committed == [1, 2, 3], trial
        assert trial.ledger_rounds == [1, 2, 3], trial  # no round's ε counted twice
        assert trial.same_hash, trial
