"""Secure aggregation end to end on the in-process engine: real ServerApp and ClientApps."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedcommons.client_sdk.secagg as client_secagg
import fedcommons.coordinator.secure_round as secure_round
from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.coordinator.runs import RunStore
from fedcommons.engines.inprocess import InProcessGrid, run_in_process
from fedcommons.errors import (
    CandidateRejectedError,
    ConfigError,
    SecAggAbortedError,
    SecAggIncompatibleError,
)
from fedcommons.privacy.secagg.quantize import dequantize
from fedcommons.releases.registry import Registry
from fedcommons.wire import keys
from tests.secagg_helpers import dropping, run_secure_demo


def _config(tmp_path: Path, rounds: int = 1, **extra: object) -> RunConfig:
    flat: dict[str, object] = {
        "rounds": rounds,
        "local-epochs": 1,
        "batch-size": 64,  # few steps: the tests stay fast
        "registry": str(tmp_path / "registry"),
        "secagg": True,
        "secagg-num-shares": 7,
        "secagg-threshold": 4,
    }
    flat.update(extra)
    return RunConfig.from_flat(flat)


def _round_one(config: RunConfig, clients: list) -> SimpleNamespace:
    """Round 1's committed report, whether or not the gate published the 1-round candidate.

    These tests are about the secure sum of one round; a barely trained candidate may not
    beat the line's starting weights, which the gate requires of a first release.
    """
    with contextlib.suppress(CandidateRejectedError):
        run_in_process(config, clients)
    (run,) = RunStore(config.registry_path).list()
    (commit,) = RunStore(config.registry_path).rounds(run.name)
    return SimpleNamespace(**commit.report)


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Record every client's ring vector and the coordinator's unmasked ring sum."""
    seen: dict[str, object] = {"inputs": {}, "totals": []}
    real_encode, real_dequantize = client_secagg.encode_input, secure_round.dequantize

    def encode(trained, params, record, context):
        vector = real_encode(trained, params, record, context)
        seen["inputs"][int(record["round"]), context.node_id] = vector.copy()
        return vector

    def dequantize_spy(total, ring):
        seen["totals"].append((total.copy(), ring))
        return real_dequantize(total, ring)

    monkeypatch.setattr(client_secagg, "encode_input", encode)
    monkeypatch.setattr(secure_round, "dequantize", dequantize_spy)
    return seen


@pytest.mark.parametrize(
    ("stage", "dropped"),
    [
        ("masked-input", set()),
        ("masked-input", {2}),
        ("masked-input", {2, 7}),
        ("unmask", {4, 9}),
        ("share-keys", {5}),
    ],
)
def test_secure_sum_is_exact_with_dropouts(
    tmp_path: Path, captured: dict[str, object], stage: str, dropped: set[int]
) -> None:
    """10 sites, num_shares 7, threshold 4; 0–2 drop at masked input (or 2 at unmask).

    The unmasked sum equals the sum of the survivors' ring vectors bit for bit, and so
    does its dequantization; the dropped sites are counted, not folded.
    """
    report = _round_one(_config(tmp_path), [dropping(stage, dropped)] * 10)
    survivors = {1000 + p for p in range(10)} - (
        {1000 + p for p in dropped} if stage != "unmask" else set()
    )
    assert report.accepted == len(survivors)
    assert report.rejected == ({"client-error": len(dropped)} if dropped else {})
    inputs = captured["inputs"]
    total, ring = captured["totals"][0]
    expected = np.zeros_like(total)
    for node in survivors:
        expected += inputs[1, node]
    expected &= ring.modulus_mask
    assert np.array_equal(total, expected)
    got_values, got_aux = dequantize(total, ring)
    want_values, _ = dequantize(expected, ring)
    assert got_values.tobytes() == want_values.tobytes()
    assert int(got_aux[0]) == report.examples


def test_round_beyond_threshold_aborts_and_publishes_nothing(tmp_path: Path) -> None:
    """7 sites, threshold 4, four drop at masked input: run fails, no release, reason audited."""
    config = _config(tmp_path)
    with pytest.raises(SecAggAbortedError, match="threshold 4"):
        run_in_process(config, [dropping("masked-input", {0, 1, 2, 3})] * 7)
    registry = tmp_path / "registry"
    assert not (registry / "index.sqlite").exists() or not Registry(registry).list()
    audit = [json.loads(line) for line in (registry / "audit.jsonl").read_text().splitlines()]
    failed = [e for e in audit if e["action"] == "round.finish" and e["outcome"] == "failed"]
    assert failed and "threshold 4" in failed[0]["details"]["error"]


