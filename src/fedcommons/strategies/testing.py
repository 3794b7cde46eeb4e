"""The conformance kit strategy authors run in their own pytest.

.. code-block:: python

    # tests/test_my_strategy.py (in the plugin's package)
    from fedcommons.strategies import testing
    from my_pkg import MyStrategy

    def test_conformance():
        testing.run_conformance(MyStrategy, reference=my_batch_reference)

Every ``check_*`` function raises ``AssertionError`` with a message naming the failed
property, or :class:`CheckSkipped` (a ``unittest.SkipTest``: pytest reports it as a skip)
when it does not apply to the strategy, so each can also be its own test.
:func:`run_conformance` runs every check, reports each as run, skipped (with the reason)
or failed, and raises one ``AssertionError`` listing every failure.

``factory`` is an Aggregator subclass, a function decorated with
:func:`fedcommons.strategies.strategy`, or a zero-argument callable returning a configured
instance (``lambda: my_fn.aggregator(f=2)`` for a function plugin with parameters). A
``reference`` is a plain batch function ``reference(updates, base) -> Δ*``; the
built-ins' references live here too (:func:`reference_fedavg`, :func:`reference_fisher`,
:func:`reference_mask_aligned`, :func:`reference_median`, :func:`reference_trimmed_mean`,
:func:`reference_multi_krum`).
"""

from __future__ import annotations

import copy
import math
import random
import sys
import unittest
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedcommons.strategies.base import Aggregator, _name, check_step
from fedcommons.wire.update import ClientUpdate

Weights = dict[str, torch.Tensor]
Reference = Callable[
    [Sequence[ClientUpdate], Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]
]
Factory = Any

#: Default fake model: float32 and float64 tensors of several ranks.
DEFAULT_SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "layer.weight": ((6, 5), torch.float32),
    "layer.bias": ((5,), torch.float32),
    "head.weight": ((3, 2, 2), torch.float64),
}


class CheckSkipped(unittest.SkipTest):
    """A check that does not apply to the strategy (the reason says why)."""


class ConformanceReport(list[str]):
    """The checks that ran and passed (the list), plus ``skipped`` and ``failed`` by name."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    def summary(self) -> str:
        """One line per check: passed, skipped (reason) or FAILED (message)."""
        lines = [f"passed  {name}" for name in self]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"FAILED  {name}: {why}" for name, why in self.failed.items()]
        return "\n".join(lines)


def instantiate(factory: Factory) -> Aggregator:
    """An Aggregator from a class, a @strategy function or a zero-argument callable."""
    target = getattr(factory, "aggregator", factory)
    obj = target()
    if not isinstance(obj, Aggregator):
        raise AssertionError(f"{factory!r} did not produce an Aggregator, got {type(obj)}")
    return obj


def make_base(
    seed: int = 0, shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None
) -> Weights:
    """Base weights θ0 with the given (or default) names, shapes and dtypes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for name, (shape, dtype) in (shapes or DEFAULT_SHAPES).items()
    }


def make_updates(
    base: Mapping[str, torch.Tensor],
    k: int = 5,
    *,
    seed: int = 0,
    masks: bool = True,
    fisher: bool = True,
    density: float = 0.6,
    excluded: Mapping[str, torch.Tensor] | None = None,
) -> list[ClientUpdate]:
    """``k`` fake updates: random deltas, example counts, masks and diagonal Fishers.

    With ``masks`` every other update is sparse (a random ``density`` of each tensor,
    delta zero outside). ``excluded`` maps names to bool tensors of coordinates no update
    touches (delta, mask and Fisher all zero there).
    """
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for i in range(k):
        delta: Weights = {}
        mask: Weights = {}
        fish: Weights = {}
        for name, ref in base.items():
            d = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
            m = torch.ones(ref.shape, dtype=torch.bool)
            if masks and i % 2 == 1:
                m = torch.rand(ref.shape, generator=gen) < density
            if excluded is not None and name in excluded:
                m = m & ~excluded[name]
            f = torch.rand(ref.shape, generator=gen, dtype=torch.float64) ** 3 + 1e-4
            delta[name] = torch.where(m, d, 0.0).to(ref.dtype)
            mask[name] = m
            fish[name] = torch.where(m, f, 0.0).to(torch.float32)
        sparse = masks and (i % 2 == 1 or excluded is not None)
        updates.append(
            ClientUpdate(
                delta=delta,
                num_examples=int(torch.randint(1, 100, (1,), generator=gen)),
                node_id=1000 + i,
                mask=mask if sparse else None,
                fisher=fish if fisher else None,
            )
        )
    return updates


