"""After the last round: gate the candidate, then publish it as a signed release."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import torch

from fedcommons import __version__
from fedcommons.coordinator.prepare import PreparedRun, signing_key_path
from fedcommons.coordinator.round import RoundReport, published_metrics
from fedcommons.errors import (
    CandidateRejectedError,
)
from fedcommons.logs import get_logger
from fedcommons.releases.card import render_card
from fedcommons.releases.gate import fingerprint_loader, load_suite, run_gate
from fedcommons.releases.patches import diff_weights
from fedcommons.releases.registry import Registry, Release
from fedcommons.releases.signing import Signer
from fedcommons.releases.versioning import decide_bump
from fedcommons.strategies import strategy_code
from fedcommons.tasks import Task
from fedcommons.wire import ReleaseManifest

log = get_logger("fedcommons.coordinator")


def publish(
    prepared: PreparedRun,
    weights: Mapping[str, torch.Tensor],
    reports: list[RoundReport],
    test: dict[str, float],
    contributors: int,
    run_id: int,
) -> Release:
    """Gate the candidate, then publish it signed, versioned and with its model card.

    The line's validation suite scores the candidate against its parent (a line's first
    release: against the starting weights, which it must beat); a candidate that fails is
    recorded (``fedcommons release rejected``) and
    :class:`~fedcommons.errors.CandidateRejectedError` is raised: nothing is published.
    """
    config = prepared.config
    registry = prepared.registry or Registry(config.registry_path)
    suite = prepared.suite or load_suite(prepared.task, config.validation_suite, config.gate_target)
    signer = prepared.signer or Signer.load_or_create(signing_key_path(config))
    parent = prepared.parent
    parent_weights = registry.load_weights(parent) if parent else None
    parent_manifest = parent.manifest() if parent else None
    gate = run_gate(
        prepared.task,
        suite,
        weights,
        parent=parent_weights,
        parent_version=parent.version if parent else None,
        parent_validation=parent_manifest.validation if parent_manifest else None,
        # a first release must beat the starting weights, unless the operator records only
        start=None
        if parent or config.gate_first_release == "record"
        else prepared.start_weights or prepared.weights,
    )
    central = prepared.privacy is not None and prepared.privacy.central is not None
    if central:  # an un-noised count of who took part: not published on a DP line
        contributors = 0
    last = reports[-1]
    metrics = {"val_accuracy": last.val_accuracy, "val_loss": last.val_loss}
    metrics.update({f"test_{k}": v for k, v in test.items() if k != "examples"})
    if not gate.passed:
        rejection = registry.record_rejection(
            config.line,
            weights,
            parent=parent,
            reasons=gate.reasons,
            report={
                "validation": gate.to_dict(),
                "metrics": metrics,
                "config": config.to_flat(),
                "flower_run_id": run_id,
                "contributors": contributors,
            },
        )
        log.warning("release.rejected", id=rejection.id, reasons=gate.reasons)
        raise CandidateRejectedError(
            f"candidate for {config.line} rejected by the validation gate (rejection "
            f"#{rejection.id}; see `fedcommons release rejected`): " + "; ".join(gate.reasons),
            rejection.id,
            gate.reasons,
        )
    change = diff_weights(parent_weights, weights) if parent_weights is not None else None
    decision = decide_bump(
        change,
        gate.degraded_tasks,
        max_changed_fraction=config.patch_max_changed,
        override=config.version_bump,
        override_reason=config.version_bump_reason,
    )
    fingerprints = dict(gate.fingerprints)
    test_loader = prepared.task.test_loader()
    if test_loader is not None:
        fingerprints[f"{prepared.task.name}/test"] = fingerprint_loader(test_loader)

    def build(version: str, digest: str, size: int) -> ReleaseManifest:
        return ReleaseManifest(
            name=config.line,
            version=version,
            parent_version=parent.version if parent else None,
            parent_manifest_sha256=parent.manifest_sha256 if parent else None,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            task=config.task,
            strategy=prepared.strategy.name,
            strategy_params=prepared.strategy.params(),
            strategy_code=strategy_code(prepared.strategy),
            rounds=config.rounds,
            clients_per_round=config.clients_per_round,
            contributors=contributors,
            weights_sha256=digest,
            weights_bytes=size,
            num_parameters=sum(v.numel() for v in weights.values()),
            metrics=metrics,
            round_metrics=[published_metrics(r, central) for r in reports],
            config=config.to_flat(),
            code_version=__version__,
            flower_run_id=run_id,
            validation=gate.to_dict(),
            data_fingerprints=fingerprints,
            version_bump=decision.to_dict(),
            privacy=prepared.privacy.manifest_privacy() if prepared.privacy else {},
            compression=config.compression,
            upload_bytes=sum(sum(r.upload_bytes.values()) for r in reports),
            base=patch_base(prepared.task),
        )

    return registry.publish(
        config.line,
        weights,
        build,
        signer=signer,
        parent=parent,
        bump=decision.bump,
        render_card=render_card,
    )


def patch_base(task: Task) -> dict[str, Any]:
    """The pinned base a task's weights are a patch of (empty for whole-model tasks)."""
    base_info = getattr(task, "base_info", None)
    return dict(base_info()) if callable(base_info) else {}
