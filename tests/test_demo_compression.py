"""``fedcommons demo --compression``: the option reaches the run config, bad specs fail early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcommons", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_rejects_a_bad_compression_spec_before_any_round(tmp_path: Path) -> None:
    """Input: ``fedcommons demo --compression topk:7`` (kept fraction above 1)."""
    registry = tmp_path / "reg"
    proc = run_cli("demo", "--compression", "topk:7", "--registry", str(registry), cwd=tmp_path)
    assert proc.returncode == 2
    assert "CompressionSpecError" in proc.stderr and "topk:7" in proc.stderr
    assert not registry.exists()


def test_demo_help_documents_compression_and_error_feedback(tmp_path: Path) -> None:
    proc = run_cli("demo", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--compression" in proc.stdout and "--no-error-feedback" in proc.stdout
