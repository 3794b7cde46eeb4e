"""A long run: does the coordinator's memory stay flat over 1,000 rounds?

Run as ``python -m benchmarks.long_run [--rounds 1000] [--json PATH]``.

The demo configuration (the built-in ``digits`` task, the 4,810-parameter MLP, 10
institutions with Dirichlet α = 0.5, FedAvg, every institution every round, durable
commits on) through the in-process engine: the real ServerApp and ClientApps in this one
process, one thread. ``--local-epochs`` defaults to 1 (the demo trains 5) to keep 1,000
rounds within the shared machine's budget; the coordinator's work per round (push,
intake, aggregation, validation, commit) is the same.

After every round the observer reads this process's resident set size (``VmRSS``) and,
at a few rounds, the number of objects the garbage collector tracks. The table shows
both at rounds 1, 10, 100, ... and the last, the ratio RSS(last) / RSS(10) (the baseline:
round 10, when every lazy import and cache has been filled), and the seconds per round
over the first and the last 10 % of the run. RSS here includes the in-process
ClientApps (the task cache), which are the same objects every round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def rss_mib() -> float:
    """This process's resident set size, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemoryObserver:
    """Records RSS and wall time after every round, GC-tracked objects at checkpoints."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.rows: list[dict[str, Any]] = []
        self.checkpoints = {1, 10, rounds} | {10**k for k in range(2, 7) if 10**k < rounds}
        self.started = time.monotonic()

    def on_start(self, config: Any, run_id: int) -> None:
        """Run validated: start the clock."""
        self.started = time.monotonic()

    def on_round(self, report: Any) -> None:
        """One row per round."""
        row: dict[str, Any] = {
            "round": report.round,
            "rss_mib": rss_mib(),
            "t_s": time.monotonic() - self.started,
            "val_accuracy": report.val_accuracy,
        }
        if report.round in self.checkpoints:
            gc.collect()
            row["gc_objects"] = len(gc.get_objects())
            row["rss_mib_after_gc"] = rss_mib()
        self.rows.append(row)


def main(argv: list[str] | None = None) -> int:
    """Run the long federation, print the table (and write --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--institutions", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    torch.set_num_threads(1)
    from fedcommons.client_sdk.client_app import app
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process
    from fedcommons.logs import configure_logging

    configure_logging("ERROR")
    observer = MemoryObserver(args.rounds)
    baseline = rss_mib()
    with tempfile.TemporaryDirectory(prefix="fc-long-run-") as tmp:
        os.environ["FEDCOMMONS_STATE_DIR"] = str(Path(tmp) / "client-state")
        config = RunConfig.from_flat(
            {
                "rounds": args.rounds,
                "local-epochs": args.local_epochs,
                "registry": str(Path(tmp) / "registry"),
                "task.num-partitions": args.institutions,
                "task.alpha": 0.5,
                "seed": 0,
            }
        )
        result = run_in_process(config, [app] * args.institutions, observer=observer)
        published = f"{result.release.name} {result.release.version}"
        accuracy = result.test_metrics.get("accuracy", float("nan"))
    rows = observer.rows
    by_round = {r["round"]: r for r in rows}
    ten = by_round.get(10, rows[0])
    last = rows[-1]
    tenth = max(1, len(rows) // 10)
    first_s = rows[tenth - 1]["t_s"] / tenth
    last_s = (rows[-1]["t_s"] - rows[-tenth - 1]["t_s"]) / tenth if len(rows) > tenth else first_s
    print(
        f"long run: {args.rounds} rounds, {args.institutions} institutions, digits MLP "
        f"(4,810 parameters), {args.local_epochs} local epoch(s); RSS before the run "
        f"{baseline:.0f} MiB"
    )
    print(f"{'round':>6} {'RSS MiB':>8} {'RSS after gc':>12} {'gc objects':>10} {'val acc':>7}")
    for r in rows:
        if "gc_objects" in r:
            print(
                f"{r['round']:>6} {r['rss_mib']:>8.1f} {r['rss_mib_after_gc']:>12.1f} "
                f"{r['gc_objects']:>10,} {r['val_accuracy']:>7.4f}"
            )
    ratio = last["rss_mib"] / ten["rss_mib"]
    peak = max(r["rss_mib"] for r in rows)
    print(
        f"RSS round {last['round']} / round {ten['round']}: {ratio:.3f} "
        f"({last['rss_mib'] - ten['rss_mib']:+.1f} MiB; peak {peak:.1f} MiB); "
        f"s/round first 10 % {first_s:.3f}, last 10 % {last_s:.3f} "
        f"(x{last_s / first_s:.2f}); release {published}, test accuracy {accuracy:.4f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "settings": vars(args) | {"json": str(args.json)},
                    "rss_ratio_last_vs_round10": ratio,
                    "seconds_per_round_first_tenth": first_s,
                    "seconds_per_round_last_tenth": last_s,
                    "release": published,
                    "test_accuracy": accuracy,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
