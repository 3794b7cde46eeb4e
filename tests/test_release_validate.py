"""`fedcommons release validate`: re-score a published release, through the executable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from tests.release_helpers import digits_weights, publish_digits

BIN = Path(sys.executable).parent


def test_validate_passes_a_better_child_and_exits_1_for_a_regressed_one(tmp_path: Path) -> None:
    """Input tried: a child release published with weights far worse than its parent's."""
    reg = Registry(tmp_path / "reg")
    signer = Signer.generate()
    strong = publish_digits(reg, signer, digits_weights(80))
    publish_digits(reg, signer, digits_weights(120), parent=strong)  # 1.0.1: better
    publish_digits(reg, signer, digits_weights(1), parent=strong)  # 1.0.2: regressed

    def validate(version: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "fedcommons"), "release", "validate", version, "-r", str(reg.root)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    good = validate("1.0.1")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "parent 1.0.0" in good.stdout and "pass" in good.stdout
    bad = validate("1.0.2")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "the gate would reject it" in bad.stdout