def test_fedavg_under_secagg_matches_plaintext_fedavg(tmp_path: Path) -> None:
    """Same seeds, 5 sites: the released weights differ from plaintext FedAvg's by at most
    one quantization step (plus float32 rounding of the weights).

    One round: the weighted mean of values each within one step of the plaintext delta is
    within one step of the plaintext mean. (Over several rounds local training amplifies
    these differences, so no per-weight bound holds there.)
    """
    secure = run_in_process(_config(tmp_path / "s", seed=3), [client_app] * 5)
    plain = run_in_process(
        RunConfig.from_flat(
            {
                "rounds": 1,
                "local-epochs": 1,
                "batch-size": 64,
                "seed": 3,
                "registry": str(tmp_path / "p"),
            }
        ),
        [client_app] * 5,
    )
    w_s = Registry(tmp_path / "s" / "registry").load_weights(secure.release)
    w_p = Registry(tmp_path / "p").load_weights(plain.release)  # the plain run's registry
    step = 4.0 / ((1 << 23) - 1)  # default secagg-clip over the fp32 coding's levels
    for name, plain_w in w_p.items():
        ulp = 2 * float(torch.finfo(torch.float32).eps) * float(plain_w.abs().max())
        assert float((w_s[name] - plain_w).abs().max()) <= step + ulp, name
    assert any(not torch.equal(w_s[k], w_p[k]) for k in w_p)  # quantized, not a copy
    manifest = secure.release.manifest()
    assert manifest.config["secagg"] is True
    assert manifest.round_metrics[0]["accepted"] == 5
    assert (
        manifest.round_metrics[0]["examples"]
        == plain.release.manifest().round_metrics[0]["examples"]
    )


def test_central_dp_with_secagg_publishes_with_its_guarantee(tmp_path: Path) -> None:
    """DP-FedAvg on the secure sum: noise after unmasking, ledger entries, a release."""
    config = _config(
        tmp_path,
        rounds=2,
        **{
            "dp.noise-multiplier": 1.0,
            "dp.clip-norm": 0.5,
            "dp.epsilon": 50.0,
            "dp.delta": 1e-5,
            "secagg-num-shares": 0,
            "secagg-threshold": 0,
            "gate-first-release": "record",  # two noisy rounds need not beat the start
        },
    )
    result = run_in_process(config, [client_app] * 5)
    privacy = result.release.manifest().privacy
    assert privacy["central"]["rounds_accounted"] == 2
    assert privacy["central"]["min_effective_noise_multiplier"] == pytest.approx(1.0)
    ledger = tmp_path / "registry" / "privacy" / "digits" / "ledger.jsonl"
    entries = [json.loads(line)["entry"] for line in ledger.read_text().splitlines()]
    assert [e["expected_participants"] for e in entries] == [5.0, 5.0]
    assert not {"participating", "fraction_clipped", "client_spends"} & set(entries[0])


def test_randk_int8_under_secagg_sends_fewer_bytes(tmp_path: Path) -> None:
    """Shared-seed random-k (10 %) with int8 inputs: a round committed, uploads far below dense."""
    report = _round_one(
        _config(tmp_path, compression="randk:0.1+int8", **{"secagg-clip": 0.05}),
        [client_app] * 5,
    )
    assert report.accepted == 5
    assert report.ratio_vs_dense > 4


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"strategy": "fisher"}, "Fisher"),
        ({"strategy": "mask-aligned", "strategy.sign_election": True}, "mask"),
        ({"strategy": "median"}, "robust"),
        ({"strategy": "trimmed-mean"}, "robust"),
        ({"strategy.clip_norm": 1.0}, "norm"),
        ({"compression": "topk:0.01+int8"}, "client-specific"),
        ({"compression": "topk-tensor:0.1"}, "client-specific"),
        ({"compression": "fish:0.02"}, "client-specific"),
    ],
)
def test_leaking_combinations_refused_before_any_round(
    tmp_path: Path, extra: dict[str, object], why: str
) -> None:
    """Each combination needing individual updates is refused with its reason; nothing written."""
    with pytest.raises(SecAggIncompatibleError, match=why):
        prepare_run(_config(tmp_path, **extra))
    assert not (tmp_path / "registry").exists()


