"""The publish step of a federation: gate, version, sign, card (in-process engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import CandidateRejectedError, ConfigError, SigningKeyError
from fedcommons.fileio import config_dir
from fedcommons.releases.registry import Registry
from fedcommons.releases.verification import verify_release


def _config(registry: Path, **kw) -> RunConfig:
    base = {"rounds": 1, "local_epochs": 1, "registry": str(registry), "seed": 0}
    base.update(kw)
    return RunConfig(**base)


def test_first_release_carries_gate_results_fingerprints_card_and_signature(
    tmp_path: Path,
) -> None:
    result = run_in_process(_config(tmp_path / "reg"), [client_app] * 2)
    rel = result.release
    manifest = rel.manifest()
    assert rel.version == "1.0.0" and manifest.version_bump["bump"] == "major"
    v = manifest.validation
    assert v["passed"] and v["suite"] == "digits-builtin" and v["device"] == "cpu"
    assert {t["name"] for t in v["tasks"]} == {"accuracy", "loss", "worst-class-accuracy"}
    assert all(t["seconds"] > 0 and t["device"] == "cpu" for t in v["tasks"])
    assert set(manifest.data_fingerprints) == {"digits/validation", "digits/test"}
    assert manifest.card_sha256 and rel.card_path.exists() and manifest.signing_key_id
    key = config_dir() / "signing-key.pem"  # outside the registry, private to the user
    assert key.stat().st_mode & 0o077 == 0 and not (tmp_path / "reg" / "private").exists()
    assert verify_release(Registry(tmp_path / "reg"), rel).ok


def test_release_from_a_base_is_versioned_from_the_change_with_override(
    tmp_path: Path,
) -> None:
    reg_path = tmp_path / "reg"
    run_in_process(_config(reg_path), [client_app] * 2)
    second = run_in_process(
        _config(reg_path, base_release="1.0.0", gate_target="tolerance"), [client_app] * 2
    ).release
    manifest = second.manifest()
    # a federated round moves most entries: more than a PATCH allows
    assert manifest.version_bump["computed"] == "minor" and second.version == "1.1.0"
    assert manifest.parent_version == "1.0.0"
    assert manifest.validation["parent_source"] == "recomputed"
    third = run_in_process(
        _config(
            reg_path,
            base_release="1.1.0",
            gate_target="tolerance",
            version_bump="major",
            version_bump_reason="new label set downstream",
        ),
        [client_app] * 2,
    ).release
    bump = third.manifest().version_bump
    assert third.version == "2.0.0"
    assert (bump["bump"], bump["computed"]) == ("major", "minor")
    assert bump["override_reason"] == "new label set downstream"
    reg = Registry(reg_path)
    assert verify_release(reg, reg.get("2.0.0")).chain == ["2.0.0", "1.1.0", "1.0.0"]


def test_rejected_candidate_is_recorded_and_nothing_is_published(tmp_path: Path) -> None:
    """Input: a validation suite no candidate can pass (accuracy floor 1.01)."""
    reg_path = tmp_path / "reg"
    config = _config(reg_path, validation_suite="tests.test_validation_gate:impossible_suite")
    with pytest.raises(CandidateRejectedError, match="beyond the floor") as err:
        run_in_process(config, [client_app] * 2)
    reg = Registry(reg_path)
    assert reg.releases() == []
    (rejection,) = reg.rejections()
    assert rejection.id == err.value.rejection_id
    assert "beyond the floor" in rejection.reasons[0]
    assert rejection.report["validation"]["suite"] == "impossible"
    assert reg.blob_path(rejection.weights_sha256).exists()


def test_release_options_are_checked_before_any_round(tmp_path: Path) -> None:
    """Input: version-bump without reason; unknown gate-target; patch-max-changed 2."""
    with pytest.raises(ConfigError, match="version-bump-reason"):
        RunConfig.from_flat({"version-bump": "major", "registry": str(tmp_path)})
    with pytest.raises(ConfigError, match="gate-target"):
        RunConfig.from_flat({"gate-target": "sometimes"})
    with pytest.raises(ConfigError, match="patch-max-changed"):
        RunConfig.from_flat({"patch-max-changed": 2})
    with pytest.raises(ConfigError, match="cannot be imported"):
        prepare_run(_config(tmp_path / "reg", validation_suite="nope:suite"))
    assert not (tmp_path / "reg").exists()


def test_existing_registry_with_missing_signing_key_fails_before_rounds(tmp_path: Path) -> None:
    """Input: a signed registry and a signing-key path that does not exist."""
    reg_path = tmp_path / "reg"
    run_in_process(_config(reg_path), [client_app] * 2)
    with pytest.raises(SigningKeyError, match="does not exist"):
        prepare_run(_config(reg_path, signing_key=str(tmp_path / "elsewhere.pem")))
