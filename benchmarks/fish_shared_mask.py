"""Diagnostic: FISH with per-institution masks (as shipped) against one shared mask.

    python -m benchmarks.fish_shared_mask [--rounds 150] [--alphas 0.1,0.5] [--density 0.02]

The shared mask is computed on the union of all institutions' training data, which no
real deployment has: the point is only to show whether per-institution masks on non-IID
data cause the drift seen in ``benchmarks.compression``'s FISH rows. Same settings as
that benchmark (pre-trained base, 10 institutions, 1 local epoch, fp32 values).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path
from unittest import mock


def run(alpha: float, shared: bool, rounds: int, density: float) -> tuple[list[float], float]:
    os.environ["FEDCOMMONS_CLIENT_THREADS"] = "1"
    os.environ["FEDCOMMONS_STATE_DIR"] = tempfile.mkdtemp(prefix="fc-fish-")
    import fedcommons.client_sdk.fish_mask as fm
    from benchmarks.compression import pretrain
    from fedcommons.client_sdk.client_app import app
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process
    from fedcommons.tasks.digits import DigitsTask

    original = fm.fish_mask

    def shared_mask(task, base, density, num_examples, seed=0, loader=None):  # type: ignore[no-untyped-def]
        # The union of every institution's training data: an unpartitioned task's loader.
        return original(DigitsTask({"hidden": "64"}), base, density, num_examples, seed=0)

    registry = Path(tempfile.mkdtemp(prefix="fc-fish-reg-"))
    config = RunConfig(
        task_options={"hidden": "64", "alpha": alpha, "seed": 0},
        rounds=rounds,
        local_epochs=1,
        registry=str(registry),
        base_release=pretrain(registry, "64", 0),
        compression=f"fish:{density:g}",
    )
    patch = mock.patch.object(fm, "fish_mask", shared_mask) if shared else nullcontext()
    with patch:
        result = run_in_process(config, [app] * 10)
    return [r.val_accuracy for r in result.reports], result.test_metrics["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument(
        "--alphas", type=lambda s: [float(a) for a in s.split(",")], default=[0.1, 0.5]
    )
    parser.add_argument("--density", type=float, default=0.02)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from fedcommons.logs import configure_logging

    configure_logging("ERROR")
    print(f"FISH {args.density:g}, {args.rounds} rounds, test accuracy of the release")
    print(f"{'alpha':>6} {'mask':>16} {'val acc every rounds/10':>60} {'test':>7}")
    for alpha in args.alphas:
        for shared in (False, True):
            curve, test = run(alpha, shared, args.rounds, args.density)
            step = max(1, args.rounds // 10)
            label = "shared (union)" if shared else "per-institution"
            print(
                f"{alpha:>6g} {label:>16} {' '.join(f'{a:.3f}' for a in curve[::step]):>60} "
                f"{test:>7.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
