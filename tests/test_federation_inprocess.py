"""The real ServerApp and ClientApp, driven by the in-process engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.client_app import app as fedcommons_client
from fedcommons.coordinator.config import RunConfig
from fedcommons.engines.inprocess import run_in_process
from fedcommons.errors import CandidateRejectedError, RoundFailedError
from fedcommons.logs import configure_logging
from fedcommons.releases.registry import Registry
from fedcommons.wire import keys


def _config(tmp_path: Path, **over: object) -> RunConfig:
    values: dict = {"rounds": 2, "local_epochs": 1, "registry": str(tmp_path / "reg")}
    values.update(over)
    return RunConfig(**values)


def _nan_client() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays = msg.content[keys.BASE_ARRAYS].to_numpy_ndarrays()
        names = list(msg.content[keys.BASE_ARRAYS].keys())
        delta = {n: np.full_like(a, np.nan) for n, a in zip(names, arrays, strict=True)}
        content = RecordDict(
            {
                keys.DELTA_ARRAYS: ArrayRecord({k: _arr(v) for k, v in delta.items()}),
                keys.REPLY_METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _arr(value: np.ndarray):
    from flwr.app import Array

    return Array(value)


def _plain_flower_client(shift: float) -> ClientApp:
    """A Flower-quickstart-style client: full weights under 'arrays', 'num-examples'."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state = msg.content["arrays"].to_torch_state_dict()
        new = {k: v + shift for k, v in state.items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(new),
                "metrics": MetricRecord({"num-examples": 50, "train_loss": 0.1}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def _crashing_client() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        raise RuntimeError("out of GPU memory")

    return app


def test_rounds_improve_the_model_and_publish_a_release(tmp_path: Path) -> None:
    result = run_in_process(_config(tmp_path, rounds=3), [fedcommons_client] * 4)
    accs = [r.val_accuracy for r in result.reports]
    assert len(accs) == 3 and accs[-1] > accs[0]
    manifest = result.release.manifest()
    assert manifest.version == "1.0.0" and manifest.rounds == 3
    assert manifest.contributors == 4 and manifest.num_parameters == 4810
    assert [r["accepted"] for r in manifest.round_metrics] == [4, 4, 4]
    assert manifest.metrics["test_accuracy"] == result.test_metrics["accuracy"]
    assert manifest.config["rounds"] == 3


def test_same_seed_same_release_hash(tmp_path: Path) -> None:
    a = run_in_process(_config(tmp_path / "a"), [fedcommons_client] * 3)
    b = run_in_process(_config(tmp_path / "b"), [fedcommons_client] * 3)
    c = run_in_process(_config(tmp_path / "c", seed=1), [fedcommons_client] * 3)
    assert a.release.weights_sha256 == b.release.weights_sha256
    assert a.release.weights_sha256 != c.release.weights_sha256


def test_nan_update_is_rejected_counted_and_the_round_goes_on(tmp_path: Path) -> None:
    """Input tried: one of four clients replies with an all-NaN delta."""
    clients = [fedcommons_client] * 3 + [_nan_client()]
    result = run_in_process(_config(tmp_path), clients)
    for report in result.reports:
        assert report.accepted == 3
        assert report.rejected == {"non-finite": 1}
    assert result.release.manifest().contributors == 3


def test_crashing_client_is_counted_as_client_error(tmp_path: Path) -> None:
    """Input tried: a ClientApp that raises in train()."""
    result = run_in_process(_config(tmp_path, rounds=1), [fedcommons_client, _crashing_client()])
    assert result.reports[0].rejected == {"client-error": 1}


def test_plain_flower_client_full_weights_count_as_a_dense_update(tmp_path: Path) -> None:
    """The candidate (θ0 + 0.25 everywhere, no training) is rejected: read its weights there."""
    from safetensors.torch import load_file

    with pytest.raises(CandidateRejectedError, match="does not beat the starting weights"):
        run_in_process(_config(tmp_path, rounds=1), [_plain_flower_client(0.25)])
    reg = Registry(tmp_path / "reg", create=False)
    (rejection,) = reg.rejections()
    weights = load_file(reg.blob_path(rejection.weights_sha256))
    from fedcommons.tasks.digits import DigitsTask

    base = DigitsTask({"num-partitions": 1}).build_model().state_dict()
    for name, value in weights.items():
        assert np.allclose(value.numpy(), base[name].numpy() + 0.25, atol=1e-6)


def test_round_without_enough_valid_updates_publishes_nothing(tmp_path: Path) -> None:
    """Input tried: every client replies with NaN (min-clients 1)."""
    with pytest.raises(RoundFailedError, match="0 valid update"):
        run_in_process(_config(tmp_path), [_nan_client(), _nan_client()])
    # nothing published: the registry holds only the audit log that records the failure
    assert [p.name for p in (tmp_path / "reg").iterdir()] == ["audit.jsonl"]


def test_run_from_a_base_release_is_chained_to_its_parent(tmp_path: Path) -> None:
    """A dense round changes far more than a patch's share of entries: next MINOR."""
    first = run_in_process(_config(tmp_path, rounds=1), [fedcommons_client] * 2)
    second = run_in_process(
        _config(tmp_path, rounds=1, base_release=first.release.version), [fedcommons_client] * 2
    )
    manifest = second.release.manifest()
    assert manifest.version == "1.1.0"
    assert manifest.parent_version == "1.0.0"
    assert manifest.parent_manifest_sha256 == first.release.manifest_sha256


def test_every_round_log_line_carries_run_id_and_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", json=True)
    run_in_process(_config(tmp_path), [fedcommons_client] * 2)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    round_lines = [x for x in lines if x["event"].startswith("round.")]
    assert len(round_lines) == 4  # started + finished, 2 rounds
    assert all(x["run_id"] == 1 and x["round"] in (1, 2) for x in round_lines)
    assert all("run_id" in x for x in lines if x["component"] == "fedcommons.coordinator")


def _encoded_client(payload: bytes) -> ClientApp:
    """Replies with the given bytes as its encoded update."""
    from flwr.app import ConfigRecord

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        content = RecordDict(
            {
                keys.ENCODED_RECORD: ConfigRecord({keys.ENCODED_PAYLOAD: payload}),
                keys.REPLY_METRICS: MetricRecord({keys.NUM_EXAMPLES: 10}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


def test_a_reply_whose_decoding_raises_anything_is_counted_malformed_and_the_round_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input tried: an encoded reply on which the decoder raises MemoryError (as the
    93-byte reply with a huge chunk field once did), next to three good clients."""
    import fedcommons.coordinator.intake as intake

    real = intake.decode_update

    def decode(payload: bytes, *args: object, **kwargs: object) -> object:
        if payload == b"boom":
            raise MemoryError("cannot allocate 2**62 floats")
        return real(payload, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(intake, "decode_update", decode)
    clients = [fedcommons_client] * 3 + [_encoded_client(b"boom")]
    result = run_in_process(_config(tmp_path, compression="int8"), clients)
    for report in result.reports:
        assert report.accepted == 3
        assert report.rejected == {"malformed": 1}
    assert result.release.manifest().contributors == 3


def test_a_hostile_encoded_reply_is_rejected_and_the_round_goes_on(tmp_path: Path) -> None:
    """Input tried: a sealed 95-byte int8 payload for the digits model whose chunk field
    is 2**62 and whose layout is the base's, with one scale and no codes."""
    from fedcommons.tasks.digits import DigitsTask
    from fedcommons.wire.codec import layout_of, pack_payload

    layout = layout_of(DigitsTask({}).build_model().state_dict())
    payload = pack_payload(
        layout,
        round_no=1,
        sparsifier=0,
        value_coding=3,
        chunk=2**62,
        index_mode=0,
        count=4810,
        index_bytes=b"",
        value_bytes=b"\x00\x00\x80\x3f",
    )
    clients = [fedcommons_client] * 2 + [_encoded_client(payload)]
    result = run_in_process(_config(tmp_path, rounds=1, compression="int8"), clients)
    assert result.reports[0].accepted == 2
    assert result.reports[0].rejected == {"malformed": 1}


def test_replies_over_the_fold_budget_are_folded_one_at_a_time_to_the_same_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small replies of one pull are folded in one pass; once the replies held reach
    ``FOLD_BATCH_BYTES`` (here 1 byte: every reply, as a model-sized one does) each is
    folded before the next is pulled. Both give the same release, bit for bit."""
    from fedcommons.coordinator import round as round_module

    batches: list[int] = []
    fold_many = round_module.guarded_fold_many

    def recording(strategy: object, updates: list) -> None:
        batches.append(len(updates))
        fold_many(strategy, updates)

    monkeypatch.setattr(round_module, "guarded_fold_many", recording)
    batched = run_in_process(_config(tmp_path / "a", rounds=1), [fedcommons_client] * 3)
    assert batches == [3]
    batches.clear()
    monkeypatch.setattr(round_module, "FOLD_BATCH_BYTES", 1)
    one_by_one = run_in_process(_config(tmp_path / "b", rounds=1), [fedcommons_client] * 3)
    assert batches == [1, 1, 1]
    assert one_by_one.release.weights_sha256 == batched.release.weights_sha256
