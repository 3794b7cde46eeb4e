"""Distributed DP under SecAgg+: Skellam noise, its exact accounting, dropouts, the ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fedcommons.errors import PrivacyBudgetExceededError, PrivacyConfigError, RoundFailedError
from fedcommons.privacy.accounting import RDP_ORDERS
from fedcommons.privacy.config import CentralDPConfig
from fedcommons.privacy.distributed import (
    SkellamMean,
    calibrate,
    epsilon_from_rdp,
    norm_bound,
    recompute_epsilons,
    ring_bits_for,
    skellam_noise,
    skellam_rdp,
    skellam_tail,
)
from fedcommons.privacy.line import LinePrivacy
from fedcommons.privacy.secagg import ClientSession, RingSpec, RoundParams, ServerSession
from fedcommons.privacy.secagg.quantize import clip_l2_and_round, dequantize, to_ring
from fedcommons.strategies import FedAvg


def _skellam_round(n: int, drop: tuple[int, ...], variance: float, seed: int = 0):
    """One SecAgg+ round whose clients add Skellam noise; the sum and the pre-noise codes."""
    d, levels, clip = 2000, (1 << 15) - 1, 1.0
    bits = ring_bits_for(n, levels, d, variance)
    ring = RingSpec(bits=bits, levels=levels, clip=clip, max_weight=1, aux=1)
    params = RoundParams("ddp", 1, n, 0, (2 * n) // 3 + 1, 3, ring, d)
    rng = np.random.default_rng(seed)
    clients = {i: ClientSession(params, i) for i in range(1, n + 1)}
    server = ServerSession(params)
    for i, c in clients.items():
        server.add_advertise(i, c.advertise())
    for i, req in server.share_keys_requests().items():
        server.add_shares(i, clients[i].share_keys(req))
    clean = np.zeros(d, dtype=np.int64)
    for i, req in server.masked_input_requests().items():
        if i in drop:
            continue
        codes, _ = clip_l2_and_round(
            rng.normal(0, 0.05, d), ring, clip, norm_bound=norm_bound(levels, d), rng=rng
        )
        clean += codes
        noised = codes + skellam_noise(d, variance, rng)
        server.add_masked(i, clients[i].masked_input(req, to_ring(noised, 1, [1], ring)))
    for i, req in server.unmask_requests().items():
        server.add_unmask(i, clients[i].unmask(req))
    out = server.finish()
    _, aux = dequantize(out.total, ring)
    from fedcommons.privacy.secagg.quantize import signed

    total = signed(out.total, ring.bits)[:d]
    return total - clean, int(aux[0]), out.survivors


@pytest.mark.parametrize("drop", [(), (2, 5)])
def test_noise_in_the_unmasked_sum_is_skellam_of_the_survivors(drop: tuple[int, ...]) -> None:
    """10 clients add Skellam(μ_c = 400) (2 dropping): the unmasked sum minus the clean codes
    is integer noise whose variance is survivors·μ_c (chi-square interval, α = 1e-6), and the
    dropped clients' noise is missing from it."""
    noise, counted, survivors = _skellam_round(10, drop, 400.0)
    m = len(survivors)
    assert counted == m == 10 - len(drop)
    d = noise.size
    var = float(np.var(noise, ddof=1))
    lo, hi = stats.chi2.ppf([1e-6, 1 - 1e-6], d - 1) / (d - 1)
    assert lo * m * 400 <= var <= hi * m * 400
    assert abs(float(noise.mean())) < 6 * math.sqrt(m * 400 / d)


def test_skellam_noise_sums_to_skellam() -> None:
    """Closure under addition: 8 shares of variance 3 match one Skellam(24) (KS-like test on
    the pmf: chi-square over the central bins, p > 1e-6)."""
    rng = np.random.default_rng(1)
    parts = sum(skellam_noise(200_000, 3.0, rng) for _ in range(8))
    direct = skellam_noise(200_000, 24.0, rng)
    bins = np.arange(-20, 22)
    a, _ = np.histogram(parts, bins)
    b, _ = np.histogram(direct, bins)
    assert stats.chi2_contingency(np.stack([a, b]))[1] > 1e-6


def test_rounded_codes_never_exceed_the_norm_bound() -> None:
    """Conditional rounding: ‖q‖₂ ≤ Δ₂ for clipped, tiny and huge inputs (the sensitivity)."""
    ring = RingSpec(bits=40, levels=127, clip=0.5, max_weight=1, aux=1)
    rng = np.random.default_rng(2)
    bound = norm_bound(127, 4000)
    for scale in (1e-4, 0.01, 10.0):
        codes, _ = clip_l2_and_round(
            rng.normal(0, scale, 4000), ring, 0.5, norm_bound=bound, rng=rng
        )
        assert float(np.linalg.norm(codes)) <= bound


