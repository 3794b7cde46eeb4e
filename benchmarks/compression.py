"""Compressed updates: upload bytes against accuracy, and codec throughput.

    python -m benchmarks.compression [--json rows.json] [--plot accuracy_vs_bytes.png]

Part 1 times encode, decode (to a dense tensor) and decode-and-fold (into FedAvg's
float64 accumulator) of a 10M-parameter fp32 update on one core for int8 and int4 with
either rounding, top-1% and top-1%+int8: medians of interleaved repeats, against a
memcpy of the same fp32 vector on the same core in the same repeats. ``--skip-federation``
runs only this part.

Part 2 federates the built-in digits task (10 institutions, Dirichlet α ∈ {0.1, 0.5},
every institution every round, a fixed number of rounds, 1 local epoch) through the
in-process engine, which drives the real ServerApp and ClientApp, once per compression
row; bytes are the real encoded payloads the coordinator received (indices and scales
included), averaged over clients and rounds. Accuracy is the published release's test
accuracy; ``delta_vs_dense_pp`` compares with dense fp32 FedAvg on the same model, split
and base. FISH rows start from a base pre-trained on the public part of the data (the
fixed validation split; the test split stays untouched) and compare with dense FedAvg
from that same base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODELS = {"mlp-4.8k": "64", "mlp-167k": "512,256"}

# (spec, error feedback) rows; dense fp32 first (the baseline of every ratio).
SMALL_ROWS: list[tuple[str, bool]] = [
    ("dense", False),
    ("dense:fp16", True),
    ("dense:fp16", False),
    ("int8", True),
    ("int8", False),
    ("int4", True),
    ("int4", False),
    ("topk:0.1", True),
    ("topk:0.1", False),
    ("topk:0.01", True),
    ("topk:0.01", False),
    ("topk:0.01+int8", True),
    ("topk:0.01+int8", False),
    ("randk:0.05", True),
]
LARGE_ROWS: list[tuple[str, bool]] = [
    ("dense", False),
    ("int8", True),
    ("int4", True),
    ("topk:0.01", True),
    ("topk:0.01+int8", True),
    ("topk:0.01+int8", False),
    ("topk:0.005+int8", True),
    ("topk:0.003+int8", True),
    ("randk:0.05", True),
]
# From a pre-trained base: dense baseline, then FISH masks from each institution's own
# data ("site") or from the public data every institution holds ("public": one mask).
FISH_ROWS: list[tuple[str, bool, str]] = [
    ("dense", False, "site"),
    ("fish:0.1", True, "site"),
    ("fish:0.02", True, "site"),
    ("fish:0.02+int8", True, "site"),
    ("fish:0.1", True, "public"),
    ("fish:0.02", True, "public"),
    ("fish:0.02+int8", True, "public"),
]


@dataclass(frozen=True)
class Job:
    """One federation to run."""

    model: str
    alpha: float
    base: str  # "scratch" or "pretrained"
    spec: str
    error_feedback: bool
    rounds: int
    seed: int
    fish_mask: str = "site"

    @property
    def method(self) -> str:
        """Row label: the spec, plus '+EF' where error feedback is on for a lossy spec."""
        from fedcommons.wire.codec import CompressionSpec

        lossy = CompressionSpec.parse(self.spec).lossy
        label = self.spec + ("+EF" if self.error_feedback and lossy else "")
        public = self.spec.startswith("fish") and self.fish_mask == "public"
        return label + (" public mask" if public else "")


def _setup_worker() -> None:
    os.environ["FEDCOMMONS_CLIENT_THREADS"] = "1"
    os.environ["FEDCOMMONS_STATE_DIR"] = tempfile.mkdtemp(prefix="fc-bench-state-")
    import torch

    torch.set_num_threads(1)
    from fedcommons.logs import configure_logging

    configure_logging("ERROR")


def pretrain(registry: Path, hidden: str, seed: int) -> str:
    """Train the model centrally on the public split (validation) and publish it."""
    import torch

    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.prepare import signing_key_path
    from fedcommons.releases.registry import Registry
    from fedcommons.releases.signing import Signer
    from fedcommons.tasks.digits import DigitsTask, digits_split
    from fedcommons.wire import ReleaseManifest

    task = DigitsTask({"hidden": hidden, "seed": seed})
    model = task.build_model()
    split = digits_split()
    x, y = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        for idx in torch.randperm(len(y), generator=gen).split(16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build(version: str, digest: str, size: int) -> ReleaseManifest:
        return ReleaseManifest.for_weights(
            "digits",
            version,
            digest,
            size,
            sum(v.numel() for v in weights.values()),
            strategy="central-pretraining",
            config={"task.hidden": hidden, "data": "public (validation) split"},
            code_version="bench",
        )

    # The key the federations from this base will sign with (RunConfig's default path).
    signer = Signer.load_or_create(signing_key_path(RunConfig(registry=str(registry))))
    return Registry(registry).publish("digits", weights, build, signer=signer).version


def run_job(job: Job) -> dict[str, Any]:
    """Run one federation in this (worker) process and return its row."""
    _setup_worker()
    from fedcommons.client_sdk.client_app import app as client_app
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.engines.inprocess import run_in_process

    started = time.perf_counter()
    registry = Path(tempfile.mkdtemp(prefix="fc-bench-reg-"))
    base = pretrain(registry, MODELS[job.model], job.seed) if job.base == "pretrained" else ""
    config = RunConfig(
        task_options={"hidden": MODELS[job.model], "alpha": job.alpha, "seed": job.seed},
        rounds=job.rounds,
        local_epochs=1,
        seed=job.seed,
        registry=str(registry),
        base_release=base,
        compression=job.spec,
        error_feedback=job.error_feedback,
        fish_mask=job.fish_mask,
    )
    result = run_in_process(config, [client_app] * 10)
    sizes = [b for r in result.reports for b in r.upload_bytes.values()]
    dense = result.reports[0].dense_bytes
    mean_bytes = float(np.mean(sizes))
    return {
        "model": job.model,
        "parameters": dense // 4,
        "alpha": job.alpha,
        "base": job.base,
        "method": job.method,
        "spec": job.spec,
        "error_feedback": job.error_feedback,
        "rounds": job.rounds,
        "bytes_per_client_round": round(mean_bytes, 1),
        "ratio_vs_dense": round(dense / mean_bytes, 2),
        "final_accuracy": result.test_metrics["accuracy"],
        "final_val_accuracy": result.reports[-1].val_accuracy,
        "rejected": sum(sum(r.rejected.values()) for r in result.reports),
        "seconds": round(time.perf_counter() - started, 1),
    }


# -- throughput ---------------------------------------------------------------------------
# (label, spec, rounding): what a client sends with error feedback (round to nearest, the
# default) and without it (stochastic rounding), and the sparse codings.
THROUGHPUT_ROWS = [
    ("int8 (EF: nearest)", "int8", "nearest"),
    ("int8 (stochastic)", "int8", "stochastic"),
    ("int4 (EF: nearest)", "int4", "nearest"),
    ("int4 (stochastic)", "int4", "stochastic"),
    ("topk:0.01", "topk:0.01", "nearest"),
    ("topk:0.01+int8", "topk:0.01+int8", "nearest"),
]
TARGET_MB_S = 2000  # issue #16: int8/int4 encode + decode >= 2 GB/s per core


def _spread(times: list[float], mb: float) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "best": mb / ordered[0],
        "median": mb / ordered[len(ordered) // 2],
        "worst": mb / ordered[-1],
    }


def throughput(num_params: int, repeats: int) -> list[dict[str, Any]]:
    """Encode, decode and decode-and-fold MB/s of fp32 input on one core.

    Every repeat times a memcpy of the same fp32 vector into a preallocated buffer
    first (``np.copyto``, the baseline), then every row, so each ratio compares
    figures taken under the same load. ``decode → dense`` is ``decode_update`` plus
    reading the delta (a fresh float32 vector, page faults included); ``decode → fold``
    is ``decode_update`` plus :meth:`LazyDelta.fold_into` a float64 accumulator that
    already exists, what the coordinator does with FedAvg (no dense temporary).
    """
    import torch

    torch.set_num_threads(1)
    from fedcommons.wire.codec import CompressionSpec, decode_update, encode_flat, layout_of

    rng = np.random.default_rng(0)
    sizes = [num_params // 2, num_params // 4, num_params - num_params // 2 - num_params // 4]
    tensors = {
        f"layer{i}.weight": torch.from_numpy(rng.standard_normal(n, dtype=np.float32))
        for i, n in enumerate(sizes)
    }
    flat = np.concatenate([t.numpy() for t in tensors.values()])
    layout = layout_of(tensors)
    first = layout[0].name
    mb = flat.nbytes / 1e6
    dst = np.empty_like(flat)
    acc = {info.name: np.zeros(info.numel) for info in layout}
    cases = []
    for label, text, rounding in THROUGHPUT_ROWS:
        spec = CompressionSpec.parse(text)
        gen = np.random.default_rng(1)

        def enc(s: Any = spec, g: Any = gen, r: str = rounding) -> bytes:
            return encode_flat(flat, layout, s, round_no=1, rng=g, rounding=r).payload

        payload = enc()
        cases.append(
            (
                label,
                len(payload),
                enc,
                lambda p=payload: decode_update(p, layout, expected_round=1).delta[first],
                lambda p=payload: decode_update(p, layout, expected_round=1).delta.fold_into(
                    acc, 1.0
                ),
            )
        )
    timings: dict[str, list[float]] = {"memcpy": []}
    for label, *_ in cases:
        for part in ("enc", "dec", "fold"):
            timings[f"{label}/{part}"] = []

    def timed(fn: Any) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    for case in cases:  # warm-up: compile the kernels, fault in the buffers
        for fn in case[2:]:
            fn()
    for _ in range(repeats):
        timings["memcpy"].append(timed(lambda: np.copyto(dst, flat)))
        for label, _, enc_fn, dec_fn, fold_fn in cases:
            timings[f"{label}/enc"].append(timed(enc_fn))
            timings[f"{label}/dec"].append(timed(dec_fn))
            timings[f"{label}/fold"].append(timed(fold_fn))
    copy = _spread(timings["memcpy"], mb)
    rows = [
        {
            "method": "memcpy (np.copyto, reference)",
            "mb_per_s": copy["median"],
            "spread": (copy["worst"], copy["best"]),
            "vs_copy": 1.0,
        }
    ]
    copy_median = sorted(timings["memcpy"])[repeats // 2]
    for label, nbytes, *_ in cases:
        med = {p: sorted(timings[f"{label}/{p}"])[repeats // 2] for p in ("enc", "dec", "fold")}
        enc_t = timings[f"{label}/enc"]
        pair = [e + d for e, d in zip(enc_t, timings[f"{label}/dec"], strict=True)]
        pair_fold = [e + d for e, d in zip(enc_t, timings[f"{label}/fold"], strict=True)]
        both, both_fold = _spread(pair, mb), _spread(pair_fold, mb)
        rows.append(
            {
                "method": label,
                "mb_per_s": both["median"],
                "spread": (both["worst"], both["best"]),
                "mb_per_s_fold": both_fold["median"],
                "encode_mb_per_s": mb / med["enc"],
                "decode_mb_per_s": mb / med["dec"],
                "fold_mb_per_s": mb / med["fold"],
                "vs_copy": copy_median / sorted(pair)[repeats // 2],
                "vs_copy_fold": copy_median / sorted(pair_fold)[repeats // 2],
                "payload_bytes": nbytes,
            }
        )
    return rows


# -- output -------------------------------------------------------------------------------
def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Fill ``delta_vs_dense_pp`` against the dense row of the same model, α and base."""
    dense = {
        (r["model"], r["alpha"], r["base"]): r["final_accuracy"]
        for r in rows
        if r["spec"] == "dense"
    }
    for r in rows:
        ref = dense.get((r["model"], r["alpha"], r["base"]))
        r["delta_vs_dense_pp"] = (
            None if ref is None else round(100 * (r["final_accuracy"] - ref), 2)
        )


