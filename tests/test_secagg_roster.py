"""Authenticated SecAgg+ key advertisements: the roster, signing, and what clients refuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedcommons.errors import SecAggProtocolError, SecAggRosterError
from fedcommons.privacy.secagg import ClientSession, RingSpec, RoundParams, ServerSession
from fedcommons.privacy.secagg.primitives import new_private_key, public_key
from fedcommons.privacy.secagg.quantize import quantize, to_ring
from fedcommons.privacy.secagg.roster import (
    AdvertisementSigner,
    Roster,
    new_signing_key,
    roster_document,
)

RING = RingSpec(bits=40, levels=(1 << 23) - 1, clip=1.0, max_weight=1024)


def _params(n: int = 6, threshold: int = 4, **kw) -> RoundParams:
    return RoundParams(kw.get("run", "run-a"), kw.get("round_no", 2), n, 0, threshold, 5, RING, 300)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Seven institutions with signing keys, and the roster that lists them."""
    root = tmp_path_factory.mktemp("consortium")
    members = {f"site-{i}": new_signing_key(root / f"site-{i}.pem") for i in range(1, 8)}
    path = root / "roster.json"
    path.write_text(json.dumps(roster_document("test-consortium", members)))
    roster = Roster.load(path)
    signers = {i: AdvertisementSigner.load(root / f"site-{i}.pem", roster) for i in range(1, 8)}
    return {"root": root, "roster": roster, "signers": signers, "members": members}


def _advertised(params: RoundParams, signers: dict, unsigned: tuple[int, ...] = ()):
    clients = {i: ClientSession(params, i) for i in range(1, params.n + 1)}
    server = ServerSession(params)
    for i, c in clients.items():
        server.add_advertise(i, c.advertise(None if i in unsigned else signers[i]))
    return clients, server, server.share_keys_requests()


def test_signed_round_sums_exactly(consortium: dict) -> None:
    """Six institutions that all sign and verify: the unmasked sum is exact."""
    params = _params()
    roster = consortium["roster"]
    clients, server, requests = _advertised(params, consortium["signers"])
    for i, req in requests.items():
        server.add_shares(i, clients[i].share_keys(req, roster))
    rng = np.random.default_rng(0)
    inputs = {}
    for i, req in server.masked_input_requests().items():
        codes, _ = quantize(rng.normal(0, 0.05, params.length), params.ring, rng)
        inputs[i] = to_ring(codes, 1, [1], params.ring)
        server.add_masked(i, clients[i].masked_input(req, inputs[i]))
    for i, req in server.unmask_requests().items():
        server.add_unmask(i, clients[i].unmask(req))
    expected = sum(inputs.values()) & params.ring.modulus_mask
    assert np.array_equal(server.finish().total, expected)


def test_substituted_mask_key_is_refused_before_any_share_is_sent(consortium: dict) -> None:
    """Input: the coordinator replaces participant 3's s key (one it holds the secret of) in
    client 1's share-keys request. Client 1 refuses, naming the substitution; it sent nothing."""
    clients, _, requests = _advertised(_params(), consortium["signers"])
    req = dict(requests[1])
    pos = req["idx"].index(3)
    forged = list(req["s-pk"])
    forged[pos] = public_key(new_private_key())
    req["s-pk"] = forged
    with pytest.raises(SecAggProtocolError, match=r"participant 3.*substituted"):
        clients[1].share_keys(req, consortium["roster"])
    assert clients[1].b_seed == b""  # no self-mask seed drawn, no share made


def test_member_in_two_seats_is_refused(consortium: dict) -> None:
    """Input: participant 4's seat filled with participant 2's genuine signed advertisement
    (a coordinator simulating a second participant). Refused as impersonation."""
    clients, _, requests = _advertised(_params(), consortium["signers"])
    req = {k: list(v) for k, v in requests[1].items()}
    src, dst = req["idx"].index(2), req["idx"].index(4)
    for key in ("c-pk", "s-pk", "member", "sig"):
        req[key][dst] = req[key][src]
    with pytest.raises(SecAggProtocolError, match="two seats"):
        clients[1].share_keys(req, consortium["roster"])


