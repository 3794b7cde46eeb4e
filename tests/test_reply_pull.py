"""Replies are inflated one at a time, each array assembled once from its chunks."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import make_message, remove_content_from_message
from flwr.app.metadata import Metadata
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import (
    ConfirmMessageReceivedResponse,
    ObjectTree,
    PullObjectResponse,
    PushObjectResponse,
)
from flwr.proto.runtime_pb2 import PullAppMessagesResponse, PushAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    iterate_object_tree,
)
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from fedcommons.coordinator.intake import (
    array_view,
    inflate_reply,
    pull_replies,
    push_round_messages,
)
from fedcommons.coordinator.secure_round import stage_reply_cap
from fedcommons.errors import UpdateRejectedError


def _message(content: RecordDict, *, src: int = 0, dst: int = 0, reply_to: str = "") -> Message:
    metadata = Metadata(
        run_id=5,
        message_id="",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return make_message(metadata=metadata, content=content)


def _reply(record: ArrayRecord, reply_to: str = "a" * 64) -> Message:
    content = RecordDict(
        {
            "delta": record,
            "metrics": MetricRecord({"num-examples": 3}),
            "extra": ConfigRecord({"note": "x"}),
        }
    )
    return _message(content, src=7, reply_to=reply_to)


def _contents(message: Message) -> tuple[ObjectTree, dict[str, bytes]]:
    """What the SuperLink hands out: the object tree and every object's deflated content."""
    objects = get_all_nested_objects(message)
    return get_object_tree(message), {oid: obj.deflate() for oid, obj in objects.items()}


class _Store:
    """Serves pulls from ``contents`` and records each pull's object ids."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents
        self.pulls: list[list[str]] = []

    def __call__(self, object_ids: list[str]) -> dict[str, bytes]:
        self.pulls.append(list(object_ids))
        return {oid: self.contents[oid] for oid in object_ids}


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
    tree, contents = _contents(_reply(ArrayRecord({k: Array(v) for k, v in values.items()})))
    store = _Store(contents)
    reply = inflate_reply(tree, store, max_bytes=None)
    assert reply.metadata.message_id == tree.object_id
    assert reply.metadata.src_node_id == 7
    for name, expected in values.items():
        array = reply.content["delta"][name]
        got = array_view(array)
        assert np.array_equal(got.numpy(), expected)
        start = np.frombuffer(array.data, np.uint8).ctypes.data
        assert start <= got.data_ptr() < start + len(array.data)  # a view, not a copy
    assert reply.content["metrics"]["num-examples"] == 3
    assert reply.content["extra"]["note"] == "x"
    # containers first, then the other leaves, then the arrays' chunks: both arrays' 6
    # chunks in one pull (PULL_GROUP_CHUNKS = 8)
    chunk_pulls = store.pulls[2:]
    assert [len(pull) for pull in chunk_pulls] == [6]
    assert all(contents[c].startswith(b"ArrayChunk") for pull in chunk_pulls for c in pull)


def test_arrays_are_pulled_a_few_chunks_at_a_time_and_may_share_chunks(
    chunk_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input tried: two all-zero arrays of different lengths, whose chunks after the
    first (the .npy header) are the same objects, sent once and named by both, and a
    6-chunk array; at most 6 chunks per pull."""
    monkeypatch.setattr("fedcommons.coordinator.intake.PULL_GROUP_CHUNKS", 6)
    rng = np.random.default_rng(1)
    values = {
        "z1": np.zeros(512, np.float32),  # 2 kB + header: 3 chunks
        "z2": np.zeros(768, np.float32),  # 3 kB + header: 4 chunks, 2 of them z1's
        "w": rng.standard_normal(1280).astype(np.float32),  # 6 chunks
    }
    tree, contents = _contents(_reply(ArrayRecord({k: Array(v) for k, v in values.items()})))
    store = _Store(contents)
    reply = inflate_reply(tree, store, max_bytes=None)
    for name, expected in values.items():
        assert np.array_equal(array_view(reply.content["delta"][name]).numpy(), expected)
    chunk_pulls = store.pulls[2:]
    assert [len(pull) for pull in chunk_pulls] == [4, 6]  # z1 + z2 (4 distinct), then w


