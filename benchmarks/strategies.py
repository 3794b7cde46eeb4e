"""Strategy benchmark: ``python -m benchmarks.strategies [--json PATH] [--plot PATH]``.

Four parts (issue #4), every figure measured in this run:

1. one-shot merge of 10 models fine-tuned locally from a weak shared base (digits MLP,
   Dirichlet α ∈ {0.1, 0.5, 1} and IID): weighted average, Fisher-weighted merge (client
   Fisher sent through the int8 wire encoding), TIES (mask-aligned, sign election,
   density 0.2) and a 10-model output ensemble as the reference; test accuracy, mean
   over seeds;
2. multi-round federation at equal upload bytes, α = 0.1, through the real ServerApp and
   ClientApp (in-process engine): Fisher-weighted vs FedAvg with a tuned server learning
   rate; upload bytes are the serialized arrays of every reply;
3. aggregation throughput: our streaming FedAvg vs Flower's ``aggregate_arrayrecords``
   on the same 10 replies of 10M float32 each, dense and as int8 payloads (GB/s of
   input, median and spread of interleaved repeats, and the ratio);
4. peak memory of the aggregation (fresh process per point, peak RSS via VmHWM, glibc
   ``MALLOC_MMAP_THRESHOLD_=131072``) while folding 10, 100 and 1000 updates of 1M
   parameters, in units of the model size.

``--quick`` shrinks every part (CI smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PART_NAMES = ("oneshot", "multiround", "throughput", "memory")


# -- 1. one-shot merge ------------------------------------------------------------------
def _accuracy(task: Any, weights: dict[str, torch.Tensor]) -> float:
    model = task.build_model()
    model.load_state_dict(weights)
    return task.evaluate(model, task.test_loader())["accuracy"]


def _weak_base(task: Any, seed: int, fraction: float, epochs: int) -> dict[str, torch.Tensor]:
    """A shared base trained briefly on a small 'public' slice of the training split."""
    from torch.utils.data import DataLoader, TensorDataset

    from fedcommons.client_sdk.training import train_local
    from fedcommons.tasks.digits import digits_split

    split = digits_split()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(split.y_train), int(fraction * len(split.y_train)), replace=False)

    class Public(type(task)):  # type: ignore[misc]
        def train_loader(self, batch_size: int, seed: int) -> DataLoader:
            data = TensorDataset(
                torch.from_numpy(split.x_train[idx]), torch.from_numpy(split.y_train[idx])
            )
            gen = torch.Generator().manual_seed(seed)
            return DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)

    public = Public(task.options)
    base = public.build_model().state_dict()
    res = train_local(public, base, epochs=epochs, lr=0.05, batch_size=16, seed=seed)
    return {k: base[k] + res.delta[k] for k in base}


def part_oneshot(seeds: int, clients: int, local_epochs: int) -> list[dict[str, Any]]:
    from fedcommons.client_sdk.fisher import estimate_fisher
    from fedcommons.client_sdk.training import train_local
    from fedcommons.merge import merge_weights
    from fedcommons.strategies import FedAvg, FisherMerge, MaskAligned
    from fedcommons.tasks import load_task
    from fedcommons.wire.fisher import decode_fisher, encode_fisher

    rows = []
    for alpha in (0.1, 0.5, 1.0, "iid"):
        per_seed: dict[str, list[float]] = {}
        for seed in range(seeds):
            opts: dict[str, Any] = {"num-partitions": clients, "seed": seed}
            opts.update({"partition": "iid"} if alpha == "iid" else {"alpha": alpha})
            task = load_task("digits", opts)
            base = _weak_base(task, seed, fraction=0.1, epochs=3)
            models, fishers, counts = [], [], []
            for pid in range(clients):
                site = load_task("digits", {**opts, "partition-id": pid})
                res = train_local(site, base, epochs=local_epochs, lr=0.05, batch_size=16, seed=pid)
                weights = {k: base[k] + res.delta[k] for k in base}
                codes, ranges = encode_fisher(estimate_fisher(site, weights, seed=pid))
                fishers.append(decode_fisher(codes, ranges, weights))  # as the wire delivers it
                models.append(weights)
                counts.append(res.num_examples)
            x, y = next(iter(task.test_loader()))
            probs = torch.zeros(len(y), 10)
            for weights in models:
                model = task.build_model()
                model.load_state_dict(weights)
                model.eval()
                with torch.no_grad():
                    probs += torch.softmax(model(x), dim=-1)
            results = {
                "base": _accuracy(task, base),
                "weighted average": _accuracy(
                    task, merge_weights(FedAvg(), models, base, num_examples=counts)
                ),
                "fisher": _accuracy(
                    task,
                    merge_weights(
                        FisherMerge(), models, base, fishers=fishers, num_examples=counts
                    ),
                ),
                "ties": _accuracy(
                    task,
                    merge_weights(
                        MaskAligned(sign_election=True, density=0.2),
                        models,
                        base,
                        num_examples=counts,
                    ),
                ),
                "ensemble": float((probs.argmax(1) == y).float().mean()),
            }
            for key, value in results.items():
                per_seed.setdefault(key, []).append(value)
        row = {"alpha": str(alpha)}
        row.update({k: round(100 * float(np.mean(v)), 1) for k, v in per_seed.items()})
        row["fisher - average"] = round(row["fisher"] - row["weighted average"], 1)
        rows.append(row)
        print(f"  oneshot α={alpha}: {row}", flush=True)
    return rows


# -- 2. multi-round at equal upload bytes -------------------------------------------------
def _metered_client(meter: list[int]) -> Any:
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedcommons.client_sdk.client_app import train

    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        reply = train(msg, context)
        meter[0] += sum(
            len(arr.data) for rec in reply.content.array_records.values() for arr in rec.values()
        )
        return reply

    return client


def _federate(
    strategy: str, params: dict[str, Any], rounds: int, clients: int, registry: Path
) -> tuple[list[float], list[int]]:
    """Validation accuracy and cumulative upload bytes after each round."""
    from fedcommons.coordinator.config import RunConfig
    from fedcommons.coordinator.round import RoundReport
    from fedcommons.engines.inprocess import run_in_process

    meter = [0]
    acc: list[float] = []
    sent: list[int] = []

    class Observer:
        def on_start(self, config: RunConfig, run_id: int) -> None:
            pass

        def on_round(self, report: RoundReport) -> None:
            acc.append(report.val_accuracy)
            sent.append(meter[0])

    config = RunConfig(
        strategy=strategy,
        strategy_params=params,
        rounds=rounds,
        local_epochs=2,
        lr=0.05,
        registry=str(registry),
        task_options={"alpha": 0.1},
    )
    run_in_process(config, [_metered_client(meter)] * clients, observer=Observer())
    return acc, sent


def part_multiround(fisher_rounds: int, clients: int, lrs: list[float]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        f_acc, f_bytes = _federate("fisher", {}, fisher_rounds, clients, Path(tmp) / "f")
        budget = f_bytes[-1]
        per_round = f_bytes[0]
        avg_rounds = math.ceil(1.5 * fisher_rounds)
        curves = {"fisher": {"acc": f_acc, "bytes": f_bytes}}
        best: tuple[float, float, int] | None = None
        for lr in lrs:
            acc, sent = _federate(
                "fedavg", {"server_lr": lr}, avg_rounds, clients, Path(tmp) / f"a{lr}"
            )
            curves[f"fedavg lr={lr}"] = {"acc": acc, "bytes": sent}
            fit = [i for i, b in enumerate(sent) if b <= budget]
            at_budget = acc[fit[-1]] if fit else float("nan")
            if best is None or at_budget > best[0]:
                best = (at_budget, lr, fit[-1] + 1 if fit else 0)
            print(f"  multiround fedavg lr={lr}: val acc at budget {at_budget:.3f}", flush=True)
    assert best is not None
    result = {
        "alpha": 0.1,
        "clients": clients,
        "budget_mb": round(budget / 1e6, 3),
        "fisher_rounds": fisher_rounds,
        "fisher_mb_per_round": round(per_round / 1e6, 4),
        "fisher_val_acc": round(100 * f_acc[-1], 1),
        "fedavg_best_lr": best[1],
        "fedavg_rounds_in_budget": best[2],
        "fedavg_mb_per_round": round(curves[f"fedavg lr={best[1]}"]["bytes"][0] / 1e6, 4),
        "fedavg_val_acc": round(100 * best[0], 1),
        "curves": curves,
    }
    print(f"  multiround: { {k: v for k, v in result.items() if k != 'curves'} }", flush=True)
    return result


# -- 3. throughput --------------------------------------------------------------------------
def part_throughput(clients: int, params: int, tensors: int, repeats: int) -> list[dict[str, Any]]:
    """Aggregate the same replies with Flower and with ours, at 1 and at every core's thread.

    Flower's ``aggregate_arrayrecords`` is NumPy (one thread whatever torch is set to);
    our rows run at one torch thread and at ``os.cpu_count()`` threads, the coordinator's
    default. Every repeat runs every row once, in turn (so load on the shared machine
    hits all rows alike); the table gives the median and the worst–best spread, and the
    ratio of medians against Flower. ``decode + validate + fold`` is the coordinator's
    intake of a dense reply: zero-copy views of the message's arrays, the finite check,
    the float64 fold, one reply at a time; ``one pull of 10`` folds the replies that one
    pull returned together (``FedAvg.fold_many``: one pass over the float64 sum for the
    batch, the same bits), which is what the coordinator does with each pull and what
    Flower's whole-batch aggregation compares with. The int8 rows are the same for
    compressed replies (int8, what a client sends with error feedback):
    ``decode_update`` (CRC, layout, codes and scales checked) and the fused
    decode-and-fold, no dense temporary; their GB/s count the dense fp32 size, like
    every row. ``after last reply`` is what a round waits for once
    its last reply is in: Flower aggregates the whole batch then, our streaming fold has
    already folded all the others and only folds that one and finalizes.
    """
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedcommons.coordinator.intake import record_tensors
    from fedcommons.strategies import FedAvg
    from fedcommons.wire.codec import CompressionSpec, decode_update, encode_update
    from fedcommons.wire.update import ClientUpdate, decode_dense_delta

    gen = torch.Generator().manual_seed(0)
    size = params // tensors
    base = {f"t{i}": torch.zeros(size) for i in range(tensors)}
    deltas = [{k: torch.randn(size, generator=gen) for k in base} for _ in range(clients)]
    counts = [int(torch.randint(10, 100, (1,), generator=gen)) for _ in range(clients)]
    records = [
        RecordDict(
            {
                "delta": ArrayRecord({k: Array(v.numpy()) for k, v in d.items()}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        for d, n in zip(deltas, counts, strict=True)
    ]
    updates = [ClientUpdate(d, n) for d, n in zip(deltas, counts, strict=True)]
    int8 = CompressionSpec.parse("int8")
    payloads = [encode_update(d, int8, round_no=1, rounding="nearest").payload for d in deltas]
    nbytes = clients * params * 4
    dst, src = torch.empty(params), torch.randn(params, generator=gen)

    def flower() -> dict[str, torch.Tensor]:
        out = aggregate_arrayrecords(records, "num-examples")
        return {k: torch.from_numpy(v.numpy()) for k, v in out.items()}

    # One aggregator per row, reused across repeats as the coordinator reuses its
    # strategy round after round (the sum is zeroed, not reallocated, at each begin).
    def fold(accumulate: str) -> Any:
        agg = FedAvg(accumulate=accumulate)
        return lambda: agg.aggregate(base, updates)

    def from_records(accumulate: str) -> Any:
        agg = FedAvg(accumulate=accumulate)

        def run() -> dict[str, torch.Tensor]:
            agg.begin(base)
            for rec, n in zip(records, counts, strict=True):
                delta = decode_dense_delta(record_tensors(rec["delta"]), base)
                agg.fold(ClientUpdate(delta, n))
            return agg.finalize()

        return run

    def batched(accumulate: str) -> Any:  # every reply arrived in the same pull
        agg = FedAvg(accumulate=accumulate)

        def run() -> dict[str, torch.Tensor]:
            agg.begin(base)
            agg.fold_many(
                [
                    ClientUpdate(decode_dense_delta(record_tensors(rec["delta"]), base), n)
                    for rec, n in zip(records, counts, strict=True)
                ]
            )
            return agg.finalize()

        return run

    def from_int8(batch: bool) -> Any:
        agg = FedAvg()

        def run() -> dict[str, torch.Tensor]:
            agg.begin(base)
            decoded = (
                ClientUpdate(decode_update(p, base, expected_round=1).delta, n)
                for p, n in zip(payloads, counts, strict=True)
            )
            if batch:
                agg.fold_many(list(decoded))
            else:
                for update in decoded:
                    agg.fold(update)
            return agg.finalize()

        return run

    def last_reply(accumulate: str) -> tuple[Any, Any]:
        agg = FedAvg(accumulate=accumulate)

        def setup() -> None:  # the first clients - 1 replies arrived earlier
            agg.begin(base)
            for rec, n in zip(records[:-1], counts[:-1], strict=True):
                agg.fold(ClientUpdate(decode_dense_delta(record_tensors(rec["delta"]), base), n))

        def run() -> dict[str, torch.Tensor]:
            delta = decode_dense_delta(record_tensors(records[-1]["delta"]), base)
            agg.fold(ClientUpdate(delta, counts[-1]))
            return agg.finalize()

        return setup, run

    reference = flower()
    threads = sorted({1, os.cpu_count() or 1})
    # (label, threads, run, setup, checked against Flower's result, tolerance)
    cases: list[tuple[str, int, Any, Any, bool, float]] = [
        ("flower aggregate_arrayrecords (numpy)", 1, flower, None, True, 1e-5),
        ("memcpy of one update's fp32 bytes × clients", 1, None, None, False, 0.0),
    ]
    for t in threads:
        for acc, note in (("float64", "default, bit-reproducible"), ("float32", "fast")):
            cases.append(
                (
                    f"ours: decode + validate + fold, {acc} ({note})",
                    t,
                    from_records(acc),
                    None,
                    True,
                    1e-5,
                )
            )
            cases.append((f"ours: fold decoded tensors, {acc}", t, fold(acc), None, True, 1e-5))
        cases.append(
            (
                "ours: decode + validate + fold, one pull of 10, float64 (default)",
                t,
                batched("float64"),
                None,
                True,
                1e-5,
            )
        )
        for batch in (False, True):
            cases.append(
                (
                    "ours: int8 replies, decode + validate + fused fold"
                    + (", one pull of 10" if batch else "")
                    + ", float64",
                    t,
                    from_int8(batch),
                    None,
                    True,
                    0.05,
                )
            )
        setup, run = last_reply("float64")
        cases.append(
            ("ours: after the last reply (fold it + finalize), float64", t, run, setup, False, 0)
        )

    def copy_all() -> None:
        for _ in range(clients):
            dst.copy_(src)

    times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    for label, t, fn, _, check, tol in cases:  # warm up and check results
        torch.set_num_threads(t)
        if fn is not None and check:
            result = fn()
            for k in reference:
                assert torch.allclose(result[k], reference[k], atol=tol), f"{label} disagrees"
    for _ in range(repeats):
        for i, (_, t, fn, setup, _, _) in enumerate(cases):
            torch.set_num_threads(t)
            if setup is not None:
                setup()
            start = time.perf_counter()
            (fn or copy_all)()
            times[i].append(time.perf_counter() - start)
    torch.set_num_threads(1)
    flower_s = sorted(times[0])[repeats // 2]
    rows = []
    for i, (label, t, _, setup, _, _) in enumerate(cases):
        ordered = sorted(times[i])
        median = ordered[repeats // 2]
        streaming_wait = setup is not None
        rows.append(
            {
                "aggregator": label,
                "threads": t,
                "seconds": round(median, 4),
                "GB/s": None if streaming_wait else round(nbytes / median / 1e9, 2),
                "worst–best GB/s": None
                if streaming_wait
                else f"{nbytes / ordered[-1] / 1e9:.2f}–{nbytes / ordered[0] / 1e9:.2f}",
                "x flower": round(flower_s / median, 2),
            }
        )
        print(f"  throughput: {rows[-1]}", flush=True)
    return rows


# -- 4. peak memory ---------------------------------------------------------------------
_MEMORY_CHILD = r"""
import json, sys, torch
from fedcommons.strategies import create_strategy
from fedcommons.wire.update import ClientUpdate
name, params = sys.argv[1], json.loads(sys.argv[2])
k, n_params, tensors = (int(a) for a in sys.argv[3:6])
torch.set_num_threads(1)
agg = create_strategy(name, params)
gen = torch.Generator().manual_seed(0)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def one_round(base, count):
    agg.begin(base)
    for _ in range(count):
        delta = {n: torch.randn(v.shape, generator=gen) for n, v in base.items()}
        fisher = None
        if agg.needs_fisher:
            fisher = {n: torch.rand(v.shape, generator=gen) for n, v in base.items()}
        agg.fold(ClientUpdate(delta, 10, fisher=fisher))
        del delta, fisher
    step = agg.finalize()
    del step
