"""Compressed updates through real rounds (in-process engine): intake, bytes, rejections."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedcommons.client_sdk.client_app import app as client_app
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.coordinator.run import FederationResult
from fedcommons.coordinator.server_app import make_server_app
from fedcommons.engines.inprocess import InProcessGrid, run_in_process
from fedcommons.errors import CompressionSpecError, ConfigError
from fedcommons.wire import keys
from fedcommons.wire.codec import (
    INDEX_VARINT,
    _varint,
    decode_update,
    encode_update,
    encode_varints,
    layout_of,
    pack_payload,
)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "client-state"
    monkeypatch.setenv("FEDCOMMONS_STATE_DIR", str(state))
    monkeypatch.setenv("FEDCOMMONS_CLIENT_THREADS", "1")
    return state


def config(tmp_path: Path, **kw: object) -> RunConfig:
    values: dict = dict(rounds=1, local_epochs=1, registry=str(tmp_path / "reg"), min_clients=1)
    values.update(kw)
    return RunConfig(**values)


def test_round_log_and_manifest_show_bytes_per_client_and_ratio(tmp_path: Path) -> None:
    result = run_in_process(
        config(tmp_path, rounds=2, compression="topk:0.01+int8"), [client_app] * 3
    )
    report = result.reports[-1]
    assert report.accepted == 3 and len(report.upload_bytes) == 3
    assert report.dense_bytes == 4 * 4810
    assert all(100 < b < 400 for b in report.upload_bytes.values())
    expected = 3 * report.dense_bytes / sum(report.upload_bytes.values())
    assert report.ratio_vs_dense == pytest.approx(expected)
    assert report.ratio_vs_dense > 60
    manifest = result.release.manifest()
    assert manifest.compression == "topk:0.01+int8"
    assert manifest.upload_bytes == sum(sum(r.upload_bytes.values()) for r in result.reports)
    assert manifest.round_metrics[-1]["upload_bytes"] == report.upload_bytes


def test_dense_default_still_sends_plain_delta_arrays(tmp_path: Path) -> None:
    result = run_in_process(config(tmp_path), [client_app] * 2)
    report = result.reports[0]
    assert report.accepted == 2
    # npy headers included: the real bytes of the ArrayRecord, a bit above raw fp32.
    assert all(b >= 4 * 4810 for b in report.upload_bytes.values())
    assert result.release.manifest().compression == "dense"


def test_compression_spec_is_canonicalised_and_validated_in_run_config() -> None:
    """Input: run config compression 'TOPK:0.01+INT8' (valid) and 'topk:2' (invalid)."""
    assert RunConfig(compression="TOPK:0.01+INT8").compression == "topk:0.01+int8"
    with pytest.raises(CompressionSpecError):
        RunConfig.from_flat({"compression": "topk:2"})


def test_error_feedback_flag_parses_from_flat_run_config() -> None:
    """Input: error-feedback given as the strings 'false' and 'maybe'."""
    assert RunConfig.from_flat({"error-feedback": "false"}).error_feedback is False
    assert RunConfig.from_flat({"error-feedback": True}).error_feedback is True
    with pytest.raises(ConfigError):
        RunConfig.from_flat({"error-feedback": "maybe"})


def test_client_keeps_residual_in_its_state_dir_and_never_sends_it(
    tmp_path: Path, _state_dir: Path
) -> None:
    result = run_in_process(config(tmp_path, compression="topk:0.01"), [client_app] * 2)
    residuals = sorted(_state_dir.glob("runs/*/partition-*/residual.safetensors"))
    assert [p.parent.name for p in residuals] == ["partition-0", "partition-1"]
    assert result.reports[0].accepted == 2
    # What the coordinator received is the payload alone, far smaller than a residual.
    assert all(b < 400 for b in result.reports[0].upload_bytes.values())


def test_error_feedback_off_writes_no_residual(tmp_path: Path, _state_dir: Path) -> None:
    run_in_process(config(tmp_path, compression="int4", error_feedback=False), [client_app] * 2)
    assert not list(_state_dir.glob("runs/*/*/residual.safetensors"))


def test_compressed_run_learns(tmp_path: Path) -> None:
    result = run_in_process(
        config(tmp_path, rounds=4, compression="topk:0.1+int8", local_epochs=2), [client_app] * 4
    )
    accs = [r.val_accuracy for r in result.reports]
    assert accs[-1] > 0.5 and accs[-1] > accs[0]


# -- bad input through the round: each rejected, counted, and the round goes on -----------
Tamper = Callable[[bytes, dict[str, torch.Tensor], int], bytes]


def tampering_client(tamper: Tamper) -> ClientApp:
    """A ClientApp that trains like the real one, then replaces its payload."""
    bad = ClientApp()

    @bad.train()
    def train(msg: Message, context: Context) -> Message:
        round_no = int(msg.content[keys.TRAIN_CONFIG][keys.ROUND])
        reply = client_app(msg, context)
        record = reply.content[keys.ENCODED_RECORD]
        payload = record[keys.ENCODED_PAYLOAD]
        delta = decode_update(payload).delta
        record[keys.ENCODED_PAYLOAD] = tamper(payload, delta, round_no)
        return reply

    return bad


def _reseal(payload: bytes) -> bytes:
    import struct
    import zlib

    return payload[:-4] + struct.pack("<I", zlib.crc32(payload[:-4]))


def _sparse(delta: dict[str, torch.Tensor], round_no: int, gaps: list[int]) -> bytes:
    coded = encode_varints(np.array(gaps, dtype=np.uint64))
    return pack_payload(
        layout_of(delta),
        round_no=round_no,
        sparsifier=1,
        value_coding=0,
        chunk=0,
        index_mode=INDEX_VARINT,
        count=len(gaps),
        index_bytes=_varint(len(coded)) + coded,
        value_bytes=np.full(len(gaps), 0.01, dtype=np.float32).tobytes(),
    )


def _with(delta: dict[str, torch.Tensor], name: str, value: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in delta.items()}
    out[name].view(-1)[0] = value
    return out


BAD_INPUTS: dict[str, tuple[str, Tamper]] = {
    # input tried: tensor 'net.2.weight' renamed 'head.weight'
    "wrong-tensor-names": (
        "wrong-tensors",
        lambda p, d, r: (
            encode_update(
                {("head.weight" if k == "net.2.weight" else k): v for k, v in d.items()},
                "topk:0.01",
                round_no=r,
            ).payload
        ),
    ),
    # input tried: first weight sent as 32x128 instead of 64x64
    "wrong-shape": (
        "wrong-shape",
        lambda p, d, r: (
            encode_update(
                dict(d, **{"net.0.weight": d["net.0.weight"].reshape(32, 128)}),
                "topk:0.01",
                round_no=r,
            ).payload
        ),
    ),
    # input tried: format version byte 7, CRC recomputed
    "unknown-version": ("unknown-version", lambda p, d, r: _reseal(p[:3] + b"\x07" + p[4:])),
    # input tried: sparsifier code 200, CRC recomputed
    "unknown-encoding": (
        "unknown-encoding",
        lambda p, d, r: _reseal(p[:9] + b"\xc8" + p[10:]),
    ),
    # input tried: the payload cut after 40 bytes
    "truncated": ("truncated", lambda p, d, r: p[:40]),
    # input tried: one byte flipped, CRC left as it was
    "checksum": ("checksum", lambda p, d, r: p[:-6] + bytes([p[-6] ^ 0xFF]) + p[-5:]),
    # input tried: a NaN in net.0.bias, dense fp32 encoding
    "nan": (
        "non-finite",
        lambda p, d, r: encode_update(_with(d, "net.0.bias", np.nan), "dense", round_no=r).payload,
    ),
    # input tried: +Inf in net.2.bias, dense fp32 encoding
    "inf": (
        "non-finite",
        lambda p, d, r: encode_update(_with(d, "net.2.bias", np.inf), "dense", round_no=r).payload,
    ),
    # input tried: sparse indices 3 and 4810 (one past the last parameter)
    "index-out-of-range": ("index-out-of-range", lambda p, d, r: _sparse(d, r, [3, 4807])),
    # input tried: sparse index 11 sent twice
    "duplicate-index": ("duplicate-index", lambda p, d, r: _sparse(d, r, [11, 0])),
    # input tried: a dense fp32 payload (19 kB) against max-update-bytes = 4096
    "too-large": ("too-large", lambda p, d, r: encode_update(d, "dense", round_no=r).payload),
    # input tried: a valid payload stamped with the next round's number
    "another-round": (
        "wrong-round",
        lambda p, d, r: encode_update(d, "topk:0.01", round_no=r + 1).payload,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_update_is_rejected_counted_and_the_round_goes_on(tmp_path: Path, case: str) -> None:
    """Input: one of three institutions sends the bad payload named by ``case`` (see
    BAD_INPUTS for exactly what); the other two send valid top-1% updates."""
    reason, tamper = BAD_INPUTS[case]
    cap = 4096 if case == "too-large" else 0  # 0: the default cap, 2x dense fp32 + 64 KiB
    cfg = config(tmp_path, compression="topk:0.01", rounds=2, max_update_bytes=cap)
    result = run_in_process(cfg, [client_app, client_app, tampering_client(tamper)])
    for report in result.reports:
        assert report.rejected == {reason: 1}
        assert report.accepted == 2
        assert len(report.upload_bytes) == 2
    assert result.release.version == "1.0.0"


class ReplayingGrid(InProcessGrid):
    """A transport that delivers the first node's reply twice (a replayed message)."""

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        if replies:
            first = replies[0]
            replay = Message(RecordDict(first.content), reply_to=self._last_sent[0])
            replay.metadata.__dict__["_src_node_id"] = first.metadata.src_node_id
            replies.append(replay)
        return replies

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self._last_sent = messages
        return super().push_messages(messages)