def test_advertisement_signed_for_other_round_parameters_is_refused(consortium: dict) -> None:
    """Input: client 1 is shown threshold 5 while the others signed for threshold 4 (the
    coordinator equivocating about the round). Their signatures fail on client 1's digest."""
    signers = consortium["signers"]
    honest = _params(threshold=4)
    others = {i: ClientSession(honest, i) for i in range(2, 7)}
    shown = _params(threshold=5)
    me = ClientSession(shown, 1)
    me.advertise(signers[1])
    ads = {i: c.advertise(signers[i]) for i, c in others.items()}
    request = {
        "idx": list(ads),
        "c-pk": [a["c-pk"] for a in ads.values()],
        "s-pk": [a["s-pk"] for a in ads.values()],
        "member": [a["member"] for a in ads.values()],
        "sig": [a["sig"] for a in ads.values()],
    }
    with pytest.raises(SecAggProtocolError, match="does not verify"):
        me.share_keys(request, consortium["roster"])


def test_unsigned_neighbour_is_refused_by_a_roster_site(consortium: dict) -> None:
    """Input: participant 5 advertised without a signature. Refused; and a request with no
    signature lists at all is refused as unauthenticated."""
    clients, _, requests = _advertised(_params(), consortium["signers"], unsigned=(5,))
    with pytest.raises(SecAggProtocolError, match=r"participant 5.*not signed"):
        clients[1].share_keys(requests[1], consortium["roster"])
    stripped = {k: v for k, v in requests[2].items() if k not in ("member", "sig")}
    with pytest.raises(SecAggProtocolError, match="no roster signatures"):
        clients[2].share_keys(stripped, consortium["roster"])


def test_server_requiring_signatures_refuses_an_unsigned_advertisement() -> None:
    """Input: an advertise reply without member/sig in a secagg-auth = roster round."""
    server = ServerSession(_params(), require_signatures=True)
    with pytest.raises(SecAggProtocolError, match="not signed"):
        server.add_advertise(1, {"c-pk": bytes(32), "s-pk": bytes(range(32))})
    assert server.keys == {}


def test_signed_roster_verifies_under_the_pinned_key_and_an_edit_is_caught(
    consortium: dict, tmp_path: Path
) -> None:
    """A roster signed by the consortium key loads with that key pinned; the same roster
    with one member key replaced, or pinned to another key, is refused."""
    signer_pub = new_signing_key(tmp_path / "consortium.pem")
    doc = roster_document("c", consortium["members"], tmp_path / "consortium.pem")
    assert set(Roster.from_document(doc, signer_pub).members) == set(consortium["members"])
    edited = json.loads(json.dumps(doc))
    edited["members"]["site-1"] = consortium["members"]["site-2"][:-2] + "00"
    with pytest.raises(SecAggRosterError, match=r"does not verify|Ed25519"):
        Roster.from_document(edited, signer_pub)
    other = new_signing_key(tmp_path / "other.pem")
    with pytest.raises(SecAggRosterError, match="does not verify"):
        Roster.from_document(doc, other)


def test_signing_key_not_in_the_roster_is_refused(consortium: dict, tmp_path: Path) -> None:
    """Input: an institution key the roster does not list."""
    new_signing_key(tmp_path / "stranger.pem")
    with pytest.raises(SecAggRosterError, match="not in the roster"):
        AdvertisementSigner.load(tmp_path / "stranger.pem", consortium["roster"])


def test_signing_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    """new_signing_key writes mode 0600 and refuses an existing path."""
    path = tmp_path / "k.pem"
    new_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(SecAggRosterError, match="exists"):
        new_signing_key(path)
