"""Sampling on Flower's real engines: clients-per-round < nodes, 64-bit ids, with and without DP.

Also the served-files check of issue 14: after DP runs on the simulation engine, no node
id the engine assigned (read from the coordinator's private round log) appears in any
file under the registry.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fedcommons.privacy.disclosure import PrivateRoundLog
from fedcommons.releases.registry import Registry
from tests.conftest import BIN
from tests.processes import ProcessGroup, start_superlink, start_warm_nodes, submit_run

pytestmark = pytest.mark.slow

DP = ["--dp", "noise-multiplier=1.0", "--dp", "clip-norm=0.5", "--dp", "epsilon=30"]
# two noisy rounds need not beat the starting weights; what is tested here is sampling
DP += ["--dp", "delta=1e-5", "--first-release", "record"]


def _demo(registry: Path, env: dict[str, str], extra: list[str]) -> str:
    argv = [str(BIN / "fedcommons"), "demo", "--registry", str(registry), "--institutions", "10"]
    argv += ["--clients-per-round", "5", "--rounds", "2", "--local-epochs", "1", *extra]
    run = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _served_bytes(registry: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(registry.rglob("*")) if p.is_file()]


def test_demo_samples_5_of_10_simulated_institutions_and_dp_lines_serve_no_node_id(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """Demo on Flower's simulation engine: no DP, then DP with Poisson and fixed sampling."""
    private = tmp_path / "coordinator-private"
    env = {**flower_env, "FEDCOMMONS_COORDINATOR_DIR": str(private)}
    plain = tmp_path / "plain"
    _demo(plain, env, [])
    manifest = Registry(plain, create=False).releases()[0].manifest()
    assert [r["sampled"] for r in manifest.round_metrics] == [5, 5]
    assert [r["connected"] for r in manifest.round_metrics] == [10, 10]  # waited for all 10

    registry = tmp_path / "dp"
    assert "privacy" in _demo(registry, env, [*DP, "--dp", "sampling=poisson"])
    _demo(registry, env, [*DP, "--dp", "sampling=fixed"])
    releases = Registry(registry, create=False).releases()
    by_scheme = {r.manifest().config["dp.sampling"]: r.manifest() for r in releases}
    assert sorted(by_scheme) == ["fixed", "poisson"]
    assert "Poisson sampling q=0.5" in by_scheme["poisson"].privacy["guarantee"]
    assert "fixed-size samples of 5" in by_scheme["fixed"].privacy["guarantee"]
    central = by_scheme["fixed"].privacy["central"]
    assert central["population"] == 10 and central["sensitivity"] == 1.0  # 2C, C = 0.5
    assert central["rounds_accounted"] == 4

    # the node ids the engine really assigned, from the coordinator's private log
    records = list(PrivateRoundLog(private).records())
    ids = {int(n) for r in records for n in r["contributors"]}
    ids |= {int(s["node"]) for r in records for s in r.get("privacy", {}).get("client_spends", [])}
    dp_records = [r for r in records if "privacy" in r]
    assert len(dp_records) == 4 and ids and max(ids) > 2**32  # Flower's random 64-bit ids
    for path, data in _served_bytes(registry):
        for node in ids:
            assert str(node).encode() not in data, f"node {node} served in {path}"
            assert node.to_bytes(8, "little", signed=False) not in data, f"{node} in {path}"
    assert not (registry / "audit.jsonl").exists()  # a DP line's audit log stays private


def test_deployment_engine_samples_2_of_3_supernodes_with_and_without_dp(
    tmp_path: Path, flower_env: dict[str, str]
) -> None:
    """flower-superlink + 3 `client join` institutions; clients-per-round 2; plain, then DP."""
    group = ProcessGroup(tmp_path, flower_env)
    registry = tmp_path / "registry"
    try:
        link_port = start_superlink(group, BIN, tmp_path / "link.db")
        start_warm_nodes(group, BIN, link_port, 3)
        base = ["rounds=2", "clients-per-round=2", "population=3", "local-epochs=1"]
        base += ["task.num-partitions=3", f"registry={registry}", "node-wait-timeout=90"]
        base += [f"private-dir={tmp_path / 'private'}"]
        dp = ["dp.noise-multiplier=1.0", "dp.clip-norm=0.5", "dp.epsilon=30", "dp.delta=1e-5"]
        dp.append("gate-first-release=record")  # two noisy rounds: sampling is what is tested
        for name, extra in (("plain", []), ("dp", [*dp, "release-name=dpline"])):
            status = submit_run(BIN, flower_env, link_port, [*base, *extra], tmp_path)
            assert status["status"] == "finished:completed", name
        plain = Registry(registry, create=False).get("latest", name="digits").manifest()
        assert [r["sampled"] for r in plain.round_metrics] == [2, 2]
        assert [r["accepted"] for r in plain.round_metrics] == [2, 2]
        dp_release = Registry(registry, create=False).get("latest", name="dpline").manifest()
        assert dp_release.privacy["central"]["sample_rate"] == pytest.approx(2 / 3)
        assert dp_release.privacy["central"]["rounds_accounted"] == 2
    finally:
        group.stop_all()
    assert group.alive() == []
