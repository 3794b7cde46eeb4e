"""Model cards: huggingface_hub metadata plus Mitchell et al. sections, built offline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from fedcommons.releases.card import render_card
from fedcommons.releases.registry import Registry
from fedcommons.releases.signing import Signer
from tests.release_helpers import publish, weights

SECTIONS = (
    "## Model details",
    "## Intended use",
    "## Factors",
    "## Metrics",
    "## Evaluation data",
    "## Training data",
    "## Privacy",
    "## Caveats and recommendations",
)


def _validation() -> dict:
    return {
        "suite": "digits-builtin",
        "target_policy": "no-worse",
        "device": "cpu",
        "parent_source": "recomputed",
        "tasks": [
            {
                "name": "accuracy",
                "dataset": "digits/validation",
                "metric": "accuracy",
                "direction": "max",
                "tolerance": 0.01,
                "candidate": 0.95,
                "parent": 0.94,
                "passed": True,
                "reason": "ok",
            }
        ],
    }


def test_card_has_metadata_and_every_section_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the model card tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    signer = Signer.generate()
    reg = Registry(tmp_path / "reg")
    base = publish(reg, signer, weights(0))
    rel = publish(reg, signer, weights(1), parent=base)
    manifest = rel.manifest()
    manifest.validation = _validation()
    manifest.data_fingerprints = {"digits/validation": "ab" * 32}
    text = render_card(manifest)
    card = ModelCard(text)
    assert card.data.license == "apache-2.0" and card.data.library_name == "pytorch"
    assert "federated-learning" in card.data.tags
    assert card.data.base_model == "line@1.0.0"
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.95)
    for section in SECTIONS:
        assert section in text
    assert "ab" * 32 in text
    assert "No differential privacy was used" in text


def test_card_states_the_privacy_summary_when_present(tmp_path: Path) -> None:
    signer = Signer.generate()
    reg = Registry(tmp_path / "reg")
    manifest = publish(reg, signer, weights(0)).manifest()
    manifest.privacy = {
        "guarantee": "(3, 1e-05)-DP at the institution level for the whole line",
        "ledger": "privacy/line/ledger.jsonl",
        "ledger_entries": 4,
        "ledger_head_sha256": "cd" * 32,
    }
    text = render_card(manifest)
    assert "(3, 1e-05)-DP at the institution level" in text
    assert "privacy/line/ledger.jsonl" in text and "No differential privacy" not in text


def test_published_card_is_hashed_in_the_manifest(tmp_path: Path) -> None:
    import hashlib

    reg = Registry(tmp_path / "reg")
    rel = publish(reg, Signer.generate(), weights(0))
    assert hashlib.sha256(rel.card_path.read_bytes()).hexdigest() == rel.manifest().card_sha256
