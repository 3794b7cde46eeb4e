"""Reply intake: decode and validate every client reply, or reject it with a reason.

Nothing a client sends reaches the aggregate before it has passed through here.

The plaintext round (:mod:`.round`) turns each reply into a validated
:class:`~fedcommons.wire.ClientUpdate` with :func:`decode_reply`; the secure round
(:mod:`.secure_round`) validates its stage records itself. Both count and report every
refused reply through one :class:`Rejections` tally (metrics, audit log, structured log),
and both map a client's error reply to a reason with :func:`error_reason`.

Zero-copy views. A Flower ``Array`` carries a serialized ``.npy`` file
(``stype == "numpy.ndarray"``); ``Array.numpy()`` parses it with ``np.load``, which copies
every byte of every update before the coordinator has even looked at it. For the dense
float updates that make up most of a round's input, :func:`array_view` instead reads the
``.npy`` header and returns a read-only tensor over the message's own bytes: decoding an
update costs nothing, and validation plus the aggregator's fold are the only passes over
its data.

The view is read-only by contract: nothing on the coordinator's path writes into an
update's tensors (aggregators fold them into their own state; ``strategies.testing``
checks that inputs are left untouched). Anything the fast path does not cover —
big-endian, Fortran-ordered or non-numeric dtypes, other serialization types — falls
back to ``Array.numpy()`` and a private copy.

One reply at a time. On Flower's deployment engine :func:`pull_replies` replaces
``Grid.pull_messages``, which inflates every reply that has arrived before returning the
first one (a round's memory would grow with the number of replies that arrive together)
and assembles each array by concatenating its 5 MB chunks and then copying the result
into a fresh ``bytes`` (three transient copies of every update). :func:`pull_replies`
yields the replies one by one, each pulled only when the previous one has been
processed, array by array, and assembles every array once, into one buffer: a reply
costs one copy of its arrays plus one array's chunks. :func:`push_round_messages` is the
way out: Flower's ``push_messages`` serializes every 5 MB chunk of the round's base
weights before it sends the first one (a second copy of the model); it serializes a
chunk only when a sender is free to take it.
"""

from __future__ import annotations

import io
import json
import time
import warnings
import weakref
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Error, Message, Metadata
from flwr.app.message import make_message, remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest, ObjectTree
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PushAppMessagesRequest
from flwr.serverapp import Grid
from flwr.supercore.constant import HEAD_BODY_DIVIDER, SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    get_object_head_values_from_object_content,
    get_object_tree,
    iterate_object_tree,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_pull_object_fn_protobuf,
    make_push_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import HttpGrid
from numpy.lib import format as npy_format

from fedcommons.errors import UpdateRejectedError
from fedcommons.logs import get_logger
from fedcommons.observability import events as observe
from fedcommons.privacy.client_spend import parse_spend
from fedcommons.wire import ClientUpdate, decode_dense_delta, keys
from fedcommons.wire.codec import decode_update
from fedcommons.wire.fisher import decode_fisher
from fedcommons.wire.update import check_num_examples, decode_mask

log = get_logger("fedcommons.coordinator")

_HEADER_READERS = {
    (1, 0): npy_format.read_array_header_1_0,
    (2, 0): npy_format.read_array_header_2_0,
}
_VIEWABLE_KINDS = frozenset("fiub")  # float, signed, unsigned, bool


#: Bytes of a ``.npy`` file read to parse its header (headers are padded to 64 B; longer
#: ones fall back to ``np.load``).
_NPY_HEADER_LIMIT = 1 << 16


def _npy_view(data: bytes | bytearray) -> np.ndarray | None:
    """A read-only ndarray over ``data`` (a ``.npy`` file), or None if not viewable."""
    stream = io.BytesIO(memoryview(data)[:_NPY_HEADER_LIMIT])  # BytesIO copies what it gets
    try:
        version = npy_format.read_magic(stream)
        reader = _HEADER_READERS.get(version)
        if reader is None:
            return None
        shape, fortran_order, dtype = reader(stream)
    except ValueError:
        return None
    if fortran_order or dtype.kind not in _VIEWABLE_KINDS or not dtype.isnative:
        return None
    count = int(np.prod(shape, dtype=np.int64))
    offset = stream.tell()
    if offset + count * dtype.itemsize != len(data):
        return None  # truncated or trailing bytes: let np.load raise its own error
    view = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    view.flags.writeable = False  # a bytearray (see pull_replies) would give a writable view
    return view


