"""The validation gate in real runs: poisoned candidates and chance-level first releases.

In-process engine: the real ServerApp and ClientApps; the attacker is a real malicious
client (``benchmarks.attacks``) whose update goes through the normal reply path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.attacks import federation

from fedcommons.client_sdk.client_app import app as honest_client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import CandidateRejectedError
from fedcommons.releases.registry import Registry


def _config(registry: Path, **kw: object) -> RunConfig:
    flat = {
        "rounds": 1,
        "local-epochs": 1,
        "registry": str(registry),
        "seed": 0,
        "task.num-partitions": 3,
    }
    flat.update(kw)
    return RunConfig.from_flat(flat)


def test_model_replacement_round_worse_than_the_parent_is_rejected(tmp_path: Path) -> None:
    """Input: from a published parent, one round where 1 of 3 institutions sends γ(X − G).

    X is that institution's model trained on flipped labels, γ = 3 (Bagdasaryan et al.):
    the round's mean lands near X, which is worse than the parent.
    """
    reg_path = tmp_path / "reg"
    parent = run_in_process(_config(reg_path, rounds=3), [honest_client] * 3).release
    apps, node_configs = federation("model-replacement", 3, 1)
    with pytest.raises(CandidateRejectedError, match="accuracy: target task got worse") as err:
        run_in_process(
            _config(reg_path, **{"base-release": parent.version}), apps, node_configs=node_configs
        )
    reg = Registry(reg_path, create=False)
    assert [r.version for r in reg.releases()] == [parent.version]  # nothing new published
    (rejection,) = reg.rejections()
    assert rejection.id == err.value.rejection_id and rejection.parent_version == parent.version
    accuracy = next(t for t in rejection.report["validation"]["tasks"] if t["name"] == "accuracy")
    assert accuracy["candidate"] < accuracy["parent"] - 0.1  # a real poisoning, not noise


def test_chance_level_first_release_is_rejected(tmp_path: Path) -> None:
    """Input: a line's first run whose rounds barely move the model (lr 1e-9)."""
    reg_path = tmp_path / "reg"
    with pytest.raises(CandidateRejectedError, match="does not beat the starting weights"):
        run_in_process(_config(reg_path, lr=1e-9), [honest_client] * 3)
    reg = Registry(reg_path, create=False)
    assert reg.releases() == []
    (rejection,) = reg.rejections()
    validation = rejection.report["validation"]
    assert validation["parent_source"] == "start" and rejection.parent_version is None
