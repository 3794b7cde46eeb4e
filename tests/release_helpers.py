"""Helpers for the release tests: publish synthetic weights without a federation."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import torch

from fedcommons.releases.card import render_card
from fedcommons.releases.registry import Registry, Release
from fedcommons.releases.signing import Signer
from fedcommons.wire.manifest import ReleaseManifest

SRC = Path(__file__).resolve().parents[1] / "src"


def weights(seed: int = 0, sizes: tuple[int, ...] = (64, 32, 10)) -> dict[str, torch.Tensor]:
    """A small MLP-shaped state dict."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        out[f"net.{2 * i}.weight"] = torch.randn(b, a, generator=g)
        out[f"net.{2 * i}.bias"] = torch.randn(b, generator=g)
    return out


def publish(
    reg: Registry,
    signer: Signer,
    w: dict[str, torch.Tensor],
    *,
    parent: Release | None = None,
    name: str = "line",
    bump: str = "",
    **kwargs,
) -> Release:
    """Publish ``w`` with a minimal manifest and a model card."""

    def build(version: str, digest: str, size: int) -> ReleaseManifest:
        return ReleaseManifest.for_weights(
            name,
            version,
            digest,
            size,
            sum(v.numel() for v in w.values()),
            parent=parent,
            strategy="fedavg",
            rounds=1,
            contributors=1,
            metrics={"test_accuracy": 0.5},
            code_version="test",
        )

    return reg.publish(
        name, w, build, signer=signer, parent=parent, bump=bump, render_card=render_card, **kwargs
    )


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this tree's sources first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{SRC}{os.pathsep}{Path(__file__).resolve().parents[1]}"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )


def digits_weights(steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The digits task's model after ``steps`` full-batch SGD steps on its training split."""
    from fedcommons.tasks.digits import DigitsTask, digits_split

    torch.manual_seed(seed)
    model = DigitsTask({"num-partitions": 1, "seed": seed}).build_model()
    split = digits_split()
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def publish_digits(
    reg: Registry,
    signer: Signer,
    w: dict[str, torch.Tensor],
    *,
    parent: Release | None = None,
    name: str = "digits",
    **fields,
) -> Release:
    """Publish ``w`` as a digits release scored by the task's validation gate (no run)."""
    from fedcommons.releases.gate import load_suite, run_gate
    from fedcommons.tasks.digits import DigitsTask

    task = DigitsTask({"num-partitions": 1})
    gate = run_gate(
        task,
        load_suite(task),
        w,
        parent=reg.load_weights(parent) if parent else None,
        parent_version=parent.version if parent else None,
    )
    accuracy = next(t["candidate"] for t in gate.to_dict()["tasks"] if t["name"] == "accuracy")

    def build(version: str, digest: str, size: int) -> ReleaseManifest:
        values = {
            "parent": parent,
            "task": "digits",
            "strategy": "fedavg",
            "rounds": 3,
            "contributors": 4,
            "metrics": {"val_accuracy": accuracy, "test_accuracy": accuracy},
            "validation": gate.to_dict(),
            "config": {"task.hidden": "64", "task.partition-id": 3},
            "code_version": "test",
        }
        values.update(fields)
        return ReleaseManifest.for_weights(
            name, version, digest, size, sum(v.numel() for v in w.values()), **values
        )

    return reg.publish(name, w, build, signer=signer, parent=parent, render_card=render_card)