def array_view(array: Array) -> torch.Tensor:
    """The tensor in ``array``: a zero-copy read-only view when possible, else a copy."""
    view = _npy_view(array.data) if array.stype == "numpy.ndarray" else None
    if view is None:
        copy = array.numpy()
        if copy.dtype.kind in _VIEWABLE_KINDS and not copy.dtype.isnative:
            copy = copy.astype(copy.dtype.newbyteorder("="))  # torch needs native order
        copy = np.ascontiguousarray(copy)
        return torch.from_numpy(copy if copy.flags.writeable else copy.copy())
    with warnings.catch_warnings():  # torch warns that the buffer is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(view)


def record_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Every array of ``record`` as a tensor (see :func:`array_view`)."""
    return {name: array_view(array) for name, array in record.items()}


#: Error codes of the stand-in replies :func:`pull_replies` makes for replies it refused
#: (coordinator-local: they never leave this process; a client sending one is rejected
#: under the same reason, which it would be anyway).
REPLY_TOO_LARGE_CODE = 6101
REPLY_MALFORMED_CODE = 6102
REPLY_UNAVAILABLE_CODE = ErrorCode.MESSAGE_UNAVAILABLE

#: A client's error code -> the rejection reason it is counted under.
_ERROR_REASONS = {
    keys.DP_BUDGET_EXHAUSTED_CODE: "dp-budget-exhausted",
    keys.SECAGG_REQUIRED_CODE: "secagg-required",  # the site requires secagg (#7)
    keys.SECAGG_PROTOCOL_ERROR_CODE: "secagg-refused",
    REPLY_TOO_LARGE_CODE: "too-large",
    REPLY_MALFORMED_CODE: "malformed",
    REPLY_UNAVAILABLE_CODE: "unavailable",
    keys.TASK_REFUSED_CODE: "task-refused",  # the site does not run the task asked for
}


def error_reason(reply: Message) -> str:
    """The rejection reason of an error reply (``client-error`` for unknown codes)."""
    return _ERROR_REASONS.get(reply.error.code, "client-error")


class Rejections:
    """The round's tally of refused replies, each reported once (metrics, audit, log)."""

    def __init__(self, round_no: int) -> None:
        self.round_no = round_no
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Replies refused so far."""
        return sum(self.counts.values())

    def reject(self, node: int, reason: str, detail: str, stage: str | None = None) -> None:
        """Count one refused reply from ``node`` (``stage``: the secure round's stage)."""
        self.counts[reason] += 1
        if stage is None:
            observe.update_rejected(self.round_no, node, reason, detail)
            log.warning("update.rejected", node=node, reason=reason, detail=detail)
        else:
            observe.update_rejected(self.round_no, node, reason, f"{stage}: {detail}")
            log.warning("secagg.rejected", node=node, stage=stage, reason=reason, detail=detail)


def decode_reply(
    reply: Message,
    base: Mapping[str, torch.Tensor],
    round_no: int,
    *,
    needs_fisher: bool = False,
    max_bytes: int | None = None,
    expected_seed: int | None = None,
) -> ClientUpdate:
    """Turn a reply into a validated :class:`ClientUpdate` or raise UpdateRejectedError.

    Whatever a reply makes the decoding raise, it is a rejection, never the end of the
    round: an exception that is not already a typed rejection (a decoder bug a hostile
    reply found, ``MemoryError``, …) is counted as ``malformed``, naming the exception.
    See :func:`_decode_reply` for what is checked.
    """
    try:
        return _decode_reply(
            reply,
            base,
            round_no,
            needs_fisher=needs_fisher,
            max_bytes=max_bytes,
            expected_seed=expected_seed,
        )
    except UpdateRejectedError:
        raise
    except Exception as exc:  # the reply is at fault, whatever broke: reject, go on
        raise UpdateRejectedError(
            "malformed", f"decoding the reply raised {type(exc).__name__}: {exc}"[:500]
        ) from exc


def _decode_reply(
    reply: Message,
    base: Mapping[str, torch.Tensor],
    round_no: int,
    *,
    needs_fisher: bool,
    max_bytes: int | None,
    expected_seed: int | None,
) -> ClientUpdate:
    """The checks of :func:`decode_reply`.

    fedcommons clients send ``delta``, or with compression on an encoded update
    (``encoded``/``payload``, see :mod:`fedcommons.wire.codec`), decoded and validated
    here (size cap ``max_bytes``, round, layout, indices, random-k seed, finite values)
    before anything touches the aggregate; a plain Flower ClientApp that returns its full
    weights under ``arrays`` is accepted as a dense update (delta = weights − base).
    An optional ``mask`` record marks the coordinates sent (the delta must be zero
    outside it); an optional Fisher (``fisher-codes`` + ``fisher-range``) is decoded
    inside the mask. With ``needs_fisher`` a reply without a Fisher is rejected
    (``missing-fisher``).
    """
    if reply.has_error():
        reason = error_reason(reply)
        detail = str(reply.error.reason)
        raise UpdateRejectedError(
            reason, detail if reason != "client-error" else f"{reply.error.code}: {detail}"
        )
    group = reply.metadata.group_id
    if group and group != str(round_no):
        raise UpdateRejectedError("wrong-round", f"reply for round {group}, expected {round_no}")
    content = reply.content
    metrics: dict[str, float] = {}
    for record in content.metric_records.values():
        metrics.update({k: float(v) for k, v in record.items() if isinstance(v, int | float)})
    num_examples = check_num_examples(
        next(
            (
                r[keys.NUM_EXAMPLES]
                for r in content.metric_records.values()
                if keys.NUM_EXAMPLES in r
            ),
            None,
        )
    )
    arrays = content.array_records
    encoded = content.config_records.get(keys.ENCODED_RECORD)
    mask = None
    if encoded is not None and keys.ENCODED_PAYLOAD in encoded:
        payload = encoded[keys.ENCODED_PAYLOAD]
        if not isinstance(payload, bytes):
            raise UpdateRejectedError("malformed", "encoded update payload is not bytes")
        decoded = decode_update(
            payload,
            base,
            expected_round=round_no,
            max_bytes=max_bytes,
            expected_seed=expected_seed,
        )
        # Checked by the codec against the base (names, shapes, dtypes, finite values
        # that fit the dtype) and still encoded: FedAvg folds it from its codes.
        delta = decoded.delta
        mask = decoded.mask  # a sparse update's support: mask-aligned strategies use it
        size = decoded.nbytes
    elif keys.DELTA_ARRAYS in arrays or keys.FULL_ARRAYS in arrays:
        name = keys.DELTA_ARRAYS if keys.DELTA_ARRAYS in arrays else keys.FULL_ARRAYS
        size = sum(len(a.data) for a in arrays[name].values())
        if max_bytes is not None and size > max_bytes:
            raise UpdateRejectedError("too-large", f"{size} bytes of arrays exceed cap {max_bytes}")
        delta = decode_dense_delta(record_tensors(arrays[name]), base)
        if name == keys.FULL_ARRAYS:
            delta = {k: delta[k] - base[k] for k in base}
    else:
        raise UpdateRejectedError("no-update", f"reply has no {keys.DELTA_ARRAYS!r} record")
    if keys.MASK_ARRAYS in arrays:
        mask = decode_mask(record_tensors(arrays[keys.MASK_ARRAYS]), base)
        for name, m in mask.items():
            if bool((delta[name][~m] != 0).any()):
                raise UpdateRejectedError("bad-mask", f"{name}: delta is nonzero outside its mask")
    fisher = None
    if keys.FISHER_CODES in arrays and keys.FISHER_RANGES in arrays:
        fisher = decode_fisher(
            {k: v.numpy() for k, v in arrays[keys.FISHER_CODES].items()},
            {k: v.numpy() for k, v in arrays[keys.FISHER_RANGES].items()},
            base,
            mask,
        )
    elif needs_fisher:
        raise UpdateRejectedError(
            "missing-fisher", "the strategy weights by Fisher information; reply has none"
        )
    spend = None
    if metrics.get(keys.DP_CLAIM) or keys.DP_SPEND in content.config_records:
        spend = parse_spend(content.config_records.get(keys.DP_SPEND))
    return ClientUpdate(
        delta,
        num_examples,
        reply.metadata.src_node_id,
        metrics,
        upload_bytes=size,
        dp_spend=spend,
        mask=mask,
        fisher=fisher,
    )


# -- moving round messages and replies --------------------------------------------------------
#: Retries of an object a client is still uploading: 0.1 s, doubling up to 2 s (Flower's
#: own pull starts at 1 s and backs off to 10 s, which adds seconds to a round).
_PULL_BACKOFF = (0.1, 2.0)


#: Seconds a reply's objects may take per poll before the other replies get their turn.
SLICE_S = 2.0


@dataclass
class _Partial:
    """A reply taken from the SuperLink whose objects were not all uploaded yet."""

    proto: Any  # flwr.proto.message_pb2.Message
    tree: ObjectTree
    since: float


#: grid -> {instruction message id: reply whose objects are still arriving}. The
#: SuperLink hands a reply out once: one still uploading is kept here for the next poll.
_PARTIAL: weakref.WeakKeyDictionary[Grid, dict[str, _Partial]] = weakref.WeakKeyDictionary()


def pull_replies(
    grid: Grid,
    message_ids: Collection[str],
    *,
    max_bytes: int | None = None,
    deadline: float | None = None,
    slice_s: float = SLICE_S,
) -> Iterator[Message]:
    """The replies to ``message_ids`` that can be had now, pulled and inflated one at a time.

    On the deployment engine (Flower's ``HttpGrid``) each reply's objects are pulled only
    when the caller asks for the reply, and array by array (:func:`inflate_reply`). A
    reply whose arrays would hold more than ``max_bytes`` (counted before they are
    allocated: a chunk may be named many times), whose objects do not form a message,
    or whose objects the SuperLink no longer has comes back as an error reply that
    :func:`decode_reply` rejects (``too-large``, ``malformed``, ``unavailable``). A reply
    whose upload is unfinished (its sender was killed mid-upload, or is slow) gets at
    most ``slice_s`` seconds per poll, never past ``deadline`` (``time.monotonic()``), and
    is kept for the next poll: it never holds up the replies behind it (Flower's own
    pull waits for it until the SuperLink's object-push session expires, 180 s: found by
    ``benchmarks/chaos.py``, a SuperNode killed mid-upload made a 45 s round take 186 s
    and count 5 of its 6 nodes as "no reply"). Other grids (simulation, in-process) hold their
    replies in memory already: their ``pull_messages`` is used as is. Consume every
    reply: the SuperLink hands each out once.
    """
    if not isinstance(grid, HttpGrid):
        yield from grid.pull_messages(list(message_ids))
        return
    client = grid._runtime_client  # Flower 1.41's Runtime API client (no public accessor)
    run_id = grid.run.run_id
    wanted = set(message_ids)
    partial = _PARTIAL.setdefault(grid, {})
    for gone in set(partial) - wanted:  # an earlier round's, or already counted
        del partial[gone]
    asked = [i for i in wanted if i not in partial]
    if asked:
        res = client.PullMessages(PullAppMessagesRequest(message_ids=asked))
        for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
            partial[proto.metadata.reply_to_message_id] = _Partial(proto, tree, time.monotonic())
    fetch = make_pull_object_fn_protobuf(client.PullObject, grid.node, run_id)
    for reply_to in list(partial):
        item = partial[reply_to]
        meta = item.proto.metadata
        budget = slice_s if deadline is None else min(slice_s, deadline - time.monotonic())
        dropped: list[str] = []  # objects the SuperLink no longer has (final)

        def pull_one(object_id: str, dropped: list[str] = dropped) -> bytes:
            try:
                return fetch(object_id)
            except ObjectPullError:
                dropped.append(object_id)
                raise

        def pull(
            object_ids: list[str],
            budget: float = max(budget, 0.05),
            pull_one: Callable[[str], bytes] = pull_one,
        ) -> dict[str, bytes]:
            return pull_objects(
                object_ids,
                pull_one,
                max_time=budget,
                max_tries_per_object=None,
                initial_backoff=_PULL_BACKOFF[0],
                backoff_cap=_PULL_BACKOFF[1],
            )

        try:
            reply: Message = inflate_reply(item.tree, pull, max_bytes)
        except ObjectPullError as exc:
            if not dropped:  # not uploaded yet: its turn comes again at the next poll
                log.info(
                    "round.reply_incomplete",
                    reply_to=reply_to,
                    waiting_s=round(time.monotonic() - item.since, 1),
                )
                continue
            del partial[reply_to]
            yield _stand_in(run_id, meta, REPLY_UNAVAILABLE_CODE, f"objects unavailable: {exc}")
            continue
        except UpdateRejectedError as exc:
            code = REPLY_TOO_LARGE_CODE if exc.reason == "too-large" else REPLY_MALFORMED_CODE
            reply = _stand_in(run_id, meta, code, exc.detail)
        del partial[reply_to]
        client.ConfirmMessageReceived(  # the SuperLink may drop the reply's objects now
            ConfirmMessageReceivedRequest(
                node=grid.node, run_id=run_id, message_object_id=item.tree.object_id
            )
        )
        yield reply
        del reply  # or this frame would hold it while the next one is pulled


#: Chunks serialized ahead of the two senders when pushing a round's messages.
_PUSH_WINDOW = 4


def push_round_messages(grid: Grid, messages: list[Message]) -> list[str]:
    """Push the round's messages; their shared objects are serialized as they are sent.

    On the deployment engine the messages and their object trees go to the SuperLink in
    one request (as ``HttpGrid.push_messages`` does), then each object the SuperLink
    asks for is serialized and sent by two threads, at most :data:`_PUSH_WINDOW` ahead:
    memory holds the weights' ``.npy`` bytes plus a few chunks, not a second serialized
    copy of every chunk. Objects the messages share (the base weights) are sent once.
    Other grids get ``push_messages``. Returns the message ids, in order.
    """
    if not isinstance(grid, HttpGrid):
        return list(grid.push_messages(messages))
    client = grid._runtime_client  # Flower 1.41's Runtime API client (no public accessor)
    run_id = grid.run.run_id
    with no_object_id_recompute():
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            if message.metadata.ttl <= 0:
                raise ValueError(f"message to node {message.metadata.dst_node_id} has no TTL")
        objects: dict[str, InflatableObject] = {}
        for message in messages:
            objects.update(get_all_nested_objects(message))
        res = client.PushMessages(
            PushAppMessagesRequest(
                messages_list=[message_to_proto(remove_content_from_message(m)) for m in messages],
                message_object_trees=[get_object_tree(m) for m in messages],
            )
        )
        wanted = set(res.objects_to_push)
        send = make_push_object_fn_protobuf(client.PushObject, grid.node, run_id, res.session_id)
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="fc-push") as pool:
            window: deque[Future[None]] = deque()
            for object_id, obj in objects.items():
                if object_id not in wanted:
                    continue
                while len(window) >= _PUSH_WINDOW:
                    window.popleft().result()
                window.append(pool.submit(send, object_id, obj.deflate()))
            for future in window:
                future.result()
    return list(res.message_ids)


