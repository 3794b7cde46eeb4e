"""Byzantine institutions: what each aggregation rule holds, and what the gate stops.

Run as ``python -m benchmarks.byzantine [--quick] [--json PATH]``.

Ten institutions on the built-in ``digits`` task (Dirichlet α = 0.5, the demo MLP,
1 local epoch, lr 0.05, batch 16), every institution every round, dense fp32 updates,
through the in-process engine (the real ServerApp and ClientApps). First an attack-free
federation of ``--base-rounds`` rounds publishes release 1.0.0: the parent every cell
starts from (``base-release``), so the validation gate compares each cell's candidate
with a real parent. Then, per cell, ``--rounds`` more rounds with 0, 10, 20 or 30 % of the
institutions malicious (the last ones; :mod:`benchmarks.attacks`: sign flip ×10, Gaussian
noise, scaled model replacement, label flipping), aggregated by each rule:

- ``fedavg``; ``fedavg+clip`` (``clip_norm`` = ``--clip-norm``, about the median norm of an
  honest first-round update); ``median``; ``trimmed-mean`` (β = ``--beta``);
- any other registered strategy named with ``--strategies`` (e.g. ``multi-krum``).

Per cell: the candidate's test accuracy (360 examples: one example = 0.28 points),
its difference from attack-free FedAvg (0 % attackers, same rounds, same base) and from
the same rule without attackers, and the gate's verdict (published, or rejected with its
reason). The candidate of a rejected cell is scored from the rejection record.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CLIENTS = 10
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
QUICK_FRACTIONS = (0.0, 0.2)
BASE_STRATEGIES = ("fedavg", "fedavg+clip", "median", "trimmed-mean", "multi-krum")


@dataclass(frozen=True)
class Cell:
    """One federation: a rule against an attack at a fraction of attackers."""

    strategy: str
    attack: str
    fraction: float
    rounds: int


@dataclass
class Outcome:
    """What one cell produced."""

    strategy: str
    attack: str
    fraction: float
    attackers: int
    rounds: int
    test_accuracy: float
    val_accuracy: float
    published: bool
    gate: str
    seconds: float


def common_config(registry: Path, rounds: int) -> dict[str, Any]:
    """The run config every federation shares."""
    return {
        "rounds": rounds,
        "local-epochs": 1,
        "lr": 0.05,
        "batch-size": 16,
        "seed": 0,
        "registry": str(registry),
        "task.num-partitions": CLIENTS,
        "task.alpha": 0.5,
        "compression": "dense",
    }


def strategy_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The ``strategy`` and ``strategy.<param>`` keys of rule ``name``."""
    if name == "fedavg+clip":
        return {"strategy": "fedavg", "strategy.clip_norm": args.clip_norm}
    if name == "trimmed-mean":
        return {"strategy": "trimmed-mean", "strategy.beta": args.beta}
    if name == "multi-krum":
        return {"strategy": "multi-krum", "strategy.f": args.krum_f}
    return {"strategy": name}


def _quiet() -> None:
    import torch

    torch.set_num_threads(1)
    from fedcommons.logs import configure_logging

    configure_logging("ERROR")


def make_base(work: Path, rounds: int) -> dict[str, Any]:
    """Publish the attack-free parent release 1.0.0 into ``work/base``."""
    _quiet()
    from benchmarks.attacks import federation
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process

    apps, configs = federation("sign-flip", CLIENTS, 0)
    config = RunConfig.from_flat(common_config(work / "base", rounds))
    result = run_in_process(config, apps, node_configs=configs)
    return {
        "version": result.release.version,
        "test_accuracy": result.test_metrics["accuracy"],
        "val_accuracy": result.reports[-1].val_accuracy,
    }


def run_cell(cell: Cell, work: Path, args_dict: dict[str, Any]) -> Outcome:
    """Run one cell from a copy of the base registry; never raises on a gate rejection."""
    _quiet()
    from benchmarks.attacks import federation
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process
    from fedcommons.errors import CandidateRejectedError
    from fedcommons.releases.registry import Registry

    args = argparse.Namespace(**args_dict)
    started = time.monotonic()
    registry = work / f"{cell.strategy}-{cell.attack}-{cell.fraction:.2f}"
    shutil.copytree(work / "base", registry)
    attackers = round(cell.fraction * CLIENTS)
    apps, configs = federation(cell.attack, CLIENTS, attackers, sigma=args.sigma, seed=args.seed)
    flat = common_config(registry, cell.rounds)
    flat.update(strategy_config(cell.strategy, args))
    flat["base-release"] = "1.0.0"
    config = RunConfig.from_flat(flat)
    try:
        result = run_in_process(config, apps, node_configs=configs)
        test, val = result.test_metrics["accuracy"], result.reports[-1].val_accuracy
        published, gate = True, f"published {result.release.version}"
    except CandidateRejectedError as exc:
        (rejection,) = Registry(registry, create=False).rejections()
        metrics = rejection.report["metrics"]
        test, val = metrics["test_accuracy"], metrics["val_accuracy"]
        published, gate = False, "rejected: " + "; ".join(exc.reasons)[:160]
    shutil.rmtree(registry, ignore_errors=True)
    return Outcome(
        cell.strategy,
        cell.attack,
        cell.fraction,
        attackers,
        cell.rounds,
        float(test),
        float(val),
        published,
        gate,
        time.monotonic() - started,
    )