def test_repeated_chunks_are_assembled_in_order(chunk_size: int) -> None:
    """Input tried: an all-zero array, whose identical chunks are sent once and named 5 times."""
    zeros = np.zeros(1280, np.float32)  # 5 kB of zeros: the same chunk body repeats
    tree, contents = _contents(_reply(ArrayRecord({"z": Array(zeros)})))
    chunks = [c for c in contents.values() if c.startswith(b"ArrayChunk")]
    assert len(chunks) < 5  # deduplicated on the wire
    reply = inflate_reply(tree, _Store(contents), max_bytes=None)
    assert np.array_equal(array_view(reply.content["delta"]["z"]).numpy(), zeros)


def test_a_reply_over_the_cap_is_refused_before_its_arrays_are_allocated(
    chunk_size: int,
) -> None:
    """Input tried: one 1 KiB chunk named 10^7 times (10 GB once assembled)."""
    tree, contents = _contents(_reply(ArrayRecord({"z": Array(np.zeros(256, np.float32))})))
    array_id = next(oid for oid, c in contents.items() if c.startswith(b"Array "))
    head, _, body = contents[array_id].partition(b"\x00")
    meta = json.loads(body)
    meta["arraychunk_ids"] = [0] * 10_000_000
    forged = json.dumps(meta).encode()
    kind, children, _ = head.decode().split(" ")
    contents[array_id] = f"{kind} {children} {len(forged)}".encode() + b"\x00" + forged
    with pytest.raises(UpdateRejectedError) as err:
        inflate_reply(tree, _Store(contents), max_bytes=1 << 20)
    assert err.value.reason == "too-large"


def test_an_array_naming_a_non_chunk_object_is_malformed(chunk_size: int) -> None:
    """Input tried: an Array whose one chunk is the message's MetricRecord."""
    message = _reply(ArrayRecord({"w": Array(np.ones(8, np.float32))}))
    tree, contents = _contents(message)
    metric_id = message.content["metrics"].object_id
    array_id = next(oid for oid, c in contents.items() if c.startswith(b"Array "))
    body = json.dumps(
        {"dtype": "float32", "shape": [8], "stype": "numpy.ndarray", "arraychunk_ids": [0]}
    ).encode()
    contents[array_id] = f"Array {metric_id} {len(body)}".encode() + b"\x00" + body
    with pytest.raises(UpdateRejectedError) as err:
        inflate_reply(tree, _Store(contents), max_bytes=None)
    assert err.value.reason == "malformed"


class _FakeSuperLink:
    """The Runtime API calls the coordinator makes, over an in-memory object store.

    Checks what a SuperLink checks on push (each object's id is the SHA-256 of its
    content) and records how many pushed object contents were alive at once.
    """

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.messages: list = []
        self.trees: list = []
        self.confirmed: list[str] = []

    def PushMessages(self, request: Any) -> Any:
        self.messages.extend(request.messages_list)
        self.trees.extend(request.message_object_trees)
        wanted = {
            t.object_id for tree in request.message_object_trees for t in iterate_object_tree(tree)
        }
        return PushAppMessagesResponse(
            message_ids=[t.object_id for t in request.message_object_trees],
            objects_to_push=sorted(wanted),
            session_id="session",
        )

    def PushObject(self, request: Any) -> Any:
        assert hashlib.sha256(request.object_content).hexdigest() == request.object_id
        self.objects[request.object_id] = request.object_content
        return PushObjectResponse(stored=True)

    def PullMessages(self, request: Any) -> Any:
        return PullAppMessagesResponse(messages_list=self.messages, message_object_trees=self.trees)

    def PullObject(self, request: Any) -> Any:
        content = self.objects[request.object_id]
        return PullObjectResponse(object_found=True, object_available=True, object_content=content)

    def ConfirmMessageReceived(self, request: Any) -> Any:
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def _http_grid(link: _FakeSuperLink) -> HttpGrid:
    grid = HttpGrid("127.0.0.1:1", insecure=True, token="t")
    grid._client = link  # what _connect would set; nothing listens on port 1
    grid.set_run(Run.create_empty(run_id=5))
    return grid