def _stand_in(run_id: int, meta: Any, code: int, reason: str) -> Message:
    """An error reply from the sender of ``meta`` (a reply's metadata) to the coordinator."""
    return make_message(
        metadata=Metadata(
            run_id=run_id,
            message_id="",
            src_node_id=meta.src_node_id,
            dst_node_id=meta.dst_node_id,
            message_type=SYSTEM_MESSAGE_TYPE,
            group_id=meta.group_id,
            ttl=0,
            reply_to_message_id=meta.reply_to_message_id,
            created_at=now().timestamp(),
        ),
        error=Error(code=code, reason=reason),
    )


_MALFORMED = (ValueError, KeyError, IndexError, TypeError)


def inflate_reply(
    tree: ObjectTree,
    pull: Callable[[list[str]], dict[str, bytes]],
    max_bytes: int | None,
) -> Message:
    """The message ``tree`` describes, pulled with ``pull`` a part at a time.

    First the objects that have children (message, records, arrays: small), then the
    other leaves (config and metric records), then the arrays' chunks, a few arrays per
    pull (:data:`PULL_GROUP_CHUNKS`): each ``Array`` gets one ``bytearray`` its chunks
    are copied into (in their order, repeats included), and the pulled chunks are
    dropped before the next arrays are pulled. Beyond the reply itself, memory holds one
    group's chunks. Flower's own
    inflation builds the rest of the message around those arrays. Raises
    :class:`UpdateRejectedError` (``too-large`` before the arrays past ``max_bytes`` are
    allocated, ``malformed``) or Flower's ``ObjectPullError``. ``max_bytes`` counts the
    config and metric records (pulled whole, before anything is built from them) and the
    arrays.
    """
    children = {n.object_id: [c.object_id for c in n.children] for n in iterate_object_tree(tree)}
    contents = pull([o for o, kids in children.items() if kids])
    try:
        heads = {o: get_object_head_values_from_object_content(c) for o, c in contents.items()}
        layouts = {
            oid: (json.loads(bytes(_body(contents[oid]))), kids)
            for oid, (kind, kids, _) in heads.items()
            if kind == "Array"
        }
        chunk_ids = {c for _, kids in layouts.values() for c in kids}
        leaves = pull([o for o, kids in children.items() if not (kids or o in chunk_ids)])
        contents.update(leaves)
        records = sum(len(c) for c in leaves.values())  # config/metric: a secure stage's
        if max_bytes is not None and records > max_bytes:
            raise UpdateRejectedError("too-large", f"{records} bytes of records exceed cap")
        remaining = None if max_bytes is None else max_bytes - records
        objects: dict[str, InflatableObject] = {}
        for group in _array_groups(layouts):
            uses = Counter(  # a chunk two arrays of the group share is kept for both
                layouts[oid][1][int(i)] for oid in group for i in layouts[oid][0]["arraychunk_ids"]
            )
            chunks = pull(list(dict.fromkeys(c for oid in group for c in layouts[oid][1])))
            for oid in group:
                meta, kids = layouts[oid]
                objects[oid] = _assemble(oid, meta, kids, chunks, remaining, uses)
                if remaining is not None:
                    remaining -= len(objects[oid].data)  # type: ignore[attr-defined]
            del chunks
        for oid, (kind, _, _) in list(heads.items()):
            if kind == "ArrayRecord":  # its inflate would re-create every Array (bytes only)
                record = ArrayRecord()
                for name, array_id in json.loads(bytes(_body(contents[oid]))).items():
                    record[str(name)] = objects[array_id]
                objects[oid] = record
        message = inflate_object_from_contents(tree.object_id, contents, objects=objects)
    except _MALFORMED as exc:
        raise UpdateRejectedError("malformed", f"reply objects: {exc}") from exc
    if not isinstance(message, Message):
        raise UpdateRejectedError("malformed", f"reply is a {type(message).__name__}")
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message