def run_round(
    factory: Factory, base: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]
) -> Weights:
    """One round on a fresh instance: begin, fold each update, finalize (checked)."""
    agg = instantiate(factory)
    agg.begin(base)
    for u in updates:
        agg.fold(u)
    return _checked(agg, agg.finalize(), base)


def _checked(agg: Aggregator, step: object, base: Mapping[str, torch.Tensor]) -> Weights:
    try:
        return check_step(step, base, _name(agg), "under test")
    except Exception as exc:
        raise AssertionError(str(exc)) from exc


def assert_close(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    what: str,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Assert two weight dicts are equal within tolerance, naming the first mismatch."""
    assert set(actual) == set(expected), f"{what}: tensor names differ"
    for name in expected:
        a = actual[name].double()
        e = torch.as_tensor(expected[name]).double()
        if not torch.allclose(a, e, rtol=rtol, atol=atol):
            worst = float((a - e).abs().max())
            raise AssertionError(f"{what}: {name} differs (max abs difference {worst:.3g})")


# -- checks ----------------------------------------------------------------------------
def check_streaming_matches_batch(
    factory: Factory, reference: Reference, *, seed: int = 0, k: int = 7
) -> None:
    """Folding one update at a time gives the batch ``reference(updates, base)``."""
    base = make_base(seed)
    updates = make_updates(base, k, seed=seed)
    assert_close(run_round(factory, base, updates), reference(updates, base), "streaming vs batch")


def check_single_update_identity(factory: Factory, *, seed: int = 1) -> None:
    """With one (dense) client, Δ* is that client's delta (if ``single_update_identity``)."""
    if not getattr(instantiate(factory), "single_update_identity", True):
        raise CheckSkipped("the strategy declares single_update_identity = False")
    base = make_base(seed)
    updates = make_updates(base, 1, seed=seed, masks=False)
    assert_close(run_round(factory, base, updates), updates[0].delta, "one client")


def check_zero_weight_keeps_base(factory: Factory, *, seed: int = 2, k: int = 5) -> None:
    """Coordinates no update touches (outside every mask, zero delta) get Δ* = 0."""
    base = make_base(seed)
    gen = torch.Generator().manual_seed(seed)
    excluded = {name: torch.rand(v.shape, generator=gen) < 0.3 for name, v in base.items()}
    updates = make_updates(base, k, seed=seed, excluded=excluded)
    step = run_round(factory, base, updates)
    for name, ex in excluded.items():
        moved = step[name][ex]
        if moved.numel() and bool((moved != 0).any()):
            raise AssertionError(
                f"zero-weight coordinates moved: {name} has {int((moved != 0).sum())} nonzero"
            )


def check_shapes_and_dtypes(factory: Factory, *, seed: int = 3) -> None:
    """Δ* has θ0's names, shapes and dtypes (float32 and float64 tensors mixed)."""
    base = make_base(seed)
    step = run_round(factory, base, make_updates(base, 4, seed=seed))
    for name, ref in base.items():
        assert step[name].dtype == ref.dtype, f"{name}: dtype {step[name].dtype} != {ref.dtype}"
        assert step[name].shape == ref.shape, f"{name}: shape changed"


def check_finite(factory: Factory, *, seed: int = 4) -> None:
    """Output is finite on hard inputs: all-zero deltas, huge deltas, tiny Fishers."""
    base = make_base(seed)
    zeros = make_updates(base, 3, seed=seed)
    for u in zeros:
        u.delta = {k: torch.zeros_like(v) for k, v in u.delta.items()}
    run_round(factory, base, zeros)  # check_step inside asserts finiteness
    huge = make_updates(base, 3, seed=seed + 1)
    for u in huge:
        u.delta = {k: v * 1e4 for k, v in u.delta.items()}
        if u.fisher is not None:
            u.fisher = {k: v * 1e-30 for k, v in u.fisher.items()}
    run_round(factory, base, huge)


def check_permutation_invariance(factory: Factory, *, seed: int = 5, k: int = 6) -> None:
    """The result does not depend on arrival order (only if the class declares it)."""
    if not getattr(instantiate(factory), "permutation_invariant", True):
        raise CheckSkipped("the strategy declares permutation_invariant = False")
    base = make_base(seed)
    updates = make_updates(base, k, seed=seed)
    first = run_round(factory, base, updates)
    shuffled = list(updates)
    random.Random(seed).shuffle(shuffled)
    assert_close(run_round(factory, base, shuffled), first, "permuted order")
    assert_close(run_round(factory, base, updates[::-1]), first, "reversed order")


def check_begin_resets(factory: Factory, *, seed: int = 6) -> None:
    """``begin`` starts a fresh round: a second round with other updates ignores the first.

    Skipped for strategies that declare ``cross_round_state`` (server optimisers).
    """
    agg = instantiate(factory)
    if getattr(agg, "cross_round_state", False):
        raise CheckSkipped("the strategy declares cross_round_state = True")
    base = make_base(seed)
    agg.begin(base)
    for u in make_updates(base, 4, seed=seed + 100):
        agg.fold(u)
    agg.finalize()
    updates = make_updates(base, 4, seed=seed)
    agg.begin(base)
    for u in updates:
        agg.fold(u)
    assert_close(
        _checked(agg, agg.finalize(), base), run_round(factory, base, updates), "second round"
    )


def check_does_not_alias_inputs(factory: Factory, *, seed: int = 7) -> None:
    """Overwriting an update's tensors after ``fold`` does not change Δ*."""
    base = make_base(seed)
    updates = make_updates(base, 4, seed=seed)
    expected = run_round(factory, base, updates)
    mine = copy.deepcopy(updates)
    agg = instantiate(factory)
    agg.begin(base)
    for u in mine:
        agg.fold(u)
        for tensors in (u.delta, u.fisher or {}):
            for v in tensors.values():
                v.fill_(float("nan"))
    assert_close(
        _checked(agg, agg.finalize(), base), expected, "after the caller reused its buffers"
    )


def check_leaves_inputs_untouched(factory: Factory, *, seed: int = 9) -> None:
    """``fold`` and ``finalize`` never write into an update's tensors.

    The coordinator hands aggregators zero-copy, read-only views of the reply bytes
    (:mod:`fedcommons.coordinator.intake`): an in-place op on ``update.delta``, its mask
    or its Fisher would corrupt a message, so every input must be bit-identical after a
    round.
    """
    base = make_base(seed)
    updates = make_updates(base, 4, seed=seed)
    before = copy.deepcopy(updates)
    base_before = {k: v.clone() for k, v in base.items()}
    run_round(factory, base, updates)
    for i, (now, then) in enumerate(zip(updates, before, strict=True)):
        for what in ("delta", "mask", "fisher"):
            got, want = getattr(now, what), getattr(then, what)
            for name in want or {}:
                if not torch.equal(got[name], want[name]):
                    raise AssertionError(f"update {i}: {what}[{name!r}] was modified in place")
    for name, value in base_before.items():
        if not torch.equal(base[name], value):
            raise AssertionError(f"base[{name!r}] was modified in place")


def check_ties_do_not_make_results_order_dependent(
    factory: Factory, *, seed: int = 10, k: int = 6
) -> None:
    """Updates that tie (equal norms, distances, weights and Fisher) give one result in any order.

    Random inputs never tie, so a rule that breaks ties by arrival ("the first of the
    lowest-scoring updates") passes :func:`check_permutation_invariance` and is still
    order-dependent on real rounds with duplicated or symmetric updates. Here every update
    is a different coordinate direction of the same length: every pairwise distance and
    every norm ties. Only for strategies that declare ``permutation_invariant``.
    """
    if not getattr(instantiate(factory), "permutation_invariant", True):
        raise CheckSkipped("the strategy declares permutation_invariant = False")
    base = make_base(seed)
    updates = []
    for i in range(k):
        delta = {name: torch.zeros_like(ref) for name, ref in base.items()}
        first = next(iter(delta))
        delta[first].view(-1)[i % delta[first].numel()] = 0.5
        fisher = {name: torch.ones_like(ref, dtype=torch.float32) for name, ref in base.items()}
        updates.append(ClientUpdate(delta=delta, num_examples=10, node_id=2000 + i, fisher=fisher))
    first_result = run_round(factory, base, updates)
    for order, label in (
        (updates[::-1], "reversed order of tied updates"),
        (updates[1:] + updates[:1], "rotated order of tied updates"),
    ):
        assert_close(run_round(factory, base, order), first_result, label)


#: Bytes counted per Python scalar kept in an aggregator's containers.
_SCALAR_BYTES = 8


def state_nbytes(obj: object, _seen: set[int] | None = None) -> int:
    """Bytes reachable from ``obj``: tensors, plus Python scalars and strings in containers.

    Walks attributes, dicts, lists, tuples and sets; a list of K floats counts K × 8
    bytes, so O(K) state kept as Python numbers shows.
    """
    seen = _seen if _seen is not None else set()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, bool | int | float | complex):
        return _SCALAR_BYTES
    if isinstance(obj, str | bytes | bytearray):
        return len(obj)
    if isinstance(obj, Mapping):
        return sum(state_nbytes(k, seen) + state_nbytes(v, seen) for k, v in obj.items())
    if isinstance(obj, list | tuple | set | frozenset):
        return sum(state_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return sum(state_nbytes(v, seen) for v in vars(obj).values())
    return 0


def _module_state_nbytes(factory: Factory) -> int:
    """Bytes of the data (not code) that the strategy's module(s) hold in globals."""
    cls = type(instantiate(factory))
    names = {cls.__module__, getattr(getattr(cls, "_strategy_function", None), "__module__", "")}
    total, seen = 0, set()
    for name in names - {"", __name__}:
        module = sys.modules.get(name)
        for value in vars(module).values() if module else ():
            if isinstance(value, torch.Tensor | Mapping | list | set | tuple | bytearray):
                total += state_nbytes(value, seen)
    return total


def check_state_is_o_model(factory: Factory, *, seed: int = 8) -> None:
    """A ``streaming`` strategy's state does not grow with the number of updates folded.

    Counts the instance's tensors, Python scalars and containers, and the data its
    module keeps in globals (a module-level list appended to in ``fold`` is O(K) too).
    """
    if not getattr(instantiate(factory), "streaming", True):
        raise CheckSkipped("the strategy declares streaming = False (state is K × model)")
    base = make_base(seed)
    sizes, grown = [], []
    for k in (2, 12):
        before = _module_state_nbytes(factory)
        agg = instantiate(factory)
        agg.begin(base)
        for u in make_updates(base, k, seed=seed):
            agg.fold(u)
        sizes.append(state_nbytes(agg))
        grown.append(_module_state_nbytes(factory) - before)
    if sizes[1] > sizes[0]:
        raise AssertionError(
            f"state grew from {sizes[0]} to {sizes[1]} bytes going from 2 to 12 updates: "
            "not O(model) (declare streaming = False if the rule needs every update)"
        )
    if grown[1] > grown[0]:
        raise AssertionError(
            f"module globals grew by {grown[0]} bytes folding 2 updates and by {grown[1]} "
            "folding 12: the strategy keeps per-update state outside the instance"
        )


def run_conformance(factory: Factory, *, reference: Reference | None = None) -> ConformanceReport:
    """Run every check; raise one ``AssertionError`` naming every failure.

    Returns a :class:`ConformanceReport`: the list of checks that ran and passed, with
    ``skipped`` (check -> reason) and ``failed`` (check -> message). The
    streaming-vs-batch check needs ``reference``; without one it is reported skipped.
    """
    checks: list[Callable[[Factory], None]] = [
        check_shapes_and_dtypes,
        check_finite,
        check_zero_weight_keeps_base,
        check_permutation_invariance,
        check_ties_do_not_make_results_order_dependent,
        check_begin_resets,
        check_does_not_alias_inputs,
        check_leaves_inputs_untouched,
        check_state_is_o_model,
        check_single_update_identity,
    ]
    report = ConformanceReport()
    if reference is None:
        report.skipped[check_streaming_matches_batch.__name__] = "no reference= given"
    else:
        checks.append(lambda f: check_streaming_matches_batch(f, reference))
        checks[-1].__name__ = check_streaming_matches_batch.__name__  # type: ignore[attr-defined]
    for check in checks:
        try:
            check(factory)
        except CheckSkipped as skip:
            report.skipped[check.__name__] = str(skip)
        except Exception as exc:  # a crash is a failure of the strategy, reported like one
            report.failed[check.__name__] = f"{type(exc).__name__}: {exc}"
        else:
            report.append(check.__name__)
    if report.failed:
        raise AssertionError(
            f"{len(report.failed)} of {len(checks)} conformance checks failed:\n" + report.summary()
        )
    return report


# -- batch references of the built-ins (float64, whole-stack, written independently) -----
def _stack(updates: Sequence[ClientUpdate], name: str) -> torch.Tensor:
    return torch.stack([u.delta[name].double() for u in updates])


def _mask_stack(updates: Sequence[ClientUpdate], name: str) -> torch.Tensor:
    return torch.stack(
        [
            (
                u.mask[name]
                if u.mask is not None
                else torch.ones_like(u.delta[name], dtype=torch.bool)
            ).double()
            for u in updates
        ]
    )


def _n(updates: Sequence[ClientUpdate], like: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([u.agg_weight for u in updates], dtype=torch.float64)
    return w.reshape((-1,) + (1,) * (like.dim() - 1))


def reference_fedavg(updates: Sequence[ClientUpdate], base: Mapping[str, torch.Tensor]) -> Weights:
    """Σ nΔ / Σ n."""
    out = {}
    for name, ref in base.items():
        d = _stack(updates, name)
        n = _n(updates, d)
        out[name] = ((n * d).sum(0) / n.sum()).to(ref.dtype)
    return out


def reference_fisher(
    updates: Sequence[ClientUpdate], base: Mapping[str, torch.Tensor], epsilon: float = 1e-6
) -> Weights:
    """Σ λF̃Δ / Σ λF̃ with F̃ = max(F/‖F‖, ε) inside the mask."""
    norms = [
        math.sqrt(sum(float(f.double().pow(2).sum()) for f in (u.fisher or {}).values()))
        for u in updates
    ]
    out = {}
    for name, ref in base.items():
        d = _stack(updates, name)
        m = _mask_stack(updates, name)
        f = torch.stack(
            [u.fisher[name].double() / nrm for u, nrm in zip(updates, norms, strict=True)]
        )  # type: ignore[index]
        ft = f.clamp(min=epsilon) * m * _n(updates, d)
        den = ft.sum(0)
        out[name] = torch.where(den > 0, (ft * d).sum(0) / den, 0.0).to(ref.dtype)
    return out


def reference_mask_aligned(
    updates: Sequence[ClientUpdate],
    base: Mapping[str, torch.Tensor],
    sign_election: bool = False,
    min_votes: int = 1,
) -> Weights:
    """Σ nmΔ / Σ nm, optionally over sign-agreeing entries, with min_votes."""
    out = {}
    for name, ref in base.items():
        d = _stack(updates, name)
        m = _mask_stack(updates, name)
        n = _n(updates, d)
        votes = m.sum(0)
        if sign_election:
            s = torch.sign((n * m * d).sum(0))
            m = m * (torch.sign(d) == s).double() * (s != 0).double()
        w = (n * m).sum(0)
        step = torch.where(w > 0, (n * m * d).sum(0) / w.clamp(min=1e-300), 0.0)
        out[name] = torch.where(votes >= min_votes, step, 0.0).to(ref.dtype)
    return out


def reference_median(updates: Sequence[ClientUpdate], base: Mapping[str, torch.Tensor]) -> Weights:
    """Coordinate-wise median (numpy semantics: mean of the middle two)."""
    return {
        name: torch.from_numpy(
            __import__("numpy").median(_stack(updates, name).numpy(), axis=0)
        ).to(ref.dtype)
        for name, ref in base.items()
    }


def reference_trimmed_mean(
    updates: Sequence[ClientUpdate], base: Mapping[str, torch.Tensor], beta: float = 0.1
) -> Weights:
    """Coordinate-wise mean after dropping ⌊βK⌋ values from each end."""
    k = len(updates)
    cut = math.floor(beta * k)
    out = {}
    for name, ref in base.items():
        s = _stack(updates, name).sort(0).values
        out[name] = s[cut : k - cut].mean(0).to(ref.dtype)
    return out


def reference_multi_krum(
    updates: Sequence[ClientUpdate], base: Mapping[str, torch.Tensor], f: int = 1, m: int = 0
) -> Weights:
    """Unweighted mean of the m lowest Krum scores (pairwise distances, computed directly)."""
    k = len(updates)
    flat = [torch.cat([u.delta[n].double().reshape(-1) for n in base]) for u in updates]
    closest = min(max(1, k - f - 2), k - 1)
    scores = []
    for i in range(k):
        d = sorted(float(((flat[i] - flat[j]) ** 2).sum()) for j in range(k) if j != i)
        scores.append(sum(d[:closest]))
    keep = min(k, max(1, m or k - f))
    chosen = sorted(range(k), key=lambda i: (scores[i], updates[i].node_id))[:keep]
    return {
        name: _stack([updates[i] for i in chosen], name).mean(0).to(ref.dtype)
        for name, ref in base.items()
    }
