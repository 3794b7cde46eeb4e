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
