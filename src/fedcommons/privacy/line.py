"""A release line's privacy state at the coordinator: budget checks, ledger, manifest field.

The coordinator's round loop calls, per round: :meth:`LinePrivacy.sample` (Poisson or
fixed-size sampling), :meth:`LinePrivacy.start_round` (refuses a round that would take the
line past its budget, before anything is sent, and returns the DP-FedAvg aggregator),
:meth:`LinePrivacy.add_client_spend` for each accepted reply that carries a client DP
spend, and :meth:`LinePrivacy.commit_round` (one ledger entry). :meth:`manifest_privacy`
is the manifest's ``privacy`` field.

The line's spend is the composition of *every* central-DP round its ledger records, over
all runs and releases of the line (a conservative reading of "the line's budget": every
published release is an output computed from the same users' data).

**Adjacency and population.** The guarantee is user-level: two federations are
neighbours when one institution, with its whole contribution (every update it would send
in every round), is added or removed. The population N is *declared* (run-config
``population``), never measured: the sampling rate q = clients-per-round / N and the
denominator W = q·N are public constants, so the released mean depends on the connected
nodes only through their clipped updates. Poisson sampling: sensitivity C, accounted as a
Poisson-subsampled Gaussian with rate q. Fixed-size sampling of k nodes: adding one
institution can swap it for another member of the sample, so the sensitivity is 2C (the
noise is calibrated to it) and no amplification is accounted (q = 1). Every round runs
to its release once sampled: neither ``min-clients`` nor retries condition the release on
how many institutions replied (see :func:`check_dp_round_policy`).

**What is published.** Ledger entries and the manifest carry only public mechanism
parameters and the composed ε, never a node id, a per-node figure or an un-noised count
(sampled, replied, rejected, clipped). Those stay in the coordinator's private state
(:attr:`LinePrivacy.private_round`, written by the coordinator outside the registry).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcommons.errors import ConfigError, PrivacyBudgetExceededError, PrivacyConfigError
from fedcommons.logs import get_logger
from fedcommons.privacy.accounting import RDP_ORDERS, Step, runtime_epsilon
from fedcommons.privacy.audits.seeded_bugs import active_bug
from fedcommons.privacy.central import DPFedAvg, poisson_sample, secret_rng
from fedcommons.privacy.client_spend import ClientSpend
from fedcommons.privacy.config import CentralDPConfig
from fedcommons.privacy.distributed import (
    MECHANISM as SKELLAM,
)
from fedcommons.privacy.distributed import (
    REFERENCE as SKELLAM_REFERENCE,
)
from fedcommons.privacy.distributed import (
    SkellamMean,
    SkellamRound,
    epsilon_from_rdp,
    line_rdp,
)
from fedcommons.privacy.ledger import (
    GENESIS,
    LEDGER_DIR,
    LEDGER_FILE,
    LedgerRecord,
    PrivacyLedger,
    ledger_path,
)
from fedcommons.strategies.base import Aggregator

LEDGER_SCHEMA = 2
#: The neighbouring relation every central-DP guarantee of fedcommons is stated for.
ADJACENCY = "add-or-remove-one-institution"


#: Mechanisms whose rounds the ledger accounts (a line keeps the one it started with).
DP_MECHANISMS = ("dp-fedavg", SKELLAM)


def skellam_epsilon(entries: list[dict[str, Any]], delta: float, extra: SkellamRound | None = None):
    """Cumulative ε at ``delta`` of a line's Skellam rounds (plus ``extra``, not yet run)."""
    rdp = line_rdp(entries)
    if extra is not None:
        rdp = rdp + extra.rdp()
    if not rdp.any():
        return 0.0
    return epsilon_from_rdp(rdp, delta)[0]


def recompute_entry_epsilon(
    entry: Mapping[str, Any], records: list[LedgerRecord], cfg: CentralDPConfig
) -> dict[str, Any]:
    """``entry`` with its cumulative ε recomputed after ``records`` (a roll-forward append)."""
    out = dict(entry)
    earlier = [r.entry for r in records]
    if entry.get("mechanism") == "dp-fedavg":
        history = central_history(earlier)
        history.append((float(entry["noise_multiplier"]), float(entry["sample_rate"]), 1))
        out["epsilon"] = runtime_epsilon(history, cfg.delta, cfg.accountant)
    elif entry.get("mechanism") == SKELLAM:
        out["epsilon"] = skellam_epsilon(earlier, cfg.delta, SkellamRound.from_entry(entry))
    return out