def test_rdp_is_the_published_bound_and_its_gaussian_part_matches_dp_accounting() -> None:
    """ε(α) = αΔ₂²/(2μ) + min(((2α−1)Δ₂² + 6Δ₁)/(4μ²), 3Δ₁/(2μ)) at every order; minus the
    discreteness term it equals dp-accounting's Gaussian RDP at z = √μ/Δ₂."""
    import dp_accounting as dpa
    from dp_accounting import rdp

    d2, d1, mu = 300.0, 9000.0, (1.3 * 300.0) ** 2
    got = skellam_rdp(d2, d1, mu)
    for a, value in zip(RDP_ORDERS, got, strict=True):
        want = a * d2**2 / (2 * mu) + min(
            ((2 * a - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
        )
        assert value == pytest.approx(want, rel=1e-12)
    acc = rdp.RdpAccountant(
        orders=list(RDP_ORDERS), neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    acc.compose(dpa.GaussianDpEvent(1.3), 1)
    surcharge = got - np.asarray(acc.rdp)
    assert (surcharge >= 0).all() and surcharge.max() < 1e-3


def test_ledger_epsilon_is_recomputed_by_an_auditor_from_the_entries(tmp_path: Path) -> None:
    """Three distributed rounds (one with dropouts) through LinePrivacy: each ledger entry's ε
    equals the auditor's recomputation (dp-accounting Gaussian term + formula, Opacus
    conversion) to 1e-9, the entries carry aggregates only, and the manifest states the
    distributed guarantee."""
    cfg = CentralDPConfig(
        noise_multiplier=1.0, clip_norm=1.0, epsilon=50.0, delta=1e-5, mechanism="skellam"
    )
    line = LinePrivacy(tmp_path, "ddp", cfg)
    line.check_plan(3)
    base = {"w": torch.zeros(1000)}
    for round_no, survivors in ((1, 10), (2, 8), (3, 10)):
        cal = calibrate(1.0, 1.0, (1 << 23) - 1, 1000, min_contributors=7)
        agg = line.start_round(round_no, FedAvg(), population=10, sampled=10, distributed=cal)
        agg.begin(base)
        agg.fold_sum({"w": torch.zeros(1000, dtype=torch.float64)}, survivors)
        agg.finalize()
        line.commit_round(accepted=survivors, rejected=0, timed_out=10 - survivors)
    entries = line.ledger.entries()
    recorded = [e["epsilon"] for e in entries]
    assert recompute_epsilons(entries, 1e-5) == pytest.approx(recorded, rel=1e-9)
    assert [e["contributors"] for e in entries] == [10, 8, 10]
    assert entries[1]["noise_variance"] == pytest.approx(8 * entries[1]["local_variance"])
    assert recorded[0] < recorded[1] < recorded[2]
    text = json.dumps(entries)
    assert '"node' not in text and 'client_spends": [{' not in text
    manifest = line.manifest_privacy()
    assert manifest["distributed"]["epsilon"] == recorded[-1]
    assert "against the coordinator" in manifest["guarantee"]


def test_calibration_holds_at_the_fewest_contributors_and_fewer_are_refused() -> None:
    """μ_c·m_min = (zΔ₂)²; a sum with fewer inputs than m_min is refused before release."""
    cal = calibrate(0.8, 1.0, 127, 5000, min_contributors=4)
    assert cal.local_variance * 4 == pytest.approx((0.8 * norm_bound(127, 5000)) ** 2)
    agg = SkellamMean(None, calibration=cal, expected_participants=6)
    agg.begin({"w": torch.zeros(3)})
    with pytest.raises(RoundFailedError, match="at least 4"):
        agg.fold_sum({"w": torch.zeros(3, dtype=torch.float64)}, 3)


def test_budget_refuses_a_round_the_worst_case_would_overspend(tmp_path: Path) -> None:
    """Input: budget ε = 1 and z = 0.5: the first round is refused before anything is sent."""
    cfg = CentralDPConfig(
        noise_multiplier=0.5, clip_norm=1.0, epsilon=1.0, delta=1e-5, mechanism="skellam"
    )
    line = LinePrivacy(tmp_path, "tight", cfg)
    line.check_plan(1)
    cal = calibrate(0.5, 1.0, 127, 1000, min_contributors=3)
    with pytest.raises(PrivacyBudgetExceededError, match="distributed Skellam"):
        line.start_round(1, FedAvg(), population=5, sampled=5, distributed=cal)
    assert not line.ledger.exists()


def test_skellam_needs_the_rdp_accountant() -> None:
    """Input: dp.mechanism = skellam with dp.accountant = prv."""
    with pytest.raises(PrivacyConfigError, match="accountant must be rdp"):
        CentralDPConfig(
            noise_multiplier=1.0,
            clip_norm=1.0,
            epsilon=5.0,
            delta=1e-5,
            mechanism="skellam",
            accountant="prv",
        )


def test_ring_holds_the_noised_sum_without_wrap_around() -> None:
    """The ring sized for 50 inputs: the Chernoff tail covers 10^6 Skellam draws, and the
    bound is tight (within 2x of the largest draw seen)."""
    variance = 50 * 2500.0
    tail = skellam_tail(variance, 1e-6)
    draws = skellam_noise(1_000_000, variance, np.random.default_rng(4))
    assert np.abs(draws).max() <= tail < 2 * np.abs(draws).max()
    bits = ring_bits_for(50, 127, 10_000, 2500.0)
    assert (1 << (bits - 1)) > 50 * 127 + tail


def test_epsilon_conversion_is_dp_accountings() -> None:
    """The runtime conversion is dp-accounting's compute_epsilon of the summed RDP."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    curve = 3 * skellam_rdp(100.0, 3000.0, 150.0**2)
    want, _ = compute_epsilon(list(RDP_ORDERS), curve, 1e-6)
    assert epsilon_from_rdp(curve, 1e-6)[0] == pytest.approx(want, rel=1e-12)
