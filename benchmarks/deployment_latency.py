"""Round latency on Flower's deployment engine: plain Flower vs fedcommons, one run.

Run as ``python -m benchmarks.deployment_latency [--rounds 3] [--nodes 2] [--json PATH]``.
Every configuration gets its own loopback SuperLink (insecure, as both sides would use
the same TLS) and ``--nodes`` SuperNodes, trains the digits MLP on the same partitions
with the same optimiser, epochs and batch size, and runs ``--rounds`` rounds:

- ``plain-flower``: ``flower-supernode`` in Flower's default mode (a fresh
  ``flwr-clientapp`` process per message) and quickstart-style apps
  (:mod:`benchmarks.plain_flower_app`: ``FedAvg.start``, full weights + ``num-examples``);
- ``fedcommons-subprocess``: ``fedcommons client join --mode subprocess`` (the same
  Flower process model) with fedcommons' ServerApp and ClientApp;
- ``fedcommons-warm``: ``fedcommons client join`` (default: ``--isolation process`` plus
  one long-lived warm ClientApp worker per SuperNode).

Seconds per round are measured inside each ServerApp, from the end of one round's
centralised validation to the end of the next (both sides validate every round on the
coordinator). The first round of a run also pays the FAB fetch and, in warm mode, the
task's first use; ``steady`` is the mean of rounds 2..R. Ratios divide by
``plain-flower`` measured in the same run. Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tests.processes import ProcessGroup, free_port, start_superlink, wait_for_port

from fedcommons.engines.submission import submit_run, write_connection, write_flower_app
from fedcommons.releases.registry import Registry

console = Console(width=150)
BIN = Path(sys.executable).parent
CONFIGS = ("plain-flower", "fedcommons-subprocess", "fedcommons-warm")


def _plain_app(directory: Path, settings: dict[str, Any]) -> Path:
    app = directory / "plain-flower-app"
    app.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("plain_flower_app.py"), app / "plain_flower_app.py")
    config = "\n".join(
        f"{json.dumps(k)} = {json.dumps(v) if isinstance(v, str) else v}"
        for k, v in settings.items()
    )
    (app / "pyproject.toml").write_text(
        "\n".join(
            [
                "[project]",
                'name = "plain-flower-app"',
                'version = "1.0.0"',
                'license = "Apache-2.0"',
                "dependencies = []",
                "",
                "[tool.flwr.app]",
                'publisher = "benchmarks"',
                "",
                "[tool.flwr.app.components]",
                'serverapp = "plain_flower_app:serverapp"',
                'clientapp = "plain_flower_app:clientapp"',
                "",
                "[tool.flwr.app.config]",
                config,
                "",
            ]
        )
    )
    return app


def _worker_task_seconds(log: Path) -> list[dict[str, float]]:
    """The warm worker's per-task timings (``warm.task`` lines of a client join log)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if '"warm.task"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line[line.index("{") :])
                out.append({k: v for k, v in record.items() if k.endswith("_s")})
    return out