def central_history(entries: list[dict[str, Any]]) -> list[Step]:
    """The accounting history ``(z, q, 1)`` of a ledger's central-DP entries."""
    return [
        (float(e["noise_multiplier"]), float(e["sample_rate"]), 1)
        for e in entries
        if e.get("mechanism") == "dp-fedavg"
    ]


@dataclass(frozen=True)
class RoundSample:
    """A round's sample: the node ids (Python ints), q and the expected participants W."""

    nodes: list[int]
    sample_rate: float
    expected: float


def public_sample_rate(
    central: CentralDPConfig | None, clients_per_round: int, population: int
) -> float:
    """q: Poisson rate clients-per-round / N (1 when 0 or ≥ N); 1 for fixed-size samples."""
    if central is None or central.sampling == "fixed":
        return 1.0
    k, n = clients_per_round, population
    return k / n if 0 < k < n else 1.0


def round_claim_config(
    central: CentralDPConfig | None,
    *,
    line: str,
    clients_per_round: int,
    population: int,
    rounds: int,
) -> dict[str, Any]:
    """The round-config keys that tell institutions the line's public mechanism.

    They keep them in their own receipts (:mod:`fedcommons.privacy.receipts`).
    """
    if central is None:
        return {}
    return {
        "dp-line": line,
        "dp-noise-multiplier": central.noise_multiplier,
        "dp-sample-rate": public_sample_rate(central, clients_per_round, population),
        "dp-delta": central.delta,
        "dp-rounds": rounds,
        "dp-sampling": central.sampling,
    }


def check_dp_round_policy(
    *, central: CentralDPConfig | None, population: int, min_clients: int, on_round_failure: str
) -> None:
    """Refuse round policies that would make a DP line's release depend on its sample.

    A declared population is required (q and W are public constants derived from it);
    ``min-clients`` > 1 and ``on-round-failure = retry`` are refused: both would release
    (or withhold, or re-draw) a round depending on how many institutions replied, an
    un-noised count the accountant does not model.
    """
    if central is None:
        return
    if population < 1:
        raise ConfigError(
            "central DP needs a declared population (run-config population = N, the number "
            "of institutions the line samples from): the sampling rate and the noise scale "
            "must not depend on how many nodes happen to be connected"
        )
    if min_clients > 1:
        raise ConfigError(
            f"min-clients = {min_clients} on a DP line would withhold a round's release when "
            "few institutions reply, an un-noised count the accountant does not model: use "
            "min-clients = 1 (the noise is calibrated to the expected participants W anyway)"
        )
    if on_round_failure == "retry":
        raise ConfigError(
            "on-round-failure = retry is refused on a DP line: a retry re-draws the sample "
            "until enough institutions reply, which conditions the release on the sample; "
            "every sampled round is released (and accounted) instead"
        )


@dataclass
class _Round:
    round_no: int
    population: int
    sampled: int
    sample_rate: float
    expected: float
    aggregator: DPFedAvg | SkellamMean | None
    client_spends: list[dict[str, Any]] = field(default_factory=list)


