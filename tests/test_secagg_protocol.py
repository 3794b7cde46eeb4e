"""The SecAgg+ core on its own: primitives, Shamir, graph, ring encoding, state machines."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcommons.errors import SecAggAbortedError, SecAggProtocolError
from fedcommons.privacy.secagg import (
    ClientSession,
    RingSpec,
    RoundParams,
    ServerSession,
    graph,
    shamir,
)
from fedcommons.privacy.secagg.primitives import (
    PRG_FIRST_BLOCK,
    add_mask,
    expand_mask,
    new_private_key,
)
from fedcommons.privacy.secagg.quantize import (
    PackedSum,
    _pack_bytewise,
    _unpack_bytewise,
    clip_l2_and_round,
    dequantize,
    pack,
    quantize,
    to_ring,
    unpack,
)

RING = RingSpec(bits=40, levels=(1 << 23) - 1, clip=1.0, max_weight=1024)


def _params(n: int = 10, num_shares: int = 7, threshold: int = 4, length: int = 500, **kw):
    ring = kw.pop("ring", RING)
    round_no = kw.pop("round_no", 3)
    return RoundParams("run-x", round_no, n, num_shares, threshold, 99, ring, length)


def _inputs(params: RoundParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(1, params.n + 1):
        codes, _ = quantize(rng.normal(0, 0.05, params.length), params.ring, rng)
        out[i] = to_ring(codes, 10 + i, [10 + i], params.ring)
    return out


def _run(params, inputs, drop_masked=(), drop_unmask=(), clients=None):
    clients = clients or {i: ClientSession(params, i) for i in range(1, params.n + 1)}
    server = ServerSession(params)
    for i, c in clients.items():
        server.add_advertise(i, c.advertise())
    for i, req in server.share_keys_requests().items():
        server.add_shares(i, clients[i].share_keys(req))
    for i, req in server.masked_input_requests().items():
        if i not in drop_masked:
            server.add_masked(i, clients[i].masked_input(req, inputs[i]))
    for i, req in server.unmask_requests().items():
        if i not in drop_unmask:
            server.add_unmask(i, clients[i].unmask(req))
    return server.finish()


def _miller_rabin(n: int) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_shamir_field_is_the_smallest_prime_above_2_256() -> None:
    """The field modulus 2^256 + 297 is prime and no odd number between 2^256 and it is."""
    assert _miller_rabin(shamir.PRIME)
    assert not any(_miller_rabin((1 << 256) + k) for k in range(1, 297, 2))


def test_shamir_any_threshold_subset_reconstructs_fewer_refused() -> None:
    """Any 4 of 7 shares give the secret back; 3 shares are refused."""
    secret = new_private_key()
    shares = shamir.split(secret, 4, [1, 2, 3, 4, 5, 6, 7])
    for subset in ([1, 2, 3, 4], [4, 5, 6, 7], [1, 3, 5, 7]):
        assert shamir.reconstruct([(x, shares[x]) for x in subset], 4) == secret
    with pytest.raises(SecAggProtocolError):
        shamir.reconstruct([(x, shares[x]) for x in (1, 2, 3)], 4)


def test_graph_is_regular_symmetric_and_follows_the_seed() -> None:
    """Degree num_shares − 1, symmetric, no self loops; same seed same graph, new seed new."""
    nbrs = graph.neighbours(50, 7, seed=5)
    assert all(len(s) == 6 for s in nbrs)
    for i, s in enumerate(nbrs, start=1):
        assert i not in s
        assert all(i in nbrs[v - 1] for v in s)
    assert nbrs == graph.neighbours(50, 7, seed=5)
    assert nbrs != graph.neighbours(50, 7, seed=6)
    assert all(len(s) == 4 for s in graph.neighbours(5, 0, seed=1))  # 0: complete graph


def test_mask_depends_on_every_key_byte_and_is_reduced_to_the_ring() -> None:
    """Keys that differ in their last byte expand to unrelated masks, all below 2^bits."""
    key = bytes(range(32))
    other = key[:-1] + b"\xff"
    a, b = expand_mask(key, 1000, 20), expand_mask(other, 1000, 20)
    assert np.array_equal(a, expand_mask(key, 1000, 20))
    assert (a != b).mean() > 0.99
    assert int(a.max()) < (1 << 20)


@pytest.mark.parametrize("bits", [7, 16, 26, 37, 64])
def test_ring_vectors_pack_to_bits_per_element(bits: int) -> None:
    """Packing uses exactly ⌈count·bits/8⌉ bytes and unpacks to the same elements."""
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**63, 1001, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    if bits == 64:
        values = rng.integers(0, 2**64, 1001, dtype=np.uint64)
    data = pack(values, bits)
    assert len(data) == math.ceil(1001 * bits / 8)
    assert np.array_equal(unpack(data, 1001, bits), values)


def test_mask_is_the_aes256_ctr_keystream_from_gcms_first_counter_block() -> None:
    """The PRG, recomputed with plain AES-256-CTR (counter block 0^96‖2): the same words.

    Input: 300,001 elements, more than two 1 MiB chunks, so chunk boundaries are crossed.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = bytes(range(1, 33))
    n = 300_001
    ctr = Cipher(algorithms.AES(key), modes.CTR(PRG_FIRST_BLOCK)).encryptor()
    want = np.frombuffer(ctr.update(bytes(8 * n)), dtype="<u8")
    assert np.array_equal(expand_mask(key, n, 64), want)
    acc = np.arange(n, dtype=np.uint64)
    add_mask(acc, key, -1)
    assert np.array_equal(acc + want, np.arange(n, dtype=np.uint64))


