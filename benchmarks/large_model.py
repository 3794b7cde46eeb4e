"""A 110M-parameter model through Flower's deployment engine: fedcommons vs plain Flower.

Run as ``python -m benchmarks.large_model [--quick] [--json PATH]``. Every configuration
gets its own loopback ``flower-superlink`` (insecure: TLS would cost both sides the same)
and ``--nodes`` SuperNodes, and runs ``--rounds`` rounds of FedAvg over every node with
the same model, data and optimiser:

- ``plain-flower``: ``flower-supernode`` in Flower's default mode (a fresh
  ``flwr-clientapp`` process per message) and quickstart-style apps
  (:mod:`benchmarks.plain_flower_app`: ``FedAvg.start``, full weights + ``num-examples``);
- ``fedcommons-dense``: ``fedcommons client join`` (warm worker) with fedcommons'
  ServerApp and ClientApp, dense fp32 deltas;
- ``fedcommons-int8``: the same with ``compression = "int8"`` (stochastic rounding, one
  fp32 scale per 256 values);
- ``fedcommons-dense-subprocess`` (not in the default set): fedcommons with Flower's
  process model (``--mode subprocess``), the like-for-like comparison of the apps alone.

The model (:mod:`benchmarks.large_model_task`) is a BERT-base-shaped encoder with random
weights (109,483,778 parameters, 438 MB as fp32); a site's "training" is one plain-SGD
step on 4 random sequences of 16 tokens. The benchmark therefore measures transport,
update encoding and decoding, aggregation and the coordinator's memory, not learning.
``--quick`` uses the 4-layer ``bert-small`` preset (28.8M parameters) and 2 rounds.
``--model minilm`` runs the built-in ``bbc-news`` text task instead, with the pretrained
all-MiniLM-L6-v2 fully trainable (``adapter = "full"``: the update is the whole 22.7M
parameter model; needs the ``text`` extra): 8 training articles per node (one AdamW
step), 32 validation articles scored by both coordinators every round, 32 tokens.

Figures, each from this run:

- seconds per round: plain Flower, between two calls of its ``evaluate_fn`` (it runs after
  every aggregation); fedcommons, the round's own seconds plus its durable commit (the
  audit log's ``round.finish`` and ``round.commit`` records), so both include everything
  the coordinator does per round. ``steady`` is the mean of rounds 2..R (round 1 also pays
  the FAB fetch and, in Flower's default mode, nothing is warm); with ``--rounds 1`` it is
  round 1 itself (cold starts included, on both sides);
- coordinator peak RSS: the kernel's high-water mark (``VmHWM``) of the ``flwr-serverapp``
  process the SuperLink spawns for the run, sampled every 50 ms until it exits, in MB and
  as a multiple of the model's fp32 size; ``import floor`` is the RSS of a fresh Python
  that imported the same modules, so ``(peak - floor) / model`` is what the round costs;
- bytes on the wire per node and round: the arrays (``.npy`` bytes) or encoded payload of
  one message. Downloads are the base weights; Flower deduplicates identical objects, so
  the ServerApp pushes them to the SuperLink once per round, and each node pulls its copy.

Every process is stopped by PID. Memory: a 110M run holds about 8 GB across SuperLink,
SuperNodes and workers at its peak; the configurations run one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from tests.processes import ProcessGroup, free_port, start_superlink, wait_for_port

from benchmarks.deployment_latency import _plain_app, _worker_task_seconds
from benchmarks.large_model_task import PRESETS
from fedcommons.engines.submission import (
    DeploymentError,
    submit_run,
    write_connection,
    write_flower_app,
)
from fedcommons.observability.audit_log import read as read_audit
from fedcommons.releases.registry import Registry
from fedcommons.tasks import Task, load_task

console = Console(width=160)
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
TASK_REF = "benchmarks.large_model_task:SyntheticEncoderTask"
CONFIGS = ("plain-flower", "fedcommons-dense", "fedcommons-int8", "fedcommons-dense-subprocess")
DEFAULT_CONFIGS = CONFIGS[:3]
SAMPLE_S = 0.05
IN_MEMORY = ":flwr-in-memory:"
MB = 1e6


def _proc_status(pid: int) -> dict[str, int]:
    """``VmRSS`` / ``VmHWM`` of ``pid`` in bytes (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _mem_available() -> int:
    """The kernel's estimate of memory available to new work (``MemAvailable``), bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (through /proc: Flower's superexec has its own session)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    found, stack = [root], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


class PeakMemory(threading.Thread):
    """Samples the high-water marks of every process under the given roots until stopped.

    Processes are grouped by role: ``serverapp`` (the ``flwr-serverapp`` process: the
    coordinator), ``superlink`` (the rest of the SuperLink's tree) and ``nodes`` (every
    SuperNode with its workers / ClientApp processes). Per role it keeps the largest
    single-process peak and the largest sum of concurrent RSS.
    """

    def __init__(self, superlink: int, nodes: list[int], min_available: int) -> None:
        super().__init__(daemon=True)
        self.superlink, self.nodes = superlink, nodes
        self.min_available = min_available
        self.halt = threading.Event()
        self.starved = threading.Event()
        self.peak: dict[str, int] = {"serverapp": 0, "superlink": 0, "nodes": 0}
        self.total: dict[str, int] = {"superlink": 0, "nodes": 0}
        self.serverapp_pids: set[int] = set()

    def sample(self) -> None:
        """One pass over the process trees."""
        totals = {"superlink": 0, "nodes": 0}
        roles = [(pid, "superlink") for pid in _tree(self.superlink)]
        roles += [(pid, "nodes") for node in self.nodes for pid in _tree(node)]
        for pid, role in roles:
            status = _proc_status(pid)
            if not status:
                continue
            if role == "superlink" and "flwr-serverapp" in _cmdline(pid):
                role = "serverapp"
                self.serverapp_pids.add(pid)
            else:
                totals[role] += status.get("VmRSS", 0)
            self.peak[role] = max(self.peak[role], status.get("VmHWM", 0))
        for role, value in totals.items():
            self.total[role] = max(self.total[role], value)

    def run(self) -> None:
        """Sample every :data:`SAMPLE_S` seconds until :attr:`halt` is set.

        Sets :attr:`starved` (and stops sampling) when the machine's available memory
        falls below ``min_available`` bytes: the run is then stopped instead of letting
        the kernel's OOM killer pick a process (this machine is shared).
        """
        while not self.halt.wait(SAMPLE_S):
            self.sample()
            if _mem_available() < self.min_available:
                self.starved.set()
                return


def task_setup(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The task reference and options every side of the run uses."""
    if args.model == "minilm":
        options = {
            "model": "minilm",
            "adapter": "full",
            "partition": "iid",
            "max-train": 8 * args.nodes,
            "max-eval": 32,
            "max-length": 32,
        }
        return "bbc-news", options
    return TASK_REF, {"preset": args.preset}


def import_floor(task_ref: str) -> int:
    """RSS of a fresh Python that imported what a ``flwr-serverapp`` running us imports."""
    code = (
        "import torch, flwr.serverapp, fedcommons.coordinator.server_app;"
        "from fedcommons.tasks import resolve_task_class;"
        f"resolve_task_class({task_ref!r});"
        "from pathlib import Path;"
        "print([l for l in Path('/proc/self/status').read_text().splitlines()"
        " if l.startswith('VmRSS')][0].split()[1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    return int(out.stdout.strip()) * 1024


def _fedcommons_round_seconds(audit: Path) -> list[float]:
    """Per round: ``round.finish`` seconds plus that round's ``round.commit`` seconds."""
    finish: dict[int, float] = {}
    commit: dict[int, float] = {}
    for record in read_audit(audit):
        if record["action"] == "round.finish":
            finish[int(record["round"])] = float(record["details"]["seconds"])
        elif record["action"] == "round.commit":
            commit[int(record["round"])] = float(record["details"]["seconds"])
    return [finish[r] + commit.get(r, 0.0) for r in sorted(finish)]


def _submit_watched(app: Path, memory: PeakMemory, timeout: float) -> dict[str, Any]:
    """``submit_run`` in a thread; raise MemoryError if the machine runs short meanwhile."""
    result: dict[str, Any] = {}

    def submit() -> None:
        try:
            result.update(submit_run(app, "bench", timeout=timeout))
        except Exception as exc:  # reported below, in this thread
            result["error"] = exc

    thread = threading.Thread(target=submit, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(1.0)
        if memory.starved.is_set():
            raise MemoryError(
                f"available memory fell below {memory.min_available / 1e9:.1f} GB: run stopped"
            )
    if "error" in result:
        raise result["error"]
    return result


def _node_argv(name: str, i: int, link_port: int, port: int, args: argparse.Namespace) -> list:
    if name == "plain-flower":
        return [
            str(BIN / "flower-supernode"),
            "--insecure",
            "--superlink",
            f"127.0.0.1:{link_port}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--node-config",
            f"partition-id={i} num-partitions={args.nodes}",
        ]
    return [
        str(BIN / "fedcommons"),
        "client",
        "join",
        "--insecure",
        "--coordinator",
        f"127.0.0.1:{link_port}",
        "--port",
        str(port),
        "--mode",
        "subprocess" if name.endswith("-subprocess") else "warm",
        "--task",
        args.task_ref,
        "-n",
        f"partition-id={i}",
        "-n",
        f"num-partitions={args.nodes}",
    ]


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
            "FEDCOMMONS_STATE_DIR": str(work / "client-state"),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            # the task (benchmarks/large_model_task.py) must import in every process
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p),
        }
    )
    env.pop("FEDCOMMONS_AUDIT_LOG", None)
    os.environ["FLWR_HOME"] = env["FLWR_HOME"]  # for write_connection / flwr run / flwr ls
    procs = ProcessGroup(work, env)
    common = {
        "local-epochs": 1,
        "lr": 0.01,
        "batch-size": 4,
        "task": args.task_ref,
        **{f"task.{k}": v for k, v in args.task_options.items()},
    }
    memory: PeakMemory | None = None
    try:
        # Flower's in-memory state (the coordinator's default too): with a --database file
        # the SuperLink writes every 5 MB chunk into SQLite, and three nodes uploading
        # 440 MB each ran into "database is locked" (a reply lost) on this machine.
        link_port = start_superlink(procs, BIN, IN_MEMORY, timeout=120.0)
        nodes = []
        for i in range(args.nodes):
            port = free_port()
            proc, log = procs.start(f"node-{i}", _node_argv(name, i, link_port, port, args))
            wait_for_port(port, proc, log, timeout=120.0)
            nodes.append(proc.pid)
        memory = PeakMemory(procs.procs[0].pid, nodes, int(args.min_available_gb * 1e9))
        memory.start()
        write_connection("bench", f"127.0.0.1:{link_port}", insecure=True)
        timings = work / "timings.json"
        if name == "plain-flower":
            app = _plain_app(
                work,
                {
                    **common,
                    "num-server-rounds": args.rounds,
                    "nodes": args.nodes,
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
                    "node-wait-timeout": 300,
                    "round-timeout": 1800,
                    "compression": "int8" if name == "fedcommons-int8" else "dense",
                    "error-feedback": False,
                    # transport is measured, not learning: a release that does not beat
                    # its starting weights is still published
                    "gate-first-release": "record",
                },
            )
        started = time.monotonic()
        status = _submit_watched(app, memory, args.rounds * 1800 + 600)
        wall = time.monotonic() - started
        time.sleep(4 * SAMPLE_S)
        if status.get("status") != "finished:completed":
            raise RuntimeError(f"{name}: run ended {status}; logs in {work}")
    finally:
        if memory is not None:
            memory.halt.set()
            memory.join()
        procs.stop_all()
    if name == "plain-flower":
        data = json.loads(timings.read_text())
        seconds = data["round_seconds"]
        per_message = args.nodes * args.rounds
        download = data["pushed_array_bytes"] / per_message
        upload = data["pulled_array_bytes"] / per_message
        if download != args.base_array_bytes:
            raise RuntimeError(f"{name}: pushed {download} B per message, not the model's")
    else:
        release = Registry(work / "registry", create=False).releases()[0]
        manifest = release.manifest()
        if manifest.num_parameters != args.params:
            raise RuntimeError(f"{name}: the coordinator's model has {manifest.num_parameters}")
        seconds = _fedcommons_round_seconds(work / "registry" / "audit.jsonl")
        uploads = [b for r in manifest.round_metrics for b in r["upload_bytes"].values()]
        upload = statistics.fmean(uploads)
        download = args.base_array_bytes
    tasks = [t for i in range(args.nodes) for t in _worker_task_seconds(work / f"node-{i}.log")]
    return {
        "config": name,
        "round_seconds": seconds,
        "first_round_s": seconds[0],
        "steady_round_s": statistics.fmean(seconds[1:] or seconds),
        "run_wall_s": wall,
        "serverapp_peak_rss": memory.peak["serverapp"] if memory else 0,
        "serverapp_processes": len(memory.serverapp_pids) if memory else 0,
        "superlink_peak_rss_sum": memory.total["superlink"] if memory else 0,
        "nodes_peak_rss_sum": memory.total["nodes"] if memory else 0,
        "node_process_peak_rss": memory.peak["nodes"] if memory else 0,
        "upload_bytes_per_node_round": upload,
        "download_bytes_per_node_round": download,
        "warm_worker_tasks": tasks,
        # what Flower's SuperLink counted for the run (flwr ls: network-traffic)
        "flower_traffic_bytes": int(status.get("network-traffic", {}).get("total-bytes", 0)),
    }