def test_round_messages_pushed_through_the_http_grid_share_one_copy_of_the_base(
    chunk_size: int,
) -> None:
    weights = np.arange(3000, dtype=np.float32)  # 12 kB: 12 chunks
    content = RecordDict({"base": ArrayRecord({"w": Array(weights)})})
    messages = [_message(content, dst=n) for n in (1, 2)]
    link = _FakeSuperLink()
    ids = push_round_messages(_http_grid(link), messages)
    assert ids == [m.metadata.message_id for m in messages] and len(set(ids)) == 2
    expected = {
        oid: obj.deflate() for m in messages for oid, obj in get_all_nested_objects(m).items()
    }
    assert link.objects == expected  # every object once, byte for byte


def test_replies_pulled_through_the_http_grid_come_one_at_a_time_and_are_confirmed(
    chunk_size: int,
) -> None:
    link = _FakeSuperLink()
    grid = _http_grid(link)
    values = [np.full(700, i, np.float32) for i in range(3)]
    asked = [str(i) * 64 for i in range(3)]  # the round's three instruction messages
    for value, reply_to in zip(values, asked, strict=True):
        reply = _reply(ArrayRecord({"w": Array(value)}), reply_to)
        objects = get_all_nested_objects(reply)
        link.objects.update({oid: obj.deflate() for oid, obj in objects.items()})
        link.trees.append(get_object_tree(reply))
        link.messages.append(message_to_proto(remove_content_from_message(reply)))
        link.messages[-1].metadata.message_id = reply.object_id
    stream = pull_replies(grid, asked, max_bytes=None)
    first = next(stream)
    assert len(link.confirmed) == 1  # the second reply is not pulled yet
    rest = list(stream)
    got = [array_view(r.content["delta"]["w"]).numpy() for r in (first, *rest)]
    assert all(np.array_equal(a, b) for a, b in zip(got, values, strict=True))
    assert len(link.confirmed) == 3


def test_a_secure_stage_reply_over_the_cap_is_refused_before_it_is_inflated() -> None:
    """Input tried: a stage reply whose ConfigRecord carries a 2 MB "masked" vector
    (secure-round payloads are config records, not arrays) against a 1 MB cap."""
    masked = ConfigRecord({"stage": "masked-input", "masked": b"\x01" * (2 << 20)})
    tree, contents = _contents(_message(RecordDict({"secagg": masked}), src=7))
    with pytest.raises(UpdateRejectedError) as err:
        inflate_reply(tree, _Store(contents), max_bytes=1 << 20)
    assert err.value.reason == "too-large"
    # the same reply is within the cap the secure round sets for a vector of 2^20 values
    reply = inflate_reply(tree, _Store(contents), max_bytes=stage_reply_cap(1 << 20, 10))
    assert len(reply.content["secagg"]["masked"]) == 2 << 20


def test_the_stage_cap_admits_a_share_reply_to_two_thousand_neighbours() -> None:
    """A share-keys reply on a complete graph of 2,000 (one sealed 102-byte share pair per
    neighbour) for the 4,810-value demo model inflates within the secure round's cap."""
    from fedcommons.privacy.secagg.primitives import seal

    blob = seal(b"k" * 32, b"p" * 74, b"ad")  # 8 + 2 x 33 bytes of shares, sealed
    record = ConfigRecord(
        {
            "stage": "share-keys",
            "dst": list(range(2000)),
            "ct": [blob] * 2000,
            "b-commit": b"c" * 32,
        }
    )
    tree, contents = _contents(_message(RecordDict({"secagg": record}), src=7))
    reply = inflate_reply(tree, _Store(contents), max_bytes=stage_reply_cap(4810, 2000))
    assert reply.content["secagg"]["ct"][0] == blob
