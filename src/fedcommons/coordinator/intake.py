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
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
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


def _npy_view(data: bytes) -> np.ndarray | None:
    """A read-only ndarray over ``data`` (a ``.npy`` file), or None if not viewable."""
    stream = io.BytesIO(data)
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
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


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


#: A client's error code -> the rejection reason it is counted under.
_ERROR_REASONS = {
    keys.DP_BUDGET_EXHAUSTED_CODE: "dp-budget-exhausted",
    keys.SECAGG_REQUIRED_CODE: "secagg-required",  # the site requires secagg (#7)
    keys.SECAGG_PROTOCOL_ERROR_CODE: "secagg-refused",
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