#: Arrays whose chunks are pulled together, up to this many distinct chunks (5 MB at most
#: each): a model's many small arrays (biases, norms) cost a few round trips to the
#: SuperLink instead of one each, and memory holds at most this many chunks beyond the
#: reply. An array with more chunks is pulled on its own.
PULL_GROUP_CHUNKS = 8


def _array_groups(layouts: dict[str, tuple[dict[str, Any], list[str]]]) -> list[list[str]]:
    """The arrays of ``layouts`` in order, grouped to at most :data:`PULL_GROUP_CHUNKS`."""
    groups: list[list[str]] = []
    count = PULL_GROUP_CHUNKS
    for oid, (_, kids) in layouts.items():
        n = len(set(kids))
        if count + n > PULL_GROUP_CHUNKS:
            groups.append([])
            count = 0
        groups[-1].append(oid)
        count += n
    return groups


def _assemble(
    oid: str,
    meta: dict[str, Any],
    kids: list[str],
    chunks: dict[str, bytes],
    cap: int | None,
    uses: Counter[str] | None = None,
) -> Array:
    """One ``Array`` from its pulled ``chunks``, in ``meta``'s order.

    Each chunk is dropped from ``chunks`` once its last use is copied (``uses``: the
    uses left across the arrays pulled together; by default this array's own).

    Raises ``too-large`` when the array would exceed ``cap`` bytes (checked while adding
    up the chunk sizes, before the buffer exists), ``malformed`` for a chunk that is no
    ``ArrayChunk``.
    """
    sizes = {}
    for cid in set(kids):
        kind, _, body_len = get_object_head_values_from_object_content(chunks[cid])
        if kind != "ArrayChunk":
            raise UpdateRejectedError("malformed", f"array {oid[:12]} names a {kind}")
        sizes[cid] = body_len
    order = [kids[int(i)] for i in meta["arraychunk_ids"]]
    size = 0
    for cid in order:
        size += sizes[cid]
        if cap is not None and size > cap:
            raise UpdateRejectedError("too-large", f"arrays exceed the cap of {cap} bytes")
    if uses is None:
        uses = Counter(order)
    buffer = bytearray(size)
    offset = 0
    for cid in order:
        body = _body(chunks[cid])
        buffer[offset : offset + len(body)] = body
        offset += len(body)
        uses[cid] -= 1
        if not uses[cid]:
            del chunks[cid]
    array = Array(
        dtype=str(meta["dtype"]),
        shape=tuple(int(d) for d in meta["shape"]),
        stype=str(meta["stype"]),
        data=b"",
    )
    array.data = buffer  # type: ignore[assignment]  # read through memoryviews only
    return array


def _body(content: bytes) -> memoryview:
    """The body of a pulled object's content (after its head), without copying it."""
    return memoryview(content)[content.index(HEAD_BODY_DIVIDER) + len(HEAD_BODY_DIVIDER) :]