def test_threshold_below_a_majority_refused_in_the_run_config(tmp_path: Path) -> None:
    """secagg-threshold 3 with 7 shares is refused as a ConfigError naming the danger."""
    with pytest.raises(ConfigError, match="more than half"):
        _config(tmp_path, **{"secagg-threshold": 3})


def test_site_requiring_secagg_refuses_plaintext_and_joins_secure_rounds(tmp_path: Path) -> None:
    """A site with node config secagg-required: its plaintext reply is counted as refused."""
    sites = [{keys.SECAGG_REQUIRED: True}, {}, {}]
    plain = RunConfig.from_flat({"rounds": 1, "local-epochs": 1, "registry": str(tmp_path / "p")})
    report = run_in_process(plain, [client_app] * 3, node_configs=sites).reports[0]
    assert report.rejected == {"secagg-required": 1}
    assert report.accepted == 2
    config = _config(tmp_path, **{"secagg-num-shares": 0, "secagg-threshold": 0})
    secure = run_in_process(config, [client_app] * 3, node_configs=sites).reports[0]
    assert secure.accepted == 3 and secure.rejected == {}


def _truncating(partition: int) -> ClientApp:
    """The real ClientApp, except that one site's masked vector loses its last byte."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client_app(msg, context)
        record = None if reply.has_error() else reply.content.config_records.get("secagg")
        if (
            record is not None
            and record[keys.SECAGG_STAGE] == "masked-input"
            and int(context.node_config["partition-id"]) == partition
        ):
            record["masked"] = record["masked"][:-1]
        return reply

    return app


def test_truncated_masked_vector_rejected_and_sum_stays_exact(
    tmp_path: Path, captured: dict[str, object]
) -> None:
    """Input: one site's masked vector one byte short. It is rejected as secagg-malformed,
    treated as a dropout (its masks removed via shares), and the others' sum is exact."""
    report = run_in_process(_config(tmp_path), [_truncating(3)] * 8).reports[0]
    assert report.rejected == {"secagg-malformed": 1}
    assert report.accepted == 7
    total, ring = captured["totals"][0]
    expected = np.zeros_like(total)
    for node in range(1000, 1008):
        if node != 1003:
            expected += captured["inputs"][1, node]
    assert np.array_equal(total, expected & ring.modulus_mask)


def test_site_refuses_a_round_below_its_minimum_threshold(tmp_path: Path) -> None:
    """Input: a site with secagg-min-threshold 5 in a round with threshold 4: it refuses
    at the first stage (counted as secagg-refused), the others aggregate without it."""
    sites = [{keys.SECAGG_MIN_THRESHOLD: 5}] + [{}] * 6
    report = run_in_process(_config(tmp_path), [client_app] * 7, node_configs=sites).reports[0]
    assert report.rejected == {"secagg-refused": 1}
    assert report.accepted == 6


class _TamperingGrid(InProcessGrid):
    """Flips one bit of every share ciphertext routed to node 1000."""

    def push_messages(self, messages):
        messages = list(messages)
        for msg in messages:
            record = msg.content.config_records.get(keys.SECAGG_RECORD)
            if (
                record is not None
                and record[keys.SECAGG_STAGE] == "masked-input"
                and msg.metadata.dst_node_id == 1000
            ):
                cts = list(record["ct"])
                cts[0] = cts[0][:-1] + bytes([cts[0][-1] ^ 1])
                record["ct"] = cts
        return super().push_messages(messages)


def test_tampered_ciphertext_in_a_round_is_refused_by_its_receiver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A coordinator-side bit flip: the receiving site refuses, the round goes on without it."""
    import fedcommons.engines.inprocess as inprocess

    monkeypatch.setattr(inprocess, "InProcessGrid", _TamperingGrid)
    report = run_in_process(_config(tmp_path), [client_app] * 7).reports[0]
    assert report.rejected == {"secagg-refused": 1}
    assert report.accepted == 6


@pytest.mark.slow
def test_demo_with_secagg_on_the_simulation_engine(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """`fedcommons demo --secagg` on Flower's simulation engine (Ray): sessions persist in
    each SuperNode's Context between the four stages, and the release records secagg."""
    registry = tmp_path / "registry"
    run = run_secure_demo(tmp_path, flower_env, 5, 2)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "secure aggregation (SecAgg+)" in run.stdout
    assert "clients 5/5" in run.stdout
    release = Registry(registry).get("1.0.0", name="digits")
    manifest = release.manifest()
    assert manifest.config["secagg"] is True and manifest.contributors == 5
