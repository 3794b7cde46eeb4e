"""A reply whose upload is unfinished does not hold up a round's other replies.

Found by ``benchmarks/chaos.py`` on the deployment engine: a SuperNode SIGKILLed while
uploading its reply made Flower's ``HttpGrid.pull_messages`` wait 180 s for the missing
objects, and the round counted five nodes that had replied as "no reply". The unfinished
upload cannot be produced on demand on a real engine, so Flower's Runtime API is played
here by an in-memory SuperLink object store (messages handed out once, as the SuperLink
does; objects found, not yet available, or gone); the grid, Flower's object download and
message inflation are Flower's own. The real-engine check is ``python -m benchmarks.chaos``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from fedcommons.coordinator.intake import pull_replies


def pull_available(grid, pending, deadline, *, slice_s):
    """One poll of the round loop: every reply it yields."""
    return list(pull_replies(grid, pending, deadline=deadline, slice_s=slice_s))


RUN_ID = 42


@dataclass
class RuntimeStore:
    """The SuperLink's side of the Runtime API calls a ServerApp pulls replies with."""

    replies: dict[str, Message] = field(default_factory=dict)  # instruction id -> reply
    objects: dict[str, bytes] = field(default_factory=dict)
    uploading: set[str] = field(default_factory=set)  # object ids not uploaded yet
    confirmed: list[str] = field(default_factory=list)

    def add(self, instruction_id: str, node: int, value: float, *, upload_done: bool) -> None:
        reply = make_message(
            metadata=Metadata(
                run_id=RUN_ID,
                message_id="",
                src_node_id=node,
                dst_node_id=1,
                reply_to_message_id=instruction_id,
                group_id="1",
                created_at=time.time(),
                ttl=60,
                message_type="train",
            ),
            content=RecordDict({"w": ArrayRecord([np.full(4, value, dtype=np.float32)])}),
        )
        reply.metadata.__dict__["_message_id"] = reply.object_id
        self.replies[instruction_id] = reply
        nested = get_all_nested_objects(reply)
        self.objects.update({oid: obj.deflate() for oid, obj in nested.items()})
        if not upload_done:  # the message is registered, its arrays are not there yet
            self.uploading |= {oid for oid in nested if oid != reply.object_id}

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:  # Flower's names
        taken = [self.replies.pop(i) for i in request.message_ids if i in self.replies]
        return PullAppMessagesResponse(
            messages_list=[message_to_proto(m) for m in taken],
            message_object_trees=[get_object_tree(m) for m in taken],
        )

    def PullObject(self, request: Any) -> PullObjectResponse:
        oid = request.object_id
        if oid not in self.objects:
            return PullObjectResponse(object_found=False, object_available=False)
        if oid in self.uploading:
            return PullObjectResponse(object_found=True, object_available=False)
        return PullObjectResponse(
            object_found=True, object_available=True, object_content=self.objects[oid]
        )

    def ConfirmMessageReceived(self, request: Any) -> ConfirmMessageReceivedResponse:
        self.confirmed.append(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def _grid(store: RuntimeStore) -> HttpGrid:
    grid = HttpGrid(token="test")
    grid.set_run(Run.create_empty(RUN_ID))
    grid._client = store  # type: ignore[assignment]  # the Runtime API client
    return grid


def _value(reply: Message) -> float:
    return float(reply.content.array_records["w"]["0"].numpy()[0])


def test_an_unfinished_upload_is_skipped_until_it_completes_while_other_replies_are_pulled() -> (
    None
):
    store = RuntimeStore()
    store.add("ins-a", node=11, value=1.0, upload_done=True)
    store.add("ins-b", node=12, value=2.0, upload_done=False)  # killed mid-upload, say
    store.add("ins-c", node=13, value=3.0, upload_done=True)
    grid, pending = _grid(store), {"ins-a", "ins-b", "ins-c"}

    started = time.monotonic()
    first = pull_available(grid, pending, time.monotonic() + 60, slice_s=0.5)
    assert time.monotonic() - started < 10, "an unfinished upload held the pull"
    assert sorted(_value(r) for r in first) == [1.0, 3.0]
    pending -= {r.metadata.reply_to_message_id for r in first}
    assert pending == {"ins-b"}

    assert pull_available(grid, pending, time.monotonic() + 60, slice_s=0.5) == []
    store.uploading.clear()  # the upload finishes
    (late,) = pull_available(grid, pending, time.monotonic() + 60, slice_s=0.5)
    assert late.metadata.reply_to_message_id == "ins-b" and _value(late) == 2.0
    assert not late.has_error() and len(store.confirmed) == 3


def test_a_reply_whose_objects_the_superlink_dropped_becomes_an_error_reply_of_its_sender() -> None:
    store = RuntimeStore()
    store.add("ins-a", node=11, value=1.0, upload_done=False)
    for oid in list(store.uploading):  # the object-push session expired: objects removed
        del store.objects[oid]
    (reply,) = pull_available(_grid(store), {"ins-a"}, time.monotonic() + 60, slice_s=0.5)
    assert reply.has_error() and reply.metadata.reply_to_message_id == "ins-a"
    assert reply.metadata.src_node_id == 11 and store.confirmed == []


def test_a_reply_still_uploading_at_the_deadline_is_not_returned() -> None:
    store = RuntimeStore()
    store.add("ins-a", node=11, value=1.0, upload_done=False)
    started = time.monotonic()
    assert pull_available(_grid(store), {"ins-a"}, started + 0.3, slice_s=5.0) == []
    assert time.monotonic() - started < 3, "the pull ran past the round's deadline"
