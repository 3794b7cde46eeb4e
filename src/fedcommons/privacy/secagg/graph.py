"""The SecAgg+ communication graph: a random k-regular graph from a public seed.

Bell et al. (2020) replace SecAgg's complete graph by a random graph of degree
O(log n). We use their construction: a Harary graph (each node linked to its ``k/2``
nearest positions on either side of a ring) over a random permutation of the
participants; the permutation comes from a public seed every party can recompute.
Degree ``num_shares − 1`` is rounded up to an even number; when that reaches ``n − 1``
the graph is complete (the SecAgg protocol of Bonawitz et al. 2017).
"""

from __future__ import annotations

import hashlib

import numpy as np

from fedcommons.errors import SecAggProtocolError


def graph_seed(run_tag: str, round_no: int) -> int:
    """The round's public graph seed (a 64-bit hash of run tag and round)."""
    digest = hashlib.sha256(f"fedcommons-secagg-graph/{run_tag}/{round_no}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def degree(n: int, num_shares: int) -> int:
    """Neighbours per node: ``num_shares − 1`` rounded up to even, capped at ``n − 1``.

    ``num_shares`` ≤ 0 means every other participant (complete graph).
    """
    if n < 1:
        raise SecAggProtocolError("a secure-aggregation round needs at least one participant")
    if num_shares <= 0:
        return n - 1
    k = num_shares - 1
    k += k % 2
    return min(k, n - 1)


def neighbours(n: int, num_shares: int, seed: int) -> list[frozenset[int]]:
    """Neighbour sets of participants ``1..n`` (index ``i`` at position ``i − 1``)."""
    k = degree(n, num_shares)
    if k >= n - 1:
        everyone = frozenset(range(1, n + 1))
        return [everyone - {i} for i in range(1, n + 1)]
    order = np.random.default_rng(seed).permutation(n) + 1  # position -> participant
    position = {int(p): pos for pos, p in enumerate(order)}
    out: list[frozenset[int]] = []
    for i in range(1, n + 1):
        pos = position[i]
        near = {int(order[(pos + d) % n]) for d in range(1, k // 2 + 1)}
        near |= {int(order[(pos - d) % n]) for d in range(1, k // 2 + 1)}
        out.append(frozenset(near))
    return out
