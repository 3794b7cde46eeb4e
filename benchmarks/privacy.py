"""Privacy figures of issues #6 and #14: canary audit, dropouts, accountant agreement.

Run from the repository root: ``python -m benchmarks.privacy`` (a few minutes on 2 cores).

1. End-to-end canary audit (:mod:`fedcommons.engines.canary_audit`): canary institutions
   through the real coordinator (sampling, clipping, noise, composition, ledger, publishing
   into a scratch registry); the adversary reads only what is served. Default: 2,000
   canaries (each enrolled with probability ½), 2,000 institutions that always fail,
   2 rounds, z = 2.83 (= z 2 over both rounds), q = 1, PRV accountant, δ = 1e-5, for the
   correct pipeline and each seeded bug. Times are ratios to the correct pipeline's audit
   in the same run.
2. 50 rounds, 20 nodes, Poisson sampling q = 0.5, 30 % of sampled clients dropping at
   random: the effective noise multiplier per round, as the ledger records it, against a
   baseline that divides by the replies (what Flower's fixed-clipping wrapper does), on
   the same dropouts.
3. The ledger's ε recomputed independently: Opacus RDP vs dp-accounting RDP, and Opacus
   PRV vs dp-accounting PLD, for the 50-round history.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.progress import steps
from fedcommons.engines.canary_audit import PipelineAuditConfig, run_pipeline_audit
from fedcommons.logs import configure_logging
from fedcommons.privacy.accounting import audit_epsilon, runtime_epsilon
from fedcommons.privacy.audits.ledger_audit import audit_ledger
from fedcommons.privacy.audits.seeded_bugs import SEEDED_BUGS
from fedcommons.privacy.central import DPFedAvg
from fedcommons.privacy.config import CentralDPConfig
from fedcommons.privacy.line import LinePrivacy
from fedcommons.strategies import FedAvg
from fedcommons.wire.update import ClientUpdate

console = Console(width=120)


def canary_table(canaries: int, dropouts: int, rounds: int, z: float, seed: int) -> None:
    cfg = PipelineAuditConfig(
        canaries=canaries, dropouts=dropouts, rounds=rounds, noise_multiplier=z, seed=seed
    )
    table = Table(
        "pipeline",
        "claimed ε",
        "empirical ε (f-DP)",
        "Steinke ε bound",
        "correct / guesses (10 %, 20 %, 30 %)",
        "ids served",
        "verdict",
        "seconds",
        "time ratio",
        title=(
            f"end-to-end canary audit: {canaries:,} canaries + {dropouts:,} failing "
            f"institutions, {rounds} round(s), z={z:g}, q=1, δ=1e-5, 95 % confidence"
        ),
    )
    base_seconds = None
    for bug in steps((None, *SEEDED_BUGS), "canary audits"):
        with tempfile.TemporaryDirectory(prefix="fc-canary-bench-") as work:
            r = run_pipeline_audit(cfg, seeded_bug=bug, workdir=Path(work))
        base_seconds = base_seconds or r.seconds
        table.add_row(
            "correct" if bug is None else f"bug: {bug}",
            f"{r.claimed_epsilon:.3f}",
            f"{r.empirical_epsilon:.3f}",
            f"{r.steinke_bound:.3f}",
            ", ".join(f"{v}/{k}" for _, k, v in r.counts),
            str(r.leaked_ids),
            "claim falsified" if r.falsified else "passes",
            f"{r.seconds:.1f}",
            f"{r.seconds / base_seconds:.2f}",
        )
    console.print(table)


def dropout_table(rounds: int, dropout: float, seed: int) -> Path:
    root = Path(tempfile.mkdtemp(prefix="fc-privacy-bench-"))
    cfg = CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=1e6, delta=1e-5)
    line = LinePrivacy(
        root,
        "bench",
        cfg,
        rng=np.random.default_rng(seed),
        noise_seed=seed,
        clients_per_round=10,
        population=20,
    )
    rng = np.random.default_rng(seed + 1)
    base = {"w": torch.zeros(4_810)}
    nodes = list(range(20))
    ours, flower, dropped, sampled_total = [], [], 0, 0
    for r in range(1, rounds + 1):
        sample = line.sample(nodes)
        sampled, expected = sample.nodes, sample.expected
        agg = line.start_round(
            r,
            FedAvg(),
            population=len(nodes),
            sampled=len(sampled),
            sample_rate=sample.sample_rate,
            expected=expected,
        )
        baseline = DPFedAvg(  # the same code with the seeded "÷ replies" bug
            None,
            noise_multiplier=1.0,
            clip_norm=1.0,
            expected_participants=expected,
            seed=r,
            seeded_bug="denominator-replies",
        )
        agg.begin(base)
        baseline.begin(base)
        replied = [n for n in sampled if rng.random() >= dropout]
        for n in replied:
            update = ClientUpdate({"w": torch.randn(4_810) * 0.05}, 1, n)
            agg.fold(update)
            baseline.fold(update)
        agg.finalize()
        if replied:
            baseline.finalize()  # its stats claim W; what it released is noise z·C/W on ÷ n
            flower.append(1.0 * len(replied) / expected)
        entry = line.commit_round(
            accepted=len(replied), rejected=0, timed_out=len(sampled) - len(replied)
        )
        assert entry is not None
        ours.append(entry["effective_noise_multiplier"])
        dropped += len(sampled) - len(replied)
        sampled_total += len(sampled)
    table = Table(
        "aggregation",
        "rounds",
        "dropped",
        "min z_eff / z",
        "mean z_eff / z",
        "rounds under-noised",
        title=f"{rounds} rounds, Poisson q=0.5 of 20 nodes, {dropout:.0%} of sampled drop",
    )
    for name, zs in (
        ("fedcommons DP-FedAvg (÷ expected W)", ours),
        ("baseline ÷ replies (Flower-style)", flower),
    ):
        table.add_row(
            name,
            str(len(zs)),
            f"{dropped}/{sampled_total}",
            f"{min(zs):.3f}",
            f"{np.mean(zs):.3f}",
            str(sum(z < 1.0 - 1e-12 for z in zs)),
        )
    console.print(table)
    return root


def accounting_table(root: Path) -> None:
    line = LinePrivacy(root, "bench", None)
    privacy = LinePrivacy(
        root,
        "bench",
        CentralDPConfig(noise_multiplier=1.0, clip_norm=1.0, epsilon=1e6, delta=1e-5),
    ).manifest_privacy()
    started = time.perf_counter()
    audit = audit_ledger(root, privacy)
    audit_s = time.perf_counter() - started
    history = line.history()
    table = Table(
        "method",
        "runtime ε (Opacus)",
        "recomputed ε (dp-accounting)",
        "relative difference",
        title=f"ε at δ=1e-5 after {len(history)} DP-FedAvg rounds (z=1, q=0.5)",
    )
    for runtime, method in (("rdp", "rdp"), ("prv", "pld")):
        a = runtime_epsilon(history, 1e-5, runtime)
        b = audit_epsilon(history, 1e-5, method)
        label = f"{runtime.upper()} vs {method.upper()}"
        table.add_row(label, f"{a:.6f}", f"{b:.6f}", f"{abs(a - b) / a:.2e}")
    console.print(table)
    console.print(
        f"audit ledger: {audit.entries} entries verified and recomputed in {audit_s:.2f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=2_000)
    parser.add_argument("--dropouts", type=int, default=2_000)
    parser.add_argument("--canary-rounds", type=int, default=2)
    parser.add_argument("-z", "--noise-multiplier", type=float, default=2.83)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging("WARNING")  # the tables, not the per-round log lines
    started = time.perf_counter()
    canary_table(args.canaries, args.dropouts, args.canary_rounds, args.noise_multiplier, args.seed)
    root = dropout_table(args.rounds, args.dropout, args.seed)
    accounting_table(root)
    console.print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