one_round({f"t{i}": torch.zeros(1000) for i in range(tensors)}, 3)  # warm code paths only
base = {f"t{i}": torch.zeros(n_params // tensors) for i in range(tensors)}
rss0 = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to now
one_round(base, k)
print(json.dumps({"baseline": rss0, "peak": status("VmHWM:")}))
"""


def part_memory(
    sizes: list[int], params: int, tensors: int, strategies: list[tuple[str, dict]]
) -> list[dict[str, Any]]:
    model_bytes = params * 4
    rows = []
    env = dict(os.environ)
    # glibc's dynamic mmap threshold otherwise moves freed model-sized buffers into the
    # heap, where fragmentation makes the peak depend on allocation history (±50 % noise
    # between runs, unrelated to what the strategy keeps). A fixed threshold returns every
    # large buffer to the OS on free, so VmHWM measures live memory.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")]
    )
    for name, sparams in strategies:
        for k in sizes:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _MEMORY_CHILD,
                    name,
                    json.dumps(sparams),
                    str(k),
                    str(params),
                    str(tensors),
                ],
                capture_output=True,
                text=True,
                env=env,
                timeout=600,
                check=True,
            )
            data = json.loads(out.stdout.strip().splitlines()[-1])
            extra = data["peak"] - data["baseline"]
            label = name + (
                "" if not sparams else " " + ",".join(f"{a}={b}" for a, b in sparams.items())
            )
            rows.append(
                {
                    "strategy": label,
                    "updates": k,
                    "peak extra MB": round(extra / 1e6, 1),
                    "x model": round(extra / model_bytes, 2),
                    "target x model": 5 if name == "fisher" else 4,
                    "meets": extra / model_bytes <= (5 if name == "fisher" else 4),
                }
            )
            print(f"  memory: {rows[-1]}", flush=True)
    return rows


# -- output -----------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]], title: str) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    widths = [max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    lines = [f"\n{title}", "  ".join(str(c).ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append(
            "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True))
        )
    return "\n".join(lines)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    if "oneshot" in results:
        ax = axes[0][0]
        rows = results["oneshot"]
        methods = ["weighted average", "fisher", "ties", "ensemble"]
        xs = np.arange(len(rows))
        for i, m in enumerate(methods):
            ax.bar(xs + (i - 1.5) * 0.2, [r[m] for r in rows], 0.2, label=m)
        ax.set_xticks(xs, [f"α={r['alpha']}" for r in rows])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("1. one-shot merge of 10 fine-tuned models")
        ax.legend(fontsize=8)
    if "multiround" in results:
        ax = axes[0][1]
        for label, c in results["multiround"]["curves"].items():
            ax.plot(
                np.asarray(c["bytes"]) / 1e6, 100 * np.asarray(c["acc"]), marker=".", label=label
            )
        ax.axvline(results["multiround"]["budget_mb"], color="grey", ls="--", lw=1)
        ax.set_xlabel("cumulative upload (MB)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title("2. multi-round, α = 0.1, equal upload bytes")
        ax.legend(fontsize=8)
    if "throughput" in results:
        ax = axes[1][0]
        rows = results["throughput"]
        ax.barh([r["aggregator"].replace(" (", "\n(") for r in rows], [r["GB/s"] for r in rows])
        ax.set_xlabel("GB/s of client input")
        ax.set_title("3. aggregation throughput, 10 × 10M float32")
        ax.tick_params(axis="y", labelsize=7)
    if "memory" in results:
        ax = axes[1][1]
        rows = results["memory"]
        for label in dict.fromkeys(r["strategy"] for r in rows):
            pts = [r for r in rows if r["strategy"] == label]
            ax.plot(
                [r["updates"] for r in pts], [r["x model"] for r in pts], marker="o", label=label
            )
        ax.axhline(4, color="grey", ls="--", lw=1, label="target: 3× model + 1 update")
        ax.set_xscale("log")
        ax.set_xlabel("updates folded")
        ax.set_ylabel("peak extra memory / model size")
        ax.set_title("4. aggregation peak memory, 1M-parameter model")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, help="write all results as JSON")
    parser.add_argument("--plot", type=Path, help="write a 2×2 PNG plot (matplotlib)")
    parser.add_argument("--parts", default=",".join(PART_NAMES), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for part 1")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PART_NAMES))
    if unknown:
        parser.error(f"unknown parts {unknown}; valid: {', '.join(PART_NAMES)}")
    torch.set_num_threads(1)
    q = args.quick
    results: dict[str, Any] = {"machine": {"threads": 1, "cpus": os.cpu_count()}}
    started = time.perf_counter()
    if "oneshot" in parts:
        results["oneshot"] = part_oneshot(1 if q else args.seeds, 10, 10)
    if "multiround" in parts:
        results["multiround"] = part_multiround(
            2 if q else 8, 10, [1.0] if q else [0.5, 1.0, 1.5, 2.0]
        )
    if "throughput" in parts:
        results["throughput"] = part_throughput(
            10, 1_000_000 if q else 10_000_000, 10, 1 if q else 5
        )
    if "memory" in parts:
        sizes = [10, 30] if q else [10, 100, 1000]
        strategies = [("fedavg", {}), ("fisher", {}), ("mask-aligned", {"sign_election": True})]
        results["memory"] = part_memory(sizes, 100_000 if q else 1_000_000, 4, strategies)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if "oneshot" in results:
        print(
            _table(
                results["oneshot"],
                "1. one-shot merge, test accuracy % (10 clients, mean over seeds)",
            )
        )
    if "multiround" in results:
        mr = {k: v for k, v in results["multiround"].items() if k != "curves"}
        print(_table([mr], "2. multi-round at equal upload bytes (validation accuracy %)"))
    if "throughput" in results:
        print(
            _table(
                results["throughput"],
                "3. aggregation throughput, 10 × 10M float32 (median of interleaved repeats; "
                "Flower row = 1.0; target: default path ≥ 2× Flower on one thread)",
            )
        )
    if "memory" in results:
        print(
            _table(
                results["memory"],
                "4. peak memory of one round (model = 1M float32 = 4 MB; target: 3× model + the "
                "update in flight, which for fisher carries its Fisher)",
            )
        )
    print(f"\ntotal {results['seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        _plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