def cells(args: argparse.Namespace) -> list[Cell]:
    """Attack-free cells first (one per rule), then every attack × fraction × rule."""
    from benchmarks.attacks import ATTACKS

    out = [Cell(s, "none", 0.0, args.rounds) for s in args.strategy_list]
    for attack in args.attack_list:
        if attack not in ATTACKS:
            raise SystemExit(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
        for fraction in args.fraction_list:
            if fraction == 0:
                continue
            out += [Cell(s, attack, fraction, args.rounds) for s in args.strategy_list]
    return out


def table(outcomes: list[Outcome], base: dict[str, Any]) -> str:
    """Accuracy per cell, the differences, and the gate's verdict."""
    clean = {o.strategy: o.test_accuracy for o in outcomes if o.attack == "none"}
    reference = clean.get("fedavg", float("nan"))
    header = (
        f"{'attack':<18} {'bad':>4} {'strategy':<13} {'test acc':>8} {'Δ fedavg@0 pp':>13} "
        f"{'Δ own@0 pp':>10} {'gate':<9} {'s':>4}"
    )
    lines = [
        f"base release 1.0.0 (attack-free parent): test accuracy {base['test_accuracy']:.4f}",
        header,
        "-" * len(header),
    ]
    for o in outcomes:
        own = clean.get(o.strategy, float("nan"))
        lines.append(
            f"{o.attack:<18} {o.fraction:>4.0%} {o.strategy:<13} {o.test_accuracy:>8.4f} "
            f"{100 * (o.test_accuracy - reference):>+13.2f} "
            f"{100 * (o.test_accuracy - own):>+10.2f} "
            f"{'published' if o.published else 'REJECTED':<9} {o.seconds:>4.0f}"
        )
    return "\n".join(lines)


def targets(outcomes: list[Outcome], strategies: list[str], base: dict[str, Any]) -> list[str]:
    """The issue's targets, evaluated on this run."""
    clean = {o.strategy: o.test_accuracy for o in outcomes if o.attack == "none"}
    reference = clean.get("fedavg", float("nan"))
    robust = [s for s in strategies if s != "fedavg"]
    lines = []
    for attack in ("sign-flip", "model-replacement"):
        row = [o for o in outcomes if o.attack == attack and abs(o.fraction - 0.2) < 1e-9]
        if not row:
            continue
        best = max((o for o in row if o.strategy in robust), key=lambda o: o.test_accuracy)
        gap = 100 * (reference - best.test_accuracy)
        lines.append(
            f"20% {attack}: best robust rule {best.strategy} {best.test_accuracy:.4f}, "
            f"{gap:.2f} points below attack-free FedAvg {reference:.4f}: "
            f"{'met' if gap <= 3.0 else 'MISSED'} (target: within 3 points)"
        )
    parent = base["val_accuracy"]
    worse = [o for o in outcomes if o.attack != "none" and o.val_accuracy < parent]
    stopped = [o for o in worse if not o.published]
    lines.append(
        f"poisoned candidates worse than their parent (validation accuracy < {parent:.4f}): "
        f"{len(worse)}, rejected by the gate {len(stopped)}: "
        f"{'met' if len(stopped) == len(worse) else 'MISSED'}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print the table (and write --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20%% attackers only, fewer rounds")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per cell (20; quick 10)")
    parser.add_argument("--base-rounds", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(BASE_STRATEGIES))
    parser.add_argument("--attacks", default="sign-flip,gaussian,model-replacement,label-flip")
    parser.add_argument("--fractions", default="")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.3)
    parser.add_argument("--krum-f", type=int, default=3, help="multi-krum f")
    parser.add_argument("--sigma", type=float, default=0.3, help="Gaussian attack σ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (10 if args.quick else 20)
    fractions = args.fractions or ",".join(
        str(f) for f in (QUICK_FRACTIONS if args.quick else FRACTIONS)
    )
    args.fraction_list = [float(f) for f in fractions.split(",") if f]
    args.strategy_list = [s for s in args.strategies.split(",") if s]
    args.attack_list = [a for a in args.attacks.split(",") if a]
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fc-byzantine-") as tmp:
        work = Path(tmp)
        os.environ["FEDCOMMONS_STATE_DIR"] = str(work / "client-state")
        base = make_base(work, args.base_rounds)
        todo = cells(args)
        shared = {k: v for k, v in vars(args).items() if k not in {"json"} and not callable(v)}
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            futures = [pool.submit(run_cell, c, work, shared) for c in todo]
            outcomes = [f.result() for f in futures]
    print(table(outcomes, base))
    for line in targets(outcomes, args.strategy_list, base):
        print(line)
    print(f"{len(outcomes)} cells in {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "base": base,
                    "settings": {k: v for k, v in vars(args).items() if k != "json"},
                    "cells": [asdict(o) for o in outcomes],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
