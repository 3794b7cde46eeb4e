"""Secure aggregation (SecAgg+): the protocol core, free of Flower and the coordinator.

- :mod:`.primitives` — X25519 + HKDF-SHA256, AES-256-CTR masks, ChaCha20-Poly1305 shares;
- :mod:`.shamir` — t-of-n Shamir sharing over GF(2^256 + 297);
- :mod:`.graph` — the random k-regular neighbour graph from a public seed;
- :mod:`.quantize` — fixed-point encoding into Z_{2^b} with the weight alongside;
- :mod:`.roster` — authenticated key advertisements against a consortium roster;
- :mod:`.protocol` — the client and server state machines of the four stages.

The coordinator's round driver (:mod:`fedcommons.coordinator.secure_round`) and the
client handler (:mod:`fedcommons.client_sdk.secagg`) carry these messages over Flower.
"""

from fedcommons.privacy.secagg.protocol import (
    STAGES,
    ClientSession,
    RoundParams,
    SecAggOutcome,
    ServerSession,
)
from fedcommons.privacy.secagg.quantize import RingSpec

__all__ = ["STAGES", "ClientSession", "RingSpec", "RoundParams", "SecAggOutcome", "ServerSession"]