def run_config(name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Start a SuperLink and ``args.nodes`` SuperNodes for ``name``, run, stop; report."""
    work = root / name
    work.mkdir()
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(work / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]  # for write_connection / flwr run / flwr ls
    procs = ProcessGroup(work, env)
    started = time.monotonic()
    try:
        link_port = start_superlink(procs, BIN, work / "link.db", timeout=90.0)
        for i in range(args.nodes):
            port = free_port()
            node_cfg = f"partition-id={i} num-partitions={args.nodes}"
            if name == "plain-flower":
                argv = [
                    str(BIN / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    node_cfg,
                ]
            else:
                argv = [
                    str(BIN / "fedcommons"),
                    "client",
                    "join",
                    "--insecure",
                    "--coordinator",
                    f"127.0.0.1:{link_port}",
                    "--port",
                    str(port),
                    "--mode",
                    name.removeprefix("fedcommons-"),
                    "-n",
                    f"partition-id={i}",
                    "-n",
                    f"num-partitions={args.nodes}",
                ]
            wait_for_port(port, *procs.start(f"node-{i}", argv), timeout=90.0)
        write_connection("bench", f"127.0.0.1:{link_port}", insecure=True)
        timings = work / "timings.json"
        common = {"local-epochs": args.local_epochs, "lr": 0.05, "batch-size": 16}
        if name == "plain-flower":
            app = _plain_app(
                work,
                {
                    **common,
                    "num-server-rounds": args.rounds,
                    "nodes": args.nodes,
                    "hidden": "64",
                    "timings-path": str(timings),
                },
            )
        else:
            app = write_flower_app(
                work,
                {
                    **common,
                    "rounds": args.rounds,
                    "min-clients": args.nodes,
                    "task.num-partitions": args.nodes,
                    "registry": str(work / "registry"),
                    "node-wait-timeout": 120,
                },
            )
        ready = time.monotonic()
        status = submit_run(app, "bench", timeout=args.rounds * 180 + 300)
        wall = time.monotonic() - ready
        if status.get("status") != "finished:completed":
            raise RuntimeError(f"{name}: run ended {status}")
        if name == "plain-flower":
            data = json.loads(timings.read_text())
            seconds, accuracy = data["round_seconds"], data["val_accuracy"]
        else:
            manifest = Registry(work / "registry", create=False).releases()[0].manifest()
            seconds = [float(r["seconds"]) for r in manifest.round_metrics]
            accuracy = [float(r["val_accuracy"]) for r in manifest.round_metrics]
    finally:
        procs.stop_all()
    tasks = [t for i in range(args.nodes) for t in _worker_task_seconds(work / f"node-{i}.log")]
    steady = seconds[1:] or seconds
    return {
        "config": name,
        "round_seconds": seconds,
        "first_round_s": seconds[0],
        "steady_round_s": statistics.fmean(steady),
        "run_wall_s": wall,
        "startup_s": ready - started,
        "final_val_accuracy": accuracy[-1],
        "warm_worker_tasks": tasks,
    }


def main(argv: list[str] | None = None) -> None:
    """Run every configuration once, print the table (and write --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is reported apart)")
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="fc-latency-") as tmp:
        for name in configs:
            console.print(f"[dim]running {name} ({args.nodes} nodes, {args.rounds} rounds)…[/]")
            results.append(run_config(name, args, Path(tmp)))
    base = next((r for r in results if r["config"] == "plain-flower"), None)
    table = Table(title=f"Deployment-engine round latency ({args.nodes} SuperNodes, loopback)")
    for col in (
        "config",
        "round 1 s",
        "steady s/round",
        "÷ plain (steady)",
        "÷ plain (all)",
        "rounds s",
        "run wall s",
        "val acc",
    ):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        total = sum(r["round_seconds"])
        table.add_row(
            r["config"],
            f"{r['first_round_s']:.2f}",
            f"{r['steady_round_s']:.2f}",
            f"{r['steady_round_s'] / base['steady_round_s']:.2f}" if base else "-",
            f"{total / sum(base['round_seconds']):.2f}" if base else "-",
            " ".join(f"{s:.1f}" for s in r["round_seconds"]),
            f"{r['run_wall_s']:.1f}",
            f"{r['final_val_accuracy']:.3f}",
        )
    console.print(table)
    warm = next((r for r in results if r["warm_worker_tasks"]), None)
    if warm:
        tasks = warm["warm_worker_tasks"]
        keys = sorted({k for t in tasks for k in t})
        console.print(
            "warm worker, mean seconds per task: "
            + ", ".join(
                f"{k[:-2]} {statistics.fmean(t.get(k, 0.0) for t in tasks):.3f}" for k in keys
            )
        )
    if args.json:
        args.json.write_text(
            json.dumps({"nodes": args.nodes, "rounds": args.rounds, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