def base_array_bytes(task: Task) -> tuple[int, int]:
    """(parameters, bytes of the base weights as a Flower ``ArrayRecord`` of ``.npy`` files)."""
    from flwr.app import ArrayRecord

    state = task.build_model().state_dict()
    record = ArrayRecord(state)
    return sum(v.numel() for v in state.values()), sum(len(a.data) for a in record.values())


def main(argv: list[str] | None = None) -> None:
    """Run every configuration once, print the table (and write --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bert-small (28.8M), 2 rounds")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: bert-base")
    parser.add_argument(
        "--model", choices=("encoder", "minilm"), default="encoder", help="see the module doc"
    )
    parser.add_argument("--rounds", type=int, help="default: 3 (quick: 2)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--keep", type=Path, help="work in this new directory and keep its logs")
    parser.add_argument(
        "--min-available-gb",
        type=float,
        default=2.0,
        help="stop a run when the machine's available memory falls below this",
    )
    args = parser.parse_args(argv)
    args.preset = args.preset or ("bert-small" if args.quick else "bert-base")
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    args.task_ref, args.task_options = task_setup(args)
    args.params, args.base_array_bytes = base_array_bytes(
        load_task(args.task_ref, args.task_options)
    )
    floor = import_floor(args.task_ref)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fc-large-") as tmp:
        work = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True)
            work = args.keep
        for name in configs:
            console.print(f"[dim]running {name} ({args.nodes} nodes, {args.rounds} rounds)…[/]")
            try:
                results.append(run_config(name, args, work))
            except (MemoryError, RuntimeError, DeploymentError) as exc:
                console.print(f"[red]{name} aborted: {exc}[/]")
                results.append({"config": name, "aborted": str(exc)[:2000]})
            if args.json:  # after every configuration: a long run keeps what it measured
                _write_json(args, floor, results)
    print_results(args, floor, results)


def _write_json(args: argparse.Namespace, floor: int, results: list[dict[str, Any]]) -> None:
    args.json.write_text(
        json.dumps(
            {
                "preset": args.preset,
                "model": args.model,
                "task": args.task_ref,
                "task_options": args.task_options,
                "parameters": args.params,
                "model_fp32_bytes": 4 * args.params,
                "nodes": args.nodes,
                "rounds": args.rounds,
                "import_floor_rss": floor,
                "results": results,
            },
            indent=2,
        )
    )


def print_results(args: argparse.Namespace, floor: int, results: list[dict[str, Any]]) -> None:
    """The table (ratios against ``plain-flower`` of the same run) and the worker timings."""
    model_bytes = 4 * args.params
    base = next((r for r in results if r["config"] == "plain-flower" and "aborted" not in r), None)
    title = (
        f"{args.preset if args.model == 'encoder' else 'MiniLM-L6 (bbc-news, full)'}: "
        f"{args.params:,} parameters ({model_bytes / MB:.0f} MB fp32), "
        f"{args.nodes} SuperNodes, {args.rounds} rounds, loopback deployment engine"
    )
    table = Table(title=title)
    columns = (
        "config",
        "round 1 s",
        "steady s/round",
        "÷ plain",
        "coordinator peak MB",
        "× model",
        "(peak−floor) × model",
        "upload B/node/round",
        "× vs fp32",
        "download B/node/round",
        "Flower traffic MB/node/round",
        "nodes peak MB (sum)",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        if "aborted" in r:
            table.add_row(r["config"], f"aborted: {r['aborted'][:60]}", *[""] * (len(columns) - 2))
            continue
        peak = r["serverapp_peak_rss"]
        table.add_row(
            r["config"],
            f"{r['first_round_s']:.1f}",
            f"{r['steady_round_s']:.1f}",
            f"{r['steady_round_s'] / base['steady_round_s']:.2f}" if base else "-",
            f"{peak / MB:,.0f}",
            f"{peak / model_bytes:.2f}",
            f"{(peak - floor) / model_bytes:.2f}",
            f"{r['upload_bytes_per_node_round']:,.0f}",
            f"{model_bytes / r['upload_bytes_per_node_round']:.2f}",
            f"{r['download_bytes_per_node_round']:,.0f}",
            f"{r['flower_traffic_bytes'] / (args.nodes * args.rounds) / MB:,.0f}",
            f"{r['nodes_peak_rss_sum'] / MB:,.0f}",
        )
    console.print(table)
    console.print(
        f"import floor (fresh Python with torch, flwr and the ServerApp imported): "
        f"{floor / MB:.0f} MB; model fp32 {model_bytes / MB:.0f} MB"
    )
    for r in results:
        if r.get("warm_worker_tasks"):
            tasks = r["warm_worker_tasks"]
            keys = sorted({k for t in tasks for k in t})
            console.print(
                f"{r['config']} warm worker, mean s per task: "
                + ", ".join(
                    f"{k[:-2]} {statistics.fmean(t.get(k, 0.0) for t in tasks):.2f}" for k in keys
                )
            )


if __name__ == "__main__":
    main()