def print_tables(tp: list[dict[str, Any]], rows: list[dict[str, Any]], args: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    t = Table(
        title=f"encode + decode throughput, {args.throughput_params:,} fp32 values, one core, "
        f"median of {args.repeats} (worst–best)"
    )
    for col in [
        "method",
        "MB/s enc+dec",
        "worst–best",
        "x memcpy",
        "MB/s enc+dec→fold",
        "x memcpy",
        "encode",
        "decode",
        "dec→fold",
        "payload B",
    ]:
        t.add_column(col, justify="right" if col != "method" else "left")
    for r in tp:
        lo, hi = r["spread"]
        t.add_row(
            r["method"],
            f"{r['mb_per_s']:,.0f}",
            f"{lo:,.0f}–{hi:,.0f}",
            f"{r['vs_copy']:.3f}",
            f"{r.get('mb_per_s_fold', float('nan')):,.0f}",
            f"{r.get('vs_copy_fold', float('nan')):.3f}",
            f"{r.get('encode_mb_per_s', float('nan')):,.0f}",
            f"{r.get('decode_mb_per_s', float('nan')):,.0f}",
            f"{r.get('fold_mb_per_s', float('nan')):,.0f}",
            f"{r.get('payload_bytes', '')}",
        )
    console.print(t)
    for r in tp[1:]:
        if r["method"].startswith(("int8", "int4")):
            best = max(r["mb_per_s"], r["mb_per_s_fold"])
            verdict = "met" if best >= TARGET_MB_S else "MISSED"
            console.print(
                f"target ≥ {TARGET_MB_S:,} MB/s, {r['method']}: {verdict} "
                f"({best:,.0f} MB/s median; memcpy {tp[0]['mb_per_s']:,.0f} MB/s in this run)"
            )
    t = Table(title="digits, 10 institutions, FedAvg, test accuracy of the published release")
    cols = [
        "model",
        "α",
        "base",
        "rounds",
        "method",
        "bytes/client/round",
        "× vs dense fp32",
        "accuracy",
        "Δ vs dense (pp)",
        "s",
    ]
    for col in cols:
        t.add_column(col, justify="left" if col in {"model", "base", "method"} else "right")
    for r in rows:
        d = r["delta_vs_dense_pp"]
        t.add_row(
            r["model"],
            f"{r['alpha']:g}",
            r["base"],
            str(r["rounds"]),
            r["method"],
            f"{r['bytes_per_client_round']:,.0f}",
            f"{r['ratio_vs_dense']:,.1f}",
            f"{r['final_accuracy']:.4f}",
            "" if d is None else f"{d:+.2f}",
            f"{r['seconds']:.0f}",
        )
    console.print(t)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy against bytes per client-round (log scale), one panel per model and α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(MODELS)
    panels = sorted(
        {(r["model"], r["alpha"]) for r in rows}, key=lambda p: (order.index(p[0]), p[1])
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    for ax, (model, alpha) in zip(axes[0], panels, strict=True):
        for base, marker in [("scratch", "o"), ("pretrained", "s")]:
            sel = [r for r in rows if (r["model"], r["alpha"], r["base"]) == (model, alpha, base)]
            if not sel:
                continue
            x = [r["bytes_per_client_round"] for r in sel]
            y = [r["final_accuracy"] for r in sel]
            ax.scatter(x, y, marker=marker, label=f"from {base} base")
            for r in sel:
                ax.annotate(
                    r["method"],
                    (r["bytes_per_client_round"], r["final_accuracy"]),
                    fontsize=6,
                    xytext=(3, 2),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.set_xlabel("upload bytes per client and round")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{model}, Dirichlet α={alpha:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def build_jobs(args: Any) -> list[Job]:
    jobs = []
    for model in args.models:
        rounds = args.rounds if model == "mlp-4.8k" else args.rounds_large
        for alpha in args.alphas:
            rows = SMALL_ROWS if model == "mlp-4.8k" else LARGE_ROWS
            jobs += [Job(model, alpha, "scratch", s, ef, rounds, args.seed) for s, ef in rows]
            if model == "mlp-4.8k":
                jobs += [
                    Job(model, alpha, "pretrained", s, ef, rounds, args.seed, fm)
                    for s, ef, fm in FISH_ROWS
                ]
    jobs = [j for j in jobs if j.base in args.bases]
    if args.quick:
        jobs = [j for j in jobs if j.spec in {"dense", "topk:0.01+int8", "fish:0.02"}]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the federation rows as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of accuracy against bytes")
    parser.add_argument("--rounds", type=int, default=150, help="rounds, 4.8k-parameter MLP")
    parser.add_argument("--rounds-large", type=int, default=100, help="rounds, 167k MLP")
    parser.add_argument(
        "--alphas", type=lambda s: [float(a) for a in s.split(",")], default=[0.1, 0.5]
    )
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument(
        "--bases",
        type=lambda s: s.split(","),
        default=["scratch", "pretrained"],
        help="scratch, pretrained (the FISH block), or both",
    )
    parser.add_argument("--workers", type=int, default=2, help="federations run in parallel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throughput-params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=9, help="throughput: median of N")
    parser.add_argument("--quick", action="store_true", help="dense, top-1%%+int8, FISH 2%% only")
    parser.add_argument("--skip-federation", action="store_true")
    args = parser.parse_args()
    for model in args.models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; known: {', '.join(MODELS)}")

    tp = throughput(args.throughput_params, args.repeats)
    rows: list[dict[str, Any]] = []
    if not args.skip_federation:
        jobs = build_jobs(args)
        with ProcessPoolExecutor(max_workers=max(1, args.workers)) as pool:
            for i, row in enumerate(pool.map(run_job, jobs), 1):
                rows.append(row)
                print(
                    f"[{i}/{len(jobs)}] {row['model']} α={row['alpha']:g} {row['base']} "
                    f"{row['method']}: {row['final_accuracy']:.4f}, "
                    f"{row['ratio_vs_dense']:.1f}x, {row['seconds']:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
    add_deltas(rows)
    print_tables(tp, rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot and rows:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