@pytest.mark.parametrize("bits", [2, 7, 8, 9, 13, 26, 31, 33, 41, 47, 56, 57, 63])
@pytest.mark.parametrize("count", [1, 7, 8, 1003])
def test_word_window_packing_matches_the_bytewise_reference(bits: int, count: int) -> None:
    """pack / PackedSum give the bytes and sums of the byte-column reference, any size.

    Input: random elements of every ring size near the fast path's edges (8, 56), counts
    with and without an incomplete last group of 8.
    """
    rng = np.random.default_rng(bits * 1000 + count)
    values = rng.integers(0, 2**64, count, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    data = pack(values, bits)
    assert data == _pack_bytewise(values, bits)
    assert np.array_equal(_unpack_bytewise(data, count, bits), values)
    other = rng.integers(0, 2**64, count, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    acc = PackedSum(count, bits)
    acc.add(data)
    acc.add(pack(other, bits))
    got = acc.total() & np.uint64((1 << bits) - 1)
    assert np.array_equal(got, (values + other) & np.uint64((1 << bits) - 1))


def test_masked_vector_of_wrong_length_rejected() -> None:
    """A masked vector one byte short is refused with a typed error naming the sizes."""
    with pytest.raises(SecAggProtocolError, match="expected"):
        unpack(b"\0" * 9, 3, 26)


@pytest.mark.parametrize(
    ("drop_masked", "drop_unmask"),
    [((), ()), ((3,), ()), ((3, 8), ()), ((), (2,)), ((), (2, 9)), ((5,), (6,))],
)
def test_exact_ring_sum_with_dropouts(drop_masked, drop_unmask) -> None:
    """10 clients, num_shares 7, threshold 4: the sum equals Σ y over survivors bit for bit."""
    params = _params()
    inputs = _inputs(params)
    out = _run(params, inputs, drop_masked, drop_unmask)
    expected = np.zeros(params.length + 1, dtype=np.uint64)
    for i in out.survivors:
        expected += inputs[i]
    expected &= params.ring.modulus_mask
    assert out.survivors == [i for i in range(1, 11) if i not in drop_masked]
    assert np.array_equal(out.total, expected)
    values, aux = dequantize(out.total, params.ring)
    assert aux[0] == sum(10 + i for i in out.survivors)
    assert np.array_equal(values, dequantize(expected, params.ring)[0])


def test_round_aborts_when_survivors_fall_below_threshold() -> None:
    """With 7 clients and threshold 4, four dropouts at masked input abort the round."""
    params = _params(n=7, num_shares=7, threshold=4)
    with pytest.raises(SecAggAbortedError, match="threshold 4"):
        _run(params, _inputs(params), drop_masked=(1, 2, 3, 4))


def test_round_aborts_when_a_dropped_clients_key_lacks_shares() -> None:
    """Dropped at masked input and too many neighbours silent at unmask: abort, not garbage."""
    params = _params(n=7, num_shares=7, threshold=4)
    with pytest.raises(SecAggAbortedError):
        _run(params, _inputs(params), drop_masked=(1,), drop_unmask=(2, 3, 4))


def _through_share_keys(params):
    clients = {i: ClientSession(params, i) for i in range(1, params.n + 1)}
    server = ServerSession(params)
    for i, c in clients.items():
        server.add_advertise(i, c.advertise())
    for i, req in server.share_keys_requests().items():
        server.add_shares(i, clients[i].share_keys(req))
    return clients, server, server.masked_input_requests()


def test_tampered_share_ciphertext_rejected() -> None:
    """One flipped bit in a routed share ciphertext fails authentication before masking."""
    params = _params(n=5, num_shares=0, threshold=3)
    clients, _, requests = _through_share_keys(params)
    req = dict(requests[1])
    cts = list(req["ct"])
    cts[0] = cts[0][:20] + bytes([cts[0][20] ^ 1]) + cts[0][21:]
    req["ct"] = cts
    with pytest.raises(SecAggProtocolError, match="authentication"):
        clients[1].receive_shares(req)


def test_share_redirected_to_another_receiver_rejected() -> None:
    """A share meant for client 3 forwarded to client 1 as if from the same sender fails."""
    params = _params(n=5, num_shares=0, threshold=3)
    clients, _, requests = _through_share_keys(params)
    req = dict(requests[1])
    sender = req["src"][0]
    pos3 = requests[3]["src"].index(sender)
    req["ct"] = [requests[3]["ct"][pos3], *req["ct"][1:]]
    with pytest.raises(SecAggProtocolError, match="authentication"):
        clients[1].receive_shares(req)


def test_share_replayed_from_an_earlier_round_rejected() -> None:
    """A ciphertext from round 3 replayed in round 4 (same parties) fails authentication."""
    _, _, old_requests = _through_share_keys(_params(n=5, num_shares=0, threshold=3))
    clients, _, requests = _through_share_keys(_params(n=5, num_shares=0, threshold=3, round_no=4))
    req = dict(requests[1])
    req["ct"] = [old_requests[1]["ct"][0], *req["ct"][1:]]
    with pytest.raises(SecAggProtocolError, match="authentication"):
        clients[1].receive_shares(req)


def test_share_replayed_twice_in_one_round_rejected() -> None:
    """The same sender's share delivered twice in one request is refused as a replay."""
    params = _params(n=5, num_shares=0, threshold=3)
    clients, _, requests = _through_share_keys(params)
    req = dict(requests[1])
    req["src"] = [req["src"][0], *req["src"]]
    req["ct"] = [req["ct"][0], *req["ct"]]
    with pytest.raises(SecAggProtocolError, match="repeats a sender"):
        clients[1].receive_shares(req)


def _to_unmask(params):
    clients, server, requests = _through_share_keys(params)
    inputs = _inputs(params)
    for i, req in requests.items():
        server.add_masked(i, clients[i].masked_input(req, inputs[i]))
    return clients, server.unmask_requests()


def test_unmask_refuses_a_neighbour_listed_as_survivor_and_dropped() -> None:
    """A coordinator asking for both secrets of neighbour 2 gets a typed refusal."""
    params = _params(n=5, num_shares=0, threshold=3)
    clients, requests = _to_unmask(params)
    req = dict(requests[1])
    req["dropped"] = [2]
    with pytest.raises(SecAggProtocolError, match="survivor and dropped"):
        clients[1].unmask(req)


def test_unmask_answers_only_once() -> None:
    """A second unmask request (e.g. with other dropouts) is refused: stage out of order."""
    params = _params(n=5, num_shares=0, threshold=3)
    clients, requests = _to_unmask(params)
    clients[1].unmask(requests[1])
    with pytest.raises(SecAggProtocolError, match="out of order"):
        clients[1].unmask({"survivors": [3, 4, 5], "dropped": [2]})


def test_threshold_of_half_the_shares_refused() -> None:
    """threshold 3 of 7 shares (not a majority) is refused before any key is made."""
    with pytest.raises(SecAggProtocolError, match="more than half"):
        _params(n=10, num_shares=7, threshold=3)


def test_client_session_survives_serialisation() -> None:
    """A session restored from bytes between stages finishes the round exactly."""
    params = _params(n=6, num_shares=0, threshold=4)
    inputs = _inputs(params)
    clients = {i: ClientSession(params, i) for i in range(1, 7)}
    server = ServerSession(params)
    for i, c in clients.items():
        server.add_advertise(i, c.advertise())
    clients = {i: ClientSession.from_bytes(c.to_bytes()) for i, c in clients.items()}
    for i, req in server.share_keys_requests().items():
        server.add_shares(i, clients[i].share_keys(req))
    clients = {i: ClientSession.from_bytes(c.to_bytes()) for i, c in clients.items()}
    for i, req in server.masked_input_requests().items():
        server.add_masked(i, clients[i].masked_input(req, inputs[i]))
    for i, req in server.unmask_requests().items():
        server.add_unmask(i, clients[i].unmask(req))
    expected = sum(inputs.values()) & params.ring.modulus_mask
    assert np.array_equal(server.finish().total, expected)


def test_one_clients_masked_vector_looks_uniform() -> None:
    """Chi-square of a masked vector over 256 ring bins passes; plaintext matches are chance.

    Input: a very non-uniform update (every entry the same small value) in a 16-bit ring.
    """
    from scipy import stats

    ring = RingSpec(bits=16, levels=127, clip=1.0, max_weight=1)
    params = RoundParams("run-u", 1, 5, 0, 3, 7, ring, 50_000)
    plain = to_ring(np.full(50_000, 3, dtype=np.int64), 1, [1], ring)
    clients, _, requests = _through_share_keys(params)
    masked = unpack(clients[1].masked_input(requests[1], plain)["masked"], 50_001, 16)
    counts = np.bincount((masked >> np.uint64(8)).astype(np.int64), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-6  # false alarm: 1 run in a million
    equal = int((masked == plain).sum())  # expected 50001 / 65536 ≈ 0.76
    assert equal <= stats.binom.ppf(1 - 1e-6, 50_001, 2**-16)
    plain_counts = np.bincount((plain >> np.uint64(8)).astype(np.int64), minlength=256)
    assert stats.chisquare(plain_counts + 1).pvalue < 1e-4  # the test can fail


def test_dp_rounding_never_exceeds_the_clip_norm() -> None:
    """L2-clipped then rounded codes stay within C (the noise's sensitivity) for any input."""
    ring = RingSpec(bits=32, levels=127, clip=0.5, max_weight=1, aux=2)
    rng = np.random.default_rng(0)
    for scale in (0.001, 0.1, 10.0):
        codes, clipped = clip_l2_and_round(rng.normal(0, scale, 4000), ring, 0.5, rng=rng)
        assert np.linalg.norm(codes * ring.step) <= 0.5
        assert clipped == (scale >= 0.1)


def test_quantization_is_unbiased() -> None:
    """Stochastic rounding: the mean of many encodings of 0.3·step is 0.3·step."""
    ring = RingSpec(bits=32, levels=7, clip=1.0, max_weight=1)
    codes, _ = quantize(np.full(200_000, 0.3 * ring.step), ring, np.random.default_rng(1))
    assert abs(codes.mean() - 0.3) < 0.01


def test_server_rejects_a_short_public_key() -> None:
    """Input: an advertise reply whose c key has 31 bytes. Typed error, nothing recorded."""
    server = ServerSession(_params(n=5, num_shares=0, threshold=3))
    with pytest.raises(SecAggProtocolError, match="32-byte"):
        server.add_advertise(1, {"c-pk": bytes(31), "s-pk": bytes(32)})
    assert server.keys == {}


def test_server_rejects_shares_for_clients_it_did_not_ask_about() -> None:
    """Input: an unmask reply that returns b-shares for a neighbour it was told dropped."""
    params = _params(n=5, num_shares=0, threshold=3)
    clients, server, requests = _through_share_keys(params)
    inputs = _inputs(params)
    for i, req in requests.items():
        if i != 2:
            server.add_masked(i, clients[i].masked_input(req, inputs[i]))
    unmask = server.unmask_requests()
    reply = clients[1].unmask(unmask[1])
    reply["b-idx"] = [1, 2, 3, 4, 5]
    reply["b-share"] = [*reply["b-share"], reply["b-share"][0]]
    with pytest.raises(SecAggProtocolError, match="other clients"):
        server.add_unmask(1, reply)
