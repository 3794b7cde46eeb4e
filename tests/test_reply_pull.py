"""Replies are inflated one at a time, each array assembled once from its chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.app.metadata import Metadata
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedcommons.coordinator.intake import array_view, inflate_reply
from fedcommons.errors import UpdateRejectedError


def _reply(record: ArrayRecord) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=7,
        dst_node_id=0,
        reply_to_message_id="a" * 64,
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "delta": record,
            "metrics": MetricRecord({"num-examples": 3}),
            "extra": ConfigRecord({"note": "x"}),
        }
    )
    return make_message(metadata=metadata, content=content)


def _contents(message: Message) -> tuple[str, dict[str, bytes]]:
    """What the SuperLink hands out: every object's deflated content, by object id."""
    objects = get_all_nested_objects(message)
    return message.object_id, {oid: obj.deflate() for oid, obj in objects.items()}


@pytest.fixture
def chunk_size(monkeypatch: pytest.MonkeyPatch) -> int:
    """1 KiB chunks, so a few kB of test data spans many chunks."""
    monkeypatch.setattr("flwr.app.message.array.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 1024)
    return 1024


def test_a_multi_chunk_reply_inflates_to_the_same_arrays_and_content(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    values = {
        "w": rng.standard_normal((40, 30)).astype(np.float32),  # 4.8 kB: 5 chunks
        "b": rng.standard_normal(7).astype(np.float64),
    }
    message_id, contents = _contents(_reply(ArrayRecord({k: Array(v) for k, v in values.items()})))
    reply = inflate_reply(message_id, contents, max_bytes=None)
    assert reply.metadata.message_id == message_id
    assert reply.metadata.src_node_id == 7
    for name, expected in values.items():
        array = reply.content["delta"][name]
        got = array_view(array)
        assert np.array_equal(got.numpy(), expected)
        start = np.frombuffer(array.data, np.uint8).ctypes.data
        assert start <= got.data_ptr() < start + len(array.data)  # a view, not a copy
    assert reply.content["metrics"]["num-examples"] == 3
    assert reply.content["extra"]["note"] == "x"
    assert not any(c.startswith(b"ArrayChunk") for c in contents.values())  # chunks dropped


def test_repeated_chunks_are_assembled_in_order(chunk_size: int) -> None:
    """Input tried: an all-zero array, whose identical chunks are sent once and named 5 times."""
    zeros = np.zeros(1280, np.float32)  # 5 kB of zeros: the same chunk body repeats
    message_id, contents = _contents(_reply(ArrayRecord({"z": Array(zeros)})))
    chunks = [c for c in contents.values() if c.startswith(b"ArrayChunk")]
    assert len(chunks) < 5  # deduplicated on the wire
    reply = inflate_reply(message_id, contents, max_bytes=None)
    assert np.array_equal(array_view(reply.content["delta"]["z"]).numpy(), zeros)


def test_a_reply_over_the_cap_is_refused_before_its_arrays_are_allocated(
    chunk_size: int,
) -> None:
    """Input tried: one 1 KiB chunk named 10^7 times (10 GB once assembled)."""
    message_id, contents = _contents(_reply(ArrayRecord({"z": Array(np.zeros(256, np.float32))})))
    array_id = next(oid for oid, c in contents.items() if c.startswith(b"Array "))
    head, _, body = contents[array_id].partition(b"\x00")
    meta = json.loads(body)
    meta["arraychunk_ids"] = [0] * 10_000_000
    forged = json.dumps(meta).encode()
    kind, children, _ = head.decode().split(" ")
    contents[array_id] = f"{kind} {children} {len(forged)}".encode() + b"\x00" + forged
    with pytest.raises(UpdateRejectedError) as err:
        inflate_reply(message_id, contents, max_bytes=1 << 20)
    assert err.value.reason == "too-large"


def test_an_array_naming_a_non_chunk_object_is_malformed(chunk_size: int) -> None:
    """Input tried: an Array whose one chunk is the message's MetricRecord."""
    message = _reply(ArrayRecord({"w": Array(np.ones(8, np.float32))}))
    message_id, contents = _contents(message)
    metric_id = message.content["metrics"].object_id
    array_id = next(oid for oid, c in contents.items() if c.startswith(b"Array "))
    body = json.dumps(
        {"dtype": "float32", "shape": [8], "stype": "numpy.ndarray", "arraychunk_ids": [0]}
    ).encode()
    contents[array_id] = f"Array {metric_id} {len(body)}".encode() + b"\x00" + body
    with pytest.raises(UpdateRejectedError) as err:
        inflate_reply(message_id, contents, max_bytes=None)
    assert err.value.reason == "malformed"