class LinePrivacy:
    """Privacy bookkeeping of one release line in one registry (see the module docstring)."""

    def __init__(
        self,
        registry_root: Path,
        line: str,
        central: CentralDPConfig | None,
        *,
        rng: np.random.Generator | None = None,
        noise_seed: int | None = None,
        clients_per_round: int = 0,
        population: int = 0,
    ) -> None:
        self.registry_root = Path(registry_root)
        self.line = line
        self.central = central
        #: Declared population N and clients per round (the public sampling parameters).
        self.population = int(population)
        self.clients_per_round = int(clients_per_round)
        #: The last committed round's operational record (node ids, counts, client spends):
        #: for the coordinator's private state, never for a published file.
        self.private_round: dict[str, Any] = {}
        #: Nodes that reported a DP-SGD spend in this run (counted, never published by id).
        self.client_dp_nodes: set[int] = set()
        self.ledger = PrivacyLedger(ledger_path(self.registry_root, line))
        self._rng = rng
        self._noise_seed = noise_seed
        self._round: _Round | None = None
        self._planned_rounds = 0
        self._rounds_started = 0
        self.run_entries = 0
        #: Flower run id recorded in ledger entries (set by the coordinator).
        self.run_id = 0
        #: Durable runs (#8): ledger entries wait in :attr:`staged` until the coordinator
        #: commits the round (:meth:`append_staged`), so a round lost in a crash never
        #: leaves a ledger entry behind (its re-run would count ε twice).
        self.defer_ledger = False
        self.staged: list[Mapping[str, Any] | Callable[[list[LedgerRecord]], Mapping[str, Any]]]
        self.staged = []
        #: Name of the durable run, recorded in each ledger entry (set by the coordinator).
        self.run_name = ""
        #: The run's tag (what institutions' receipts name the run by; set by the coordinator).
        self.run_tag = ""

    def _append(
        self, entry: Mapping[str, Any] | Callable[[list[LedgerRecord]], Mapping[str, Any]]
    ) -> LedgerRecord:
        """Append now, or with :attr:`defer_ledger` stage the entry and return a preview."""
        if not self.defer_ledger:
            return self.ledger.append(entry)
        self.staged.append(entry)
        records = self.ledger.verify()
        content = dict(entry(records) if callable(entry) else entry)
        prev = records[-1].sha256 if records else GENESIS
        return LedgerRecord(len(records), prev, "", content)

    def append_staged(
        self, before_write: Callable[[LedgerRecord | None], None]
    ) -> LedgerRecord | None:
        """Append the staged entry (at most one per round), committing inside the lock.

        ``before_write`` gets the record about to be written (``None`` when the round has
        no ledger entry) and is where the coordinator commits the round; if it raises,
        nothing is appended. The ε of the entry is recomputed under the ledger's lock.
        """
        staged, self.staged = self.staged, []
        if len(staged) > 1:
            raise RuntimeError("more than one staged ledger entry for one round")
        if not staged:
            before_write(None)
            return None
        return self.ledger.append(staged[0], before_write=before_write)

    def resume_state(self) -> dict[str, int]:
        """What a durable run checkpoints of this object (ledger entries of the run)."""
        return {"run_entries": self.run_entries}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`resume_state` after a restart (the ledger itself is on disk).

        The whole-run budget check of the first :meth:`start_round` runs again, for the
        rounds that remain (:meth:`check_plan` is given those).
        """
        self.run_entries = int(state.get("run_entries", 0))

    # -- accounting -----------------------------------------------------------------
    def history(self) -> list[Step]:
        """Central-DP history of the whole line (verified ledger)."""
        return central_history(self.ledger.entries())

    def spent(self) -> float:
        """The line's cumulative ε at the configured δ (0 with no DP round yet)."""
        if self.central is None:
            return 0.0
        if self.central.distributed:
            return skellam_epsilon(self.ledger.entries(), self.central.delta)
        return runtime_epsilon(self.history(), self.central.delta, self.central.accountant)

    def check_plan(self, rounds: int) -> None:
        """At configuration time: refuse a run that cannot fit the line's budget.

        Refuses when the line is already exhausted or z = 0 (ε = ∞). q is a public
        constant (declared population), so the spend of every planned round is known now:
        a run whose ``rounds`` do not all fit is refused with the number that would.
        """
        self._planned_rounds = rounds
        if self.central is None:
            return
        cfg = self.central
        used = {e.get("mechanism") for e in self.ledger.entries()} & set(DP_MECHANISMS)
        if used - {cfg.mechanism}:
            raise PrivacyConfigError(
                f"line {self.line!r} was accounted with {sorted(used)}; it cannot switch to "
                f"dp.mechanism = {cfg.mechanism} (start a new line)"
            )
        history = self.history()
        spent = self.spent()
        if spent >= cfg.epsilon or cfg.noise_multiplier == 0:
            raise PrivacyBudgetExceededError(
                f"line {self.line!r} cannot run a central-DP round: spent ε={spent:.4g} of "
                f"budget ε={cfg.epsilon:g} at δ={cfg.delta:g}"
                + (" and z=0 gives ε=∞" if cfg.noise_multiplier == 0 else "")
            )
        if not cfg.distributed:
            rate = self.sample_rate
            planned = [*history, (cfg.noise_multiplier, rate, rounds)]
            eps = runtime_epsilon(planned, cfg.delta, cfg.accountant)
            if eps > cfg.epsilon:
                fit = self._rounds_that_fit(history, rate, rounds)
                scheme = (
                    f"Poisson sampling q={rate:.4g}"
                    if cfg.sampling == "poisson" and rate < 1
                    else "no amplification by sampling"
                )
                raise PrivacyBudgetExceededError(
                    f"{rounds} round(s) of DP-FedAvg (z={cfg.noise_multiplier:g}, {scheme}) would "
                    f"take line {self.line!r} to ε={eps:.4g} > budget ε={cfg.epsilon:g} at "
                    f"δ={cfg.delta:g}; {fit} round(s) fit"
                )

    def _rounds_that_fit(self, history: list[Step], rate: float, upto: int) -> int:
        assert self.central is not None
        cfg = self.central
        lo, hi = 0, upto
        while lo < hi:
            mid = (lo + hi + 1) // 2
            eps = runtime_epsilon(
                [*history, (cfg.noise_multiplier, rate, mid)], cfg.delta, cfg.accountant
            )
            if eps <= cfg.epsilon:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # -- the round ------------------------------------------------------------------
    @property
    def sample_rate(self) -> float:
        """q: Poisson rate clients-per-round / N (1 when 0 or ≥ N); 1 for fixed-size."""
        return public_sample_rate(self.central, self.clients_per_round, self.population)

    @property
    def expected_participants(self) -> float:
        """W, the public denominator: q·N (Poisson), k (fixed-size) or N (everyone)."""
        k, n = self.clients_per_round, self.population
        if self.central is not None and self.central.sampling == "fixed" and k > 0:
            return float(k)
        return float(self.sample_rate * n) if n else 1.0

    @property
    def sensitivity(self) -> float:
        """One institution's largest influence on the sum: C, or 2C for a fixed-size sample."""
        assert self.central is not None
        fixed_k = self.central.sampling == "fixed" and self.clients_per_round > 0
        return self.central.clip_norm * (2.0 if fixed_k else 1.0)

    def sample(self, nodes: list[int]) -> RoundSample:
        """Sample a round's nodes from a secret seed (see the module docstring).

        Poisson: each connected node independently with probability q. Fixed: the
        ``clients-per-round`` first of a secret permutation (every node when 0). Indices
        are drawn, never the ids: the ids stay Python ints.
        """
        assert self.central is not None
        rng = self._rng or secret_rng()
        ids = sorted(int(n) for n in nodes)
        if self.central.sampling == "poisson":
            chosen = poisson_sample(ids, self.sample_rate, rng)
        else:
            k = self.clients_per_round if 0 < self.clients_per_round < len(ids) else len(ids)
            chosen = sorted(ids[int(i)] for i in rng.permutation(len(ids))[:k])
        return RoundSample(chosen, self.sample_rate, self.expected_participants)

    def start_round(
        self,
        round_no: int,
        strategy: Aggregator,
        *,
        population: int,
        sampled: int,
        sample_rate: float = 1.0,
        expected: float | None = None,
        distributed: SkellamRound | None = None,
    ) -> Aggregator:
        """Refuse the round if it would exceed the budget; return the round's aggregator.

        Distributed DP (``dp.mechanism = skellam``) needs the round's ``distributed``
        calibration (noise at its fewest contributors: the worst case is checked).
        """
        if self.central is None:
            self._round = _Round(round_no, population, sampled, sample_rate, 0.0, None)
            return strategy
        cfg = self.central
        if cfg.distributed:
            return self._start_distributed(
                round_no,
                strategy,
                population,
                sampled,
                float(expected if expected is not None else sampled),
                distributed,
            )
        sample_rate, expected = self.sample_rate, self.expected_participants
        history = self.history()
        eps = runtime_epsilon(
            [*history, (cfg.noise_multiplier, sample_rate, 1)], cfg.delta, cfg.accountant
        )
        if eps > cfg.epsilon:
            spent = runtime_epsilon(history, cfg.delta, cfg.accountant)
            raise PrivacyBudgetExceededError(
                f"round {round_no} refused before it started: it would take line "
                f"{self.line!r} from ε={spent:.4g} to ε={eps:.4g}, past its budget "
                f"ε={cfg.epsilon:g} at δ={cfg.delta:g} (z={cfg.noise_multiplier:g}, "
                f"q={sample_rate:.4g})"
            )
        self._rounds_started += 1
        aggregator = DPFedAvg(
            strategy,
            noise_multiplier=cfg.noise_multiplier,
            clip_norm=cfg.clip_norm,
            sensitivity=self.sensitivity,
            expected_participants=expected,
            seed=None if self._noise_seed is None else self._noise_seed + round_no,
            seeded_bug=active_bug(self.registry_root),
        )
        self._round = _Round(round_no, population, sampled, sample_rate, expected, aggregator)
        return aggregator

    def _start_distributed(
        self,
        round_no: int,
        strategy: Aggregator,
        population: int,
        sampled: int,
        expected: float,
        calibration: SkellamRound | None,
    ) -> Aggregator:
        assert self.central is not None
        cfg = self.central
        if calibration is None:
            raise PrivacyConfigError("a distributed-DP round needs its Skellam calibration")
        entries = self.ledger.entries()
        spent = skellam_epsilon(entries, cfg.delta)
        eps = skellam_epsilon(entries, cfg.delta, calibration)
        if eps > cfg.epsilon:
            raise PrivacyBudgetExceededError(
                f"round {round_no} refused before it started: it would take line "
                f"{self.line!r} from ε={spent:.4g} to ε={eps:.4g}, past its budget "
                f"ε={cfg.epsilon:g} at δ={cfg.delta:g} (distributed Skellam, "
                f"z={cfg.noise_multiplier:g} at {calibration.min_contributors} contributors)"
            )
        if self._rounds_started == 0 and self._planned_rounds > 1:
            rdp = line_rdp(entries) + self._planned_rounds * calibration.rdp()
            eps_run = epsilon_from_rdp(rdp, cfg.delta)[0]
            if eps_run > cfg.epsilon:
                fit = 0
                while (
                    fit < self._planned_rounds
                    and epsilon_from_rdp(
                        line_rdp(entries) + (fit + 1) * calibration.rdp(), cfg.delta
                    )[0]
                    <= cfg.epsilon
                ):
                    fit += 1
                raise PrivacyBudgetExceededError(
                    f"run refused before round {round_no}: its {self._planned_rounds} rounds "
                    f"of distributed Skellam noise (z={cfg.noise_multiplier:g}) would take "
                    f"line {self.line!r} to ε={eps_run:.4g} > budget ε={cfg.epsilon:g} at "
                    f"δ={cfg.delta:g}; {fit} round(s) fit"
                )
        self._rounds_started += 1
        aggregator = SkellamMean(
            strategy, calibration=calibration, expected_participants=max(expected, 1.0)
        )
        self._round = _Round(round_no, population, sampled, 1.0, expected, aggregator)
        return aggregator

    def add_client_spend(self, node_id: int, spend: ClientSpend) -> None:
        """Record an institution's reported DP-SGD spend for the current round."""
        if self._round is not None:
            self._round.client_spends.append({"node": int(node_id), **spend.to_dict()})
            self.client_dp_nodes.add(int(node_id))

    def commit_round(
        self,
        *,
        accepted: int,
        rejected: int,
        timed_out: int,
    ) -> dict[str, Any] | None:
        """Append the round's ledger entry (central DP rounds only); return it.

        The entry holds public mechanism parameters and the composed ε only; the round's
        counts and the institutions' reported DP-SGD spends go to :attr:`private_round`.
        """
        current, self._round = self._round, None
        if current is None:
            return None
        if self.central is None and not current.client_spends:
            return None  # no DP in this round: nothing for the private record
        stats = current.aggregator.stats if current.aggregator is not None else None
        self.private_round = {
            "line": self.line,
            "run_id": int(self.run_id),
            "run_name": self.run_name,
            "round": current.round_no,
            "connected": current.population,
            "sampled": current.sampled,
            "participating": accepted,
            "rejected": rejected,
            "timed_out": timed_out,
            "clipped": getattr(stats, "clipped", None),
            "client_spends": current.client_spends,
        }
        if current.aggregator is None or self.central is None:
            return None
        cfg = self.central
        if stats is None:
            raise RuntimeError("commit_round before the aggregator was finalized")
        entry: dict[str, Any] = {
            "schema": LEDGER_SCHEMA,
            "line": self.line,
            "run_id": int(self.run_id),
            "run_tag": self.run_tag,
            "round": current.round_no,
            "adjacency": ADJACENCY,
            "population": self.population,
            "clients_per_round": self.clients_per_round,
        }
        if self.run_name:
            entry["run_name"] = self.run_name
        if isinstance(current.aggregator, SkellamMean):
            return self._commit_distributed(current, entry)
        entry |= {
            "mechanism": "dp-fedavg",
            "sampling": cfg.sampling,
            "amplification": cfg.sampling == "poisson" and current.sample_rate < 1,
            "sample_rate": current.sample_rate,
            "expected_participants": stats.expected_participants,
            "denominator": stats.denominator,
            "noise_multiplier": cfg.noise_multiplier,
            "clip_norm": cfg.clip_norm,
            "sensitivity": stats.sensitivity,
            "noise_std": stats.noise_std,
            "effective_noise_multiplier": stats.effective_noise_multiplier,
            "accountant": f"opacus-{cfg.accountant}",
            "delta": cfg.delta,
            "budget_epsilon": cfg.epsilon,
        }
        return self._append_round(
            current,
            entry,
            effective_noise_multiplier=round(stats.effective_noise_multiplier, 6),
            fraction_clipped=round(stats.fraction_clipped, 4),
            participating=accepted,
            sampled=current.sampled,
        )

    def _append_round(
        self, current: _Round, entry: dict[str, Any], **log_fields: Any
    ) -> dict[str, Any]:
        """Append a DP round's entry with the line's cumulative ε, or refuse past the budget."""
        assert self.central is not None
        cfg = self.central

        def with_epsilon(records: list[LedgerRecord]) -> dict[str, Any]:
            # under the ledger's lock: rounds another coordinator committed meanwhile count
            out = recompute_entry_epsilon(entry, records, cfg)
            if out["epsilon"] > cfg.epsilon:
                raise PrivacyBudgetExceededError(
                    f"round {current.round_no} discarded before release: rounds committed "
                    f"concurrently on line {self.line!r} leave no budget for it "
                    f"(ε would be {out['epsilon']:.4g} > {cfg.epsilon:g})"
                )
            return out

        record = self._append(with_epsilon)
        self.run_entries += 1
        get_logger("fedcommons.privacy").info(  # looked up now: honours the current level
            "privacy.round",
            line=self.line,
            round=current.round_no,
            mechanism=entry["mechanism"],
            epsilon=round(record.entry["epsilon"], 6),
            delta=cfg.delta,
            budget=cfg.epsilon,
            **log_fields,
        )
        return record.entry

    def _commit_distributed(self, current: _Round, entry: dict[str, Any]) -> dict[str, Any]:
        """The ledger entry of a distributed-DP round (aggregate figures only)."""
        assert self.central is not None and isinstance(current.aggregator, SkellamMean)
        cfg = self.central
        stats = current.aggregator.stats
        if stats is None:
            raise RuntimeError("commit_round before the aggregator was finalized")
        done = stats.round
        entry.update(
            mechanism=SKELLAM,
            reference=SKELLAM_REFERENCE,
            sampling=cfg.sampling,
            amplification=False,  # the coordinator knows the sample: accounted with q = 1
            sample_rate=1.0,
            expected_participants=stats.expected_participants,
            denominator=stats.denominator,
            **done.to_dict(),
            accountant="skellam-rdp+dp-accounting",
            rdp_orders=f"{RDP_ORDERS[0]}..{RDP_ORDERS[-1]}",
            delta=cfg.delta,
            budget_epsilon=cfg.epsilon,
        )
        return self._append_round(
            current, entry, noise_variance=done.variance, contributors=done.contributors
        )

    # -- per release ----------------------------------------------------------------
    def manifest_privacy(self) -> dict[str, Any]:
        """The manifest's ``privacy`` field: the guarantee and the ledger it rests on.

        Aggregate and public only: no institution's identity or reported figure (each
        institution composes its own spend: ``fedcommons client receipt``).
        """
        if self.central is None:
            if not self.client_dp_nodes:
                return {}
            return {
                "client_dp": {"institutions": len(self.client_dp_nodes)},
                "guarantee": (
                    "no central DP: the release itself carries no user-level guarantee; "
                    f"{len(self.client_dp_nodes)} institution(s) trained with record-level "
                    "DP-SGD, each accounting its own spend (`fedcommons client receipt`)"
                ),
            }
        if not self.ledger.exists():
            return {}
        records = self.ledger.verify()
        if not records:
            return {}
        entries = [r.entry for r in records]
        out: dict[str, Any] = {
            "schema": LEDGER_SCHEMA,
            "ledger": f"{LEDGER_DIR}/{self.line}/{LEDGER_FILE}",
            "ledger_entries": len(records),
            "ledger_head_sha256": records[-1].sha256,
            # each entry's hash, signed with the manifest: an audit names the first
            # round of a ledger rewritten after publication, not only its last one
            "ledger_entry_sha256": [r.sha256 for r in records],
            "rounds_this_run": self.run_entries,
        }
        central = [e for e in entries if e.get("mechanism") == "dp-fedavg"]
        distributed = [e for e in entries if e.get("mechanism") == SKELLAM]
        if self.central is not None and self.central.distributed and distributed:
            cfg = self.central
            last = distributed[-1]
            out["distributed"] = {
                "mechanism": SKELLAM,
                "reference": SKELLAM_REFERENCE,
                "level": "user",
                "adjacency": ADJACENCY,
                "population": self.population,
                "epsilon": last["epsilon"],
                "delta": last["delta"],
                "accountant": last["accountant"],
                "rdp_orders": last["rdp_orders"],
                "rounds_accounted": len(distributed),
                "noise_multiplier": cfg.noise_multiplier,
                "clip_norm": cfg.clip_norm,
                "amplification_by_sampling": False,
                "budget": {"epsilon": cfg.epsilon, "delta": cfg.delta},
                "min_noise_variance_over_bound": min(
                    e["noise_variance"] / e["norm_bound"] ** 2 for e in distributed
                ),
            }
            out["guarantee"] = (
                f"user-level ({last['epsilon']:.4g}, {last['delta']:g})-DP for every "
                f"institution against the coordinator and anyone downstream, composed over "
                f"all {len(distributed)} distributed Skellam round(s) recorded for line "
                f"{self.line!r} (noise added by the institutions before secure aggregation, "
                f"z={cfg.noise_multiplier:g} at the fewest contributors a round can complete "
                f"with, C={cfg.clip_norm:g}, no amplification by sampling)"
            )
            return out
        if not central:
            return {}
        cfg = self.central
        last = central[-1]
        amplified = any(e.get("amplification") for e in central)
        out["central"] = {
            "mechanism": "dp-fedavg",
            "level": "user",
            "adjacency": ADJACENCY,
            "population": self.population,
            "clients_per_round": self.clients_per_round,
            "expected_participants": self.expected_participants,
            "sample_rate": self.sample_rate,
            "sensitivity": self.sensitivity,
            "epsilon": last["epsilon"],
            "delta": last["delta"],
            "accountant": last["accountant"],
            "rdp_orders": f"{RDP_ORDERS[0]}..{RDP_ORDERS[-1]}",
            "rounds_accounted": len(central),
            "noise_multiplier": cfg.noise_multiplier,
            "clip_norm": cfg.clip_norm,
            "sampling": cfg.sampling,
            "amplification_by_sampling": amplified,
            "retries": "refused: every sampled round is released and accounted",
            "budget": {"epsilon": cfg.epsilon, "delta": cfg.delta},
            "min_effective_noise_multiplier": min(e["effective_noise_multiplier"] for e in central),
        }
        out["guarantee"] = (
            f"user-level ({last['epsilon']:.4g}, {last['delta']:g})-DP for every institution "
            f"(neighbours: one institution and its whole contribution added or removed), "
            f"composed over all {len(central)} DP-FedAvg round(s) recorded for line "
            f"{self.line!r}; declared population {self.population}, "
            + (
                f"Poisson sampling q={self.sample_rate:.4g}, amplification accounted"
                if cfg.sampling == "poisson" and self.sample_rate < 1
                else (
                    f"fixed-size samples of {self.clients_per_round} (sensitivity 2C), no "
                    "amplification accounted"
                    if cfg.sampling == "fixed" and self.clients_per_round > 0
                    else "every institution each round, no amplification accounted"
                )
            )
            + (
                "; earlier rounds of the line as their ledger entries record"
                if len({(e.get("sampling"), e.get("sample_rate")) for e in central}) > 1
                else ""
            )
            + f" (z={cfg.noise_multiplier:g}, C={cfg.clip_norm:g}, accountant "
            f"{last['accountant']})"
        )
        return out


