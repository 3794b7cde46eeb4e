"""SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017) as two pure state machines.

:class:`ClientSession` and :class:`ServerSession` exchange plain dictionaries of bytes,
ints and lists (the fields of Flower ``ConfigRecord``s; this module imports no Flower).
Participants are numbered ``1..n`` (their Shamir points); every one of them knows the
round's public :class:`RoundParams`.

Stages (``U1 ⊇ U2 ⊇ U3 ⊇ U4`` are the participants still answering):

1. *advertise keys* — each client sends two X25519 public keys: ``c`` (share encryption)
   and ``s`` (pairwise masks); with a consortium roster, signed (:mod:`.roster`).
2. *share keys* — the server sends each client its neighbours' keys (neighbours in the
   round's k-regular graph); a client holding a roster verifies every neighbour's
   signature first; the client splits its self-mask seed ``b`` and its mask key
   ``s_sk`` t-of-(k+1) with Shamir, and encrypts one share pair per neighbour under the
   key agreed with that neighbour's ``c`` key; it also commits to ``b`` (SHA-256).
3. *masked input* — the server routes the ciphertexts; the client checks each one
   (authenticated encryption bound to run, round, sender, receiver, stage) and sends
   ``y + PRG(b) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_uv)`` mod 2^bits.
4. *unmask* — the server names, per client, which neighbours survived stage 3 and which
   dropped; the client returns shares of ``b`` for the survivors (and itself) and of
   ``s_sk`` for the dropped — never both for one neighbour, and only once per round.

The server removes every survivor's ``PRG(b)`` and the pairwise masks survivors shared
with dropped clients, and learns ``Σ_{U3} y`` and nothing else. Any step without enough
shares aborts the round (:class:`~fedcommons.errors.SecAggAbortedError`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from fedcommons.errors import SecAggAbortedError, SecAggProtocolError
from fedcommons.privacy.secagg import graph, shamir
from fedcommons.privacy.secagg.primitives import (
    PROTOCOL,
    add_mask,
    agree,
    context_info,
    new_private_key,
    open_sealed,
    private_key,
    public_key,
    seal,
    share_ad,
)
from fedcommons.privacy.secagg.quantize import PackedSum, RingSpec, pack
from fedcommons.privacy.secagg.roster import (
    SIGNATURE_BYTES,
    AdvertisementSigner,
    Roster,
    params_digest,
)

STAGE_ADVERTISE = "advertise-keys"
STAGE_SHARE = "share-keys"
STAGE_MASKED = "masked-input"
STAGE_UNMASK = "unmask"
STAGES = (STAGE_ADVERTISE, STAGE_SHARE, STAGE_MASKED, STAGE_UNMASK)

_SHARE_PLAIN = struct.Struct(f"<II{shamir.SHARE_BYTES}s{shamir.SHARE_BYTES}s")


@dataclass(frozen=True)
class RoundParams:
    """The public parameters of one secure-aggregation round."""

    run_tag: str
    round_no: int
    n: int
    num_shares: int
    threshold: int
    graph_seed: int
    ring: RingSpec
    #: Ring elements before the aux slots (the update's coordinates).
    length: int

    def __post_init__(self) -> None:
        if self.n < 1 or self.length < 0:
            raise SecAggProtocolError("a round needs n >= 1 participants and length >= 0")
        check_threshold(self.threshold, self.shares_per_client)
        if self.ring.capacity() < self.n:
            raise SecAggProtocolError(
                f"a {self.ring.bits}-bit ring holds the sum of {self.ring.capacity()} maximal "
                f"inputs, the round has {self.n} participants: the sum could wrap around"
            )

    @property
    def shares_per_client(self) -> int:
        """Shares each secret is split into: the neighbours plus the client itself."""
        return graph.degree(self.n, self.num_shares) + 1

    @cached_property
    def neighbours(self) -> list[frozenset[int]]:
        """Neighbour sets, index ``i − 1`` for participant ``i``."""
        return graph.neighbours(self.n, self.num_shares, self.graph_seed)

    def neighbours_of(self, index: int) -> frozenset[int]:
        """Neighbours of participant ``index``."""
        return self.neighbours[index - 1]

    def to_record(self) -> dict[str, Any]:
        """Plain fields for a message."""
        ring = self.ring.to_dict()
        return {
            "protocol": PROTOCOL.decode(),
            "run-tag": self.run_tag,
            "round": self.round_no,
            "n": self.n,
            "num-shares": self.num_shares,
            "threshold": self.threshold,
            "graph-seed": self.graph_seed.to_bytes(8, "little"),
            "length": self.length,
            **{f"ring-{k.replace('_', '-')}": v for k, v in ring.items()},
        }

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the public parameters: what signed key advertisements bind to."""
        return params_digest(self.to_record())

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> RoundParams:
        """Inverse of :meth:`to_record`.

        Raises :class:`SecAggProtocolError` if malformed or of another protocol version
        (its masks would not cancel against ours).
        """
        version = rec.get("protocol")
        if version != PROTOCOL.decode():
            raise SecAggProtocolError(
                f"round uses secure-aggregation protocol {version!r}, this party speaks "
                f"{PROTOCOL.decode()!r}: upgrade the older side"
            )
        try:
            ring = RingSpec(
                bits=int(rec["ring-bits"]),
                levels=int(rec["ring-levels"]),
                clip=float(rec["ring-clip"]),
                max_weight=int(rec["ring-max-weight"]),
                aux=int(rec["ring-aux"]),
            )
            return cls(
                run_tag=str(rec["run-tag"]),
                round_no=int(rec["round"]),
                n=int(rec["n"]),
                num_shares=int(rec["num-shares"]),
                threshold=int(rec["threshold"]),
                graph_seed=int.from_bytes(bytes(rec["graph-seed"]), "little"),
                ring=ring,
                length=int(rec["length"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggProtocolError(f"malformed round parameters: {exc}") from exc


def check_threshold(threshold: int, shares: int) -> None:
    """Refuse thresholds that are unsafe or cannot be met.

    ``threshold`` must be a strict majority of the ``shares`` each secret is split into:
    otherwise a coordinator that tells one half of a client's neighbours "it dropped"
    and the other half "it survived" collects enough shares of *both* its secrets and
    unmasks its individual input.
    """
    if threshold > shares:
        raise SecAggProtocolError(
            f"threshold {threshold} exceeds the {shares} shares each secret is split into"
        )
    if 2 * threshold <= shares or threshold < 2:
        raise SecAggProtocolError(
            f"threshold {threshold} must be at least 2 and more than half of the {shares} "
            "shares: with fewer, a lying coordinator could recover both secrets of one client"
        )


def _sign_for(u: int, v: int) -> int:
    return 1 if u < v else -1


def _as_int_list(value: Any, what: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(x, int) for x in value):
        raise SecAggProtocolError(f"{what} must be a list of ints")
    return [int(x) for x in value]


def _as_bytes_list(value: Any, what: str) -> list[bytes]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(x, bytes) for x in value):
        raise SecAggProtocolError(f"{what} must be a list of bytes")
    return list(value)


# ---------------------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------------------
@dataclass
class ClientSession:
    """One participant's side of one round (serialisable between messages)."""

    params: RoundParams
    index: int
    c_sk: bytes = field(default_factory=new_private_key, repr=False)
    s_sk: bytes = field(default_factory=new_private_key, repr=False)
    b_seed: bytes = field(default=b"", repr=False)
    stage: str = STAGE_ADVERTISE
    #: U1 ∩ N(u): neighbour -> (c_pk, s_pk)
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    #: U2 ∩ N(u): neighbour -> (share of its b, share of its s_sk)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    own_b_share: bytes = field(default=b"", repr=False)
    #: This institution's roster name when it signed its advertisement ("" unsigned).
    member: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.params.n:
            raise SecAggProtocolError(f"participant index {self.index} outside 1..{self.params.n}")

    def _expect(self, stage: str) -> None:
        if self.stage != stage:
            raise SecAggProtocolError(
                f"{stage} request out of order: this client is at stage {self.stage!r}"
            )

    # stage 1 -------------------------------------------------------------------------
    def advertise(self, signer: AdvertisementSigner | None = None) -> dict[str, Any]:
        """Stage 1: the two public keys, signed with the institution's roster key if given."""
        self._expect(STAGE_ADVERTISE)
        c_pk, s_pk = public_key(self.c_sk), public_key(self.s_sk)
        out: dict[str, Any] = {"c-pk": c_pk, "s-pk": s_pk}
        if signer is not None:
            self.member = signer.member
            out["member"] = signer.member
            out["sig"] = signer.sign(self.params.digest, self.index, c_pk, s_pk)
        self.stage = STAGE_SHARE
        return out

    # stage 2 -------------------------------------------------------------------------
    def share_keys(
        self, request: Mapping[str, Any], roster: Roster | None = None
    ) -> dict[str, Any]:
        """Stage 2: check the neighbours' keys; return encrypted shares and a commitment.

        With a ``roster``, every neighbour's advertisement must carry a signature by a
        distinct roster member (not this institution) over this round's parameters, its
        seat and its keys (:meth:`Roster.verify`); nothing secret is derived or sent
        before all of them verify.
        """
        self._expect(STAGE_SHARE)
        p = self.params
        idx = _as_int_list(request.get("idx"), "idx")
        c_pks = _as_bytes_list(request.get("c-pk"), "c-pk")
        s_pks = _as_bytes_list(request.get("s-pk"), "s-pk")
        if not len(idx) == len(c_pks) == len(s_pks):
            raise SecAggProtocolError("share-keys request: lists of different lengths")
        if roster is not None:
            self._verify_peers(roster, request, idx, c_pks, s_pks)
        mine = p.neighbours_of(self.index)
        if len(set(idx)) != len(idx) or not set(idx) <= mine:
            raise SecAggProtocolError(
                "share-keys request names participants that are not this client's neighbours"
            )
        own = {public_key(self.c_sk), public_key(self.s_sk)}
        keys = c_pks + s_pks
        if len(set(keys)) != len(keys) or own & set(keys):
            raise SecAggProtocolError("share-keys request repeats a public key")
        if len(idx) + 1 < p.threshold:
            raise SecAggProtocolError(
                f"only {len(idx)} neighbour(s) advertised keys; threshold {p.threshold} "
                "cannot be met"
            )
        self.peers = {v: (c, s) for v, c, s in zip(idx, c_pks, s_pks, strict=True)}
        self.b_seed = new_private_key()  # 32 uniformly random bytes from the CSPRNG
        points = sorted([*idx, self.index])
        b_shares = shamir.split(self.b_seed, p.threshold, points)
        s_shares = shamir.split(self.s_sk, p.threshold, points)
        self.own_b_share = b_shares[self.index]
        dst, cts = [], []
        for v in sorted(idx):
            key = agree(self.c_sk, self.peers[v][0], self._info("enc", v))
            plain = _SHARE_PLAIN.pack(self.index, v, b_shares[v], s_shares[v])
            dst.append(v)
            cts.append(
                seal(key, plain, share_ad(p.run_tag, p.round_no, self.index, v, STAGE_SHARE))
            )
        self.stage = STAGE_MASKED
        return {"dst": dst, "ct": cts, "b-commit": hashlib.sha256(self.b_seed).digest()}

    def _verify_peers(
        self,
        roster: Roster,
        request: Mapping[str, Any],
        idx: list[int],
        c_pks: list[bytes],
        s_pks: list[bytes],
    ) -> None:
        """Every neighbour's advertisement is signed by its own roster member."""
        members = request.get("member")
        sigs = _as_bytes_list(request.get("sig"), "sig")
        if not isinstance(members, list | tuple) or not all(isinstance(m, str) for m in members):
            raise SecAggProtocolError(
                "share-keys request carries no roster signatures, and this institution accepts "
                "only authenticated key advertisements: refusing the round"
            )
        if not len(members) == len(sigs) == len(idx):
            raise SecAggProtocolError("share-keys request: signature lists of different lengths")
        if not self.member:
            raise SecAggProtocolError("this institution did not sign its own advertisement")
        seen = {self.member}
        for v, member, sig, c, s in zip(idx, members, sigs, c_pks, s_pks, strict=True):
            if not member or len(sig) != SIGNATURE_BYTES:
                raise SecAggProtocolError(
                    f"participant {v}'s key advertisement is not signed: refusing the round"
                )
            if member in seen:
                raise SecAggProtocolError(
                    f"roster member {member!r} holds two seats in this round (participant {v}): "
                    "the coordinator is impersonating participants; refusing the round"
                )
            seen.add(member)
            roster.verify(self.params.digest, v, member, c, s, sig)

    def _info(self, purpose: str, other: int) -> bytes:
        return context_info(purpose, self.params.run_tag, self.params.round_no, self.index, other)

    # stage 3 -------------------------------------------------------------------------
    def receive_shares(self, request: Mapping[str, Any]) -> None:
        """Stage 3, first half: authenticate and store the shares routed to this client.

        Raises :class:`SecAggProtocolError` for a ciphertext that fails authentication
        (tampered, replayed, redirected), a duplicate or unknown sender, or too few
        senders to meet the threshold. Nothing is masked or sent before this passes.
        """
        self._expect(STAGE_MASKED)
        p = self.params
        src = _as_int_list(request.get("src"), "src")
        cts = _as_bytes_list(request.get("ct"), "ct")
        if len(src) != len(cts):
            raise SecAggProtocolError("masked-input request: lists of different lengths")
        if len(set(src)) != len(src):
            raise SecAggProtocolError("masked-input request repeats a sender (replayed share)")
        if not set(src) <= set(self.peers):
            raise SecAggProtocolError("masked-input request has shares from unknown senders")
        held: dict[int, tuple[bytes, bytes]] = {}
        for v, blob in zip(src, cts, strict=True):
            key = agree(self.c_sk, self.peers[v][0], self._info("enc", v))
            plain = open_sealed(
                key, blob, share_ad(p.run_tag, p.round_no, v, self.index, STAGE_SHARE)
            )
            if len(plain) != _SHARE_PLAIN.size:
                raise SecAggProtocolError("decrypted share has the wrong length")
            sender, receiver, b_share, s_share = _SHARE_PLAIN.unpack(plain)
            if (sender, receiver) != (v, self.index):
                raise SecAggProtocolError("decrypted share names another sender or receiver")
            held[v] = (b_share, s_share)
        if len(held) + 1 < p.threshold:
            raise SecAggProtocolError(
                f"only {len(held)} neighbour(s) shared keys; threshold {p.threshold} cannot be met"
            )
        self.held = held
        self.stage = "masking"

    def mask(self, ring_vector: np.ndarray) -> dict[str, Any]:
        """Stage 3, second half: the masked, bit-packed input ``y + masks`` mod 2^bits."""
        self._expect("masking")
        p = self.params
        y = np.asarray(ring_vector, dtype=np.uint64)
        total = p.length + p.ring.aux
        if y.shape != (total,):
            raise SecAggProtocolError(f"input has {y.size} elements, the round expects {total}")
        masked = y.copy()
        add_mask(masked, self.b_seed)
        s_sk = private_key(self.s_sk)
        for v in sorted(self.held):
            pair = agree(s_sk, self.peers[v][1], self._info("mask", v))
            add_mask(masked, pair, _sign_for(self.index, v))
        masked &= p.ring.modulus_mask
        self.stage = STAGE_UNMASK
        return {"masked": pack(masked, p.ring.bits)}

    def masked_input(self, request: Mapping[str, Any], ring_vector: np.ndarray) -> dict[str, Any]:
        """Stage 3 in one call: :meth:`receive_shares`, then :meth:`mask`."""
        self.receive_shares(request)
        return self.mask(ring_vector)

    # stage 4 -------------------------------------------------------------------------
    def unmask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Stage 4: shares of ``b`` for survivors, of ``s_sk`` for dropped neighbours.

        Refuses a request that does not split exactly the neighbours whose shares this
        client holds into survivors and dropped, that leaves fewer than ``threshold``
        survivors, or that comes a second time.
        """
        self._expect(STAGE_UNMASK)
        p = self.params
        survivors = set(_as_int_list(request.get("survivors"), "survivors"))
        dropped = set(_as_int_list(request.get("dropped"), "dropped"))
        if survivors & dropped:
            raise SecAggProtocolError("unmask request lists a neighbour as survivor and dropped")
        if survivors | dropped != set(self.held):
            raise SecAggProtocolError(
                "unmask request does not split this client's neighbours into survivors and dropped"
            )
        if len(survivors) + 1 < p.threshold:
            raise SecAggProtocolError(
                f"only {len(survivors) + 1} survivor(s) in this neighbourhood, threshold "
                f"{p.threshold}: refusing to unmask"
            )
        self.stage = "done"
        b_idx = sorted(survivors)
        s_idx = sorted(dropped)
        return {
            "b-idx": [self.index, *b_idx],
            "b-share": [self.own_b_share, *(self.held[v][0] for v in b_idx)],
            "s-idx": s_idx,
            "s-share": [self.held[v][1] for v in s_idx],
        }

    # persistence -----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Serialise the whole session (secret keys included: keep it on the client)."""
        state = {
            "params": {
                k: (v.hex() if isinstance(v, bytes) else v)
                for k, v in self.params.to_record().items()
            },
            "index": self.index,
            "c_sk": self.c_sk.hex(),
            "s_sk": self.s_sk.hex(),
            "b_seed": self.b_seed.hex(),
            "stage": self.stage,
            "peers": {str(k): [c.hex(), s.hex()] for k, (c, s) in self.peers.items()},
            "held": {str(k): [b.hex(), s.hex()] for k, (b, s) in self.held.items()},
            "own_b_share": self.own_b_share.hex(),
            "member": self.member,
        }
        return json.dumps(state, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientSession:
        """Inverse of :meth:`to_bytes`."""
        try:
            s = json.loads(data)
            rec = dict(s["params"])
            rec["graph-seed"] = bytes.fromhex(rec["graph-seed"])
            return cls(
                params=RoundParams.from_record(rec),
                index=int(s["index"]),
                c_sk=bytes.fromhex(s["c_sk"]),
                s_sk=bytes.fromhex(s["s_sk"]),
                b_seed=bytes.fromhex(s["b_seed"]),
                stage=str(s["stage"]),
                peers={
                    int(k): (bytes.fromhex(c), bytes.fromhex(x)) for k, (c, x) in s["peers"].items()
                },
                held={
                    int(k): (bytes.fromhex(b), bytes.fromhex(x)) for k, (b, x) in s["held"].items()
                },
                own_b_share=bytes.fromhex(s["own_b_share"]),
                member=str(s.get("member", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggProtocolError(f"corrupt secure-aggregation client state: {exc}") from exc


# ---------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------
@dataclass
class SecAggOutcome:
    """What the server learns: the sum of the survivors' inputs, and who they were."""

    total: np.ndarray
    survivors: list[int]
    dropped: dict[str, list[int]]


class ServerSession:
    """The coordinator's side of one round: routes messages, sums, unmasks.

    Memory is one ring vector (the running sum of masked inputs) plus O(n·k) keys and
    ciphertexts, whatever the number of participants.
    """

    def __init__(self, params: RoundParams, *, require_signatures: bool = False) -> None:
        self.params = params
        #: Refuse advertisements without a roster signature (run config ``secagg-auth``).
        self.require_signatures = require_signatures
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        #: participant -> (roster member, signature), for signed advertisements
        self.signed: dict[int, tuple[str, bytes]] = {}
        self.u1: set[int] = set()
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.u4: set[int] = set()
        self.cipher: dict[tuple[int, int], bytes] = {}
        self.commit: dict[int, bytes] = {}
        self.b_shares: dict[int, dict[int, bytes]] = {}
        self.s_shares: dict[int, dict[int, bytes]] = {}
        #: Running sum of the masked inputs (O(model) memory, whatever the clients).
        self.sum = PackedSum(params.length + params.ring.aux, params.ring.bits)
        self._expected_dst: dict[int, list[int]] = {}
        self._unmask_asked: dict[int, tuple[list[int], list[int]]] = {}

    def _nbrs(self, u: int) -> frozenset[int]:
        return self.params.neighbours_of(u)

    def _prune(self, alive: set[int]) -> set[int]:
        """Drop participants whose neighbourhood in ``alive`` cannot meet the threshold."""
        t = self.params.threshold
        alive = set(alive)
        while True:
            weak = {u for u in alive if len(self._nbrs(u) & alive) + 1 < t}
            if not weak:
                return alive
            alive -= weak

    def _need(self, alive: set[int], stage: str) -> None:
        if len(alive) < self.params.threshold:
            raise SecAggAbortedError(
                f"secure aggregation aborted at {stage}: {len(alive)} participant(s) left, "
                f"threshold {self.params.threshold}"
            )

    # stage 1 -> 2 ------------------------------------------------------------------------
    def add_advertise(self, index: int, reply: Mapping[str, Any]) -> None:
        """Record one client's public keys (stage 1 reply)."""
        c, s = reply.get("c-pk"), reply.get("s-pk")
        if not (isinstance(c, bytes) and isinstance(s, bytes) and len(c) == len(s) == 32):
            raise SecAggProtocolError("advertise reply needs two 32-byte public keys")
        if index in self.keys or not 1 <= index <= self.params.n:
            raise SecAggProtocolError(f"unexpected advertise reply from participant {index}")
        member, sig = reply.get("member"), reply.get("sig")
        if member is None and sig is None:
            if self.require_signatures:
                raise SecAggProtocolError(
                    "advertise reply is not signed, and this run requires roster-signed keys "
                    "(secagg-auth = roster)"
                )
        elif not (
            isinstance(member, str)
            and 0 < len(member) <= 64
            and isinstance(sig, bytes)
            and len(sig) == SIGNATURE_BYTES
        ):
            raise SecAggProtocolError("advertise reply: malformed roster member or signature")
        else:
            self.signed[index] = (member, sig)
        self.keys[index] = (c, s)

    def share_keys_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 2 requests: each client's advertised neighbours' keys."""
        seen = Counter(k for pair in self.keys.values() for k in pair)
        dup = {k for k, count in seen.items() if count > 1}
        members = Counter(m for m, _ in self.signed.values())
        alive = {
            u
            for u, pair in self.keys.items()
            if not set(pair) & dup and members[self.signed.get(u, ("", b""))[0]] <= 1
        }  # a roster member in two seats would be refused by its neighbours: drop both
        self.u1 = self._prune(alive)
        self._need(self.u1, STAGE_ADVERTISE)
        out = {}
        for u in sorted(self.u1):
            peers = sorted(self._nbrs(u) & self.u1)
            self._expected_dst[u] = peers
            out[u] = {
                "idx": peers,
                "c-pk": [self.keys[v][0] for v in peers],
                "s-pk": [self.keys[v][1] for v in peers],
            }
            if self.signed:  # relayed as advertised; unsigned seats as ("", b"")
                out[u]["member"] = [self.signed.get(v, ("", b""))[0] for v in peers]
                out[u]["sig"] = [self.signed.get(v, ("", b""))[1] for v in peers]
        return out

    # stage 2 -> 3 ------------------------------------------------------------------------
    def add_shares(self, index: int, reply: Mapping[str, Any]) -> None:
        """Record one client's encrypted shares (stage 2 reply)."""
        if index not in self._expected_dst or index in self.u2:
            raise SecAggProtocolError(f"unexpected share-keys reply from participant {index}")
        dst = _as_int_list(reply.get("dst"), "dst")
        cts = _as_bytes_list(reply.get("ct"), "ct")
        commit = reply.get("b-commit")
        if dst != self._expected_dst[index] or len(cts) != len(dst):
            raise SecAggProtocolError(
                f"participant {index} sent shares for {dst}, expected {self._expected_dst[index]}"
            )
        if not isinstance(commit, bytes) or len(commit) != 32:
            raise SecAggProtocolError("share-keys reply lacks the 32-byte commitment to b")
        for v, ct in zip(dst, cts, strict=True):
            self.cipher[(index, v)] = ct
        self.commit[index] = commit
        self.u2.add(index)

    def masked_input_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 3 requests: the ciphertexts addressed to each client."""
        self.u2 = self._prune(self.u2)
        self._need(self.u2, STAGE_SHARE)
        out = {}
        for u in sorted(self.u2):
            src = sorted(self._nbrs(u) & self.u2)
            out[u] = {"src": src, "ct": [self.cipher[(v, u)] for v in src]}
        self.cipher.clear()
        return out

    # stage 3 -> 4 ------------------------------------------------------------------------
    def add_masked(self, index: int, reply: Mapping[str, Any]) -> None:
        """Fold one client's masked input into the running sum (stage 3 reply)."""
        if index not in self.u2 or index in self.u3:
            raise SecAggProtocolError(f"unexpected masked input from participant {index}")
        data = reply.get("masked")
        if not isinstance(data, bytes):
            raise SecAggProtocolError("masked-input reply lacks the masked vector")
        self.sum.add(data)  # mod 2^64 here, mod 2^bits once in finish()
        self.u3.add(index)

    def unmask_requests(self) -> dict[int, dict[str, Any]]:
        """Stage 4 requests: per survivor, which neighbours survived and which dropped."""
        self._need(self.u3, STAGE_MASKED)
        out = {}
        for u in sorted(self.u3):
            held = self._nbrs(u) & self.u2
            survivors = sorted(held & self.u3)
            dropped = sorted(held - self.u3)
            self._unmask_asked[u] = (survivors, dropped)
            out[u] = {"survivors": survivors, "dropped": dropped}
        return out

    def add_unmask(self, index: int, reply: Mapping[str, Any]) -> None:
        """Record one client's shares (stage 4 reply)."""
        if index not in self._unmask_asked or index in self.u4:
            raise SecAggProtocolError(f"unexpected unmask reply from participant {index}")
        survivors, dropped = self._unmask_asked[index]
        b_idx = _as_int_list(reply.get("b-idx"), "b-idx")
        b_sh = _as_bytes_list(reply.get("b-share"), "b-share")
        s_idx = _as_int_list(reply.get("s-idx"), "s-idx")
        s_sh = _as_bytes_list(reply.get("s-share"), "s-share")
        if b_idx != [index, *survivors] or s_idx != dropped:
            raise SecAggProtocolError(f"participant {index} returned shares for other clients")
        if len(b_sh) != len(b_idx) or len(s_sh) != len(s_idx):
            raise SecAggProtocolError("unmask reply: lists of different lengths")
        for v, share in zip(b_idx, b_sh, strict=True):
            self.b_shares.setdefault(v, {})[index] = share
        for v, share in zip(s_idx, s_sh, strict=True):
            self.s_shares.setdefault(v, {})[index] = share
        self.u4.add(index)

    def finish(self) -> SecAggOutcome:
        """Remove the masks; return Σ_{U3} y mod 2^bits.

        Raises :class:`SecAggAbortedError` when a survivor's self-mask seed or a dropped
        client's mask key cannot be reconstructed (fewer than ``threshold`` shares), or a
        reconstruction does not match what the client committed to.
        """
        p = self.params
        t = p.threshold
        total = self.sum.total()
        for v in sorted(self.u3):
            shares = self.b_shares.get(v, {})
            if len(shares) < t:
                raise SecAggAbortedError(
                    f"secure aggregation aborted at unmask: {len(shares)} share(s) of survivor "
                    f"{v}'s self-mask, threshold {t}"
                )
            b = shamir.reconstruct(shares.items(), t)
            if hashlib.sha256(b).digest() != self.commit[v]:
                raise SecAggAbortedError(f"reconstructed self-mask of {v} fails its commitment")
            add_mask(total, b, -1)
        for d in sorted(self.u2 - self.u3):
            partners = sorted(self._nbrs(d) & self.u3)
            if not partners:
                continue
            shares = self.s_shares.get(d, {})
            if len(shares) < t:
                raise SecAggAbortedError(
                    f"secure aggregation aborted at unmask: {len(shares)} share(s) of dropped "
                    f"client {d}'s mask key, threshold {t}"
                )
            raw = shamir.reconstruct(shares.items(), t)
            if public_key(raw) != self.keys[d][1]:
                raise SecAggAbortedError(f"reconstructed mask key of {d} fails its public key")
            s_sk = private_key(raw)
            for u in partners:
                info = context_info("mask", p.run_tag, p.round_no, d, u)
                # u added sign(u, d)·PRG(s_ud): take it out
                add_mask(total, agree(s_sk, self.keys[u][1], info), -_sign_for(u, d))
        total &= p.ring.modulus_mask
        n_all = set(range(1, p.n + 1))
        return SecAggOutcome(
            total=total,
            survivors=sorted(self.u3),
            dropped={
                STAGE_ADVERTISE: sorted(n_all - self.u1),
                STAGE_SHARE: sorted(self.u1 - self.u2),
                STAGE_MASKED: sorted(self.u2 - self.u3),
                STAGE_UNMASK: sorted(self.u3 - self.u4),
            },
        )
