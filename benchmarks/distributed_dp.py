"""Distributed DP (Skellam, under SecAgg+) against central DP-FedAvg at the same noise.

    python -m benchmarks.distributed_dp [--rounds 15] [--seeds 0,1,2] [--quick] [--json out]

The demo task (digits, 10 institutions, Dirichlet α = 0.5, 4,810-parameter MLP, 1 local
epoch, lr 0.05, batch 16), every institution in every round (fixed sampling: accounted
with q = 1 in every mechanism, so the ε columns compare like with like). Each row is a
whole federation through the in-process engine (the real ServerApp and ClientApps);
accuracy is the published release's test accuracy (mean and range over seeds); ε is the
release's claim at δ = 1e-5 after all rounds.

Rows, all at clip norm C and noise multiplier z:

- no DP (SecAgg+ FedAvg), for reference;
- central DP-FedAvg, plaintext: the coordinator adds N(0, (zC)²) to the clipped sum;
- central DP-FedAvg under SecAgg+: the same noise, added after unmasking (the coordinator
  sees the exact sum: no protection against it);
- distributed Skellam calibrated for all 10 (``min-clients = 10``): the same total noise
  as central, added by the institutions; a dropout would fail the round;
- distributed Skellam calibrated at the SecAgg threshold (complete graph of 10,
  threshold 7): each institution adds 1/7 of the target variance, so the sum carries
  10/7 × the target with no dropout and exactly the target with 3 dropouts per round;
- the same with 1 and 3 institutions dropping before they send their masked input in
  every round (3 = n − threshold, the most a round survives): their noise is missing and
  the ledger accounts only the survivors' noise.

"noise std / central" is the per-coordinate noise std on the released mean relative to
the central row's zC/W, computed from the ledger.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def rows(z: float, clip: float) -> list[tuple[str, dict[str, Any], set[int]]]:
    """(label, run-config keys, dropping partitions) of every row."""
    dp = {
        "dp.noise-multiplier": z,
        "dp.clip-norm": clip,
        "dp.epsilon": 1e6,  # the benchmark reports ε; it does not stop at a budget
        "dp.delta": 1e-5,
        "dp.sampling": "fixed",
    }
    secagg = {"secagg": True, "secagg-num-shares": 0, "secagg-threshold": 7}
    skellam = {**dp, **secagg, "dp.mechanism": "skellam"}
    return [
        ("no DP (SecAgg+)", dict(secagg), set()),
        ("central DP-FedAvg", dict(dp), set()),
        ("central DP-FedAvg + SecAgg+", {**dp, **secagg}, set()),
        ("distributed, calibrated for 10", {**skellam, "min-clients": 10}, set()),
        ("distributed, at threshold 7", dict(skellam), set()),
        ("distributed, at threshold, 1 drops", dict(skellam), {3}),
        ("distributed, at threshold, 3 drop", dict(skellam), {1, 4, 8}),
    ]


def run_row(flat: dict[str, Any], dropped: set[int], rounds: int, seed: int) -> dict[str, Any]:
    """One federation; accuracy, ε and the ledger's noise figures."""
    from tests.secagg_helpers import dropping

    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process

    root = Path(tempfile.mkdtemp(prefix="fc-ddp-bench-"))
    config = RunConfig.from_flat(
        {
            "rounds": rounds,
            "local-epochs": 1,
            "lr": 0.05,
            "batch-size": 16,
            "seed": seed,
            "task.seed": seed,
            "task.alpha": 0.5,
            "registry": str(root / "registry"),
            **flat,
        }
    )
    started = time.perf_counter()
    result = run_in_process(config, [dropping("masked-input", dropped)] * 10)
    seconds = time.perf_counter() - started
    privacy = result.release.manifest().privacy
    claim = privacy.get("distributed") or privacy.get("central") or {}
    ledger = root / "registry" / "privacy" / config.line / "ledger.jsonl"
    stds = []
    if ledger.exists():
        for line in ledger.read_text().splitlines():
            e = json.loads(line)["entry"]
            if e.get("mechanism") == "skellam":  # integer units → mean units
                step = e["clip_norm"] / e["levels"]
                stds.append(math.sqrt(e["noise_variance"]) * step / e["denominator"])
            elif e.get("mechanism") == "dp-fedavg":
                stds.append(e["noise_std"])
    return {
        "accuracy": float(result.test_metrics.get("accuracy", math.nan)),
        "epsilon": float(claim.get("epsilon", math.nan)) if claim else math.nan,
        "noise_std": statistics.mean(stds) if stds else 0.0,
        "contributors": [r.accepted for r in result.reports],
        "seconds": seconds,
    }


def main() -> None:
    """Run the rows and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--noise-multiplier", type=float, default=0.5)
    ap.add_argument("--clip-norm", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="3 rounds, one seed")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    args = ap.parse_args()
    os.environ.setdefault("FEDCOMMONS_CLIENT_THREADS", "1")
    os.environ.setdefault("FEDCOMMONS_STATE_DIR", tempfile.mkdtemp(prefix="fc-ddp-state-"))
    import torch

    from fedcommons.logs import configure_logging

    torch.set_num_threads(1)
    configure_logging("ERROR")
    rounds = 3 if args.quick else args.rounds
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    z, clip = args.noise_multiplier, args.clip_norm
    print(
        f"digits, 10 institutions, {rounds} rounds, z = {z:g}, C = {clip:g}, δ = 1e-5, "
        f"fixed sampling (q = 1 everywhere); accuracy: mean [min, max] over seeds {seeds}"
    )
    header = (
        f"{'mechanism':<38} {'accuracy':>22} {'ε':>9} {'noise std / central':>19} "
        f"{'inputs/round':>12} {'s/run':>6}"
    )
    print(header)
    out = []
    central_std = None
    for label, flat, dropped in rows(z, clip):
        runs = [run_row(flat, dropped, rounds, seed) for seed in seeds]
        acc = [r["accuracy"] for r in runs]
        std = statistics.mean(r["noise_std"] for r in runs)
        if label == "central DP-FedAvg":
            central_std = std
        rel = std / central_std if central_std and std else math.nan
        row = {
            "mechanism": label,
            "config": flat,
            "dropped_per_round": len(dropped),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_min": min(acc),
            "accuracy_max": max(acc),
            "epsilon": runs[0]["epsilon"],
            "noise_std_on_mean": std,
            "noise_std_vs_central": rel,
            "runs": runs,
        }
        out.append(row)
        inputs = runs[0]["contributors"][0]
        print(
            f"{label:<38} {statistics.mean(acc):>8.4f} [{min(acc):.4f}, {max(acc):.4f}] "
            f"{runs[0]['epsilon']:>9.3f} {rel:>19.3f} {inputs:>12} "
            f"{statistics.mean(r['seconds'] for r in runs):>6.0f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"z": z, "clip": clip, "rounds": rounds, "rows": out}))


if __name__ == "__main__":
    main()
