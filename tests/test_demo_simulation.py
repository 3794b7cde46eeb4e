"""The Quick start demo, as a user runs it: Flower's simulation engine, 10 × 10 rounds."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN

pytestmark = pytest.mark.slow


def test_demo_publishes_a_release_above_90_percent_test_accuracy(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    registry = tmp_path / "registry"
    started = time.monotonic()
    run = subprocess.run(
        [str(BIN / "fedcommons"), "demo", "--registry", str(registry)],
        env=flower_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
    )
    seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout + run.stderr
    rounds = re.findall(r"round +(\d+)/10 +val accuracy (\d\.\d+)", run.stdout)
    assert [int(r) for r, _ in rounds] == list(range(1, 11))
    published = re.search(r"published digits (\S+) +test accuracy (\d\.\d+)", run.stdout)
    assert published, run.stdout
    version, accuracy = published.group(1), float(published.group(2))
    print(f"demo: {seconds:.1f}s, test accuracy {accuracy:.4f}")
    assert version == "1.0.0"
    assert accuracy >= 0.90

    listed = subprocess.run(
        [
            str(BIN / "fedcommons"),
            "release",
            "show",
            version,
            "-r",
            str(registry),
            "--format",
            "json",
        ],
        env=flower_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    manifest = json.loads(listed.stdout)
    assert manifest["contributors"] == 10 and manifest["rounds"] == 10
    assert manifest["weights_sha256"] in run.stdout
    assert abs(manifest["metrics"]["test_accuracy"] - accuracy) < 1e-4