def test_second_update_from_the_same_node_is_rejected(tmp_path: Path) -> None:
    """Input: the transport delivers node 1000's compressed reply twice in one round."""
    cfg = config(tmp_path, compression="topk:0.01+int8", rounds=2)
    cfg.task_options.setdefault("num-partitions", 3)
    prepared = prepare_run(cfg)
    results: list[FederationResult] = []
    server = make_server_app(cfg, prepared=prepared, results=results)
    grid = ReplayingGrid([client_app] * 3)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    for report in results[0].reports:
        assert report.rejected == {"duplicate": 1}
        assert report.accepted == 3


def plain_flower_client() -> ClientApp:
    """A plain Flower ClientApp: replies with its full weights under ``arrays``."""
    plain = ClientApp()

    @plain.train()
    def train(msg: Message, context: Context) -> Message:
        from flwr.app import ArrayRecord, MetricRecord

        weights = msg.content[keys.BASE_ARRAYS].to_torch_state_dict()
        weights = {k: v + 0.001 for k, v in weights.items()}
        content = RecordDict(
            {"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 10})}
        )
        return Message(content=content, reply_to=msg)

    return plain


def test_plain_flower_full_weights_are_still_accepted_and_counted(tmp_path: Path) -> None:
    result = run_in_process(
        config(tmp_path, compression="int8"), [client_app, plain_flower_client()]
    )
    report = result.reports[0]
    assert report.accepted == 2 and report.rejected == {}
    assert sorted(report.upload_bytes.values())[0] < 6000 < sorted(report.upload_bytes.values())[1]


def test_public_fish_masks_are_the_same_at_every_institution(
    tmp_path: Path, _state_dir: Path
) -> None:
    from safetensors.numpy import load_file

    def masks(source: str) -> list[np.ndarray]:
        cfg = config(tmp_path / source, compression="fish:0.05", fish_mask=source)
        run_in_process(cfg, [client_app] * 3)
        files = sorted(_state_dir.glob("runs/*/partition-*/fish-mask.safetensors"))
        out = [load_file(str(f))["mask"] for f in files]
        for f in files:
            f.unlink()
        return out

    public = masks("public")
    assert len(public) == 3 and all(np.array_equal(public[0], m) for m in public)
    site = masks("site")
    assert len(site) == 3 and not all(np.array_equal(site[0], m) for m in site)


def test_bad_fish_mask_source_is_a_config_error() -> None:
    """Input: run config fish-mask = 'coordinator' (not a known source)."""
    with pytest.raises(ConfigError):
        RunConfig.from_flat({"fish-mask": "coordinator"})