def model_card_section(privacy: dict[str, Any]) -> str:
    """The model card's "Privacy" section (Markdown) for a manifest's ``privacy`` field.

    The release registry's model-card writer (#5) includes this text verbatim.
    """
    if not privacy:
        return "## Privacy\n\nNo differential privacy was used to train this release.\n"
    lines = ["## Privacy", "", privacy.get("guarantee", ""), ""]
    if "ledger" not in privacy:
        return "\n".join(lines)
    central = privacy.get("central")
    if central:
        lines += [
            "| | |",
            "| --- | --- |",
            f"| mechanism | DP-FedAvg (McMahan et al. 2018), {central['level']}-level |",
            f"| ε at δ | {central['epsilon']:.6g} at {central['delta']:g} |",
            f"| budget | ε={central['budget']['epsilon']:g}, δ={central['budget']['delta']:g} |",
            f"| noise multiplier z, clip norm C | {central['noise_multiplier']:g}, "
            f"{central['clip_norm']:g} |",
            f"| sampling | {central['sampling']}"
            + (" (amplification accounted)" if central["amplification_by_sampling"] else "")
            + " |",
            f"| rounds accounted | {central['rounds_accounted']} |",
            f"| accountant | {central['accountant']} (orders {central['rdp_orders']}) |",
            "",
        ]
    distributed = privacy.get("distributed")
    if distributed:
        lines += [
            "| | |",
            "| --- | --- |",
            f"| mechanism | distributed Skellam noise under SecAgg+ ({distributed['reference']}),"
            f" {distributed['level']}-level |",
            f"| ε at δ | {distributed['epsilon']:.6g} at {distributed['delta']:g} |",
            f"| budget | ε={distributed['budget']['epsilon']:g}, "
            f"δ={distributed['budget']['delta']:g} |",
            f"| noise multiplier z, clip norm C | {distributed['noise_multiplier']:g}, "
            f"{distributed['clip_norm']:g} |",
            "| sampling | no amplification accounted (the coordinator knows the sample) |",
            f"| rounds accounted | {distributed['rounds_accounted']} |",
            f"| accountant | {distributed['accountant']} (orders {distributed['rdp_orders']}) |",
            "",
        ]
    if central and "adjacency" in central:
        lines += [
            f"Neighbouring federations differ by one institution and its whole contribution "
            f"({central['adjacency']}); the population is the {central['population']} "
            f"institution(s) the operator declared, and the per-round expected participants "
            f"W = {central['expected_participants']:g} is fixed before each round. Which "
            "institutions took part, how many replied and any per-institution figure are not "
            "published: they would not be covered by the noise. Institutions that trained "
            "with record-level DP-SGD keep their own receipts (`fedcommons client receipt`).",
            "",
        ]
    lines += [
        f"Ledger: `{privacy['ledger']}` ({privacy['ledger_entries']} entries, head "
        f"`{privacy['ledger_head_sha256'][:16]}…`). Recompute with "
        "`fedcommons audit ledger <version>`.",
        "",
    ]
    return "\n".join(lines)
