"""``fedcommons strategies list`` and ``fedcommons merge``: aggregators, online and offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedcommons.cli.common import OutputFormat, console, err_console, parse_settings

strategies_app = typer.Typer(
    help="Aggregation strategies: built-in and plugged in.", no_args_is_help=True
)


@strategies_app.command("list")
def strategies_list(
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """List every strategy (built-in and plugins) with parameters and paper reference."""
    from fedcommons.strategies import strategy_specs

    specs = strategy_specs()
    if fmt is OutputFormat.json:
        rows = []
        for s in specs:
            rows.append(
                {
                    "name": s.name,
                    "origin": s.origin,
                    "usable": not s.error,
                    "error": s.error or None,
                    "description": s.description,
                    "reference": s.reference,
                    "params": {
                        p.name: {
                            "type": p.type_name,
                            "default": None if p.required else p.default,
                            "required": p.required,
                        }
                        for p in s.params.values()
                    },
                    "needs_fisher": bool(getattr(s.cls, "needs_fisher", False)),
                    "uses_mask": bool(getattr(s.cls, "uses_mask", False)),
                    "streaming": bool(getattr(s.cls, "streaming", True)),
                }
            )
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "origin", "parameters", "state", "reference", show_lines=True)
    for s in specs:
        params = "\n".join(p.describe() for p in s.params.values()) or "-"
        flags = ["O(model)" if getattr(s.cls, "streaming", True) else "O(K×model)"]
        if getattr(s.cls, "needs_fisher", False):
            flags.append("needs Fisher")
        if getattr(s.cls, "uses_mask", False):
            flags.append("uses masks")
        origin = s.origin if not s.error else f"{s.origin}\n[red]unusable: {s.error}[/]"
        ref = s.reference + (f"\n[dim]{s.description}[/]" if s.description else "")
        table.add_row(s.name, origin, params, "\n".join(flags), ref)
    console.print(table)


def merge(
    models: Annotated[
        list[str],
        typer.Argument(help="Models: .safetensors files or releases (VERSION or NAME@VERSION)."),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Merged .safetensors file.")],
    strategy: Annotated[str, typer.Option("--strategy", "-s", help="Strategy name.")] = "fedavg",
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="Strategy parameter key=value (repeatable)."),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="θ0: file or release (default: common parent, else zeros).")
    ] = None,
    fisher_data: Annotated[
        list[str] | None,
        typer.Option(
            "--fisher-data",
            help="Data set for the Fisher: TASK or TASK,key=value,... (once, or once per model).",
        ),
    ] = None,
    task_option: Annotated[
        list[str] | None,
        typer.Option("--task-option", "-t", help="Option for every data set task, key=value."),
    ] = None,
    fisher_samples: Annotated[int, typer.Option(help="Examples per Fisher (N).")] = 256,
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated merge weights λᵢ (default: equal).")
    ] = None,
    eval_task: Annotated[
        str | None,
        typer.Option(help="Score inputs and result on this task's test split (TASK[,k=v...])."),
    ] = None,
    registry: Annotated[
        Path | None, typer.Option("--registry", "-r", help="Registry to resolve releases in.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Release line for bare versions.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the Fisher's example order.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite OUTPUT if it exists.")] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
) -> None:
    """Merge released models or checkpoints offline with any strategy (e.g. Fisher)."""
    import torch

    from fedcommons.errors import MergeError
    from fedcommons.merge import (
        check_compatible,
        fisher_for,
        load_checkpoint,
        merge_weights,
        parse_data_ref,
        save_weights,
    )
    from fedcommons.strategies import create_strategy, strategy_code

    agg = create_strategy(strategy, parse_settings(param))
    if len(models) < 1:
        raise MergeError("name at least one model to merge")
    if output.exists() and not force:
        raise MergeError(f"{output} exists: pass --force to overwrite it")
    common = parse_settings(task_option)
    data = list(fisher_data or [])
    if agg.needs_fisher and not data:
        raise MergeError(f"strategy {strategy!r} needs --fisher-data TASK (e.g. digits)")
    if data and len(data) not in (1, len(models)):
        raise MergeError(f"{len(data)} --fisher-data values for {len(models)} models: give 1 or N")
    lam = None
    if weights:
        try:
            lam = [float(w) for w in weights.split(",")]
        except ValueError as exc:
            raise MergeError(f"--weights {weights!r} is not a list of numbers") from exc
    checkpoints = [load_checkpoint(m, registry, name) for m in models]
    base_cp = None
    if base:
        base_cp = load_checkpoint(base, registry, name)
    elif (
        registry is not None
        and checkpoints[0].parent
        and all(c.parent == checkpoints[0].parent for c in checkpoints)
    ):
        base_cp = load_checkpoint(checkpoints[0].parent, registry, name)
    check_compatible(checkpoints + ([base_cp] if base_cp else []))
    ref_weights = checkpoints[0].weights
    theta0 = (
        base_cp.weights if base_cp else {k: torch.zeros_like(v) for k, v in ref_weights.items()}
    )
    fishers = None
    if agg.needs_fisher:
        per_model = data if len(data) == len(models) else data * len(models)
        fishers = [
            fisher_for(d, c.weights, common, num_samples=fisher_samples, seed=seed)
            for d, c in zip(per_model, checkpoints, strict=True)
        ]
    merged = merge_weights(
        agg, [c.weights for c in checkpoints], theta0, fishers=fishers, weights=lam
    )
    digest = save_weights(
        output,
        merged,
        {
            "fedcommons.strategy": agg.name,
            "fedcommons.strategy_params": agg.params(),
            "fedcommons.strategy_code": strategy_code(agg),
            "fedcommons.inputs": [{"ref": c.ref, "sha256": c.sha256} for c in checkpoints],
            "fedcommons.base": {"ref": base_cp.ref, "sha256": base_cp.sha256}
            if base_cp
            else "zeros",
            "fedcommons.fisher_data": data,
            "fedcommons.weights": lam,
        },
    )
    scores: dict[str, float] = {}
    if eval_task:
        from fedcommons.tasks import load_task

        ref, options = parse_data_ref(eval_task)
        task = load_task(ref, {**common, **options})
        loader = task.test_loader()
        if loader is None:
            raise MergeError(f"task {ref!r} has no test split to score on")
        for label, w in [(c.ref, c.weights) for c in checkpoints] + [(str(output), merged)]:
            model = task.build_model()
            model.load_state_dict(w, strict=True)
            scores[label] = task.evaluate(model, loader)["accuracy"]
    result = {
        "output": str(output),
        "sha256": digest,
        "strategy": agg.name,
        "params": agg.params(),
        "inputs": [c.ref for c in checkpoints],
        "base": base_cp.ref if base_cp else "zeros",
        "test_accuracy": scores,
    }
    if fmt is OutputFormat.json:
        print(json.dumps(result, indent=2))
        return
    if base_cp is None:
        err_console.print("[yellow]no base: merged absolute weights (θ0 = 0)[/]")
    console.print(f"[bold green]merged[/] {len(checkpoints)} models with {agg.name} -> {output}")
    console.print(f"  sha256 {digest}")
    for label, acc in scores.items():
        console.print(f"  test accuracy {acc:.4f}  {label}")
